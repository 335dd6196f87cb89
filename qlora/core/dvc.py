"""DVC's records, read in one place: dvc.lock (what each stage ran with and wrote), the
stage names of dvc.yaml, and the commands that run `dvc status` and `dvc repro`.

Torch-free. The report shows dvc.lock's hashes, the registry refuses a promotion whose
records do not hold together, `qlora run` and the Prefect flow run DVC: all through this
module, so dvc.lock's layout and DVC's command line are spelled out once.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from qlora.core.io import StageError, atomic_write_bytes, pipeline_env

LOCK = Path("dvc.lock")
DAG = Path("dvc.yaml")
STATUS_TIMEOUT_S = 900


def command(*args: str) -> list[str]:
    """`dvc ARGS...` run by this interpreter's DVC (the one installed beside the pipeline),
    not whatever `dvc` comes first on PATH."""
    return [sys.executable, "-m", "dvc", *args]


def parse_lock(text: str, where: Path | str = LOCK) -> dict[str, dict]:
    """dvc.lock's stages ({name: {cmd, deps, params, outs}}), or a StageError naming the
    file when it is not a lock file."""
    try:
        lock = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise StageError(f"{where}: not valid YAML ({e.__class__.__name__})") from None
    stages = lock.get("stages") if isinstance(lock, dict) else None
    if not isinstance(stages, dict):
        raise StageError(f"{where}: has no stages")
    return stages


def read_lock(root: Path | str = ".") -> dict[str, dict]:
    """The stages of ROOT/dvc.lock (see parse_lock); a StageError when there is none."""
    path = Path(root) / LOCK
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise StageError(f"{path}: not found: run the pipeline (`qlora run`) first") from None
    except OSError as e:
        raise StageError(f"{path}: cannot be read ({e.__class__.__name__})") from None
    return parse_lock(text, path)


def lock_entry(stages: dict, stage: str, path: Path, kind: str) -> dict | None:
    """dvc.lock's entry for `path` among a stage's `kind` ("outs" or "deps"), if any."""
    entries = (stages.get(stage) or {}).get(kind) or []
    return next((e for e in entries if e.get("path") == path.as_posix()), None)


def lock_out(stages: dict, stage: str, path: Path) -> dict:
    """dvc.lock's entry for one output of a stage, which must carry its md5."""
    out = lock_entry(stages, stage, path, "outs")
    if out is None or not out.get("md5"):
        raise StageError(f"dvc.lock: the {stage} stage has no output {path} (with an md5)")
    return out


def out_md5(stages: dict, path: Path) -> str | None:
    """The md5 dvc.lock records for `path`, whichever stage wrote it; None without one."""
    for name in stages:
        if (out := lock_entry(stages, name, path, "outs")) is not None:
            return out.get("md5")
    return None


def _merge(a: dict, b: Any) -> Any:
    if not isinstance(b, dict):
        return b
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(out.get(k), dict) else v
    return out


def nested(flat: dict) -> dict:
    """dvc.lock records params as dotted keys ("base.trust_remote_code"): nest them back."""
    out: dict = {}
    for key, value in flat.items():
        *parents, leaf = str(key).split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = _merge(node[leaf], value) if isinstance(node.get(leaf), dict) else value
    return out


def params_run_with(stages: dict) -> dict:
    """Every param any stage ran with, nested as params.yaml writes them."""
    params: dict = {}
    for stage in stages.values():
        for file_params in (stage.get("params") or {}).values():
            if isinstance(file_params, dict):
                params = _merge(params, nested(file_params))
    return params


