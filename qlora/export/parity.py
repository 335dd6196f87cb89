"""The parity check: is an exported artifact as good as the NF4 + adapter it came from?

Torch-free, over two files the pipeline writes: reports/export/gguf_eval.json (each GGUF
artifact through the evaluation tasks under llama.cpp) and reports/eval/metrics.json (the
PyTorch variants). For every artifact, the primary metric (gate.primary) is compared with
the NF4 + adapter's: its relative loss may be at most export.parity.max_loss; with
export.parity.significance, a larger loss still passes while the 95% interval of the
difference (the gate's rule, from the two standard errors) includes no loss at all.
A failing artifact is reported and left out of `deployable`: the registry takes only the
deployable ones. Every other metric is shown beside, against the NF4 + adapter and the
in-engine 16-bit merged model, without a verdict: the gate judged those on the adapter.
"""

from __future__ import annotations

from qlora.core import paths
from qlora.core.io import StageError
from qlora.core.params import Params
from qlora.evaluation.gate import ci_half_width, relative_gain
from qlora.schemas.metrics import DIRECTIONS, higher_is_better

REFERENCE = paths.CANDIDATE  # the NF4 + adapter: what was trained, evaluated and gated


def judge(name: str, got: dict, ref: dict, max_loss: float, significance: bool) -> dict:
    """One artifact's primary metric against the NF4 + adapter's."""
    hib = higher_is_better(ref, got)
    if hib is None:
        raise StageError(f"parity: the primary metric has no direction for {name}")
    gain = relative_gain(ref["value"], got["value"], hib)
    loss = -gain
    half = ci_half_width(ref, got)
    relative_half = None if half is None else half / abs(ref["value"] or 1.0)
    beyond_noise = None if half is None else abs(got["value"] - ref["value"]) > half
    passed = loss <= max_loss
    reason = (
        f"{got['value']:.4g} against the NF4 + adapter's {ref['value']:.4g} "
        f"({DIRECTIONS[hib]}): {loss:+.1%} loss (limit {max_loss:.1%})"
        + (
            ""
            if relative_half is None
            else f", 95% interval of the difference ±{relative_half:.1%}"
        )
    )
    if not passed and significance:
        if beyond_noise is False:
            passed = True
            reason += ", exceeded but within the noise"
        elif beyond_noise is None:
            reason += ", no standard error: the significance rule could not be applied"
    return {
        "value": got["value"],
        "stderr": got.get("stderr"),
        "reference": ref["value"],
        "reference_stderr": ref.get("stderr"),
        "relative_loss": loss,
        "ci95_relative_half_width": relative_half,
        "beyond_noise": beyond_noise,
        "passed": passed,
        "reason": ("PASS: " if passed else "FAIL: ") + reason,
    }


def unbuilt(ref: dict, why: str) -> dict:
    """The verdict on an artifact the export could not build: failed, with the export's
    reason, and no score."""
    return {
        "value": None,
        "stderr": None,
        "reference": ref["value"],
        "reference_stderr": ref.get("stderr"),
        "relative_loss": None,
        "ci95_relative_half_width": None,
        "beyond_noise": None,
        "passed": False,
        "reason": f"FAIL: {why}",
    }


def table(references: dict[str, dict], artifacts: dict[str, dict]) -> list[dict]:
    """Every task/metric the NF4 + adapter has, with each model's value and stderr."""
    adapter = references[REFERENCE]
    rows = []
    for task, metrics in adapter.items():
        for metric, ref in metrics.items():
            values = {}
            for name, source in (*references.items(), *artifacts.items()):
                entry = source.get(task, {}).get(metric)
                if entry is not None:
                    values[name] = {"value": entry["value"], "stderr": entry.get("stderr")}
            rows.append(
                {
                    "task": task,
                    "metric": metric,
                    "higher_is_better": ref.get("higher_is_better"),
                    "values": values,
                }
            )
    return rows


def parity_report(gguf_eval: dict, eval_metrics: dict, params: Params) -> dict:
    """reports/export/parity.json: each artifact's verdict, the deployable list, the table."""
    variants = eval_metrics["variants"]
    if REFERENCE not in variants:
        raise StageError(f"{paths.EVAL_METRICS}: no {REFERENCE} variant to compare with")
    task, metric = params.gate.primary.task, params.gate.primary.metric
    ref = variants[REFERENCE]["metrics"].get(task, {}).get(metric)
    if ref is None:
        raise StageError(f"{paths.EVAL_METRICS}: {REFERENCE} has no {task}/{metric}")
    rules = params.export.parity
    verdicts = {}
    for name, artifact in gguf_eval["artifacts"].items():
        got = artifact["metrics"].get(task, {}).get(metric)
        if got is None:
            raise StageError(f"{paths.GGUF_EVAL}: {name} has no {task}/{metric}")
        verdicts[name] = judge(name, got, ref, rules.max_loss, rules.significance)
    for name, why in gguf_eval.get("failed", {}).items():
        verdicts[name] = unbuilt(ref, why)
    references = {n: variants[n]["metrics"] for n in (paths.REFERENCE, REFERENCE) if n in variants}
    deployable = [n for n, v in verdicts.items() if v["passed"]]
    return {
        "primary": {"task": task, "metric": metric},
        "reference": REFERENCE,
        "rules": rules.model_dump(),
        "artifacts": verdicts,
        "deployable": deployable,
        "summary": {"passed": len(deployable), "failed": len(verdicts) - len(deployable)},
        "table": table(references, {n: a["metrics"] for n, a in gguf_eval["artifacts"].items()}),
    }
