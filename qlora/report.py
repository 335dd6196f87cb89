"""Stage `report`: the run on one page, for a reviewer deciding whether to trust the adapter.

Reads what the other stages wrote under reports/ and renders two templates from
stages/templates/:
- reports/report.html: one self-contained file (inline CSS and SVG, no scripts, no network)
  that prints well: the gate decision first, then what quantization costs, how training
  went, every metric for the three variants, the gate's checks, example outputs, the data,
  and the lineage (git revision, params, hashes from dvc.lock, package versions);
- reports/report.md: the same story in Markdown (for Prefect artifacts and pull requests).
This module derives the numbers (confidence interval, share of the score NF4 keeps,
overfitting, lineage); the templates only lay them out and format them with the filters
below. Model outputs are untrusted text: the HTML template autoescapes everything.

`python -m stages.report --compare REV` adds a column with the adapter's metrics at git
revision REV (read with `git show REV:reports/eval/metrics.json`).
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import re
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import jinja2
import yaml
from markupsafe import Markup

from qlora import artifacts
from qlora.gate import relative_gain
from qlora.io import StageError, atomic_write_text, read_json
from qlora.report_plots import Series, histogram, line_chart

REPORTS_DIR = artifacts.REPORTS_DIR
HTML_OUT = artifacts.REPORT_HTML
MD_OUT = artifacts.REPORT_MD
TEMPLATES = Path(__file__).parent / "templates"

# Every input, where it lives under reports/, and the top-level keys the report reads.
INPUTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "base": ("base.json", ("source", "parameters", "trust_remote_code")),
    "dataset": ("dataset.json", ("rows", "tokens", "max_length")),
    "validation": ("validation/result.json", ("success", "checks")),
    "quantize": ("quantize.json", ("bytes", "bits_per_parameter", "quant_error")),
    "train": ("train/metrics.json", ("steps", "train_runtime_s", "tokens_per_s")),
    "train_loss": ("train/train_loss.json", ()),
    "eval_loss": ("train/eval_loss.json", ()),
    "eval": ("eval/metrics.json", ("settings", "variants")),
    "examples": ("eval/examples.json", ()),
    "gate": ("gate.json", ("decision", "passed", "primary", "checks")),
}
LIST_INPUTS = {"train_loss", "eval_loss", "examples"}
VARIANTS = artifacts.VARIANTS
BASELINE = artifacts.BASELINE  # the gate judges the adapter against the base it was trained on
SPLITS = artifacts.SPLITS
PACKAGES = (
    "torch",
    "transformers",
    "peft",
    "bitsandbytes",
    "lm-eval",
    "dvc",
    "great-expectations",
    "prefect",
)
Z95 = 1.96
# A validation loss this much (relative) above its best is a rise, not logging noise.
OVERFIT_TOLERANCE = 0.005
MINUS = "\u2212"


# ---------------------------------------------------------------- number formatting


def num(x: Any) -> float | None:
    """A finite number, or None for anything else (lm-eval writes stderr as "N/A")."""
    if isinstance(x, bool) or not isinstance(x, int | float):
        return None
    return float(x) if math.isfinite(x) else None


def fmt(x: Any, digits: int = 4) -> str:
    """4 significant digits, thousands separators for big numbers, a real minus sign."""
    if isinstance(x, int) and not isinstance(x, bool):
        text = f"{x:,}"
    elif (v := num(x)) is None:
        return "n/a" if x is None or isinstance(x, int | float) else str(x)
    elif abs(v) >= 10**digits:
        text = f"{v:,.0f}"
    else:
        text = f"{v:.{digits}g}"
    return text.replace("-", MINUS)


def fmt_signed(x: Any, digits: int = 4) -> str:
    v = num(x)
    return "n/a" if v is None else ("+" if v > 0 else "") + fmt(v, digits)


def fmt_pct(ratio: Any, signed: bool = False) -> str:
    v = num(ratio)
    if v is None:
        return "n/a"
    # One decimal: "97.0%" next to "97.8%" reads as a column, 3 significant digits would not.
    text = (f"{v * 100:.1f}" if abs(v) >= 0.001 else f"{v * 100:.2g}").replace("-", MINUS)
    return ("+" if signed and v > 0 else "") + text + "%"


def fmt_bytes(n: Any) -> str:
    v = num(n)
    if v is None:
        return "n/a"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if v >= size:
            return f"{fmt(v / size)} {unit}"
    return f"{v:.0f} B"


def fmt_duration(seconds: Any) -> str:
    s = num(seconds)
    if s is None:
        return "n/a"
    if s < 60:
        return f"{fmt(s, 3)} s"
    minutes, sec = divmod(round(s), 60)
    if minutes < 60:
        return f"{minutes} min {sec:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def fmt_gain(gain: Any) -> str:
    """A direction-aware relative change: "23.0% better" reads right for a loss and for an
    accuracy alike, where "-23%" would need the reader to know which way is good."""
    v = num(gain)
    if v is None:
        return "n/a"
    if v == 0:
        return "no change"
    return f"{fmt_pct(abs(v))} {'better' if v > 0 else 'worse'}"


def md_cell(text: Any) -> str:
    """A Markdown table cell: no pipes, newlines or raw HTML from model output."""
    text = str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return text.replace("|", "\\|").replace("\n", " ")


def md_fence(text: Any) -> str:
    """A fenced block longer than any backtick run inside, so output cannot break out."""
    text = str(text)
    fence = "`" * max(3, 1 + max((len(r) for r in re.findall(r"`+", text)), default=0))
    return f"{fence}text\n{text}\n{fence}"


FILTERS = {
    "fmt": fmt,
    "signed": fmt_signed,
    "pct": fmt_pct,
    "spct": lambda x: fmt_pct(x, signed=True),
    "mb": fmt_bytes,
    "duration": fmt_duration,
    "gain": fmt_gain,
    "md": md_cell,
    "fence": md_fence,
}


# ---------------------------------------------------------------- inputs


def load_inputs(reports_dir: Path) -> dict[str, Any]:
    """Every input file, checked for the keys the report reads; all missing files named."""
    missing = [
        str(reports_dir / rel) for rel, _ in INPUTS.values() if not (reports_dir / rel).exists()
    ]
    if missing:
        raise StageError(
            f"missing input(s): {', '.join(missing)} "
            "(run `dvc repro` for the stages that write them)"
        )
    data = {}
    for key, (rel, required) in INPUTS.items():
        path = reports_dir / rel
        value = read_json(path)
        expected = list if key in LIST_INPUTS else dict
        if not isinstance(value, expected):
            raise StageError(f"{path}: expected a JSON {expected.__name__}")
        absent = [k for k in required if k not in value]
        if absent:
            raise StageError(f"{path}: missing key(s) {absent}")
        data[key] = value
    absent = [v for v in VARIANTS if v not in data["eval"]["variants"]]
    if absent:
        raise StageError(f"{reports_dir / INPUTS['eval'][0]}: variants lacks {absent}")
    return data


def metric_entry(variant: dict, task: str, metric: str) -> dict:
    entry = (variant.get("metrics") or {}).get(task, {}).get(metric)
    return entry if isinstance(entry, dict) else {}


# ---------------------------------------------------------------- what the numbers mean


def headline(gate: dict, variants: dict) -> dict:
    """The decision and the primary metric's change with a 95% confidence interval.

    The interval treats base and adapter scores as independent estimates, each with
    lm-eval's standard error: change +- 1.96 * sqrt(se_base^2 + se_adapter^2).
    """
    p = gate["primary"]
    task, metric = p.get("task", "?"), p.get("metric", "?")
    hib = bool(p.get("higher_is_better", True))
    base, adapter, change = num(p.get("base")), num(p.get("adapter")), num(p.get("change"))
    if change is None and base is not None and adapter is not None:
        change = adapter - base
    se = [
        num(metric_entry(variants[v], task, metric).get("stderr"))
        for v in (BASELINE, artifacts.CANDIDATE)
    ]
    half = Z95 * math.hypot(*se) if None not in se and change is not None else None
    improved = None if not change else (change > 0) == hib
    # The gate's own definition: positive when the adapter is better, relative to the base.
    gain = relative_gain(base, adapter, hib) if base is not None and adapter is not None else None
    if half is None:
        ci_note = "n/a: lm-eval reports no standard error for this metric"
    elif abs(change) > half:
        ci_note = "excludes 0: the change is larger than the noise"
    else:
        ci_note = "includes 0: the change is within the noise"
    return {
        "decision": gate["decision"],
        "passed": gate["passed"],
        "task": task,
        "metric": metric,
        "hib": hib,
        "base": base,
        "adapter": adapter,
        "change": change,
        "gain": gain,
        "ci": None if half is None else (change - half, change + half),
        "ci_note": ci_note,
        "improved": improved,
        "baseline_label": variants[BASELINE].get("label", BASELINE),
        "adapter_label": variants["adapter_4bit"].get("label", "adapter_4bit"),
    }


def metric_keys(eval_metrics: dict) -> list[tuple[str, str]]:
    """(task, metric) pairs in the order of the evaluated tasks, then as first seen."""
    keys: list[tuple[str, str]] = []
    for name in VARIANTS:
        for task, metrics in (eval_metrics["variants"][name].get("metrics") or {}).items():
            keys.extend((task, m) for m in metrics if (task, m) not in keys)
    order = list(eval_metrics["settings"].get("tasks") or [])
    return sorted(keys, key=lambda k: order.index(k[0]) if k[0] in order else len(order))


def higher_is_better(variants: dict, task: str, metric: str) -> bool:
    for name in VARIANTS:
        flag = metric_entry(variants[name], task, metric).get("higher_is_better")
        if flag is not None:
            return bool(flag)
    return True


def metric_rows(eval_metrics: dict, compare: dict | None) -> list[dict]:
    """Every metric for the three variants, the best value in each row marked, and how much
    of the full-precision score the NF4 base keeps (direction-aware: for a loss, a higher NF4
    value keeps less)."""
    variants = eval_metrics["variants"]
    rows = []
    for task, metric in metric_keys(eval_metrics):
        hib = higher_is_better(variants, task, metric)
        cells = [dict(metric_entry(variants[v], task, metric)) for v in VARIANTS]
        values = [num(c.get("value")) for c in cells]
        present = [v for v in values if v is not None]
        best = (max if hib else min)(present) if present else None
        for c, v in zip(cells, values, strict=True):
            c["best"] = v is not None and v == best
        full, nf4 = values[0], values[1]
        kept_num, kept_den = (nf4, full) if hib else (full, nf4)
        previous = None
        if compare is not None:
            previous = ((compare.get("metrics") or {}).get(task) or {}).get(metric) or {}
        rows.append(
            {
                "task": task,
                "metric": metric,
                "arrow": "↑" if hib else "↓",
                "cells": cells,
                "kept": kept_num / kept_den if kept_num is not None and kept_den else None,
                "previous": previous,
            }
        )
    return rows


def gate_checks(gate: dict, variants: dict) -> list[dict]:
    """The gate's checks with the direction-aware gain each one was judged on."""
    rows = []
    for check in gate["checks"]:
        task, metric = check.get("task"), check.get("metric")
        hib = check.get("higher_is_better")
        hib = higher_is_better(variants, task, metric) if hib is None else bool(hib)
        base, adapter = num(check.get("base")), num(check.get("adapter"))
        gain = (
            relative_gain(base, adapter, hib) if base is not None and adapter is not None else None
        )
        rows.append({**check, "arrow": "↑" if hib else "↓", "gain": gain})
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


