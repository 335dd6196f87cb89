"""The adapter registry: every promotion, why it was decided, and the "champion" alias.

A directory in the Hugging Face layout, not a service (README, "Promotion and the adapter
registry", says why):

    registry/
      index.jsonl   append-only events, one JSON object a line: "register" (a version, its
                    decision, whether it became champion) and "alias" (a rollback)
      v1/           the adapter as trained (adapter_config.json, adapter_model.safetensors,
                    base_identity.json), README.md (model card), lineage.json (git,
                    dvc.lock, params, metrics, decision): a hub model repository as it is
      .lock         held by whoever writes; the kernel frees it when its holder dies

A version is staged in a hidden directory, renamed into place, and only then does the one
line that registers it (and moves the alias) reach the index, in a single write. A promotion
killed at any point leaves either that line, and so a complete version, or no line: the next
writer deletes the unregistered files, and the champion never moved.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import yaml

from qlora import artifacts
from qlora.gate import decide_vs_champion
from qlora.io import StageError, pipeline_env, read_json, sha256_of
from qlora.params import load_params
from qlora.sources import settle_always_changed

REGISTRY_ENV = "QLORA_REGISTRY"
DEFAULT_DIR = Path("registry")
INDEX, LOCK, LINEAGE, CARD = "index.jsonl", ".lock", "lineage.json", "README.md"
ALIAS = "champion"
# From the torch-free artifacts module, so the registry starts without loading torch.
ADAPTER_DIR = artifacts.ADAPTER_DIR
METRICS = artifacts.EVAL_METRICS
GATE = artifacts.GATE_REPORT
# A promotion holds the lock for seconds (copying ~20 MB); ten minutes means a stuck peer.
LOCK_TIMEOUT_S = 600.0
_VERSION = re.compile(r"v(\d+)")


def default_dir() -> Path:
    return Path(os.environ.get(REGISTRY_ENV) or DEFAULT_DIR)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container user without a passwd entry
        return str(os.getuid())


class Registry:
    def __init__(self, root: Path | str | None = None) -> None:
        self.root = Path(root) if root is not None else default_dir()

    # ------------------------------------------------------------------ reading

    def events(self) -> list[dict]:
        path = self.root / INDEX
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return []
        # The last piece has no newline: a write cut short, never an event.
        events = []
        for n, line in enumerate(data.split(b"\n")[:-1], start=1):
            if not line.strip():
                continue
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise StageError(f"{path}: line {n} is not valid JSON ({e.msg})") from None
        return events

    def versions(self) -> dict[str, dict]:
        """Version -> its register event, oldest first."""
        return {e["version"]: e for e in self.events() if e.get("event") == "register"}

    def champion_history(self) -> list[str]:
        """The champions in order of appointment; a rollback to the one before pops."""
        stack: list[str] = []
        for e in self.events():
            if e.get("event") == "register" and e.get("champion"):
                stack.append(e["version"])
            elif e.get("event") == "alias" and e.get("alias") == ALIAS:
                if len(stack) >= 2 and stack[-2] == e["version"]:
                    stack.pop()
                else:
                    stack.append(e["version"])
        return stack

    def champion(self) -> str | None:
        history = self.champion_history()
        return history[-1] if history else None

    def record(self, version: str) -> dict:
        versions = self.versions()
        if version not in versions:
            known = ", ".join(versions) or "none"
            raise StageError(f"{self.root}: no version {version!r} (registered: {known})")
        return versions[version]

    def resolve(self, name: str) -> str:
        """A version, or the alias "champion" turned into one."""
        if name == ALIAS:
            champion = self.champion()
            if champion is None:
                raise StageError(f"{self.root}: no champion yet (`qlora promote` makes one)")
            return champion
        self.record(name)
        return name

    def path(self, version: str) -> Path:
        return self.root / version

    def lineage(self, version: str) -> dict:
        record = self.record(version)
        path = self.path(version) / LINEAGE
        if not path.is_file() or sha256_of(path) != record["lineage_sha256"]:
            raise StageError(f"{path}: missing or changed since {version} was registered")
        return read_json(path)

    def check_version(self, version: str) -> list[str]:
        """What is wrong with a version's files: missing, or changed since registration."""
        record = self.record(version)
        folder = self.path(version)
        problems = []
        for name, digest in {**record["files"], LINEAGE: record["lineage_sha256"]}.items():
            f = folder / name
            if not f.is_file():
                problems.append(f"{version}: {name} is missing")
            elif sha256_of(f) != digest:
                problems.append(f"{version}: {name} changed since it was registered")
        return problems

    def verify(self) -> list[str]:
        """Every problem of the registry: a version's files, a champion that cannot serve."""
        versions = self.versions()
        problems = [p for v in versions for p in self.check_version(v)]
        champion = self.champion()
        if champion is not None and versions.get(champion, {}).get("decision") != "promoted":
            problems.append(f"champion {champion} is not a promoted version")
        return problems

    # ------------------------------------------------------------------ writing

    @contextlib.contextmanager
    def writing(self) -> Iterator[Registry]:
        """Hold the registry's lock, after clearing what an interrupted writer left."""
        from filelock import FileLock, Timeout

        self.root.mkdir(parents=True, exist_ok=True)
        # No soft-lock fallback: a lock file left by a killed process would block forever.
        lock = FileLock(self.root / LOCK, timeout=LOCK_TIMEOUT_S, fallback_to_soft=False)
        try:
            with lock:
                self._recover()
                yield self
        except Timeout:
            raise StageError(
                f"{self.root / LOCK}: another promotion held the registry for "
                f"{LOCK_TIMEOUT_S:.0f} s; is one stuck?"
            ) from None

    def _recover(self) -> None:
        index = self.root / INDEX
        if index.exists():
            data = index.read_bytes()
            if data and not data.endswith(b"\n"):
                with index.open("r+b") as f:
                    f.truncate(data.rfind(b"\n") + 1)
        registered = set(self.versions())
        for child in self.root.iterdir():
            staged = child.name.startswith(".stage-")
            orphan = bool(_VERSION.fullmatch(child.name)) and child.name not in registered
            if child.is_dir() and (staged or orphan):
                shutil.rmtree(child)  # files of a promotion that never registered

    def _append(self, event: dict) -> None:
        data = (json.dumps(event, ensure_ascii=False, default=str) + "\n").encode()
        fd = os.open(self.root / INDEX, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)

    def move_alias(self, version: str, previous: str | None, action: str, reason: str) -> dict:
        """Point the champion alias at `version` (registered), away from `previous`, and
        record why. Call inside `writing()`."""
        self.record(version)
        event = {
            "event": "alias",
            "alias": ALIAS,
            "version": version,
            "previous": previous,
            "action": action,
            "reason": reason,
            "created": _now(),
            "by": _user(),
        }
        self._append(event)
        return event

    def next_version(self) -> str:
        numbers = [int(m[1]) for v in self.versions() if (m := _VERSION.fullmatch(v))]
        return f"v{max(numbers, default=0) + 1}"

    def add(
        self,
        version: str,
        adapter_dir: Path,
        texts: dict[str, str],
        event: dict,
        expected_md5: dict[str, str] | None = None,
    ) -> dict:
        """Copy the adapter and write `texts` (name -> content) as `version`, then append
        `event` (completed with the files' hashes). Copied files must have the md5 that
        `expected_md5` gives them (DVC's record of the adapter). Call inside `writing()`."""
        target = self.path(version)
        if target.exists():
            raise StageError(f"{target} exists but is registered: refusing to overwrite it")
        stage = self.root / f".stage-{version}-{os.getpid()}"
        stage.mkdir()
        try:
            for f in sorted(adapter_dir.iterdir()):
                if f.is_file() and f.name not in texts:
                    shutil.copy2(f, stage / f.name)
                    (stage / f.name).chmod(0o644)  # finetune writes private files
            changed = [
                name
                for name, md5 in (expected_md5 or {}).items()
                if name not in texts and _md5(stage / name) != md5
            ]
            if changed:
                raise StageError(
                    f"{adapter_dir}: {', '.join(changed)} changed while being registered "
                    "(is a run writing it?): nothing registered"
                )
            for name, text in texts.items():
                (stage / name).write_text(text, encoding="utf-8")
            files = {f.name: sha256_of(f) for f in sorted(stage.iterdir()) if f.name != LINEAGE}
            for f in stage.iterdir():
                with f.open("rb") as fh:
                    os.fsync(fh.fileno())
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        stage.rename(target)
        _fsync_dir(self.root)
        event = {**event, "files": files, "lineage_sha256": sha256_of(target / LINEAGE)}
        self._append(event)
        return event


