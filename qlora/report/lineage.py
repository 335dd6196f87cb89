"""Where the run came from, for the report: dvc.lock's hashes and params, git, packages,
and the differences to an earlier revision (`qlora report --compare REV`)."""

from __future__ import annotations

import json
import platform
import subprocess
from pathlib import Path
from typing import Any

import yaml

from qlora.core import paths
from qlora.core.io import StageError
from qlora.core.lineage import differences, git_state, package_versions
from qlora.schemas.base import validated
from qlora.schemas.metrics import EvalMetrics


def _nest(flat: dict) -> dict:
    """dvc.lock records params as dotted keys ("base.trust_remote_code"): nest them back."""
    out: dict = {}
    for key, value in flat.items():
        *parents, leaf = str(key).split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = _merge(node[leaf], value) if isinstance(node.get(leaf), dict) else value
    return out


def _merge(a: dict, b: Any) -> Any:
    if not isinstance(b, dict):
        return b
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(out.get(k), dict) else v
    return out


def dvc_lineage(root: Path) -> dict:
    """Hashes of the data and model outputs and the params each stage ran with (dvc.lock)."""
    result: dict[str, Any] = {"artifacts": [], "inputs": [], "params": None, "notes": []}
    path = root / "dvc.lock"
    try:
        lock = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        lock = None
        result["notes"].append(
            "dvc.lock not found: run the pipeline with `dvc repro` to record the hashes of "
            "its data and models"
        )
    except (OSError, yaml.YAMLError) as e:
        lock = None
        result["notes"].append(f"dvc.lock could not be read ({e.__class__.__name__}): no hashes")
    stages = lock.get("stages") if isinstance(lock, dict) else None
    if not isinstance(stages, dict):
        if lock is not None:
            result["notes"].append("dvc.lock has no stages: no hashes")
        return result
    produced, deps, params = set(), {}, {}
    for name, stage in stages.items():
        for out in stage.get("outs") or []:
            produced.add(out.get("path"))
            result["artifacts"].append({"stage": name, **out})
        for dep in stage.get("deps") or []:
            deps.setdefault(dep.get("path"), dep)
        for file_params in (stage.get("params") or {}).values():
            if isinstance(file_params, dict):
                params = _merge(params, _nest(file_params))
    # Inputs from outside the DAG (raw data, eval task definitions); code files left out.
    result["inputs"] = [
        d for p, d in deps.items() if p not in produced and not str(p).endswith(".py")
    ]
    result["params"] = params or None
    # The report's own entry is written after it runs, so it is never expected here.
    absent = [s for s in _dag_stages(root) if s not in stages and s != "report"]
    if absent:
        result["notes"].append(
            f"dvc.lock has no entry for {', '.join(absent)} (not run through DVC yet): "
            "their hashes are not shown"
        )
    return result


def _dag_stages(root: Path) -> list[str]:
    try:
        dag = yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return []
    return list(dag.get("stages") or {}) if isinstance(dag, dict) else []


def lineage(root: Path) -> dict:
    dvc = dvc_lineage(root)
    params, source = dvc["params"], "dvc.lock (the values each stage ran with)"
    if params is None:
        try:
            params = yaml.safe_load((root / "params.yaml").read_text(encoding="utf-8"))
            source = "params.yaml (no dvc.lock: may differ from the values of the run)"
        except (OSError, yaml.YAMLError):
            params, source = None, "nowhere: no dvc.lock and no readable params.yaml"
    params_yaml = yaml.safe_dump(params, sort_keys=False, allow_unicode=True) if params else ""
    return {
        "git": git_state(root),
        "dvc": dvc,
        "params_yaml": params_yaml.strip(),
        "params_source": source,
        "packages": package_versions(),
        "host": f"{platform.system()} {platform.machine()}",
    }


def _git_show(rev: str, path: Path, root: Path) -> str | None:
    """The text of `path` at git revision `rev`; None when the revision lacks the file."""
    try:
        shown = subprocess.run(
            ["git", "show", f"{rev}:{path.as_posix()}"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise StageError(f"--compare {rev}: git is not available ({e})") from e
    if shown.returncode != 0:
        if "exists on disk, but not in" in shown.stderr or "does not exist in" in shown.stderr:
            return None
        raise StageError(f"--compare {rev}: cannot read {path} there: {shown.stderr.strip()}")
    return shown.stdout


def adapter_md5(outs: list[dict]) -> str | None:
    """The adapter directory's hash among dvc.lock outputs ({path, md5, ...} entries)."""
    return next((o.get("md5") for o in outs if o.get("path") == paths.ADAPTER_DIR.as_posix()), None)


def load_compare(rev: str, root: Path = Path(".")) -> dict:
    """The adapter's metrics at git revision `rev`, for a "vs previous" column, with what
    that run recorded of its machine and the hash of its adapter (dvc.lock), when it did."""
    path = paths.EVAL_METRICS
    text = _git_show(rev, path, root)
    if text is None:
        raise StageError(f"--compare {rev}: {path} is not in that revision")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise StageError(f"--compare {rev}: {path} there is not valid JSON ({e})") from e
    metrics = validated(EvalMetrics, data, f"{rev}:{path}")
    train = _git_show(rev, paths.TRAIN_RUN, root)
    lock = _git_show(rev, Path("dvc.lock"), root)
    try:
        environment = json.loads(train).get("environment") if train else None
        stages = (yaml.safe_load(lock) or {}).get("stages") or {} if lock else {}
    except (json.JSONDecodeError, yaml.YAMLError, AttributeError):
        environment, stages = None, {}
    outs = [o for stage in stages.values() for o in (stage.get("outs") or [])]
    return {
        "label": f"adapter @ {rev}",
        "rev": rev,
        "metrics": metrics.variants[paths.CANDIDATE].metrics,
        "environment": environment,
        "adapter_md5": adapter_md5(outs) if stages else None,
    }


def run_differences(train: dict, lineage_: dict, compare: dict) -> list[str]:
    """What differs between this run and the compared one: the machine fields that decide
    bit-reproducibility (qlora.core.lineage.environment) and the adapter's hash."""
    found = differences(train.get("environment"), compare.get("environment"))
    now, before = adapter_md5(lineage_["dvc"]["artifacts"]), compare.get("adapter_md5")
    if now and before and now != before:
        found.append(f"adapter ({before} → {now})")
    return found
