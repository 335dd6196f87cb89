"""The report's view of what quantization does to the weights, and of the 4-bit method's
published claims against this run (the sections qlora/report.py adds for quantization).

Reads, beside the inputs report.py already has:
- quantize.json's "formats" (NF4, FP4 and int8 each loaded for real), "analysis" (the
  summary of qlora.weight_analysis), "skip_modules" and "loftq";
- reports/quantize_layers.json: every quantized layer ranked most damaged by NF4 first, and
  a histogram of the worst layer's block-scaled weights beside the 16 NF4 code points;
- reports/claims.json: qlora.claims.check_claims' rows, and each evaluated variant's
  generation "speed" in reports/eval/metrics.json.
Every one of these may be absent (files of older runs): a part of the report is shown only
when its data is there. What is there is checked against the schemas below, so a renamed
field fails with the file and the field, never as a blank cell.
"""

from __future__ import annotations

from typing import Any

from markupsafe import Markup
from pydantic import model_validator

from qlora import artifacts
from qlora.artifacts import (
    EvalMetrics,
    QuantizeReport,
    _Open,  # writers may add fields; the report reads the typed ones
)
from qlora.report_plots import Series, binned_histogram, ranked_bars

FORMATS = ("nf4", "fp4", "int8")  # table order: the QLoRA default, its alternative, 8 bits
# Layers shown in "which layers suffer most" when quantize.json names no most sensitive.
TOP_LAYERS = 5
CHART_LABELS = 3  # bars named on the per-layer chart: more names than that crowd it


def format_name(key: str) -> str:
    """ "NF4", "FP4", but "int8", as bitsandbytes (LLM.int8()) and the paper write it."""
    return key if key == "int8" else key.upper()


# ---------------------------------------------------------------- schemas


class ErrorSummary(_Open):
    mean_relative_error: float
    max_relative_error: float
    overall_relative_error: float | None = None
    layers: int | None = None


class FormatResult(_Open):
    """One format loaded for real; a format this device cannot load says why instead."""

    supported: bool
    reason: str | None = None
    bytes: int | None = None
    bits_per_parameter: float | None = None
    linear_bits: float | None = None
    memory_ratio: float | None = None
    error: ErrorSummary | None = None

    @model_validator(mode="after")
    def _numbers_or_reason(self) -> FormatResult:
        if self.supported and (self.bytes is None or self.error is None):
            raise ValueError("a supported format needs bytes and error")
        if not self.supported and not self.reason:
            raise ValueError("an unsupported format needs a reason")
        return self


class Analysis(_Open):
    layers: int
    weights: int
    errors: dict[str, ErrorSummary]
    max_excess_kurtosis: float
    max_block_absmax_ratio: float
    most_sensitive: list[str]


class SkipModules(_Open):
    configured: list[str]
    configured_layers: list[str] | None = None  # the layers `configured` matched
    configured_extra_bytes: int
    suggested: list[str]
    suggested_extra_bytes: int
    suggested_error_share: float


class Loftq(_Open):
    quant_type: str = "nf4"
    rank: int
    scaling: float
    every: int | None = None
    layers: int
    error_before: float
    error_after: float
    reduction: float
    seconds: float | None = None


class QuantizeExtras(_Open):
    """quantize.json's issue-13 keys, each absent from older runs' files."""

    formats: dict[str, FormatResult] | None = None
    analysis: Analysis | None = None
    skip_modules: SkipModules | None = None
    loftq: Loftq | None = None


class LayerRow(_Open):
    rank: int
    name: str
    shape: list[int]
    excess_kurtosis: float
    block_absmax_ratio: float
    nf4_error: float
    fp4_error: float | None = None
    int8_error: float | None = None


class WeightHistogram(_Open):
    layer: str
    bin_edges: list[float]
    counts: list[int]
    code_points: list[float]
    code_point_share: list[float] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> WeightHistogram:
        if len(self.bin_edges) != len(self.counts) + 1:
            raise ValueError(
                f"{len(self.bin_edges)} bin_edges for {len(self.counts)} counts "
                "(expected one edge more than counts)"
            )
        if self.code_point_share is not None and len(self.code_point_share) != len(
            self.code_points
        ):
            raise ValueError("code_point_share and code_points differ in length")
        return self


