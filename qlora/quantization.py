"""The `quantize` stage's library: what 4-bit quantization does to the base, measured.

Loads the base in 16 bits and in 4 bits through qlora/models.py (the very loader
finetune and evaluate use) and reports the parameter count, the memory of each, the bits
per parameter actually achieved (the quantization constants included), and the error of
the dequantized weights for NF4 and FP4 side by side. The 4-bit model is not saved:
quantizing on load takes seconds and keeps one copy of the weights on disk.
Output: reports/quantize.json (a DVC metric)
"""

from __future__ import annotations

from pathlib import Path

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import torch

from qlora import artifacts
from qlora.artifacts import BASE_MODEL_DIR
from qlora.models import compute_dtype, footprint_bytes, load_4bit, load_full
from qlora.params import QuantizeParams

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


def four_bit_layout(model: torch.nn.Module) -> dict:
    """Bytes of the packed 4-bit weights plus their constants, per quantized weight."""
    packed = consts = n_weights = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            w = module.weight
            packed += w.numel() * w.element_size()
            consts += quant_state_bytes(w.quant_state)
            n_weights += int(torch.Size(w.quant_state.shape).numel())
    return {"packed_bytes": packed, "constant_bytes": consts, "quantized_weights": n_weights}


def quantization_error(model: torch.nn.Module, quant_type: str, double_quant: bool) -> dict:
    """Relative error ||W - deq(q(W))|| / ||W|| over every linear weight bnb would quantize."""
    errors, sq_err, sq_norm = [], 0.0, 0.0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or name.endswith("lm_head"):
            continue  # transformers keeps lm_head in 16 bits
        w = module.weight.detach().float()
        q, state = bnbf.quantize_4bit(w, quant_type=quant_type, compress_statistics=double_quant)
        diff = (bnbf.dequantize_4bit(q, state).float() - w).pow(2).sum().item()
        norm = w.pow(2).sum().item()
        errors.append((diff / norm) ** 0.5)
        sq_err += diff
        sq_norm += norm
    return {
        "mean_relative_error": sum(errors) / len(errors),
        "max_relative_error": max(errors),
        "overall_relative_error": (sq_err / sq_norm) ** 0.5,
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


def measure(q: QuantizeParams, path: Path | str = BASE_MODEL_DIR, trust: bool = False) -> dict:
    """reports/quantize.json (artifacts.QuantizeReport): sizes and bits are keyed "full" and
    by `quant_type`, the 4-bit type measured (nf4 or fp4), which the report reads them by;
    the weight error is given for both types, whichever is configured."""
    full = load_full(path, "bfloat16", trust)
    parameters = sum(p.numel() for p in full.parameters())
    full_bytes = footprint_bytes(full)
    errors = {t: quantization_error(full, t, q.double_quant) for t in ("nf4", "fp4")}
    del full
    four = load_4bit(q, path, trust)
    layout = four_bit_layout(four)
    four_bytes = footprint_at_16bit(four) + layout["constant_bytes"]
    loaded_bytes = footprint_bytes(four) + layout["constant_bytes"]
    del four
    return {
        "parameters": parameters,
        "quant_type": q.quant_type,
        "double_quant": q.double_quant,
        "compute_dtype": str(compute_dtype(q.compute_dtype)).removeprefix("torch."),
        "full_dtype": "bfloat16",
        "bytes": {"full": full_bytes, q.quant_type: four_bytes},
        # As loaded here: unquantized tensors in the compute dtype (fp32 on a CPU).
        "bytes_as_loaded": {q.quant_type: loaded_bytes},
        "bits_per_parameter": {
            "full": 8 * full_bytes / parameters,
            # Whole model: embeddings and norms stay 16-bit, so this is above 4.
            q.quant_type: 8 * four_bytes / parameters,
            # The quantized linear weights alone, constants included (~4.13 with double quant).
            f"{q.quant_type}_linear_layers": 8
            * (layout["packed_bytes"] + layout["constant_bytes"])
            / layout["quantized_weights"],
        },
        "memory_ratio": four_bytes / full_bytes,
        "quant_error": errors,
    }
