"""Where the run came from, for the report: dvc.lock's hashes and params, git, packages,
and the differences to an earlier revision (`qlora report --compare REV`)."""

from __future__ import annotations

import json
import platform
import subprocess
from pathlib import Path
from typing import Any

import yaml

from qlora.core import dvc, paths
from qlora.core.io import StageError
from qlora.core.lineage import differences, git_state, package_versions
from qlora.schemas.base import validated
from qlora.schemas.metrics import EvalMetrics


def dvc_lineage(root: Path) -> dict:
    """Hashes of the data and model outputs and the params each stage ran with (dvc.lock).
    A missing or unreadable dvc.lock is a note on the page, not an error."""
    result: dict[str, Any] = {"artifacts": [], "inputs": [], "params": None, "notes": []}
    if not (root / dvc.LOCK).exists():
        result["notes"].append(
            "dvc.lock not found: run the pipeline with `dvc repro` to record the hashes of "
            "its data and models"
        )
        return result
    try:
        stages = dvc.read_lock(root)
    except StageError as e:
        result["notes"].append(f"{e}: no hashes")
        return result
    produced, deps = set(), {}
    for name, stage in stages.items():
        for out in stage.get("outs") or []:
            produced.add(out.get("path"))
            result["artifacts"].append({"stage": name, **out})
        for dep in stage.get("deps") or []:
            deps.setdefault(dep.get("path"), dep)
    # Inputs from outside the DAG (raw data, eval task definitions); code files left out.
    result["inputs"] = [
        d for p, d in deps.items() if p not in produced and not str(p).endswith(".py")
    ]
    result["params"] = dvc.params_run_with(stages) or None
    # The report's own entry is written after it runs, so it is never expected here.
    absent = [s for s in dvc.stage_names(root) if s not in stages and s != "report"]
    if absent:
        result["notes"].append(
            f"dvc.lock has no entry for {', '.join(absent)} (not run through DVC yet): "
            "their hashes are not shown"
        )
    return result


def lineage(root: Path) -> dict:
    dvc = dvc_lineage(root)
    params, source = dvc["params"], "dvc.lock (the values each stage ran with)"
    if params is None:
        try:
            params = yaml.safe_load((root / paths.PARAMS_FILE).read_text(encoding="utf-8"))
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


def _dvc_read(rev: str, path: Path, root: Path) -> str | None:
    """A DVC-cached output as it was at git revision `rev` (dvc.lock there names it; the
    local cache holds it); None when it cannot be had."""
    import dvc.api
    from dvc.exceptions import DvcException

    try:
        return dvc.api.read(path.as_posix(), repo=str(root), rev=rev, encoding="utf-8")
    except (DvcException, OSError, ValueError):
        return None


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
    train = _git_show(rev, paths.TRAIN_RUN, root) or _dvc_read(rev, paths.TRAIN_RUN, root)
    lock = _git_show(rev, dvc.LOCK, root)
    try:
        environment = json.loads(train).get("environment") if train else None
    except (json.JSONDecodeError, AttributeError):
        environment = None
    try:
        stages = dvc.parse_lock(lock, f"{rev}:{dvc.LOCK}") if lock else {}
    except StageError:
        stages = {}
    return {
        "label": f"adapter @ {rev}",
        "rev": rev,
        "metrics": metrics.variants[paths.CANDIDATE].metrics,
        "environment": environment,
        "adapter_md5": dvc.out_md5(stages, paths.ADAPTER_DIR),
    }


def run_differences(train: dict, lineage_: dict, compare: dict) -> list[str]:
    """What differs between this run and the compared one: the machine fields that decide
    bit-reproducibility (qlora.core.lineage.environment) and the adapter's hash."""
    found = differences(train.get("environment"), compare.get("environment"))
    now, before = adapter_md5(lineage_["dvc"]["artifacts"]), compare.get("adapter_md5")
    if now and before and now != before:
        found.append(f"adapter ({before} → {now})")
    return found
