"""A sweep's leaderboard: every experiment's primary metric with its interval, the gate's
decision, training time and memory, read from `dvc exp show --json`; and the best one.

The best experiment is the one whose adapter the gate promoted with the best primary
value (the gate's direction for it); one the gate rejected never wins, whatever its score.
Repeats of one setting over `finetune.seed` are summed up as the training noise: the
spread of the primary metric between seeds, against which a difference between settings
can be read. Torch-free.
"""

from __future__ import annotations

import statistics
from typing import Any

from qlora.core import paths
from qlora.evaluation.gate import Z95, ci_half_width
from qlora.sweep.grid import Point

SEED_KEY = "finetune.seed"


def experiments_by_name(exp_show: list[dict]) -> dict[str, dict]:
    """{experiment name: its data} from `dvc exp show --json` (every baseline commit)."""
    found = {}
    for baseline in exp_show:
        for experiment in baseline.get("experiments") or []:
            name = experiment.get("name")
            revs = experiment.get("revs") or []
            if name and revs:
                found[name] = revs[0]
    return found


def _file(data: dict, kind: str, path) -> dict:
    entry = ((data.get(kind) or {}).get(str(path)) or {}).get("data")
    return entry if isinstance(entry, dict) else {}


def row(point: Point, keys: list[str], rev: dict | None, hint: str | None = None) -> dict[str, Any]:
    """One experiment's line of the leaderboard ("failed" when it left no results, with
    `hint`: where to look, by default the log of DVC's queue)."""
    base = {"name": point.name, "params": {k: point.value(k) for k in keys}}
    data = (rev or {}).get("data") or {}
    gate = _file(data, "metrics", paths.GATE_REPORT)
    metrics = _file(data, "metrics", paths.EVAL_METRICS)
    if rev is None or not gate or not metrics:
        why = hint or f"dvc queue logs {point.name}"
        return {**base, "status": "failed", "rev": (rev or {}).get("rev"), "hint": why}
    primary = gate.get("primary") or {}
    task, metric = primary.get("task"), primary.get("metric")
    adapter, base_entry = (
        (((metrics.get("variants") or {}).get(v) or {}).get("metrics") or {})
        .get(task, {})
        .get(metric)
        or {}
        for v in (paths.CANDIDATE, paths.BASELINE)
    )
    value, stderr = adapter.get("value", primary.get("adapter")), adapter.get("stderr")
    train = _file(data, "metrics", paths.TRAIN_METRICS).get("train") or {}
    evaluation = _file(data, "metrics", paths.TRAIN_METRICS).get("eval") or {}
    return {
        **base,
        "status": "done",
        "rev": rev.get("rev"),
        "primary": {
            "task": task,
            "metric": metric,
            "higher_is_better": primary.get("higher_is_better"),
            "value": value,
            "stderr": stderr,
            "interval": [value - Z95 * stderr, value + Z95 * stderr]
            if isinstance(value, int | float) and isinstance(stderr, int | float)
            else None,
            "base": primary.get("base"),
            "relative_change": primary.get("relative_change"),
            "change_ci95": change_interval(primary.get("change"), base_entry, adapter),
        },
        "decision": gate.get("decision"),
        "passed": bool(gate.get("passed")),
        "train_seconds": train.get("runtime_s"),
        "peak_memory_bytes": train.get("peak_memory_bytes"),
        "tokens_per_s": train.get("tokens_per_s"),
        "validation_loss": evaluation.get("loss"),
    }


def change_interval(change: Any, base: dict, adapter: dict) -> list[float] | None:
    """The gate's 95% interval of the adapter's change against the base, from both
    results' standard errors (`dvc exp show` drops the lists of gate.json, so it is
    rebuilt here with the gate's own rule)."""
    if not isinstance(change, int | float):
        return None
    if not all(isinstance(e.get("stderr"), int | float) for e in (base, adapter)):
        return None
    half = ci_half_width(base, adapter)
    return None if half is None else [change - half, change + half]


def _sort_key(r: dict) -> tuple:
    """Promoted first, then the better primary value, then the failed ones last."""
    if r["status"] != "done" or not isinstance(r["primary"]["value"], int | float):
        return (2, 0.0, r["name"])
    value = r["primary"]["value"]
    better = -value if r["primary"]["higher_is_better"] else value
    return (0 if r["passed"] else 1, better, r["name"])


def noise(rows: list[dict], keys: list[str]) -> list[dict[str, Any]]:
    """For each setting run over several seeds: the primary metric's mean and spread."""
    if SEED_KEY not in keys:
        return []
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["status"] == "done":
            setting = tuple((k, v) for k, v in r["params"].items() if k != SEED_KEY)
            groups.setdefault(setting, []).append(r)
    summary = []
    for setting, members in groups.items():
        values = [m["primary"]["value"] for m in members]
        if len(values) < 2:
            continue
        summary.append(
            {
                "params": dict(setting),
                "seeds": [m["params"][SEED_KEY] for m in members],
                "mean": statistics.fmean(values),
                "stdev": statistics.stdev(values),
                "min": min(values),
                "max": max(values),
                "passed": sum(m["passed"] for m in members),
            }
        )
    return summary


def build(
    sweep: str,
    points: list[Point],
    keys: list[str],
    exp_show: list[dict],
    hints: dict[str, str] | None = None,
) -> dict:
    """The leaderboard of a sweep: rows best first, the best experiment's name (None when
    the gate promoted none), and the seeds' noise. `hints`: per experiment, what to look at
    when it failed (a distributed member's flow run)."""
    found = experiments_by_name(exp_show)
    hints = hints or {}
    rows = sorted(
        (row(p, keys, found.get(p.name), hints.get(p.name)) for p in points), key=_sort_key
    )
    for rank, r in enumerate(rows, start=1):
        r["rank"] = rank
    best = next((r["name"] for r in rows if r["status"] == "done" and r["passed"]), None)
    done = [r for r in rows if r["status"] == "done"]
    primary = f"{done[0]['primary']['task']}/{done[0]['primary']['metric']}" if done else None
    return {
        "sweep": sweep,
        "keys": keys,
        "primary": primary,
        "experiments": len(points),
        "failed": [r["name"] for r in rows if r["status"] == "failed"],
        "best": best,
        "rows": rows,
        "noise": noise(rows, keys),
    }