# ---------------------------------------------------------------- lineage


PIPELINE_RESULTS = ("reports/", "dvc.lock")


def git_state(root: Path) -> dict:
    """HEAD and whether the work tree has uncommitted changes; a note when there is no git."""

    def git(*args: str) -> subprocess.CompletedProcess | None:
        try:
            return subprocess.run(
                ["git", *args], cwd=root, capture_output=True, text=True, timeout=20
            )
        except (OSError, subprocess.TimeoutExpired):
            return None

    head = git("rev-parse", "HEAD")
    if head is None:
        return {"commit": None, "note": "git is not available: the code version is unknown"}
    if head.returncode != 0:
        return {
            "commit": None,
            "note": "not inside a git repository (or no commit yet): the code version is unknown",
        }
    status = git("status", "--porcelain")
    lines = status.stdout.splitlines() if status and status.returncode == 0 else []
    # The pipeline's own results (reports, dvc.lock) do not make the code version unknown.
    changed = [line for line in lines if not line[3:].startswith(PIPELINE_RESULTS)]
    return {"commit": head.stdout.strip(), "dirty": bool(changed), "changed": changed}


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


def package_versions() -> list[tuple[str, str]]:
    versions = [("python", platform.python_version())]
    for name in PACKAGES:
        try:
            versions.append((name, importlib.metadata.version(name)))
        except importlib.metadata.PackageNotFoundError:
            versions.append((name, "not installed"))
    return versions


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