def _md5(path: Path) -> str | None:
    if not path.is_file():
        return None
    h = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def dvc_manifest(root: Path, dir_md5: str | None) -> dict[str, str] | None:
    """File name -> md5 of a DVC-tracked directory, from the cache's .dir object (None when
    the cache does not have it, e.g. a clone that only pulled other outputs)."""
    if not dir_md5 or not dir_md5.endswith(".dir"):
        return None
    path = root / ".dvc/cache/files/md5" / dir_md5[:2] / dir_md5[2:]
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return {e["relpath"]: e["md5"] for e in entries}


def _fsync_dir(path: Path) -> None:
    """Make a rename durable: without it a crash can forget the new directory entry."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------- lineage


def stale_stages(root: Path, target: str = "gate") -> dict:
    """`dvc status` of `target` and every stage upstream of it: {} when the workspace is
    exactly what dvc.lock records."""
    cmd = [sys.executable, "-m", "dvc", "status", "--json", "--with-deps", target]
    done = subprocess.run(
        cmd, cwd=root, capture_output=True, text=True, env=pipeline_env(), timeout=900
    )
    if done.returncode != 0:
        raise StageError(f"`dvc status` failed in {root}: {(done.stderr or done.stdout).strip()}")
    try:
        status = json.loads(done.stdout or "{}")
    except json.JSONDecodeError:
        raise StageError(f"`dvc status --json` printed no JSON: {done.stdout[:300]}") from None
    return settle_always_changed(status, root)


def _lock_stages(root: Path) -> dict:
    path = root / "dvc.lock"
    try:
        lock = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StageError(f"{path}: not found: run the pipeline (`qlora run`) first") from None
    stages = lock.get("stages") if isinstance(lock, dict) else None
    missing = [s for s in ("finetune", "evaluate", "gate") if s not in (stages or {})]
    if missing:
        raise StageError(f"{path}: no entry for {', '.join(missing)}: run `qlora run` first")
    return stages


def evaluation_inputs(stages: dict) -> dict:
    """What the evaluate stage read besides the adapter (code, data, base, eval tasks) and
    its params. Two adapters' metrics compare only when these are equal."""
    trained = {o["path"] for o in stages["finetune"].get("outs") or []}
    deps = {
        d["path"]: d.get("md5") or d.get("hash")
        for d in stages["evaluate"].get("deps") or []
        if d["path"] not in trained
    }
    params = stages["evaluate"].get("params") or {}
    digest = hashlib.sha256(
        json.dumps({"deps": deps, "params": params}, sort_keys=True, default=str).encode()
    ).hexdigest()
    return {"fingerprint": digest, "deps": deps, "params": params}


