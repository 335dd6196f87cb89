"""The `quantize` stage's library: what quantization does to the base, measured.

The three steps of quantization, on the base about to be trained:
- analyse: each linear layer's weight distribution and the error every format leaves in
  it, ranked (qlora/weight_analysis.py);
- convert: the base loaded in NF4, FP4 and LLM.int8() through qlora/models.py (the very
  loader finetune and evaluate use), each with its memory, bits per parameter (the
  quantization constants included) and weight error; a format bitsandbytes cannot run on
  this device is reported as such, not failed on, unless it is the one configured;
- calibrate: how much of the configured format's error a LoftQ-initialised adapter at
  finetune.lora's rank and scaling takes back (qlora/calibration.py).
The quantized model is not saved: quantizing on load takes seconds and keeps one copy of
the weights on disk.
Outputs: reports/quantize.json (a DVC metric), reports/quantize_layers.json (per layer)
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import torch

from qlora import artifacts
from qlora.artifacts import BASE_MODEL_DIR
from qlora.models import (
    UnsupportedFormat,
    compute_dtype,
    footprint_bytes,
    load_full,
    load_quantized,
    skipped_by_default,
)
from qlora.params import LoraParams, QuantizeParams

REPORT = artifacts.QUANTIZE_REPORT


def quant_state_bytes(state) -> int:
    """Bytes of a 4-bit layer's quantization constants (absmax, and with double quant the
    8-bit absmax plus its own fp32 scales and code book)."""
    total = state.absmax.numel() * state.absmax.element_size()
    if state.nested and state.state2 is not None:
        s2 = state.state2
        total += s2.absmax.numel() * s2.absmax.element_size()
        total += s2.code.numel() * s2.code.element_size()
    return total


def int8_row_scales(layer: bnb.nn.Linear8bitLt) -> torch.Tensor | None:
    """An LLM.int8() layer's fp32 scale per output row. bitsandbytes keeps them on the
    weight (`SCB`) until the layer's first forward pass, then on the layer's state."""
    if layer.weight.SCB is not None:
        return layer.weight.SCB
    return layer.state.SCB


def quantized_layout(model: torch.nn.Module) -> dict:
    """Bytes of the quantized weights and of their constants, and how many weights they
    hold: 4-bit layers (packed pairs, block scales) and LLM.int8() layers (one byte a
    weight, one fp32 scale a row: `SCB`, an attribute, not a parameter or a buffer)."""
    packed = consts = n_weights = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            w = module.weight
            packed += w.numel() * w.element_size()
            consts += quant_state_bytes(w.quant_state)
            n_weights += int(torch.Size(w.quant_state.shape).numel())
        elif isinstance(module, bnb.nn.Linear8bitLt):
            w, scales = module.weight, int8_row_scales(module)
            packed += w.numel() * w.element_size()
            consts += scales.numel() * scales.element_size()
            n_weights += w.numel()
    return {"packed_bytes": packed, "constant_bytes": consts, "quantized_weights": n_weights}


# bitsandbytes' 4-bit block size (Params4bit and quantize_4bit default to 64 on a CPU and a
# CUDA GPU): one absmax scale per 64 consecutive weights of the row-major weight.
BLOCK_SIZE = 64
FORMATS = ("nf4", "fp4", "int8")  # the 4-bit types, and LLM.int8()'s storage for comparison


def quantizable_linears(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Linear]]:
    """(name, module) of every linear layer bitsandbytes quantizes on a 4-bit load, matched by
    transformers' own rule (`replace_with_bnb_linear`: exactly nn.Linear, not skipped)."""
    from transformers.quantizers.quantizers_utils import should_convert_module

    skipped = skipped_by_default(model)
    for name, module in model.named_modules():
        if type(module) is torch.nn.Linear and should_convert_module(name, skipped):
            yield name, module


def dequantized(w: torch.Tensor, fmt: str, double_quant: bool = False) -> torch.Tensor:
    """deq(q(W)) in fp32 for `fmt` nf4 / fp4 (bitsandbytes' 4-bit blocks, double quantization
    of the scales per `double_quant`) or int8 (LLM.int8()'s row-wise absmax weights)."""
    w = w.detach().float()
    if fmt == "int8":
        # Int8Params quantizes the fp16 weight with this very op (bitsandbytes' CPU backend
        # runs it); double quantization does not exist for int8.
        q, row_absmax, _ = bnbf.int8_vectorwise_quant(w.half())
        return bnbf.int8_vectorwise_dequant(q, row_absmax).float()
    q, state = bnbf.quantize_4bit(
        w, blocksize=BLOCK_SIZE, quant_type=fmt, compress_statistics=double_quant
    )
    return bnbf.dequantize_4bit(q, state).float()


