"""The simulation of bitsandbytes' AVX512-BF16 path (tests/helpers/avx512bf16.py) against the real
thing, where this CPU has it: the reference kernel that stands in for the fused one on other
CPUs must compute what the fused kernel computes."""

from __future__ import annotations

import pytest
import torch

from helpers.avx512bf16 import CPU_HAS_AVX512BF16, cpu_path, is_repacked, reference_kernel
from qlora.core.params import shipped_params
from qlora.models.loading import load_quantized


@pytest.mark.skipif(
    not CPU_HAS_AVX512BF16,
    reason="bitsandbytes' fused AVX512-BF16 kernel runs only on a CPU with AVX512-BF16 (no "
    "avx512_bf16 in /proc/cpuinfo here): there is nothing to compare the reference with",
)
@pytest.mark.parametrize(
    "name", ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.k_proj"]
)
def test_the_reference_kernel_computes_what_the_fused_kernel_does(tiny_model_dir, name):
    q = shipped_params().quantize.model_copy(update={"compute_dtype": "float32"})
    with cpu_path("avx512bf16"):
        layer = load_quantized(q, tiny_model_dir).get_submodule(name)
        layer.eval()
        x = torch.randn(5, layer.in_features, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            fused = layer(x)  # repacks, then runs bitsandbytes' own kernel
        assert is_repacked(layer)
        reference = reference_kernel(x, layer.weight.data, state=layer.weight.quant_state)
    # Both round each output to bf16 (8 significant bits: 2^-9 relative each) and may round
    # the products differently inside: a few bf16 steps apart, no more (measured: 2^-8.4).
    gap = (fused - reference.float()).norm() / reference.float().norm()
    assert gap < 2**-7, f"the reference is {gap:.2%} (relative norm) from the fused kernel"
