"""bitsandbytes' storage formats, read and measured: the layers a 4-bit load quantizes,
a weight quantized and dequantized in software, a loaded layer's effective weight
(repacked or not), error norms and the bytes of packed weights and their constants.
The primitives the weight analysis, LoftQ and the quantize stage share."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import torch

from qlora.models.loading import (
    skipped_by_default,
)


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


@contextmanager
def one_cpu_thread() -> Iterator[None]:
    """Run torch's CPU ops on one thread, then restore the setting. The analysis is ~200
    small passes a model; on the 2-core CPU with other work running, two threads made it
    6x slower in wall time (SmolLM2's shape: 125 s, 60 s of CPU, against 21 s, 14 s of
    CPU on one thread): idle OpenMP threads spin while they wait for a core. Weights on a
    GPU are unaffected."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
