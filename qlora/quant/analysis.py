"""What the base's weights look like to a 4-bit quantizer, layer by layer.

For every linear layer bitsandbytes quantizes (formats.quantizable_linears: every
nn.Linear but the ones transformers keeps in 16 bits, lm_head among them) this measures
- the distribution: range, absmax, standard deviation, excess kurtosis, the share of
  weights beyond 3 and 6 standard deviations, and the absmax of each 64-weight block
  bitsandbytes scales by (median, max and max/median: one outlier sets its block's scale
  and leaves the other 63 weights few of the 16 code points);
- the relative error ||W - deq(q(W))|| / ||W|| that NF4, FP4 and LLM.int8()'s row-wise
  int8 leave (formats.squared_error: the same function the quantize report uses);
- a ranking, most damaged first, whose top names are the candidates for
  quantize.skip_modules (kept in 16 bits: qlora.models.loading.skip_list);
- a histogram of one layer's weights as NF4 sees them (divided by their block's absmax)
  beside the 16 NF4 code points.
How much of the error a LoftQ-initialised adapter takes back: qlora/quant/calibration.py.
Everything returned is JSON-serialisable (plain dicts, lists, numbers and strings).
"""

from __future__ import annotations

import time

import bitsandbytes.functional as bnbf
import torch

from qlora.core.params import QUANT_FORMATS
from qlora.quant.formats import (
    BLOCK_SIZE,
    error_summary,
    one_cpu_thread,
    quantizable_linears,
    squared_error,
    squared_norm,
)

HISTOGRAM_BINS = 128  # 8 bins between neighbouring NF4 code points on average: gaps show


TOP_K = 5  # layers named as most sensitive in the summary


def blocks(w: torch.Tensor, block_size: int = BLOCK_SIZE) -> torch.Tensor:
    """The weight as bitsandbytes blocks it: row-major, `block_size` consecutive weights a
    block, shape (blocks, block_size); a last partial block is padded with zeros, which
    leave its absmax as it is."""
    flat = w.detach().float().flatten()
    pad = -flat.numel() % block_size
    return (torch.nn.functional.pad(flat, (0, pad)) if pad else flat).view(-1, block_size)


def distribution(w: torch.Tensor, block_size: int = BLOCK_SIZE) -> dict:
    """Range, spread and tails of one weight, and the absmax of its quantization blocks.

    Moments are the population ones (divided by n; fp32 sums, exact to ~1e-6); excess
    kurtosis is 0 for a normal distribution, large when a few weights sit far out. The tail
    shares count weights further than 3 (6) standard deviations from the mean: 0.27 % (2e-9)
    for a normal distribution. Each statistic is one pass over the weight: this runs on
    ~100 M weights for the default model."""
    flat = w.detach().float().flatten()
    n = flat.numel()
    sq = (flat - flat.mean()).square_()
    var = sq.mean().item()
    lowest, highest = torch.aminmax(flat)
    block_absmax = blocks(flat, block_size).abs().amax(dim=1)
    absmax = block_absmax.max().item()
    median_block = torch.quantile(block_absmax, 0.5).item()
    return {
        "min": lowest.item(),
        "max": highest.item(),
        "absmax": absmax,
        "std": var**0.5,
        "excess_kurtosis": torch.dot(sq, sq).item() / n / var**2 - 3,
        "beyond_3_std": torch.count_nonzero(sq > 9 * var).item() / n,
        "beyond_6_std": torch.count_nonzero(sq > 36 * var).item() / n,
        "block_absmax_median": median_block,
        "block_absmax_max": absmax,
        "block_absmax_ratio": absmax / median_block,
    }


def layer_row(name: str, w: torch.Tensor, double_quant: bool) -> dict:
    """One layer's row: shape, norm, distribution and the relative error of each format."""
    w = w.detach().float()
    norm_sq = squared_norm(w)
    errors = {
        f"{fmt}_error": (squared_error(w, fmt, double_quant) / norm_sq) ** 0.5
        for fmt in QUANT_FORMATS
    }
    return {"name": name, "shape": list(w.shape), "norm": norm_sq**0.5, **distribution(w), **errors}


