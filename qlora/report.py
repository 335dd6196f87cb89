"""The `report` stage's library: the run on one page, for a reviewer of the adapter.

Reads what the other stages wrote under reports/ and renders two templates from
qlora/templates/:
- reports/report.html: one self-contained file (inline CSS and SVG, no scripts, no network)
  that prints well: the gate decision first, then what quantization costs (formats, the
  layers it damages most, skip_modules, LoftQ), how training went, every metric for the
  three variants, the method's claims against them, the gate's checks, example outputs,
  the data, and the lineage (git revision, params, hashes from dvc.lock, package versions);
- reports/report.md: the same story in Markdown (for Prefect artifacts and pull requests).
metrics.json, gate.json and quantize.json are read through their schemas (qlora/artifacts.py);
quantize_layers.json, claims.json and the issue-13 keys of quantize.json and metrics.json
through those of qlora/report_quantization.py, which builds their part of the page.
The gate's numbers (the primary metric's gain, its 95% interval, each check's verdict) are
shown as gate.json has them, never recomputed; this module derives the rest (share of the
score the 4-bit base keeps, overfitting, lineage); the templates only lay them out and
format them with the filters below. Model outputs are untrusted text: the HTML template
autoescapes everything.

`python -m stages.report --compare REV` adds a column with the adapter's metrics at git
revision REV (read with `git show REV:reports/eval/metrics.json`) and names what differs
between the two runs' machines (reports/train/run.json "environment") and adapters.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import string
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import jinja2
import yaml
from markupsafe import Markup

from qlora import artifacts, train_log
from qlora.artifacts import ARROWS, DIRECTIONS, EvalMetrics, GateDecision, MetricResult
from qlora.io import StageError, atomic_write_text, read_json
from qlora.lineage import differences, git_state, package_versions
from qlora.report_plots import Series, histogram, line_chart
from qlora.report_quantization import (
    ClaimsReport,
    QuantizeLayers,
    claims_section,
    format_name,
    generation_speeds,
    quantization_section,
    quantize_extras,
)

REPORTS_DIR = artifacts.REPORTS_DIR
HTML_OUT = artifacts.REPORT_HTML
MD_OUT = artifacts.REPORT_MD
TEMPLATES = Path(__file__).parent / "templates"

# Every input, and the top-level keys the report reads of those that have no schema.
INPUTS: dict[str, tuple[Path, tuple[str, ...]]] = {
    "base": (artifacts.BASE_REPORT, ("source", "parameters", "trust_remote_code")),
    "dataset": (artifacts.DATASET_REPORT, ("rows", "tokens", "max_length")),
    "validation": (artifacts.VALIDATION_RESULT, ("success", "checks")),
    "quantize": (artifacts.QUANTIZE_REPORT, ()),
    # DVCLive's summary and the run's record; read together by qlora.train_log.
    "train_summary": (artifacts.TRAIN_METRICS, ("step",)),
    "train": (artifacts.TRAIN_RUN, ()),
    "eval": (artifacts.EVAL_METRICS, ()),
    "examples": (artifacts.EVAL_EXAMPLES, ()),
    "gate": (artifacts.GATE_REPORT, ()),
    "quantize_layers": (artifacts.QUANTIZE_LAYERS, ()),
    "claims": (artifacts.CLAIMS_REPORT, ()),
}
SCHEMAS = {
    "quantize": artifacts.QuantizeReport,
    "eval": artifacts.EvalMetrics,
    "gate": artifacts.GateDecision,
    "quantize_layers": QuantizeLayers,
    "claims": ClaimsReport,
}
LIST_INPUTS = {"examples"}
# Written by stages older runs lack (`--compare`, a report of an old checkout): without
# one, its part of the report is left out, never an error.
OPTIONAL_INPUTS = {"quantize_layers", "claims"}
VARIANTS = artifacts.VARIANTS
BASELINE = artifacts.BASELINE  # the gate judges the adapter against the base it was trained on
CANDIDATE = artifacts.CANDIDATE
SPLITS = artifacts.SPLITS
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


def fmt_env(value: Any) -> str:
    """A field of qlora.lineage.environment(): a list as its items, None as n/a."""
    if value is None:
        return "n/a"
    if isinstance(value, list):
        return " ".join(map(str, value)) or "none"
    return str(value)


# ---------------------------------------------------------------- markdown
# Every Markdown this project writes (report.md, the Prefect artifacts, model cards) puts
# text from the data through these: a task name, a reason, a model's answer never becomes a
# link, an image or HTML where the page is rendered.

# CommonMark lets a backslash escape any ASCII punctuation character, and some dialect
# gives each of them a meaning (links, emphasis, tables, headings, lists, "~~", "$" math,
# ":emoji:", GFM's bare-URL autolinks on "://", "www." and "@"): escaped, all of them read
# as themselves. & < > become entities instead, which every renderer shows as the
# character, where a backslash before them is literal to some.
_MD_ESCAPES = str.maketrans(
    {c: "\\" + c for c in string.punctuation if c not in "&<>"}
    | {"&": "&amp;", "<": "&lt;", ">": "&gt;"}
)
# CommonMark's line endings: in a table cell or a list item a line break ends the construct.
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
# A link is made only to the web, a file, or a relative path; a flow parameter or a path
# from the data must not become a javascript: or data: link.
LINK_SCHEMES = frozenset({"http", "https", "file"})
# Characters a URL keeps as they are in a link destination; the rest are percent-encoded,
# so no space, quote, parenthesis or angle bracket can end the destination early.
_URL_SAFE = "/:?#[]@!$&*+,;=%~"
_ESCAPED_AMP = "\\&"


def md_text(text: Any) -> str:
    """Untrusted text as literal Markdown on one line (a table cell, a list item, a heading):
    every punctuation character escaped, line breaks turned into spaces."""
    return _LINE_BREAK.sub(" ", str(text)).translate(_MD_ESCAPES)


def _longest_backtick_run(text: str) -> int:
    return max((len(run) for run in re.findall(r"`+", text)), default=0)


def md_code(text: Any, cell: bool = False) -> str:
    """Untrusted text as an inline code span, delimited by a backtick run longer than any
    inside it. In a table `cell`, "|" is escaped: GFM splits a row on it even inside code
    (and drops the backslash), where elsewhere the backslash would show."""
    flat = _LINE_BREAK.sub(" ", str(text))
    if cell:
        flat = flat.replace("|", "\\|")
    ticks = "`" * (_longest_backtick_run(flat) + 1)
    # CommonMark strips one space from each end of a span: a space there is kept by a pad,
    # and a pad keeps a backtick at either end from joining the delimiter.
    pad = " " if flat[:1] in ("`", " ") or flat[-1:] in ("`", " ") else ""
    return f"{ticks}{pad}{flat}{pad}{ticks}"


def md_fence(text: Any, lang: str = "text") -> str:
    """A fenced block longer than any backtick run inside, so output cannot break out."""
    text = str(text)
    fence = "`" * max(3, 1 + _longest_backtick_run(text))
    return f"{fence}{lang}\n{text}\n{fence}"


def md_link(url: str, label: str | None = None) -> str:
    """A link to `url` (its own text unless `label`), or plain text when `url` is not a web
    or file address or a relative path."""
    text = md_text(url if label is None else label)
    if urlsplit(url).scheme.lower() not in LINK_SCHEMES | {""}:
        return text if label is None else f"{text} ({md_text(url)})"
    # "&" kept for query strings, escaped so no renderer reads an entity (&colon;) in it.
    return f"[{text}]({quote(url, safe=_URL_SAFE).replace('&', _ESCAPED_AMP)})"


FILTERS = {
    "fmt": fmt,
    "signed": fmt_signed,
    "pct": fmt_pct,
    "spct": lambda x: fmt_pct(x, signed=True),
    "mb": fmt_bytes,
    "duration": fmt_duration,
    "gain": fmt_gain,
    "arrow": ARROWS.get,
    "direction": DIRECTIONS.get,
    "env_value": fmt_env,
    "md": md_text,
    "code": md_code,
    "fence": md_fence,
    "link": md_link,
}


# ---------------------------------------------------------------- inputs


def _input_path(reports_dir: Path, key: str) -> Path:
    return reports_dir / INPUTS[key][0].relative_to(REPORTS_DIR)


def load_inputs(reports_dir: Path) -> dict[str, Any]:
    """Every input file, checked against its schema or for the keys the report reads; all
    missing files named. An optional input that is absent is None."""
    paths = {key: _input_path(reports_dir, key) for key in INPUTS}
    missing = [
        str(path) for key, path in paths.items() if not path.exists() and key not in OPTIONAL_INPUTS
    ]
    if missing:
        raise StageError(
            f"missing input(s): {', '.join(missing)} "
            "(run `dvc repro` for the stages that write them)"
        )
    data: dict[str, Any] = {}
    for key, (_, required) in INPUTS.items():
        path = paths[key]
        if key in OPTIONAL_INPUTS and not path.exists():
            data[key] = None
            continue
        value = read_json(path)
        if key in SCHEMAS:
            data[key] = artifacts.validated(SCHEMAS[key], value, path)
            continue
        expected = list if key in LIST_INPUTS else dict
        if not isinstance(value, expected):
            raise StageError(f"{path}: expected a JSON {expected.__name__}")
        absent = [k for k in required if k not in value]
        if absent:
            raise StageError(f"{path}: missing key(s) {absent}")
        data[key] = value
    # Keys of quantize.json and metrics.json that older runs' files lack, checked if there.
    data["quantize_extras"] = quantize_extras(data["quantize"], paths["quantize"])
    data["speeds"] = generation_speeds(data["eval"], paths["eval"])
    # Read above; merged here into the view the templates use.
    data["train"] = train_log.merged_view(
        data["train"],
        data.pop("train_summary"),
        paths["train"],
        paths["train_summary"],
    )
    train_dir = paths["train"].parent
    data["train_loss"] = train_log.train_curve(train_dir)
    data["eval_loss"] = train_log.eval_curve(train_dir)
    return data


def metric_entry(variant: artifacts.VariantResult, task: str, metric: str) -> MetricResult | None:
    return variant.metrics.get(task, {}).get(metric)


# ---------------------------------------------------------------- what the numbers mean


def headline(gate: GateDecision, variants: dict[str, artifacts.VariantResult]) -> dict:
    """The decision and the primary metric's gain with its 95% interval, as the gate
    computed them (gate.json): the report shows the numbers the decision was made on."""
    p = gate.primary
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
        hib = artifacts.higher_is_better(*entries)
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


# ---------------------------------------------------------------- lineage


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


# ---------------------------------------------------------------- compare


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
    return next(
        (o.get("md5") for o in outs if o.get("path") == artifacts.ADAPTER_DIR.as_posix()), None
    )


def load_compare(rev: str, root: Path = Path(".")) -> dict:
    """The adapter's metrics at git revision `rev`, for a "vs previous" column, with what
    that run recorded of its machine and the hash of its adapter (dvc.lock), when it did."""
    path = artifacts.EVAL_METRICS
    text = _git_show(rev, path, root)
    if text is None:
        raise StageError(f"--compare {rev}: {path} is not in that revision")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise StageError(f"--compare {rev}: {path} there is not valid JSON ({e})") from e
    metrics = artifacts.validated(EvalMetrics, data, f"{rev}:{path}")
    train = _git_show(rev, artifacts.TRAIN_RUN, root)
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
        "metrics": metrics.variants[CANDIDATE].metrics,
        "environment": environment,
        "adapter_md5": adapter_md5(outs) if stages else None,
    }


def run_differences(train: dict, lineage_: dict, compare: dict) -> list[str]:
    """What differs between this run and the compared one: the machine fields that decide
    bit-reproducibility (qlora.lineage.environment) and the adapter's hash."""
    found = differences(train.get("environment"), compare.get("environment"))
    now, before = adapter_md5(lineage_["dvc"]["artifacts"]), compare.get("adapter_md5")
    if now and before and now != before:
        found.append(f"adapter ({before} → {now})")
    return found


