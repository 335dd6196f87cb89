"""The report's sections built from the stages' outputs: the headline, the metric table,
the training curves and overfitting check, the data summary and the summary cards."""

from __future__ import annotations

import os
from pathlib import Path

from markupsafe import Markup

from qlora.core.paths import BASELINE, CANDIDATE, SPLITS, VARIANTS
from qlora.evaluation.generation import METRICS
from qlora.report.plots import Series, histogram, line_chart
from qlora.report.text import ARROWS, fmt, fmt_bytes, fmt_duration, fmt_gain, fmt_pct, num
from qlora.schemas.gate import GateDecision
from qlora.schemas.metrics import (
    EvalMetrics,
    MetricResult,
    VariantResult,
    higher_is_better,
)

# A validation loss this much (relative) above its best is a rise, not logging noise.
OVERFIT_TOLERANCE = 0.005


def metric_entry(variant: VariantResult, task: str, metric: str) -> MetricResult | None:
    return variant.metrics.get(task, {}).get(metric)


def headline(
    gate: GateDecision, variants: dict[str, VariantResult], generation_tasks: tuple[str, ...] = ()
) -> dict:
    """The decision and the primary metric's gain with its 95% interval, as the gate
    computed them (gate.json): the report shows the numbers the decision was made on.
    Beside it, the gate's checks of the generated answers' scores (of `generation_tasks`),
    unless one of them is the primary itself."""
    p = gate.primary
    generation = [
        c
        for c in gate.checks
        if c.task in generation_tasks and c.kind == "guard" and c.metric in METRICS
    ]
    if p.ci95 is None:
        ci_note = "n/a: lm-eval reports no standard error for this metric"
    elif p.beyond_noise:
        ci_note = "excludes 0: the change is larger than the noise"
    else:
        ci_note = "includes 0: the change is within the noise"
    return {
        "decision": gate.decision,
        "passed": gate.passed,
        "task": p.task,
        "metric": p.metric,
        "hib": p.higher_is_better,
        "base": p.base,
        "adapter": p.adapter,
        "change": p.change,
        "gain": p.relative_change,
        "ci": p.ci95,
        "ci_note": ci_note,
        "improved": None if not p.relative_change else p.relative_change > 0,
        "baseline_label": variants[BASELINE].label or BASELINE,
        "adapter_label": variants[CANDIDATE].label or CANDIDATE,
        "generation": generation,
    }


def metric_keys(eval_metrics: EvalMetrics) -> list[tuple[str, str]]:
    """(task, metric) pairs in the order of the evaluated tasks, then as first seen."""
    keys: list[tuple[str, str]] = []
    for name in VARIANTS:
        for task, metrics in eval_metrics.variants[name].metrics.items():
            keys.extend((task, m) for m in metrics if (task, m) not in keys)
    order = eval_metrics.settings.tasks
    return sorted(keys, key=lambda k: order.index(k[0]) if k[0] in order else len(order))


def metric_rows(eval_metrics: EvalMetrics, compare: dict | None) -> list[dict]:
    """Every metric for the three variants, the best value in each row marked, and how much
    of the full-precision score the 4-bit base keeps (direction-aware: for a loss, a higher
    4-bit value keeps less). A metric of unknown direction has neither: no guessing."""
    variants = eval_metrics.variants
    rows = []
    for task, metric in metric_keys(eval_metrics):
        entries = [metric_entry(variants[v], task, metric) for v in VARIANTS]
        hib = higher_is_better(*entries)
        cells = [e.model_dump() if e else {} for e in entries]
        values = [num(c.get("value")) for c in cells]
        present = [v for v in values if v is not None]
        best = (max if hib else min)(present) if present and hib is not None else None
        for c, v in zip(cells, values, strict=True):
            c["best"] = v is not None and v == best
        full, four_bit = values[0], values[1]
        kept_num, kept_den = (four_bit, full) if hib else (full, four_bit)
        kept = kept_num / kept_den if kept_num is not None and kept_den else None
        previous = None
        if compare is not None:
            entry = compare["metrics"].get(task, {}).get(metric)
            previous = entry.model_dump() if entry else {}
        rows.append(
            {
                "task": task,
                "metric": metric,
                "hib": hib,
                "cells": cells,
                "kept": None if hib is None else kept,
                "previous": previous,
            }
        )
    return rows


def overfitting(train_loss: list[dict], eval_loss: list[dict]) -> dict | None:
    """Validation loss rose from its best while training loss kept falling: a warning."""
    evals = [(e["step"], num(e.get("loss"))) for e in eval_loss if num(e.get("loss")) is not None]
    if len(evals) < 2:
        return None
    best_step, best = min(evals, key=lambda e: e[1])
    last_step, last = evals[-1]
    if last <= best * (1 + OVERFIT_TOLERANCE):
        return None
    # Means of a few logged points smooth per-batch noise in the training loss. A best at
    # step 0 (the untrained model) compares with the first points logged.
    losses = [(t["step"], num(t.get("loss"))) for t in train_loss if num(t.get("loss")) is not None]
    before = [v for s, v in losses if s <= best_step][-3:] or [v for _, v in losses][:3]
    after = [v for _, v in losses][-3:]
    if not before or sum(after) / len(after) >= sum(before) / len(before):
        return None
    return {
        "best": best,
        "best_step": best_step,
        "last": last,
        "last_step": last_step,
        "rise": last / best - 1,
        "train_before": sum(before) / len(before),
        "train_after": sum(after) / len(after),
    }


