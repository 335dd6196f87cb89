"""The weight analysis against ground truth computed here with numpy, scipy and plain torch:
a tiny Llama with outliers planted in one layer, Gaussian weights, and NF4 and LLM.int8()
written out by hand."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch
from transformers import LlamaForCausalLM

from qlora.core.params import QUANT_FORMATS
from qlora.quant import analysis as wa
from qlora.quant.formats import quantizable_linears, squared_error

PLANTED = "model.layers.0.mlp.down_proj"  # 64 x 128: 8192 weights, 128 blocks of 64
OUTLIERS = {5: 0.6, 700: -0.6, 4000: 0.6, 8100: -0.6}  # flat index -> value: 4 blocks
# NF4's 16 levels (QLoRA paper, appendix E), written out: the analysis reads bitsandbytes'.
NF4 = torch.tensor(
    [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
     -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
     0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
     0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]
)  # fmt: skip


def tiny_llama(path) -> LlamaForCausalLM:
    """conftest's tiny Llama (2 layers, hidden 64, tied embeddings), in float32."""
    return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)


@pytest.fixture(scope="module")
def planted(tiny_model_dir) -> tuple[LlamaForCausalLM, np.ndarray]:
    """The tiny Llama with four 30-sigma weights in PLANTED, and that weight as numpy."""
    model = tiny_llama(tiny_model_dir)
    weight = model.get_submodule(PLANTED).weight
    with torch.no_grad():
        for index, value in OUTLIERS.items():
            weight.view(-1)[index] = value
    return model, weight.detach().double().numpy()


@pytest.fixture(scope="module")
def analysis(planted) -> dict:
    return wa.analyse(planted[0], double_quant=False, top_k=3)


def nf4_by_hand(w: torch.Tensor) -> torch.Tensor:
    """NF4 without double quant from its definition: each block of 64 divided by its absmax,
    rounded to the nearest level, scaled back."""
    blocks = w.double().reshape(-1, 64)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    nearest = (blocks / absmax).unsqueeze(-1).sub(NF4.double()).abs().argmin(dim=-1)
    return (NF4.double()[nearest] * absmax).reshape(w.shape)


def relative(approx: torch.Tensor, w: torch.Tensor) -> float:
    return ((approx.double() - w.double()).norm() / w.double().norm()).item()


def test_the_planted_layer_ranks_first_and_its_statistics_are_exact(planted, analysis):
    _, w = planted
    row = analysis["layers"][0]
    assert row["name"] == PLANTED and row["rank"] == 1
    assert analysis["summary"]["most_sensitive"][0] == PLANTED
    assert analysis["summary"]["layers"] == 14  # 2 layers x 7 linears; lm_head stays 16-bit
    d = w - w.mean()
    expected = {
        "min": w.min(),
        "max": w.max(),
        "absmax": 0.6,
        "std": w.std(),
        "excess_kurtosis": scipy.stats.kurtosis(w.ravel(), fisher=True, bias=True),
        "beyond_3_std": np.mean(np.abs(d) > 3 * w.std()),
        "block_absmax_median": np.median(np.abs(w).reshape(-1, 64).max(axis=1)),
        "block_absmax_max": 0.6,
    }
    for key, value in expected.items():
        assert row[key] == pytest.approx(value, rel=1e-5), key
    # Golden: the four planted weights and nothing of the Gaussian lie beyond 6 sigma.
    assert row["beyond_6_std"] == 4 / 8192
    assert row["block_absmax_ratio"] == pytest.approx(0.6 / expected["block_absmax_median"])
    others = analysis["layers"][1:]
    assert row["excess_kurtosis"] > 50 > max(r["excess_kurtosis"] for r in others)
    assert row["block_absmax_ratio"] > 8 > max(r["block_absmax_ratio"] for r in others)


def test_errors_match_nf4_and_int8_computed_by_hand(planted, analysis):
    model, _ = planted
    rows = {r["name"]: r for r in analysis["layers"]}
    for name in (PLANTED, "model.layers.1.self_attn.k_proj"):
        w = model.get_submodule(name).weight.detach()
        assert rows[name]["nf4_error"] == pytest.approx(relative(nf4_by_hand(w), w), rel=1e-4)
        # LLM.int8() weights: fp16, one absmax per output row, 127 levels a side.
        half = w.half().double()
        row_absmax = half.abs().amax(dim=1, keepdim=True)
        int8 = torch.round(half * 127 / row_absmax) * row_absmax / 127
        assert rows[name]["int8_error"] == pytest.approx(relative(int8, w), rel=1e-3)
    # The planted outliers squash their blocks' other 63 weights onto NF4's zero level.
    assert rows[PLANTED]["nf4_error"] > 1.3 * max(r["nf4_error"] for r in analysis["layers"][1:])
    # The summary's overall error: every quantized weight as one vector, by hand.
    weights = [m.weight.detach() for _, m in quantizable_linears(model)]
    error_sq = sum((nf4_by_hand(w) - w.double()).pow(2).sum().item() for w in weights)
    norm_sq = sum(w.double().pow(2).sum().item() for w in weights)
    overall = analysis["summary"]["errors"]["nf4"]["overall_relative_error"]
    assert overall == pytest.approx((error_sq / norm_sq) ** 0.5, rel=1e-4)


def test_histogram_shows_the_most_sensitive_layer_against_the_nf4_levels(planted, analysis):
    model, _ = planted
    hist = analysis["histogram"]
    assert hist["layer"] == PLANTED
    assert hist["code_points"] == pytest.approx(NF4.tolist())
    assert len(hist["bin_edges"]) == len(hist["counts"]) + 1 == wa.HISTOGRAM_BINS + 1
    assert sum(hist["counts"]) == 8192
    scaled = model.get_submodule(PLANTED).weight.detach().double().reshape(-1, 64)
    scaled = (scaled / scaled.abs().amax(dim=1, keepdim=True)).flatten()
    nearest = (scaled.unsqueeze(-1) - NF4.double()).abs().argmin(dim=-1)
    share = torch.bincount(nearest, minlength=16) / 8192
    assert hist["code_point_share"] == pytest.approx(share.tolist(), abs=1e-6)
    # Each of the 128 blocks' absmax weight lands on the level -1 or 1.
    assert hist["code_point_share"][0] + hist["code_point_share"][15] >= 128 / 8192


def test_nf4_beats_fp4_and_int8_beats_both_on_gaussian_weights():
    w = torch.randn(256, 512, generator=torch.Generator().manual_seed(1)) * 0.02
    norm_sq = w.pow(2).sum().item()
    error = {f: (squared_error(w, f, double_quant=True) / norm_sq) ** 0.5 for f in QUANT_FORMATS}
    # NF4's levels are normal quantiles: ~9 % error where FP4 leaves ~12 %.
    assert 0.08 < error["nf4"] < 0.10 < 0.11 < error["fp4"] < 0.13
    assert error["int8"] < error["nf4"] / 8


def test_a_plain_module_leaves_only_lm_head_out():
    model = torch.nn.Module()
    model.proj, model.lm_head = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    assert [name for name, _ in quantizable_linears(model)] == ["proj"]
