"""What a flow run shows in Prefect's UI, built from the files the stages wrote.

- `qlora-stages`: every stage of the run, what DVC did with it, its time and attempts;
- `qlora-training`: the fine-tune's numbers from DVCLive's summary (reports/train/metrics.json);
- `qlora-eval-metrics`: base (16-bit), base (NF4) and NF4 + adapter side by side;
- `qlora-gate`: the promotion decision with every check and reason;
- `qlora-report`: reports/report.md, and `qlora-report-html`: a link to reports/report.html.

The functions that turn files into tables and Markdown are pure (tested on fixture files);
`publish_results` is the only one that talks to Prefect. A missing or unreadable file gives
a visible note instead of an artifact, never a failed run: the stages already succeeded.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qlora.core import paths
from qlora.evaluation.gate import relative_gain
from qlora.report.text import fmt, md_code, md_link, md_text
from qlora.schemas.gate import GateDecision
from qlora.schemas.metrics import DIRECTIONS, EvalMetrics, MetricResult, higher_is_better
from qlora.train import log_layout

# Prefect stores artifacts in its database; a report larger than this is cut, with a link.
MAX_MARKDOWN_CHARS = 60_000


def _with_stderr(entry: MetricResult) -> str:
    value, stderr = entry.value, entry.stderr
    if isinstance(stderr, int | float) and not math.isnan(stderr) and stderr > 0:
        return f"{fmt(value)} ± {fmt(stderr)}"
    return fmt(value)


def metrics_table(metrics: dict) -> list[dict[str, str]]:
    """One row per task/metric, one column per evaluated variant, plus the adapter's change
    relative to the 4-bit base (signed so that positive is better, as the gate counts it;
    two decimals, as a tiny model's changes are often below 0.1%). A metric lm-eval gave
    no direction has no signed change. Raises ValueError when `metrics` is not metrics.json."""
    variants = EvalMetrics.model_validate(metrics).variants
    keys: list[tuple[str, str]] = []
    for variant in variants.values():
        for task, task_metrics in variant.metrics.items():
            keys.extend((task, name) for name in task_metrics if (task, name) not in keys)
    rows = []
    for task, name in keys:
        entries = {v: variants[v].metrics.get(task, {}).get(name) for v in variants}
        higher = higher_is_better(*entries.values())
        better = DIRECTIONS[higher].removesuffix(" is better")
        row = {"task": task, "metric": name, "better": better}
        for variant, entry in entries.items():
            row[variants[variant].label or variant] = _with_stderr(entry) if entry else ""
        base, cand = entries.get(paths.BASELINE), entries.get(paths.CANDIDATE)
        change = ""
        if base and cand and higher is not None:
            gain = relative_gain(base.value, cand.value, higher)
            change = f"{gain:+.2%}" if base.value else f"{gain:+.4g}"
        row["adapter vs NF4 base"] = change
        rows.append(row)
    return rows


TRAINING_ROWS = (
    ("optimizer steps", "step"),
    ("final train loss", log_layout.TRAIN_LOSS),
    ("validation loss before training", log_layout.INITIAL_EVAL_LOSS),
    ("final validation loss", log_layout.EVAL_LOSS),
    ("best validation loss", log_layout.BEST_EVAL_LOSS),
    ("tokens / s (whole run)", log_layout.TOKENS_PER_S),
    ("training time, s", log_layout.RUNTIME_S),
    ("peak memory, GB", log_layout.PEAK_MEMORY_GB),
)


def training_table(summary: dict) -> list[dict[str, str]]:
    """DVCLive's summary as rows; a metric the run did not log is left out."""
    rows = []
    for label, name in TRAINING_ROWS:
        value = log_layout.summary_value(summary, name)
        if value is not None:
            rows.append({"metric": label, "value": fmt(value), "dvclive": name})
    if not rows:
        raise ValueError("no metric of the training log found")
    return rows


def _number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and not math.isnan(x)


def gate_markdown(gate: dict) -> str:
    """gate.json as Markdown; raises ValueError when `gate` is not gate.json."""
    g = GateDecision.model_validate(gate)
    p = g.primary
    # Task and metric names, the summary and the reasons come from the data: escaped.
    mark = "✅" if g.passed else "❌"
    lines = [f"# Gate: {g.decision.upper()} {mark}", "", md_text(g.summary), ""]
    lines += [
        f"**Primary metric** {md_code(f'{p.task}/{p.metric}')}: base {fmt(p.base)} → adapter "
        f"{fmt(p.adapter)} ({p.relative_change:+.2%})",
        "",
    ]
    if g.checks:
        lines += [
            "| task | metric | base | adapter | change | threshold | passed |",
            "|---|---|---|---|---|---|---|",
        ]
        for c in g.checks:
            change = "" if c.relative_change is None else f"{c.relative_change:+.2%}"
            verdict = {True: "✅", False: "❌", None: "➖ not judged"}[c.passed]
            lines.append(
                f"| {md_text(c.task)} | {md_text(c.metric)} | {fmt(c.base)} | "
                f"{fmt(c.adapter)} | {change} | {c.threshold:+.1%} | {verdict} |"
            )
        lines.append("")
    if g.reasons:
        lines += ["**Reasons**", ""] + [f"- {md_text(r)}" for r in g.reasons]
    return "\n".join(lines).rstrip() + "\n"


def report_markdown(report_md: str | None, html_link: str | None) -> str:
    parts = []
    if html_link:
        # report_base_url is a flow parameter: never a javascript: link.
        parts.append(f"Full report (HTML): {md_link(html_link)}\n")
    if report_md is None:
        parts.append(f"_{paths.REPORT_MD} was not written by this run._")
    elif len(report_md) > MAX_MARKDOWN_CHARS:
        parts.append(report_md[:MAX_MARKDOWN_CHARS] + "\n\n_… cut here: see the HTML report._")
    else:
        parts.append(report_md)
    return "\n".join(parts)


def stage_rows(outcomes: list[dict]) -> list[dict[str, Any]]:
    return [
        {
            "stage": o["stage"],
            "result": o["result"],
            "seconds": round(o["seconds"], 1) if _number(o.get("seconds")) else "",
            "attempts": o.get("attempts", ""),
        }
        for o in outcomes
    ]


def report_link(repo_dir: Path, report_base_url: str | None) -> str:
    """Where reports/report.html can be opened: under `report_base_url` when the reports
    folder is published somewhere, else a file:// link valid on the worker's machine."""
    if report_base_url:
        return report_base_url.rstrip("/") + "/" + paths.REPORT_HTML.name
    return (repo_dir / paths.REPORT_HTML).resolve().as_uri()


def _read_json(path: Path, notes: list[str]) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        notes.append(f"{path.name}: not found, no artifact")
        return None
    except (OSError, json.JSONDecodeError) as e:
        notes.append(f"{path.name}: unreadable ({e}), no artifact")
        return None
    if not isinstance(data, dict):
        notes.append(f"{path.name}: not a JSON object, no artifact")
        return None
    return data


def _built(
    repo_dir: Path, path: Path, build: Callable[[dict], Any], notes: list[str], data=None
) -> Any:
    """`build` applied to the JSON object in `path` (or to `data`, already read), or None
    with a note saying why there is no artifact."""
    if data is None:
        data = _read_json(repo_dir / path, notes)
        if data is None:
            return None
    try:
        return build(data)
    except (ValueError, TypeError, AttributeError, KeyError) as e:
        notes.append(f"{path}: unexpected shape ({e}), no artifact")
        return None


def publish_stage_table(outcomes: list[dict], description: str) -> None:
    from prefect.artifacts import create_table_artifact

    create_table_artifact(stage_rows(outcomes), key="qlora-stages", description=description)


def publish_results(
    repo_dir: Path,
    logger: logging.Logger | logging.LoggerAdapter,
    report_base_url: str | None = None,
) -> dict[str, str]:
    """Create the metrics, gate and report artifacts; returns {key: what it shows}."""
    from prefect.artifacts import (
        create_link_artifact,
        create_markdown_artifact,
        create_table_artifact,
    )

    made: dict[str, str] = {}
    notes: list[str] = []
    training = _built(repo_dir, paths.TRAIN_METRICS, training_table, notes)
    if training is not None:
        create_table_artifact(
            training, key="qlora-training", description="fine-tune, from DVCLive's summary"
        )
        made["qlora-training"] = f"{len(training)} number(s)"
    table = _built(repo_dir, paths.EVAL_METRICS, metrics_table, notes)
    if table is not None:
        create_table_artifact(
            table,
            key="qlora-eval-metrics",
            description="lm-eval: base (16-bit), base (NF4), NF4 base + adapter",
        )
        made["qlora-eval-metrics"] = f"{len(table)} metric(s)"
    gate = _read_json(repo_dir / paths.GATE_REPORT, notes)
    gate_md = (
        None if gate is None else _built(repo_dir, paths.GATE_REPORT, gate_markdown, notes, gate)
    )
    if gate_md is not None:
        create_markdown_artifact(gate_md, key="qlora-gate", description="promotion gate decision")
        made["qlora-gate"] = str(gate.get("decision"))
    html = repo_dir / paths.REPORT_HTML
    link = report_link(repo_dir, report_base_url) if html.is_file() else None
    if link:
        create_link_artifact(
            link, link_text="QLoRA report (HTML)", key="qlora-report-html", description=link
        )
        made["qlora-report-html"] = link
    else:
        notes.append(f"{paths.REPORT_HTML}: not found, no link")
    try:
        md = (repo_dir / paths.REPORT_MD).read_text(encoding="utf-8")
    except OSError:
        md = None
        notes.append(f"{paths.REPORT_MD}: not found")
    if md is not None or link:
        create_markdown_artifact(
            report_markdown(md, link), key="qlora-report", description="pipeline report"
        )
        made["qlora-report"] = "report.md" if md is not None else "link only"
    for note in notes:
        logger.warning("artifacts: %s", note)
    return made
