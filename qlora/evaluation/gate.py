"""The `gate` stage's library: does the adapter beat its base, breaking nothing else?

Compares the 4-bit base + adapter against the 4-bit base (same quantization, same evaluation
settings: the only difference is the adapter). The primary metric must gain at least
`gate.min_gain` (relative); every other metric may lose at most `gate.max_regression`
(or its own `gate.max_regression_per_metric`). A rejection is a result, not a crash: the
stage succeeds and the decision file says "rejected" with every reason in plain words.
A metric lm-eval gave no direction for cannot be the primary one (a clear error); as a
guard it is shown but not judged. With `gate.significance` on, a check whose standard
errors are missing says that the significance rule could not be applied.
Output: reports/gate.json (checked against GateDecision)

The champion/challenger half (`decide_vs_champion`, thresholds under `gate.champion`) runs
at promotion time, under the registry's lock (qlora/registry/store.py), not in this stage: the
champion is not a DVC dependency, and checking it here would let `dvc repro` keep a
decision made against a champion that has since changed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qlora.core import paths
from qlora.core.io import StageError
from qlora.core.params import GateParams
from qlora.schemas.base import validated
from qlora.schemas.gate import GateDecision, GatePrimary
from qlora.schemas.metrics import DIRECTIONS, EvalMetrics, higher_is_better

Z95 = 1.96  # two-sided 95% normal quantile
BASELINE, CANDIDATE = paths.BASELINE, paths.CANDIDATE


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


@dataclass(frozen=True)
class Rules:
    """One comparison's thresholds: the gate's against the base, or the champion's."""

    primary: tuple[str, str]
    min_gain: float
    max_regression: float
    significance: bool
    per_metric: dict[str, float] = field(default_factory=dict)

    @classmethod
    def against_base(cls, p: GateParams) -> Rules:
        primary = (p.primary.task, p.primary.metric)
        return cls(
            primary, p.min_gain, p.max_regression, p.significance, dict(p.max_regression_per_metric)
        )

    @classmethod
    def against_champion(cls, p: GateParams) -> Rules:
        # The per-metric limits (forgetting) hold against the champion too.
        c = p.champion
        primary = (p.primary.task, p.primary.metric)
        return cls(
            primary, c.min_gain, c.max_regression, c.significance, dict(p.max_regression_per_metric)
        )


def compare(reference: dict, candidate: dict, rules: Rules, where: str) -> list[dict]:
    """One check per metric of `reference` that `candidate` also has (both are
    {task: {metric: {value, stderr, higher_is_better}}}); `where` names the file for errors."""
    task_, metric_ = rules.primary
    for side, results in (("", reference), ("the candidate's results in ", candidate)):
        if metric_ not in results.get(task_, {}):
            available = [f"{t}/{m}" for t, ms in results.items() for m in ms]
            raise StageError(
                f"gate.primary: {task_}/{metric_} is not in {side}{where}; available: {available}"
            )
    if higher_is_better(reference[task_][metric_], candidate[task_][metric_]) is None:
        raise StageError(
            f"gate.primary: {task_}/{metric_} in {where} has no direction (lm-eval gave no "
            "higher_is_better for it), so its gain cannot be judged: choose a primary metric "
            "that has one"
        )
    unknown = [
        k
        for k in rules.per_metric
        if k.partition("/")[2] not in reference.get(k.partition("/")[0], {})
    ]
    if unknown:
        available = [f"{t}/{m}" for t, ms in reference.items() for m in ms]
        raise StageError(
            f"gate.max_regression_per_metric: {unknown} not in {where}; available: {available}"
        )
    checks = []
    for task, task_metrics in reference.items():
        for name, b in task_metrics.items():
            c = candidate.get(task, {}).get(name)
            if c is None or b.get("value") is None or c.get("value") is None:
                continue
            hib = higher_is_better(b, c)
            change = c["value"] - b["value"]
            half = ci_half_width(b, c)
            # Beyond noise: the 95% interval of the change excludes 0 (unknown without stderr).
            beyond_noise = None if half is None else abs(change) > half
            noise = "" if half is None else f" (95% interval of the change ±{half:.3g})"
            gain = None if hib is None else relative_gain(b["value"], c["value"], hib)
            head = (
                f"{task}/{name} ({DIRECTIONS[hib]}) went from "
                f"{b['value']:.4g} to {c['value']:.4g}"
                + ("" if gain is None else f": {gain:+.1%}")
                + noise
            )
            # Without both standard errors the significance rule cannot apply: say so.
            no_stderr = [who for who, e in (("base", b), ("adapter", c)) if e.get("stderr") is None]
            unapplied = (
                f", the significance rule could not be applied (no stderr for "
                f"{' and '.join(no_stderr)})"
                if rules.significance and half is None
                else ""
            )
            if (task, name) == rules.primary:
                kind, threshold = "primary", rules.min_gain
                passed = gain >= rules.min_gain
                reason = f"{head}; required gain at least {rules.min_gain:.1%}" + unapplied
                if passed and rules.significance and beyond_noise is False:
                    passed = False
                    reason += ", and the gain is within the noise"
            else:
                allowed = rules.per_metric.get(f"{task}/{name}", rules.max_regression)
                kind, threshold = "guard", -allowed
                if gain is None:
                    passed = None  # shown, not judged: neither better nor worse is known
                    reason = f"{head}; not judged: lm-eval gave no higher_is_better for this metric"
                else:
                    passed = gain >= -allowed
                    reason = f"{head}; allowed regression {allowed:.1%}" + unapplied
                    if not passed and rules.significance and beyond_noise is False:
                        passed = True  # a larger drop that is still within the noise
                        reason += ", exceeded but within the noise"
            verdict = {True: "PASS: ", False: "FAIL: ", None: "NOT JUDGED: "}[passed]
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
                    "change": change,
                    "relative_change": gain,
                    "threshold": threshold,
                    "ci95_half_width": half,
                    "ci95": None if half is None else (change - half, change + half),
                    "beyond_noise": beyond_noise,
                    "passed": passed,
                    "reason": verdict + reason,
                }
            )
    return checks


