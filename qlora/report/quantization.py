"""The report's view of what quantization does to the weights, and of the 4-bit method's
published claims against this run (the sections qlora/report/build.py adds for quantization).

Reads, beside the inputs build.py already has:
- quantize.json's "formats" (NF4, FP4 and int8 each loaded for real), "analysis" (the
  summary of qlora.quant.analysis), "skip_modules" and "loftq";
- reports/quantize_layers.json: every quantized layer ranked most damaged by NF4 first, and
  a histogram of the worst layer's block-scaled weights beside the 16 NF4 code points;
- reports/claims.json: qlora.evaluation.claims.check_claims' rows, and each evaluated variant's
  generation "speed" in reports/eval/metrics.json.
Every one of these may be absent (files of older runs): a part of the report is shown only
when its data is there. What is there was read through its schema (qlora/schemas/), so a
renamed field fails with the file and the field, never as a blank cell.
"""

from __future__ import annotations

from markupsafe import Markup

from qlora.core import paths
from qlora.core.params import QUANT_FORMATS
from qlora.report.plots import Series, binned_histogram, ranked_bars
from qlora.schemas.claims import ClaimsReport
from qlora.schemas.metrics import EvalMetrics, Speed
from qlora.schemas.quantize import (
    Analysis,
    FormatResult,
    LayerRow,
    QuantizeLayers,
    QuantizeReport,
    WeightHistogram,
)

# Layers shown in "which layers suffer most" when quantize.json names no most sensitive.
TOP_LAYERS = 5


CHART_LABELS = 3  # bars named on the per-layer chart: more names than that crowd it


def format_name(key: str) -> str:
    """ "NF4", "FP4", but "int8", as bitsandbytes (LLM.int8()) and the paper write it."""
    return key if key == "int8" else key.upper()


def generation_speeds(eval_metrics: EvalMetrics) -> dict[str, Speed]:
    """Each variant's speed, where evaluate measured one."""
    return {
        name: variant.speed
        for name, variant in eval_metrics.variants.items()
        if variant.speed is not None
    }


def format_rows(quantize: QuantizeReport, formats: dict[str, FormatResult]) -> list[dict]:
    """One row per format, the configured one marked; known formats first."""
    keys = [k for k in QUANT_FORMATS if k in formats] + [
        k for k in formats if k not in QUANT_FORMATS
    ]
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
    layers: QuantizeLayers | None,
    train: dict,
) -> dict:
    """Everything the "Quantization cost" section adds to its share-kept table: None (not
    shown) for each part whose data this run's files lack."""
    skip = quantize.skip_modules
    # The suggested layers' share of the quantized weights, beside their share of the error:
    # equal shares mean keeping them is no better than keeping any layers of that size.
    sizes = {r.name: r.shape[0] * r.shape[1] for r in layers.layers} if layers else {}
    suggested_weights = (
        sum(sizes[n] for n in skip.suggested) / quantize.analysis.weights
        if skip and quantize.analysis and all(n in sizes for n in skip.suggested)
        else None
    )
    return {
        "formats": format_rows(quantize, quantize.formats) if quantize.formats else [],
        "analysis": quantize.analysis,
        "layers": layers_view(layers, quantize.analysis) if layers is not None else None,
        "skip": skip,
        # What keeping the suggested layers in 16 bits adds to the configured model.
        "skip_ratio": skip.suggested_extra_bytes / quantize.four_bit_bytes
        if skip and quantize.four_bit_bytes
        else None,
        "skip_weight_share": suggested_weights,
        "loftq": quantize.loftq,
        "lora_init": lora_init_view(train),
    }


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
    reference = speeds.get(paths.REFERENCE)
    rows = []
    for name in paths.VARIANTS:
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
