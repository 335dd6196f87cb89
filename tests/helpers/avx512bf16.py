"""bitsandbytes' two CPU paths, both reachable on any CPU.

On a CPU with AVX512-BF16 (`avx512_bf16` in /proc/cpuinfo), bitsandbytes 0.50 repacks a
4-bit layer on its first eval-mode no-grad forward: its codes are reordered into tiles and
its block scales become plain bf16, and from then on a fused bf16 kernel computes with it.
Without AVX512-BF16 nothing is repacked and the layer dequantizes to fp32. Code that reads
4-bit weights, and every number computed from a quantized forward, can differ between the
two, so the tests that quantize, calibrate, evaluate or export run on both:

- the path this CPU has runs natively;
- the other is simulated. AVX512-BF16 on a CPU without it: `has_avx512bf16` (read when a
  Linear4bit is built) is made to say yes, so bitsandbytes' own repacking code runs, and the
  fused kernel, which cannot run here, is replaced by `reference_kernel`. The plain path on
  a CPU with AVX512-BF16: `has_avx512bf16` is made to say no.
On the AVX512-BF16 path, native or simulated, every layer repacked is counted in
`repacked_layers`, so a test can show that the path was really taken.

`reference_kernel` does the fused kernel's arithmetic (bf16 activations times the codes
scaled by the bf16 block scales) on weights recorded when bitsandbytes repacks a layer,
from the layer's plain storage. It never reads the repacked tensors, so it is ground truth
for code that does.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator

import bitsandbytes.functional as bnbf
import bitsandbytes.nn.modules as bnb_modules
import torch

CPU_HAS_AVX512BF16 = bnbf.has_avx512bf16()
# Set to 1 to run the AVX512-BF16 path on `reference_kernel` even where the CPU has the real
# kernel: how a CPU without AVX512-BF16 runs these tests, checked on one that has it.
REFERENCE_KERNEL_ENV = "QLORA_TEST_REFERENCE_KERNEL"
PATHS = ("plain", "avx512bf16")  # the 4-bit CPU path without and with AVX512-BF16
NATIVE = "avx512bf16" if CPU_HAS_AVX512BF16 else "plain"

_REFERENCE_WEIGHT = "_reference_weight"  # set on a QuantState when it is repacked


def weight_before_repacking(data: torch.Tensor, state: bnbf.QuantState) -> torch.Tensor:
    """The fp32 weight a repacked layer computes with, from its storage before repacking:
    each block's codes times that block's fp32 scale rounded to bf16 (what the repacking
    keeps of a double-quantized scale)."""
    plain = copy.copy(state)
    absmax = state.absmax
    if state.nested:
        absmax = bnbf.dequantize_blockwise(absmax, state.state2) + state.offset
    plain.absmax = absmax.float().to(torch.bfloat16).float()
    plain.nested, plain.dtype = False, torch.float32
    return bnbf.dequantize_4bit(data, plain).float()


# Layers repacked since the current `cpu_path("avx512bf16")` block began: a test can check
# that the code it ran really went down that path.
repacked_layers: list[tuple[int, ...]] = []


def _recording_repack(data: torch.Tensor, state: bnbf.QuantState, *args, **kwargs):
    weight = weight_before_repacking(data, state)
    packed, state = _REAL_REPACK(data, state, *args, **kwargs)
    setattr(state, _REFERENCE_WEIGHT, weight)
    repacked_layers.append(tuple(state.shape))
    return packed, state


_REAL_REPACK = bnb_modules._convert_weight_packed_for_cpu


def reference_kernel(A, B, out=None, transposed_A=False, transposed_B=False, state=None):
    """Stands in for bitsandbytes' fused AVX512-BF16 4-bit kernel (`gemv_4bit` on a repacked
    layer): bf16 activations and weights, a bf16 result, as that kernel returns."""
    weight = getattr(state, _REFERENCE_WEIGHT, None)
    if weight is None:
        return _REAL_GEMV(A, B, out, transposed_A, transposed_B, state)
    result = torch.nn.functional.linear(A.to(torch.bfloat16), weight.to(torch.bfloat16))
    if out is not None:
        return out.copy_(result)
    return result


_REAL_GEMV = bnbf.gemv_4bit


@contextlib.contextmanager
def cpu_path(path: str) -> Iterator[str]:
    """Run the block on bitsandbytes' `path` ("plain" or "avx512bf16"): natively where this
    CPU has it, simulated otherwise. Only 4-bit layers built inside the block take it."""
    import pytest

    repacked_layers.clear()
    with pytest.MonkeyPatch.context() as patch:
        if path != NATIVE:
            patch.setattr(bnb_modules, "has_avx512bf16", lambda: path == "avx512bf16")
        if path == "avx512bf16":
            patch.setattr(bnb_modules, "_convert_weight_packed_for_cpu", _recording_repack)
            if path != NATIVE or os.environ.get(REFERENCE_KERNEL_ENV) == "1":
                patch.setattr(bnbf, "gemv_4bit", reference_kernel)
        yield path


def is_repacked(layer: torch.nn.Module) -> bool:
    return bool(getattr(layer.weight.quant_state, "packing_format_for_cpu", False))