def rank_layers(rows: list[dict]) -> list[dict]:
    """Rows most damaged by NF4 first (ties: the heavier-tailed first), numbered from 1."""
    ranked = sorted(rows, key=lambda r: (-r["nf4_error"], -r["excess_kurtosis"]))
    return [{**row, "rank": i} for i, row in enumerate(ranked, start=1)]


def sensitive_layers(ranked: list[dict], k: int = TOP_K) -> list[str]:
    """Names of the k layers NF4 damages most: the candidates to keep in 16 bits (full
    module names, as quantize.skip_modules takes them)."""
    return [row["name"] for row in ranked[:k]]


def nf4_code_points(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16 NF4 levels in [-1, 1] (bitsandbytes' table; its default device is CUDA)."""
    return bnbf.get_4bit_type("nf4", device=device).float()


def histogram(name: str, w: torch.Tensor, bins: int = HISTOGRAM_BINS) -> dict:
    """One layer's weights divided by their block's absmax (the [-1, 1] values NF4 rounds to
    its nearest code point), binned, and the share of weights each code point receives.
    NF4's levels are quantiles of a normal distribution, so for Gaussian weights each code
    point gets a similar share; heavy tails crowd the middle codes."""
    grouped = blocks(w)
    absmax = grouped.abs().amax(dim=1, keepdim=True)
    # An all-zero block has absmax 0: its weights are 0 whatever the scale.
    scaled = (grouped / absmax.clamp_min(torch.finfo(torch.float32).tiny)).flatten()[: w.numel()]
    codes = nf4_code_points(scaled.device)
    nearest = torch.bucketize(scaled, (codes[1:] + codes[:-1]) / 2)
    return {
        "layer": name,
        "bin_edges": torch.linspace(-1, 1, bins + 1).tolist(),
        "counts": torch.histc(scaled, bins=bins, min=-1, max=1).long().tolist(),
        "code_points": codes.tolist(),
        "code_point_share": (torch.bincount(nearest, minlength=16) / w.numel()).tolist(),
    }


def layers_error(rows: list[dict], fmt: str) -> dict:
    """error_summary of the analysis' rows for one format."""
    return error_summary(
        [(r[f"{fmt}_error"] * r["norm"]) ** 2 for r in rows], [r["norm"] ** 2 for r in rows]
    )


def summary(ranked: list[dict], top_k: int = TOP_K) -> dict:
    """For a metrics JSON: each format's mean / max / overall error, and the worst layers."""
    return {
        "layers": len(ranked),
        "weights": sum(r["shape"][0] * r["shape"][1] for r in ranked),
        "errors": {fmt: layers_error(ranked, fmt) for fmt in QUANT_FORMATS},
        "max_excess_kurtosis": max(r["excess_kurtosis"] for r in ranked),
        "max_block_absmax_ratio": max(r["block_absmax_ratio"] for r in ranked),
        "most_sensitive": sensitive_layers(ranked, top_k),
    }


def analyse(
    model: torch.nn.Module,
    double_quant: bool = True,
    top_k: int = TOP_K,
    bins: int = HISTOGRAM_BINS,
) -> dict:
    """Every quantizable layer of `model` (full precision) analysed: {"summary", "layers"
    (ranked rows), "histogram" (of the most sensitive layer), "seconds"}.

    The histogram shows the most sensitive layer rather than a typical one: a median layer
    of a trained model looks like any other bell curve, while the worst one shows how its
    weights sit against the code points (crowded in the middle when the tails are heavy)."""
    start = time.perf_counter()
    with one_cpu_thread():
        rows = [layer_row(name, m.weight, double_quant) for name, m in quantizable_linears(model)]
        ranked = rank_layers(rows)
        worst = ranked[0]["name"]
        hist = histogram(worst, model.get_submodule(worst).weight, bins)
    return {
        "summary": {**summary(ranked, top_k), "double_quant": double_quant},
        "layers": ranked,
        "histogram": hist,
        "seconds": time.perf_counter() - start,
    }
