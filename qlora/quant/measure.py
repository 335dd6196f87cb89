"""The `quantize` stage's library: what quantization does to the base, measured.

The three steps of quantization, on the base about to be trained:
- analyse: each linear layer's weight distribution and the error every format leaves in
  it, ranked (qlora/quant/analysis.py);
- convert: the base loaded in NF4, FP4 and LLM.int8() through qlora/models/loading.py (the very
  loader finetune and evaluate use), each with its memory, bits per parameter (the
  quantization constants included) and weight error; a format bitsandbytes cannot run on
  this device is reported as such, not failed on, unless it is the one configured;
- calibrate: how much of the configured format's error a LoftQ-initialised adapter at
  finetune.lora's rank and scaling takes back (qlora/quant/calibration.py).
The quantized model is not saved: quantizing on load takes seconds and keeps one copy of
the weights on disk.
Outputs: reports/quantize.json (a DVC metric), reports/quantize_layers.json (per layer)
"""

from __future__ import annotations

from pathlib import Path

import bitsandbytes as bnb
import torch

from qlora.core.params import QUANT_FORMATS, LoraParams, QuantizeParams
from qlora.core.paths import BASE_MODEL_DIR
from qlora.models.loading import (
    UnsupportedFormat,
    compute_dtype,
    footprint_bytes,
    load_full,
    load_quantized,
)
from qlora.quant.analysis import layers_error
from qlora.quant.formats import quantized_layout


def footprint_at_16bit(model: torch.nn.Module) -> int:
    """Bytes with every tensor that is not 4-bit counted at 2 bytes. On a CPU the unquantized
    parts (embeddings, norms) are loaded in the fp32 compute dtype; counting them at 16 bits
    compares like with like against the 16-bit model."""
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if isinstance(t, bnb.nn.Params4bit) or not t.is_floating_point():
            total += t.numel() * t.element_size()
        else:
            total += t.numel() * 2
    return total


def format_footprint(q: QuantizeParams, fmt: str, path: Path | str, trust: bool) -> dict:
    """`fmt` loaded for real through the shared loader (with q.skip_modules): its bytes
    counted at 16 bits for what is not quantized, as loaded, and per quantized weight.
    {"supported": False, "reason"} where bitsandbytes cannot run `fmt` on this device (the
    loader's own check)."""
    try:
        model = load_quantized(q, path, trust, fmt)
    except UnsupportedFormat as e:
        return {"supported": False, "reason": e.reason}
    layout = quantized_layout(model)
    footprint = {
        "supported": True,
        "bytes": footprint_at_16bit(model) + layout["constant_bytes"],
        "bytes_as_loaded": footprint_bytes(model) + layout["constant_bytes"],
        "quantized_weights": layout["quantized_weights"],
        "linear_bits": 8
        * (layout["packed_bytes"] + layout["constant_bytes"])
        / layout["quantized_weights"],
    }
    del model
    return footprint


def kept_in_16_bits(name: str, skip_modules: list[str]) -> bool:
    """Whether quantize.skip_modules keeps layer `name` in 16 bits (transformers' rule)."""
    from transformers.quantizers.quantizers_utils import should_convert_module

    return bool(skip_modules) and not should_convert_module(name, skip_modules)


def sixteen_bit_cost(rows: list[dict], linear_bits: float) -> int:
    """Bytes that keeping these layers in 16 bits adds over quantizing them."""
    weights = sum(r["shape"][0] * r["shape"][1] for r in rows)
    return round(weights * (2 - linear_bits / 8))