class QuantizeLayers(_Open):
    """reports/quantize_layers.json."""

    layers: list[LayerRow]
    histogram: WeightHistogram


class ClaimRow(_Open):
    claim: str
    subject: str
    measured: float | None
    display: str
    rule: str
    passed: bool | None
    why: str | None


class ClaimsSummary(_Open):
    passed: int
    failed: int
    undecided: int


class ClaimsReport(_Open):
    """reports/claims.json."""

    rows: list[ClaimRow]
    summary: ClaimsSummary


class Speed(_Open):
    """variants[name]["speed"] of reports/eval/metrics.json: greedy generation, batch 1."""

    prompts: int
    new_tokens: int
    seconds: float
    tokens_per_s: float
    seconds_per_prompt: float


def quantize_extras(report: QuantizeReport, where: Any) -> QuantizeExtras:
    return artifacts.validated(QuantizeExtras, report.model_extra or {}, where)


def generation_speeds(eval_metrics: EvalMetrics, where: Any) -> dict[str, Speed]:
    """Each variant's speed, where evaluate measured one."""
    return {
        name: artifacts.validated(Speed, speed, f"{where} (variants.{name}.speed)")
        for name, variant in eval_metrics.variants.items()
        if (speed := (variant.model_extra or {}).get("speed")) is not None
    }


# ---------------------------------------------------------------- quantization


def format_rows(quantize: QuantizeReport, formats: dict[str, FormatResult]) -> list[dict]:
    """One row per format, the configured one marked; known formats first."""
    keys = [k for k in FORMATS if k in formats] + [k for k in formats if k not in FORMATS]
    rows = []
    for key in keys:
        f = formats[key]
        rows.append(
            {
                "key": key,
                "name": format_name(key),
                "configured": key == quantize.quant_type,
                "supported": f.supported,
                "reason": f.reason,
                "bytes": f.bytes,
                "memory_ratio": f.memory_ratio,
                "bits_per_parameter": f.bits_per_parameter,
                "linear_bits": f.linear_bits,
                "mean_error": f.error.mean_relative_error if f.error else None,
                "max_error": f.error.max_relative_error if f.error else None,
            }
        )
    return rows


def code_point_crowding(hist: WeightHistogram, codes: int = 4) -> dict | None:
    """The share of the layer's weights that the `codes` code points nearest 0 receive,
    beside what they would receive if every code point were used equally: NF4 places its
    levels at quantiles of a normal distribution so that bell-shaped weights use them about
    evenly; a heavy-tailed layer's outliers set large block scales and push the rest
    toward the middle codes."""
    if hist.code_point_share is None or len(hist.code_points) < codes:
        return None
    nearest = sorted(range(len(hist.code_points)), key=lambda i: abs(hist.code_points[i]))
    return {
        "codes": codes,
        "share": sum(hist.code_point_share[i] for i in nearest[:codes]),
        "even": codes / len(hist.code_points),
    }


def histogram_chart(hist: WeightHistogram) -> Markup:
    return Markup(
        binned_histogram(
            hist.bin_edges,
            hist.counts,
            title=f"{hist.layer}: weights divided by their block's absmax",
            x_label="weight / its block's absmax",
            y_label="weights",
            css_class="s-weights",
            markers=hist.code_points,
            marker_class="code-point",
            marker_label="NF4 code points",
            width=560,
            height=260,
        )
    )


def profile_chart(ranked: list[LayerRow]) -> Markup:
    """NF4's error per layer as bars, most damaged first; FP4 and int8 as lines over the
    same layers, where every layer has them."""
    overlays = [
        Series(
            format_name(key),
            [(x, getattr(r, f"{key}_error")) for x, r in enumerate(ranked, start=1)],
            css,
        )
        for key, css in (("fp4", "s-fp4"), ("int8", "s-int8"))
        if all(getattr(r, f"{key}_error") is not None for r in ranked)
    ]
    return Markup(
        ranked_bars(
            [r.nf4_error for r in ranked],
            title="Relative weight error of every quantized layer, most damaged by NF4 first",
            x_label="layer, ranked by NF4 error",
            y_label="relative weight error",
            name="NF4",
            css_class="s-nf4",
            overlays=overlays,
            labels=[f"{r.rank}. {r.name}" for r in ranked[:CHART_LABELS]],
            width=560,
            height=260,
        )
    )