# ---------------------------------------------------------------- compare


def load_compare(rev: str, root: Path = Path(".")) -> dict:
    """The adapter's metrics at git revision `rev`, for a "vs previous" column."""
    path = (REPORTS_DIR / INPUTS["eval"][0]).as_posix()
    try:
        shown = subprocess.run(
            ["git", "show", f"{rev}:{path}"], cwd=root, capture_output=True, text=True, timeout=30
        )
    except OSError as e:
        raise StageError(f"--compare {rev}: git is not available ({e})") from e
    if shown.returncode != 0:
        raise StageError(f"--compare {rev}: cannot read {path} there: {shown.stderr.strip()}")
    try:
        metrics = json.loads(shown.stdout)["variants"]["adapter_4bit"]["metrics"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise StageError(
            f"--compare {rev}: {path} there has no variants.adapter_4bit.metrics ({e!r})"
        ) from e
    return {"label": f"adapter @ {rev}", "rev": rev, "metrics": metrics}


# ---------------------------------------------------------------- rendering


def summary_cards(ctx: dict, inputs: dict) -> list[dict]:
    head, data, train = ctx["head"], ctx["data"], inputs["train"]
    sizes = inputs["quantize"]["bytes"]
    ratio = num(sizes.get("nf4")) / num(sizes["full"]) if num(sizes.get("full")) else None
    n_checks = len(inputs["gate"]["checks"])
    n_passed = sum(bool(c.get("passed")) for c in inputs["gate"]["checks"])
    tone = {True: "good", False: "bad", None: ""}
    rows = inputs["dataset"]["rows"]
    return [
        {
            "label": "Gate",
            "value": str(head["decision"]).upper(),
            "note": f"{n_passed} of {n_checks} checks passed",
            "tone": tone[bool(head["passed"])],
        },
        {
            "label": "Primary metric",
            "value": fmt_gain(head["gain"]),
            "note": f"{head['metric']} {'↑' if head['hib'] else '↓'} on {head['task']}, "
            "adapter vs NF4 base",
            "tone": tone[head["improved"]],
        },
        {
            "label": "NF4 memory",
            "value": fmt_bytes(sizes.get("nf4")),
            "note": f"{fmt_pct(ratio)} of {fmt_bytes(sizes.get('full'))} "
            f"({inputs['quantize'].get('full_dtype', '16-bit')})",
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


def build_context(inputs: dict, root: Path, out_html: Path, compare: dict | None) -> dict:
    variants = inputs["eval"]["variants"]
    ctx = {
        "title": f"QLoRA report: {inputs['base'].get('source', 'model')}",
        "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "head": headline(inputs["gate"], variants),
        "labels": [variants[v].get("label", v) for v in VARIANTS],
        "variants": variants,
        "variant_keys": VARIANTS,
        "rows": metric_rows(inputs["eval"], compare),
        "checks": gate_checks(inputs["gate"], variants),
        "compare_label": compare.get("label") if compare else None,
        "overfit": overfitting(inputs["train_loss"], inputs["eval_loss"]),
        "charts": training_charts(inputs["train_loss"], inputs["eval_loss"]),
        "data": data_section(inputs["dataset"], inputs["validation"], root, out_html),
        "lineage": lineage(root),
        **inputs,
    }
    ctx["cards"] = summary_cards(ctx, inputs)
    return ctx


def _environment(autoescape: bool) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=autoescape,
        undefined=jinja2.StrictUndefined,  # a typo in a template fails loudly, not blank
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters.update(FILTERS)
    return env


def render_report(
    reports_dir: Path = REPORTS_DIR,
    out_html: Path = HTML_OUT,
    out_md: Path = MD_OUT,
    *,
    root: Path | None = None,
    compare: dict | None = None,
) -> None:
    """Render both files from the inputs under `reports_dir`.

    `root` holds dvc.lock, dvc.yaml, params.yaml and the git work tree (default: the parent
    of `reports_dir`); `compare` is `load_compare(rev)` for a "vs previous" column.
    """
    reports_dir, out_html, out_md = Path(reports_dir), Path(out_html), Path(out_md)
    root = Path(root) if root is not None else reports_dir.resolve().parent
    ctx = build_context(load_inputs(reports_dir), root, out_html, compare)
    # Model outputs are untrusted: the HTML is autoescaped; the Markdown escapes per filter.
    try:
        html = _environment(autoescape=True).get_template("report.html.j2").render(ctx)
        md = _environment(autoescape=False).get_template("report.md.j2").render(ctx)
    except jinja2.UndefinedError as e:
        raise StageError(f"an input under {reports_dir} lacks a field the report shows: {e}") from e
    atomic_write_text(out_html, html)
    atomic_write_text(out_md, md)