def skip_summary(q: QuantizeParams, ranked: list[dict], top_k: int, linear_bits: float) -> dict:
    """The layers kept in 16 bits and the ones the analysis suggests, with their cost in
    bytes and, for the suggestion, the share of the configured format's squared weight
    error it would remove."""
    configured = [r for r in ranked if kept_in_16_bits(r["name"], q.skip_modules)]
    suggested = ranked[:top_k]
    key = f"{q.quant_type}_error"
    squared = [(r[key] * r["norm"]) ** 2 for r in ranked]
    return {
        "configured": list(q.skip_modules),
        "configured_layers": [r["name"] for r in configured],
        "configured_extra_bytes": sixteen_bit_cost(configured, linear_bits),
        "suggested": [r["name"] for r in suggested],
        "suggested_extra_bytes": sixteen_bit_cost(suggested, linear_bits),
        "suggested_error_share": sum(squared[:top_k]) / sum(squared),
    }


def measure(
    q: QuantizeParams,
    lora: LoraParams,
    path: Path | str = BASE_MODEL_DIR,
    trust: bool = False,
) -> tuple[dict, dict]:
    """(reports/quantize.json, reports/quantize_layers.json). quantize.json (a DVC metric,
    QuantizeReport) keys sizes by "full" and by `quant_type`, the format
    training and evaluation load; "formats" has nf4, fp4 and int8 each loaded for real;
    "analysis", "skip_modules" and "loftq" (at the adapter's rank and scaling, `lora`)
    summarise the per-layer file."""
    from qlora.quant.analysis import analyse
    from qlora.quant.calibration import loftq_errors

    full = load_full(path, "bfloat16", trust)
    parameters = sum(p.numel() for p in full.parameters())
    full_bytes = footprint_bytes(full)
    analysis = analyse(full, q.double_quant, q.analysis.top_k)
    loftq = loftq_errors(
        full, q.quant_type, q.double_quant, lora.r, lora.alpha / lora.r, q.analysis.loftq_every
    )
    del full
    ranked = analysis["layers"]
    # The error of what is quantized: layers kept in 16 bits have none.
    quantized_rows = [r for r in ranked if not kept_in_16_bits(r["name"], q.skip_modules)]
    errors = {fmt: layers_error(quantized_rows, fmt) for fmt in QUANT_FORMATS}
    formats = {}
    for fmt in QUANT_FORMATS:
        footprint = format_footprint(q, fmt, path, trust)
        if footprint["supported"]:
            footprint["memory_ratio"] = footprint["bytes"] / full_bytes
            footprint["bits_per_parameter"] = 8 * footprint["bytes"] / parameters
            footprint["error"] = errors[fmt]
        formats[fmt] = footprint
    chosen = formats[q.quant_type]
    if not chosen["supported"]:
        raise UnsupportedFormat(q.quant_type, chosen["reason"])
    qt = q.quant_type
    report = {
        "parameters": parameters,
        "quant_type": qt,
        "double_quant": q.double_quant,
        "compute_dtype": str(compute_dtype(q.compute_dtype)).removeprefix("torch."),
        "full_dtype": "bfloat16",
        "bytes": {"full": full_bytes, qt: chosen["bytes"]},
        # The weights stored quantized; the rest (embeddings, norms, skipped layers) 16-bit.
        "quantized_weights": chosen["quantized_weights"],
        # As loaded here: unquantized tensors in the compute dtype (fp32 on a CPU).
        "bytes_as_loaded": {qt: chosen["bytes_as_loaded"]},
        "bits_per_parameter": {
            "full": 8 * full_bytes / parameters,
            # Whole model: embeddings and norms stay 16-bit, so this is above 4 (8).
            qt: chosen["bits_per_parameter"],
            # The quantized linear weights alone, constants included (~4.13 for NF4 with
            # double quant, ~8.03 for int8).
            f"{qt}_linear_layers": chosen["linear_bits"],
        },
        "memory_ratio": chosen["memory_ratio"],
        "quant_error": errors,
        "formats": formats,
        "analysis": {**analysis["summary"], "seconds": analysis["seconds"]},
        "skip_modules": skip_summary(q, ranked, q.analysis.top_k, chosen["linear_bits"]),
        "loftq": loftq["summary"],
    }
    layers = {
        "layers": ranked,
        "histogram": analysis["histogram"],
        "loftq_layers": loftq["layers"],
    }
    return report, layers