def layers_view(layers: QuantizeLayers, analysis: Analysis | None) -> dict:
    ranked = sorted(layers.layers, key=lambda r: r.rank)
    top = len(analysis.most_sensitive) if analysis and analysis.most_sensitive else TOP_LAYERS
    worst = next((r for r in ranked if r.name == layers.histogram.layer), None)
    return {
        "top": [r.model_dump() for r in ranked[:top]],
        "count": len(ranked),
        "histogram": {
            "layer": layers.histogram.layer,
            "kurtosis": worst.excess_kurtosis if worst else None,
            "crowding": code_point_crowding(layers.histogram),
            "svg": histogram_chart(layers.histogram),
        },
        "profile_svg": profile_chart(ranked) if ranked else None,
    }


def lora_init_view(train: dict) -> dict:
    """How this run's adapter started, and the experiment that tries the other way."""
    init = train.get("lora_init") if isinstance(train.get("lora_init"), dict) else None
    method = init.get("method") if init else None
    other = "default" if method == "loftq" else "loftq"
    return {
        "recorded": init is not None,
        "method": method,
        "record": init or {},
        "command": f"dvc exp run -S finetune.lora.init={other}",
    }


def quantization_section(
    quantize: QuantizeReport,
    extras: QuantizeExtras,
    layers: QuantizeLayers | None,
    train: dict,
) -> dict:
    """Everything the "Quantization cost" section adds to its share-kept table: None (not
    shown) for each part whose data this run's files lack."""
    skip = extras.skip_modules
    # The suggested layers' share of the quantized weights, beside their share of the error:
    # equal shares mean keeping them is no better than keeping any layers of that size.
    sizes = {r.name: r.shape[0] * r.shape[1] for r in layers.layers} if layers else {}
    suggested_weights = (
        sum(sizes[n] for n in skip.suggested) / extras.analysis.weights
        if skip and extras.analysis and all(n in sizes for n in skip.suggested)
        else None
    )
    return {
        "formats": format_rows(quantize, extras.formats) if extras.formats else [],
        "analysis": extras.analysis,
        "layers": layers_view(layers, extras.analysis) if layers is not None else None,
        "skip": skip,
        # What keeping the suggested layers in 16 bits adds to the configured model.
        "skip_ratio": skip.suggested_extra_bytes / quantize.four_bit_bytes
        if skip and quantize.four_bit_bytes
        else None,
        "skip_weight_share": suggested_weights,
        "loftq": extras.loftq,
        "lora_init": lora_init_view(train),
    }


# ---------------------------------------------------------------- claims and speed


def claim_groups(claims: ClaimsReport) -> list[dict]:
    """Consecutive rows of one claim together (one accuracy row per metric), so the claim
    and its rule are written once."""
    groups: list[dict] = []
    for r in claims.rows:
        if groups and groups[-1]["claim"] == r.claim and groups[-1]["rule"] == r.rule:
            groups[-1]["rows"].append(r.model_dump())
        else:
            groups.append({"claim": r.claim, "rule": r.rule, "rows": [r.model_dump()]})
    return groups


def speed_rows(speeds: dict[str, Speed], eval_metrics: EvalMetrics) -> list[dict]:
    """Each variant's generation speed, and its tokens/s over the full-precision base's."""
    reference = speeds.get(artifacts.REFERENCE)
    rows = []
    for name in artifacts.VARIANTS:
        if name not in speeds:
            continue
        s = speeds[name]
        rows.append(
            {
                "label": eval_metrics.variants[name].label or name,
                **s.model_dump(),
                "vs_full": s.tokens_per_s / reference.tokens_per_s
                if reference and reference.tokens_per_s
                else None,
            }
        )
    return rows


def claims_section(
    claims: ClaimsReport | None, speeds: dict[str, Speed], eval_metrics: EvalMetrics
) -> dict | None:
    """The claims table and the speed measurement; None when the run has neither."""
    if claims is None and not speeds:
        return None
    return {
        "groups": claim_groups(claims) if claims else [],
        "summary": claims.summary if claims else None,
        "speed": speed_rows(speeds, eval_metrics),
        "speed_settings": next(iter(speeds.values()), None),
        "device": eval_metrics.settings.model_extra.get("device")
        if eval_metrics.settings.model_extra
        else None,
    }
