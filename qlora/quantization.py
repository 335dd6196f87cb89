"""The `quantize` stage's library: what 4-bit quantization does to the base, measured.

Loads the base in 16 bits and in 4 bits through qlora/models.py (the very loader
finetune and evaluate use) and reports the parameter count, the memory of each, the bits
per parameter actually achieved (the quantization constants included), and the error of
the dequantized weights for NF4 and FP4 side by side. The per-layer pieces (which layers
bitsandbytes quantizes, deq(q(W)) for nf4 / fp4 / int8, the error summary) are shared with
qlora/weight_analysis.py, which ranks the layers. The 4-bit model is not saved:
quantizing on load takes seconds and keeps one copy of the weights on disk.
Output: reports/quantize.json (a DVC metric)
"""

from __future__ import annotations

from collections.abc import Iterator
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


# bitsandbytes' 4-bit block size (Params4bit and quantize_4bit default to 64 on a CPU and a
# CUDA GPU): one absmax scale per 64 consecutive weights of the row-major weight.
BLOCK_SIZE = 64
FORMATS = ("nf4", "fp4", "int8")  # the 4-bit types, and LLM.int8()'s storage for comparison


def skipped_by_default(model: torch.nn.Module) -> list[str]:
    """Module names transformers' bitsandbytes quantizer leaves in 16 bits when no
    `llm_int8_skip_modules` is given: the output embeddings (lm_head), tied weights, the last
    module, and the model's `_keep_in_fp32_modules`. A plain nn.Module: just lm_head."""
    from transformers import PreTrainedModel
    from transformers.quantizers.base import get_keys_to_not_convert

    if not isinstance(model, PreTrainedModel):
        return ["lm_head"]
    return sorted(set(get_keys_to_not_convert(model)) | set(model._keep_in_fp32_modules or ()))


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


def quantization_error(model: torch.nn.Module, quant_type: str, double_quant: bool) -> dict:
    """Relative error ||W - deq(q(W))|| / ||W|| over every linear weight bnb would quantize."""
    weights = [module.weight for _, module in quantizable_linears(model)]
    return error_summary(
        [squared_error(w, quant_type, double_quant) for w in weights],
        [squared_norm(w) for w in weights],
    )


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
        # The weights stored in 4 bits; the rest (embeddings, norms) stays 16-bit.
        "quantized_weights": layout["quantized_weights"],
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