def training_charts(train_loss: list[dict], eval_loss: list[dict]) -> dict:
    def curve(rows: list[dict], key: str) -> list[tuple[float, float]]:
        return [(r["step"], num(r.get(key))) for r in rows if num(r.get(key)) is not None]

    loss = line_chart(
        [
            Series("train", curve(train_loss, "loss"), "s-train"),
            Series("validation", curve(eval_loss, "loss"), "s-eval", markers=True),
        ],
        title="Training and validation loss by optimizer step",
        x_label="step",
        y_label="loss",
    )
    lr = line_chart(
        [Series("learning rate", curve(train_loss, "learning_rate"), "s-lr")],
        title="Learning rate schedule",
        x_label="step",
        y_label="learning rate",
        width=360,
    )
    return {"loss": Markup(loss), "lr": Markup(lr)}


def data_section(dataset: dict, validation: dict, root: Path, out_html: Path) -> dict:
    tokens = dataset.get("tokens") or {}
    classes = {"train": "s-train", "validation": "s-eval", "test": "s-test"}
    splits = [
        {
            "split": s,
            "rows": (dataset.get("rows") or {}).get(s),
            "before_cap": (dataset.get("rows_before_cap") or {}).get(s),
            "groups": (dataset.get("groups") or {}).get(s),
            "median": sorted(tokens[s])[len(tokens[s]) // 2] if tokens.get(s) else None,
            "max": max(tokens[s]) if tokens.get(s) else None,
            "svg": Markup(
                histogram(
                    tokens.get(s) or [],
                    title=f"Token lengths, {s} split",
                    x_label="tokens per row",
                    css_class=classes[s],
                    upper=num(dataset.get("max_length")),
                )
            ),
        }
        for s in SPLITS
    ]
    # Data Docs path is relative to the repository root; the link must be relative to the
    # report so the pair can be moved or archived together.
    docs = validation.get("data_docs")
    docs_link = docs_found = None
    if docs:
        target = Path(docs) if Path(docs).is_absolute() else root / docs
        docs_link = Path(os.path.relpath(target, out_html.parent)).as_posix()
        docs_found = target.exists()
    checks = [c for c in validation.get("checks") or [] if isinstance(c, dict)]
    # Failures first, one row each; a check that passed on every split is one row, not three.
    passed: dict[str, dict] = {}
    for c in checks:
        if c.get("success"):
            row = passed.setdefault(str(c.get("name")), {**c, "split": []})
            row["split"].append(str(c.get("split", "")))
    rows = [c for c in checks if not c.get("success")]
    rows += [{**c, "split": ", ".join(c["split"])} for c in passed.values()]
    return {
        "splits": splits,
        "checks": checks,
        "check_rows": rows,
        "n_passed": sum(bool(c.get("success")) for c in checks),
        "valid": bool(validation.get("success")),
        "docs_link": docs_link,
        "docs_found": docs_found,
        "leaks": list(dataset.get("groups_in_two_splits") or []),
    }


def summary_cards(ctx: dict, inputs: dict) -> list[dict]:
    head, data, train = ctx["head"], ctx["data"], inputs["train"]
    quant, four_bit = inputs["quantize"], ctx["four_bit"]
    full_bytes = quant.bytes["full"]
    ratio = quant.four_bit_bytes / full_bytes if full_bytes else None
    checks = inputs["gate"].checks
    n_passed = sum(c.passed is True for c in checks)
    n_unjudged = sum(c.passed is None for c in checks)
    tone = {True: "good", False: "bad", None: ""}
    rows = inputs["dataset"]["rows"]
    return [
        {
            "label": "Gate",
            "value": str(head["decision"]).upper(),
            "note": f"{n_passed} of {len(checks)} checks passed"
            + (f", {n_unjudged} not judged" if n_unjudged else ""),
            "tone": tone[bool(head["passed"])],
        },
        {
            "label": "Primary metric",
            "value": fmt_gain(head["gain"]),
            "note": f"{head['metric']} {ARROWS[head['hib']]} on {head['task']}, "
            f"adapter vs {four_bit} base",
            "tone": tone[head["improved"]],
        },
        {
            "label": f"{four_bit} memory",
            "value": fmt_bytes(quant.four_bit_bytes),
            "note": f"{fmt_pct(ratio)} of {fmt_bytes(full_bytes)} ({quant.full_dtype})",
            "tone": "",
        },
        {
            "label": "Training",
            "value": fmt_duration(train.get("train_runtime_s")),
            "note": f"{fmt(train.get('steps'))} steps, {fmt(train.get('tokens_per_s'), 3)} tokens/s"
            + (", overfitting" if ctx["overfit"] else ""),
            "tone": "warn" if ctx["overfit"] else "",
        },
        {
            "label": "Data",
            "value": " / ".join(fmt(rows.get(s)) for s in SPLITS),
            "note": "train / val / test rows, validation "
            + ("passed" if data["valid"] else "FAILED"),
            "tone": "" if data["valid"] else "bad",
        },
    ]