def build_lineage(root: Path) -> dict:
    """Everything needed to rebuild the adapter: code, data and base hashes, params."""
    from qlora.lineage import git_state, package_versions

    stages = _lock_stages(root)
    adapter = next(
        (o for o in stages["finetune"].get("outs") or [] if o["path"] == ADAPTER_DIR.as_posix()),
        None,
    )
    if adapter is None:
        raise StageError(f"dvc.lock: the finetune stage has no output {ADAPTER_DIR}")
    identity = root / ADAPTER_DIR / "base_identity.json"
    return {
        "git": git_state(root),
        "adapter": {"path": adapter["path"], "dvc_md5": adapter.get("md5")},
        "base_weights_sha256": read_json(identity).get("weights_sha256")
        if identity.exists()
        else None,
        "evaluation": evaluation_inputs(stages),
        "params": yaml.safe_load((root / "params.yaml").read_text(encoding="utf-8")),
        "dvc_lock": stages,
        "packages": dict(package_versions()),
    }


def _differences(a: dict, b: dict) -> list[str]:
    out = [
        f"{path} ({a['deps'].get(path)} -> {b['deps'].get(path)})"
        for path in sorted(set(a["deps"]) | set(b["deps"]))
        if a["deps"].get(path) != b["deps"].get(path)
    ]
    if a["params"] != b["params"]:
        out.append("evaluate/quantize params")
    return out


# ---------------------------------------------------------------------- promote


def _vs_champion(reg: Registry, metrics: dict, lineage: dict, gate_params, ignore: bool) -> dict:
    champion = reg.champion()
    if champion is None:
        return decide_vs_champion(metrics, None, gate_params)
    if ignore:
        reason = f"SKIPPED: the comparison with champion {champion} (--ignore-champion)"
        return {
            "passed": True,
            "champion": champion,
            "checks": [],
            "reasons": [reason],
            "summary": f"not compared with {champion} (--ignore-champion)",
        }
    recorded = reg.lineage(champion)
    changed = _differences(recorded["evaluation"], lineage["evaluation"])
    if changed:
        reason = (
            f"FAIL: champion {champion} was evaluated on other inputs, so the metrics do not "
            f"compare: {'; '.join(changed)}. Promote with --ignore-champion to decide on the "
            "base gate alone"
        )
        return {
            "passed": False,
            "champion": champion,
            "checks": [],
            "reasons": [reason],
            "summary": f"not comparable with {champion}",
        }
    return decide_vs_champion(metrics, recorded["metrics"], gate_params, champion)