# ---------------------------------------------------------------- rendering


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


def build_context(inputs: dict, root: Path, out_html: Path, compare: dict | None) -> dict:
    variants = inputs["eval"].variants
    lin = lineage(root)
    ctx = {
        "title": f"QLoRA report: {inputs['base'].get('source', 'model')}",
        "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "head": headline(inputs["gate"], variants),
        "labels": [variants[v].label or v for v in VARIANTS],
        "variants": variants,
        "variant_keys": VARIANTS,
        # The type quantize measured (and evaluate loaded): "NF4", "FP4" or "int8".
        "four_bit": format_name(inputs["quantize"].quant_type),
        "rows": metric_rows(inputs["eval"], compare),
        "checks": inputs["gate"].checks,
        "compare_label": compare.get("label") if compare else None,
        "compare_differs": run_differences(inputs["train"], lin, compare) if compare else [],
        "environment": inputs["train"].get("environment"),
        "overfit": overfitting(inputs["train_loss"], inputs["eval_loss"]),
        "charts": training_charts(inputs["train_loss"], inputs["eval_loss"]),
        "data": data_section(inputs["dataset"], inputs["validation"], root, out_html),
        "lineage": lin,
        "quant": quantization_section(
            inputs["quantize"],
            inputs["quantize_extras"],
            inputs["quantize_layers"],
            inputs["train"],
        ),
        "method": claims_section(inputs["claims"], inputs["speeds"], inputs["eval"]),
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


def main(compare_rev: str | None = None) -> None:
    """`python -m stages.report [--compare REV]` and `qlora report [--compare REV]`."""
    compare = load_compare(compare_rev) if compare_rev else None
    render_report(REPORTS_DIR, HTML_OUT, MD_OUT, root=Path("."), compare=compare)
    print(f"wrote {HTML_OUT} and {MD_OUT}")