def _outcome(checks: list[dict]) -> tuple[bool, dict, list[str]]:
    # compare() raised already if the primary metric is missing on either side.
    primary = next(c for c in checks if c["kind"] == "primary")
    failed = [c["reason"] for c in checks if c["passed"] is False]
    return not failed, primary, failed


def decide(metrics: dict, p: GateParams) -> dict:
    """The gate: the 4-bit base + adapter against the 4-bit base of the same evaluation.
    `metrics` is metrics.json as read; the decision is checked against its schema."""
    variants = validated(EvalMetrics, metrics, paths.EVAL_METRICS).model_dump()["variants"]
    base, cand = variants[BASELINE]["metrics"], variants[CANDIDATE]["metrics"]
    checks = compare(base, cand, Rules.against_base(p), str(paths.EVAL_METRICS))
    passed, primary, failed = _outcome(checks)
    summary = (
        f"PROMOTED: the adapter beats the {BASELINE} base on {primary['task']}/"
        f"{primary['metric']} by {primary['relative_change']:+.1%} and no other metric "
        f"regressed by more than {p.max_regression:.1%}"
        + (" (or its own limit)." if p.max_regression_per_metric else ".")
        if passed
        else f"REJECTED: {len(failed)} of {len(checks)} checks failed."
    )
    decision = {
        "decision": "promoted" if passed else "rejected",
        "passed": passed,
        "summary": summary,
        "baseline": BASELINE,
        "candidate": CANDIDATE,
        "primary": {k: primary[k] for k in GatePrimary.model_fields},
        "thresholds": p.model_dump(),
        "checks": checks,
        "reasons": failed if failed else [c["reason"] for c in checks],
    }
    validated(GateDecision, decision, paths.GATE_REPORT)  # what gate.json promises
    return decision


def decide_vs_champion(
    candidate: dict, champion: dict | None, p: GateParams, champion_name: str | None = None
) -> dict:
    """Champion/challenger: the candidate's NF4 + adapter metrics against those recorded for
    the adapter in service, with `gate.champion`'s thresholds. No champion yet: passes."""
    if champion is None:
        reason = "PASS: there is no champion yet: nothing in service to compare with"
        return {
            "passed": True,
            "champion": None,
            "checks": [],
            "reasons": [reason],
            "summary": "no champion yet",
        }
    name = champion_name or "champion"
    where = f"the metrics recorded for {name}"

    def adapter_metrics(metrics: dict, source: str) -> dict:
        # Through the schema: a record of an older revision may use older variant names.
        checked = validated(EvalMetrics, metrics, source).model_dump()
        return checked["variants"][CANDIDATE]["metrics"]

    checks = compare(
        adapter_metrics(champion, where),
        adapter_metrics(candidate, str(paths.EVAL_METRICS)),
        Rules.against_champion(p),
        where,
    )
    passed, primary, failed = _outcome(checks)
    summary = (
        f"beats or equals {name} on {primary['task']}/{primary['metric']} "
        f"({primary['relative_change']:+.1%}) with no guard metric worse beyond the limits"
        if passed
        else f"not better than {name}: {len(failed)} of {len(checks)} checks failed"
    )
    return {
        "passed": passed,
        "champion": champion_name,
        "checks": checks,
        "reasons": failed if failed else [c["reason"] for c in checks],
        "summary": summary,
    }