def stage_names(root: Path | str = ".") -> list[str]:
    """The stages dvc.yaml declares, in file order; [] when it cannot be read."""
    try:
        dag = yaml.safe_load((Path(root) / DAG).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return []
    return list(dag.get("stages") or {}) if isinstance(dag, dict) else []


def parse_status(text: str) -> dict:
    """`dvc status --json`'s object ({} when everything is up to date). Warnings may come
    before the JSON on a merged output; they are skipped."""
    start = text.find("{")
    if start < 0:
        return {}
    try:
        return json.loads(text[start:])
    except json.JSONDecodeError as e:
        raise StageError(f"`dvc status --json` printed no JSON ({e}): {text[:300]}") from None


def _run(root: Path | str, *args: str) -> str:
    """`dvc ARGS...` in `root` with the pipeline's environment: its stdout, or a StageError
    with DVC's own message."""
    done = subprocess.run(
        command(*args),
        cwd=root,
        capture_output=True,
        text=True,
        env=pipeline_env(),
        timeout=STATUS_TIMEOUT_S,
    )
    if done.returncode != 0:
        message = (done.stderr or done.stdout).strip()
        raise StageError(f"`dvc {args[0]}` failed in {root}: {message}")
    return done.stdout


def status(root: Path | str = ".", target: str | None = None) -> dict:
    """`dvc status --json` of `target` and every stage upstream of it (all stages without
    one): {} when the workspace is exactly what dvc.lock records."""
    upstream = ["--with-deps", target] if target else []
    return parse_status(_run(root, "status", "--json", *upstream))


def cached_outputs(root: Path | str = ".") -> dict[str, bool]:
    """Every output dvc.yaml declares (outs, metrics, plots): path -> whether DVC caches it
    (`cache: false` outputs are git's, yet the run cache keeps a copy of them too)."""
    dag = yaml.safe_load((Path(root) / DAG).read_text(encoding="utf-8"))
    found: dict[str, bool] = {}
    for stage in (dag.get("stages") or {}).values():
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind) or []:
                if not isinstance(entry, dict):  # a bare path: DVC's defaults
                    entry = {entry: {}}
                for path, options in entry.items():
                    found[str(path)] = (options or {}).get("cache", True)
    return found


def changed_outputs(state: dict) -> list[str]:
    """The outputs `dvc status --json` says are missing ("deleted") or differ from dvc.lock
    ("modified"); one only absent from the cache ("not in cache") is left alone."""
    changed = []
    for entries in state.values():
        for entry in entries:
            if isinstance(entry, dict):
                outs = entry.get("changed outs") or {}
                changed += [p for p, why in outs.items() if why in ("deleted", "modified")]
    return sorted(set(changed))


def restore_outputs(root: Path | str = ".") -> list[str]:
    """Put back, from the DVC cache, every stage output that is missing from the workspace
    or differs from what dvc.lock records: the last good run's results, after a stage that
    failed once DVC had deleted its outputs (they are not persistent, so that the run cache
    works). Only declared stage outputs are touched: the pipeline wrote them all.

    Cached outputs come back with `dvc checkout`; `cache: false` ones (the reports, kept in
    git) from the copy DVC's run cache made of them, by the md5 dvc.lock records. Returns the
    paths restored; a StageError names any that no cache holds."""
    from dvc.repo import Repo

    root = Path(root)
    lost = changed_outputs(status(root))
    if not lost:
        return []
    declared = cached_outputs(root)
    stages = read_lock(root)
    unknown = [p for p in lost if p not in declared]
    if unknown:
        raise StageError(f"not stage outputs of {DAG}: {', '.join(unknown)}")
    cached = [p for p in lost if declared[p]]
    if cached:
        _run(root, "checkout", "--force", *cached)
    caches = Repo(str(root)).cache
    missing = []
    for rel in (p for p in lost if not declared[p]):
        md5 = out_md5(stages, Path(rel))
        copies = [Path(c.oid_to_path(md5)) for c in (caches.local, caches.legacy)] if md5 else []
        copy = next((c for c in copies if c.is_file()), None)
        if copy is None:
            missing.append(rel)
            continue
        atomic_write_bytes(root / rel, copy.read_bytes())
    if missing:
        raise StageError(
            f"no copy in the DVC cache of {', '.join(missing)} (run before the run cache held "
            "it): `git checkout -- <path>` brings back a committed one"
        )
    return lost