def layer_weight(layer: torch.nn.Module) -> torch.Tensor | None:
    """The fp32 weight a loaded bitsandbytes layer computes with, read from its stored form:
    4-bit blocks with their (double-quantized) scales, or int8 rows with their scales. None
    for a layer that is not quantized. The layer itself is left as it is.

    A 4-bit layer on a CPU with AVX512-BF16 is repacked by bitsandbytes on its first
    eval-mode no-grad forward: the 4-bit codes are reordered into tiles for the fused
    kernel and the block scales become plain bf16 (double quantization undone, then rounded).
    Reading that storage as the usual layout gives weights that are wrong everywhere, so a
    repacked layer is read through its own layout: the codes put back in order, scaled by
    the bf16 scales it now holds, which is exactly what its kernel multiplies by."""
    weight = layer.weight
    if isinstance(layer, bnb.nn.Linear4bit):
        state = weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            return _repacked_4bit_weight(weight.data, state)
        return bnbf.dequantize_4bit(weight.data, state).float()
    if isinstance(layer, bnb.nn.Linear8bitLt):
        return bnbf.int8_vectorwise_dequant(weight.data, int8_row_scales(layer)).float()
    return None


def _repacked_4bit_weight(data: torch.Tensor, state) -> torch.Tensor:
    """fp32 weight of a 4-bit layer in bitsandbytes' AVX512-BF16 CPU layout (see
    `layer_weight`). bitsandbytes' own inverse restores the code order, but it rewrites the
    state it is given and re-quantizes the scales, so it runs on a copy and only its codes
    are kept; the scales are the layer's bf16 ones, transposed back to one per block."""
    import copy

    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    codes, _ = _convert_weight_packed_for_cpu_inverse(data.clone(), copy.copy(state))
    plain = copy.copy(state)
    plain.absmax = state.absmax.T.reshape(-1).float()  # stored as (blocks of a row, rows)
    plain.nested, plain.dtype, plain.packing_format_for_cpu = False, torch.float32, False
    return bnbf.dequantize_4bit(codes, plain).float()


def squared_norm(t: torch.Tensor) -> float:
    """||t||^2. vector_norm is one pass without a temporary (a float64 sum is ~10x slower),
    and its fp32 accumulation is exact to ~1e-6 relative over millions of weights."""
    return torch.linalg.vector_norm(t.float()).item() ** 2


def squared_error(w: torch.Tensor, fmt: str, double_quant: bool = False) -> float:
    """||W - deq(q(W))||^2 of one weight for one format (see `dequantized`)."""
    return squared_norm(dequantized(w, fmt, double_quant) - w.detach().float())


def error_summary(squared_errors: list[float], squared_norms: list[float]) -> dict:
    """Per-layer relative errors ||W - deq(q(W))|| / ||W|| summarised: their mean and max, and
    the error of all layers taken as one vector (large layers weigh more)."""
    errors = [(e / n) ** 0.5 for e, n in zip(squared_errors, squared_norms, strict=True)]
    return {
        "mean_relative_error": sum(errors) / len(errors),
        "max_relative_error": max(errors),
        "overall_relative_error": (sum(squared_errors) / sum(squared_norms)) ** 0.5,
        "layers": len(errors),
    }


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


def layers_error(rows: list[dict], fmt: str) -> dict:
    """error_summary of the analysis' rows for one format."""
    return error_summary(
        [(r[f"{fmt}_error"] * r["norm"]) ** 2 for r in rows], [r["norm"] ** 2 for r in rows]
    )


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
    artifacts.QuantizeReport) keys sizes by "full" and by `quant_type`, the format
    training and evaluation load; "formats" has nf4, fp4 and int8 each loaded for real;
    "analysis", "skip_modules" and "loftq" (at the adapter's rank and scaling, `lora`)
    summarise the per-layer file."""
    from qlora.calibration import loftq_errors
    from qlora.weight_analysis import analyse

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
    errors = {fmt: layers_error(quantized_rows, fmt) for fmt in FORMATS}
    formats = {}
    for fmt in FORMATS:
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
