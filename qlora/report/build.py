"""The `report` stage's library: the run on one page, for a reviewer of the adapter.

Reads what the other stages wrote under reports/ and renders two templates from
qlora/report/templates/:
- reports/report.html: one self-contained file (inline CSS and SVG, no scripts, no network)
  that prints well: the gate decision first, then what quantization costs (formats, the
  layers it damages most, skip_modules, LoftQ), how training went, every metric for the
  three variants, the method's claims against them, the gate's checks, example outputs,
  every test row's generated answers (qlora/report/rows.py: sorted and filtered by what the
  adapter changed, with CSS alone), the data, and the lineage (git revision, params,
  hashes from dvc.lock, package versions);
- reports/report.md: the same story in Markdown (for Prefect artifacts and pull requests).
Every JSON report is read through its schema (qlora/schemas/), the one its writer checked
it against; qlora/report/quantization.py builds the quantization and claims parts of the
page, sections.py the rest, lineage.py the provenance.
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

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import jinja2

from qlora.core import paths
from qlora.core.io import StageError, atomic_write_text, read_json
from qlora.report.deploy import deploy_section
from qlora.report.lineage import lineage, load_compare, run_differences
from qlora.report.quantization import (
    claims_section,
    format_name,
    generation_speeds,
    quantization_section,
)
from qlora.report.rows import rows_section
from qlora.report.sections import (
    data_section,
    headline,
    metric_rows,
    overfitting,
    summary_cards,
    training_charts,
)
from qlora.report.text import (
    ARROWS,
    fmt,
    fmt_bytes,
    fmt_duration,
    fmt_env,
    fmt_gain,
    fmt_pct,
    fmt_signed,
    md_code,
    md_fence,
    md_link,
    md_text,
)
from qlora.schemas.base import validated
from qlora.schemas.claims import ClaimsReport
from qlora.schemas.export import GgufEval, ParityReport
from qlora.schemas.gate import GateDecision
from qlora.schemas.metrics import DIRECTIONS, EvalGenerations, EvalMetrics
from qlora.schemas.quantize import QuantizeLayers, QuantizeReport
from qlora.train import log_layout

TEMPLATES = Path(__file__).parent / "templates"


# Every input, and the top-level keys the report reads of those that have no schema.
INPUTS: dict[str, tuple[Path, tuple[str, ...]]] = {
    "base": (paths.BASE_REPORT, ("source", "parameters", "trust_remote_code")),
    "dataset": (paths.DATASET_REPORT, ("rows", "tokens", "max_length")),
    "validation": (paths.VALIDATION_RESULT, ("success", "checks")),
    "quantize": (paths.QUANTIZE_REPORT, ()),
    # DVCLive's summary and the run's record; read together by qlora.train.log_layout.
    "train_summary": (paths.TRAIN_METRICS, ("step",)),
    "train": (paths.TRAIN_RUN, ()),
    "eval": (paths.EVAL_METRICS, ()),
    "examples": (paths.EVAL_EXAMPLES, ()),
    "generations": (paths.EVAL_GENERATIONS, ()),
    "gate": (paths.GATE_REPORT, ()),
    "quantize_layers": (paths.QUANTIZE_LAYERS, ()),
    "claims": (paths.CLAIMS_REPORT, ()),
    "gguf_eval": (paths.GGUF_EVAL, ()),
    "parity": (paths.PARITY_REPORT, ()),
}


SCHEMAS = {
    "quantize": QuantizeReport,
    "eval": EvalMetrics,
    "gate": GateDecision,
    "quantize_layers": QuantizeLayers,
    "claims": ClaimsReport,
    "gguf_eval": GgufEval,
    "parity": ParityReport,
    "generations": EvalGenerations,
}


LIST_INPUTS = {"examples"}


# Written by stages older runs lack (`--compare`, a report of an old checkout): without
# one, its part of the report is left out, never an error.
OPTIONAL_INPUTS = {"quantize_layers", "claims", "gguf_eval", "parity", "generations"}


# the gate judges the adapter against the base it was trained on


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


def _input_path(reports_dir: Path, key: str) -> Path:
    return reports_dir / INPUTS[key][0].relative_to(paths.REPORTS_DIR)


def load_inputs(reports_dir: Path) -> dict[str, Any]:
    """Every input file, checked against its schema or for the keys the report reads; all
    missing files named. An optional input that is absent is None."""
    files = {key: _input_path(reports_dir, key) for key in INPUTS}
    missing = [
        str(path) for key, path in files.items() if not path.exists() and key not in OPTIONAL_INPUTS
    ]
    if missing:
        raise StageError(
            f"missing input(s): {', '.join(missing)} "
            "(run `dvc repro` for the stages that write them)"
        )
    data: dict[str, Any] = {}
    for key, (_, required) in INPUTS.items():
        path = files[key]
        if key in OPTIONAL_INPUTS and not path.exists():
            data[key] = None
            continue
        value = read_json(path)
        if key in SCHEMAS:
            data[key] = validated(SCHEMAS[key], value, path)
            continue
        expected = list if key in LIST_INPUTS else dict
        if not isinstance(value, expected):
            raise StageError(f"{path}: expected a JSON {expected.__name__}")
        absent = [k for k in required if k not in value]
        if absent:
            raise StageError(f"{path}: missing key(s) {absent}")
        data[key] = value
    data["speeds"] = generation_speeds(data["eval"])
    # Read above; merged here into the view the templates use.
    data["train"] = log_layout.merged_view(
        data["train"],
        data.pop("train_summary"),
        files["train"],
        files["train_summary"],
    )
    train_dir = files["train"].parent
    data["train_loss"] = log_layout.train_curve(train_dir)
    data["eval_loss"] = log_layout.eval_curve(train_dir)
    return data


def build_context(inputs: dict, root: Path, out_html: Path, compare: dict | None) -> dict:
    variants, generations = inputs["eval"].variants, inputs["generations"]
    lin = lineage(root)
    ctx = {
        "title": f"QLoRA report: {inputs['base'].get('source', 'model')}",
        "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "head": headline(inputs["gate"], variants, tuple(generations.tasks) if generations else ()),
        "answers": rows_section(generations, variants),
        "labels": [variants[v].label or v for v in paths.VARIANTS],
        "variants": variants,
        "variant_keys": paths.VARIANTS,
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
            inputs["quantize_layers"],
            inputs["train"],
        ),
        "method": claims_section(inputs["claims"], inputs["speeds"], inputs["eval"]),
        "deploy": deploy_section(inputs["gguf_eval"], inputs["parity"]),
        **inputs,
    }
    ctx["cards"] = summary_cards(ctx, inputs)
    return ctx


def template_environment(autoescape: bool) -> jinja2.Environment:
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
    reports_dir: Path = paths.REPORTS_DIR,
    out_html: Path = paths.REPORT_HTML,
    out_md: Path = paths.REPORT_MD,
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
        html = template_environment(autoescape=True).get_template("report.html.j2").render(ctx)
        md = template_environment(autoescape=False).get_template("report.md.j2").render(ctx)
    except jinja2.UndefinedError as e:
        raise StageError(f"an input under {reports_dir} lacks a field the report shows: {e}") from e
    atomic_write_text(out_html, html)
    atomic_write_text(out_md, md)


def main(compare_rev: str | None = None) -> None:
    """`python -m stages.report [--compare REV]` and `qlora report [--compare REV]`."""
    compare = load_compare(compare_rev) if compare_rev else None
    render_report(
        paths.REPORTS_DIR, paths.REPORT_HTML, paths.REPORT_MD, root=Path("."), compare=compare
    )
    print(f"wrote {paths.REPORT_HTML} and {paths.REPORT_MD}")