def promote(
    root: Path | str = ".", registry: Registry | None = None, ignore_champion: bool = False
) -> dict:
    """Register the workspace's adapter with its lineage and decision; move the champion
    alias to it when the gate passed and it is not worse than the champion. Returns the
    index event. Refuses (StageError, nothing written) a workspace that differs from
    dvc.lock: the lineage would not describe the files."""
    from qlora.model_card import render_card

    root = Path(root)
    reg = registry or Registry(root / default_dir())
    stale = stale_stages(root)
    if stale:
        raise StageError(
            "the workspace differs from dvc.lock (stale: "
            f"{', '.join(sorted(stale))}): run `qlora run` first, so that what is registered "
            "is what dvc.lock describes"
        )
    adapter_dir = root / ADAPTER_DIR
    if not (adapter_dir / "adapter_config.json").is_file():
        raise StageError(f"{adapter_dir}: no adapter_config.json (run the finetune stage)")
    gate, metrics = read_json(root / GATE), read_json(root / METRICS)
    params = load_params(root / "params.yaml")
    lineage = build_lineage(root)
    with reg.writing():
        vs = _vs_champion(reg, metrics, lineage, params.gate, ignore_champion)
        before = reg.champion()
        passed = bool(gate["passed"]) and vs["passed"]
        version = reg.next_version()
        failed = [r for r in gate["reasons"] + vs["reasons"] if r.startswith("FAIL")]
        if passed:
            summary = f"PROMOTED {version}: champion {before or 'none'} -> {version}"
        else:
            summary = f"REJECTED {version}: champion stays {before or 'none'}"
        decision = {
            "decision": "promoted" if passed else "rejected",
            "summary": summary,
            "champion_before": before,
            "gate": {k: gate[k] for k in ("decision", "summary", "reasons", "thresholds")},
            "vs_champion": vs,
            "reasons": failed or gate["reasons"] + vs["reasons"],
        }
        record = {
            "version": version,
            "created": _now(),
            "by": _user(),
            **lineage,
            "metrics": metrics,
            "decision": decision,
        }
        texts = {
            LINEAGE: json.dumps(record, indent=2, ensure_ascii=False, default=str) + "\n",
            CARD: render_card(record),
        }
        primary = gate["primary"]
        event = {
            "event": "register",
            "version": version,
            "created": record["created"],
            "by": record["by"],
            "git_commit": lineage["git"].get("commit"),
            "git_dirty": lineage["git"].get("dirty"),
            "decision": decision["decision"],
            "champion": passed,
            "summary": summary,
            "reasons": decision["reasons"],
            "primary": {
                "task": primary["task"],
                "metric": primary["metric"],
                "value": primary["adapter"],
                "base": primary["base"],
                "gain_over_base": primary["relative_change"],
            },
            "adapter_dvc_md5": lineage["adapter"]["dvc_md5"],
        }
        expected = dvc_manifest(root, lineage["adapter"]["dvc_md5"])
        return reg.add(version, adapter_dir, texts, event, expected)


def rollback(reg: Registry, version: str | None = None, reason: str = "") -> dict:
    """Move the champion alias back: to `version`, or to the champion before this one."""
    with reg.writing():
        history = reg.champion_history()
        if not history:
            raise StageError(f"{reg.root}: there is no champion to roll back")
        current = history[-1]
        if version is None:
            if len(history) < 2:
                raise StageError(
                    f"{current} was the first champion: there is none before it to roll back to"
                )
            version = history[-2]
        record = reg.record(version)
        if version == current:
            raise StageError(f"{version} is the champion already")
        if record["decision"] != "promoted":
            raise StageError(
                f"{version} was rejected ({'; '.join(record['reasons'][:2])}): only a "
                "version that passed its gate can serve"
            )
        broken = reg.check_version(version)
        if broken:
            raise StageError(f"cannot serve {version}: {'; '.join(broken)}")
        return reg.move_alias(version, previous=current, action="rollback", reason=reason)


def export_adapter(reg: Registry, version: str, out_dir: Path) -> Path:
    """Copy a registered version (adapter + card + lineage) to out_dir, checked first."""
    from qlora.io import atomic_dir

    broken = reg.check_version(version)
    if broken:
        raise StageError(f"{reg.path(version)}: {'; '.join(broken)}")
    with atomic_dir(out_dir) as tmp:
        shutil.copytree(reg.path(version), tmp, dirs_exist_ok=True)
    return out_dir
