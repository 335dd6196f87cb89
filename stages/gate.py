"""Stage `gate`: does the adapter beat its base enough, without breaking anything else?

Compares the NF4 base + adapter against the NF4 base (same quantization, same evaluation
settings: the only difference is the adapter). The primary metric must gain at least
`gate.min_gain` (relative); every other metric may lose at most `gate.max_regression`
(relative). A rejection is a result, not a crash: the stage succeeds and the decision file
says "rejected" with every reason in plain words.
Output: reports/gate.json
"""

from __future__ import annotations

from pathlib import Path

from stages.io import StageError, read_json, run_stage, write_json
from stages.params import GateParams, load_params

METRICS = Path("reports/eval/metrics.json")
Z95 = 1.96  # two-sided 95% normal quantile
REPORT = Path("reports/gate.json")
BASELINE, CANDIDATE = "base_nf4", "adapter_nf4"


def relative_gain(base: float, new: float, higher_is_better: bool) -> float:
    """Improvement as a fraction of the base value, positive when `new` is better (the
    absolute change when the base is exactly 0, where a fraction has no meaning)."""
    change = (new - base) if higher_is_better else (base - new)
    return change / abs(base) if base else change


def ci_half_width(b: dict, c: dict) -> float | None:
    """Half width of the 95% interval of (adapter - base) from the two standard errors.
    Treats the two as independent: conservative, since both score the same examples."""
    if b.get("stderr") is None or c.get("stderr") is None:
        return None
    return Z95 * (b["stderr"] ** 2 + c["stderr"] ** 2) ** 0.5


def _metric_checks(metrics: dict, p: GateParams) -> list[dict]:
    base, cand = metrics["variants"][BASELINE]["metrics"], metrics["variants"][CANDIDATE]["metrics"]
    key = (p.primary.task, p.primary.metric)
    if p.primary.metric not in base.get(p.primary.task, {}):
        available = [f"{t}/{m}" for t, ms in base.items() for m in ms]
        raise StageError(
            f"gate.primary: {key[0]}/{key[1]} is not in {METRICS}; available: {available}"
        )
    checks = []
    for task, task_metrics in base.items():
        for name, b in task_metrics.items():
            c = cand.get(task, {}).get(name)
            if c is None or b.get("value") is None or c.get("value") is None:
                continue
            hib = bool(b.get("higher_is_better", True))
            gain = relative_gain(b["value"], c["value"], hib)
            half = ci_half_width(b, c)
            # Beyond noise: the 95% interval of the change excludes 0 (unknown without stderr).
            beyond_noise = None if half is None else abs(c["value"] - b["value"]) > half
            noise = "" if half is None else f" (95% interval of the change ±{half:.3g})"
            head = (
                f"{task}/{name} ({'higher' if hib else 'lower'} is better) went from "
                f"{b['value']:.4g} to {c['value']:.4g}: {gain:+.1%}{noise}"
            )
            if (task, name) == key:
                kind, threshold = "primary", p.min_gain
                passed = gain >= p.min_gain
                reason = f"{head}; required gain at least {p.min_gain:.1%}"
                if passed and p.significance and beyond_noise is False:
                    passed = False
                    reason += ", and the gain is within the noise"
            else:
                kind, threshold = "guard", -p.max_regression
                passed = gain >= -p.max_regression
                reason = f"{head}; allowed regression {p.max_regression:.1%}"
                if not passed and p.significance and beyond_noise is False:
                    passed = True  # a larger drop that is still within the noise
                    reason += ", exceeded but within the noise"
            checks.append(
                {
                    "task": task,
                    "metric": name,
                    "kind": kind,
                    "higher_is_better": hib,
                    "base": b["value"],
                    "adapter": c["value"],
                    "base_stderr": b.get("stderr"),
                    "adapter_stderr": c.get("stderr"),
                    "change": c["value"] - b["value"],
                    "relative_change": gain,
                    "threshold": threshold,
                    "ci95_half_width": half,
                    "beyond_noise": beyond_noise,
                    "passed": passed,
                    "reason": ("PASS: " if passed else "FAIL: ") + reason,
                }
            )
    return checks


def decide(metrics: dict, p: GateParams) -> dict:
    for variant in (BASELINE, CANDIDATE):
        if variant not in metrics.get("variants", {}):
            raise StageError(f"{METRICS}: no results for variant {variant!r}")
    checks = _metric_checks(metrics, p)
    primary = next(c for c in checks if c["kind"] == "primary")
    passed = all(c["passed"] for c in checks)
    failed = [c["reason"] for c in checks if not c["passed"]]
    summary = (
        f"PROMOTED: the adapter beats the {BASELINE} base on {primary['task']}/"
        f"{primary['metric']} by {primary['relative_change']:+.1%} and no other metric "
        f"regressed by more than {p.max_regression:.1%}."
        if passed
        else f"REJECTED: {len(failed)} of {len(checks)} checks failed."
    )
    return {
        "decision": "promoted" if passed else "rejected",
        "passed": passed,
        "summary": summary,
        "baseline": BASELINE,
        "candidate": CANDIDATE,
        "primary": {
            k: primary[k]
            for k in ("task", "metric", "base", "adapter", "change", "relative_change")
        }
        | {"higher_is_better": primary["higher_is_better"]},
        "thresholds": p.model_dump(),
        "checks": checks,
        "reasons": failed if failed else [c["reason"] for c in checks],
    }


def main() -> None:
    decision = decide(read_json(METRICS), load_params().gate)
    write_json(REPORT, decision)
    print(decision["summary"])
    for reason in decision["reasons"]:
        print(f"  - {reason}")


if __name__ == "__main__":
    run_stage("gate", main)
