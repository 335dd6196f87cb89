"""Calibration: LoRA adapters that start by cancelling the quantization error (LoftQ).

Plain QLoRA starts its adapters at zero (peft's B = 0), so training begins from the
quantized base and its error. LoftQ (Li et al., 2023) starts them at the best rank-r
approximation of that error instead: with R = W - deq(q(W)) and its truncated SVD
R_r = U_r S_r V_r^T (the closest rank-r matrix, Eckart-Young), the adapter's
scaling * B @ A equals R_r, so the adapted layer computes deq(q(W)) + R_r, nearer W.

This is LoftQ with one alternation and the base left as bitsandbytes quantizes it, which
is what peft's `replace_lora_weights_loftq` applies to a loaded 4-bit model. It is done
here rather than through peft because peft 0.21 (a) writes B @ A unscaled, so the LoRA
forward adds alpha/r times the correction (at this project's alpha = 2r it overshoots by
exactly its own size: no error is removed), (b) supports NF4 only, and (c) runs its loop on
a hard-coded CUDA device. Keeping the base as loaded means evaluate, export and chat load
the adapter onto the very base every other adapter uses.

- `loftq_errors`: the weight error with and without the correction, before any training
  (the quantize stage's report).
- `initialise`: set a peft model's adapters to the correction of its loaded base's actual
  quantization error (finetune, `finetune.lora.init: loftq`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from qlora.core.io import StageError
from qlora.quant.formats import (
    dequantized,
    layer_weight,
    one_cpu_thread,
    quantizable_linears,
    squared_norm,
)


def low_rank_correction(
    residual: torch.Tensor, rank: int, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(lora_A (rank x in), lora_B (out x rank)) with scaling * B @ A the best rank-r
    approximation of `residual`. The singular values are split evenly between the two
    factors (B = U sqrt(S), A = sqrt(S) V^T, as peft's LoftQ does), so neither starts far
    larger than the other and both learn at similar rates."""
    u, s, vh = torch.linalg.svd(residual.float(), full_matrices=False)
    root = (s[:rank] / scaling).sqrt()
    return root[:, None] * vh[:rank], u[:, :rank] * root


class ErrorTally:
    """Relative weight errors before and after the correction, over many layers taken as
    one vector: the squared norms of the weights, the residuals and what is left."""

    def __init__(self) -> None:
        self.weight_sq = self.before_sq = self.after_sq = 0.0

    def add(self, weight: torch.Tensor, residual: torch.Tensor, left: torch.Tensor) -> dict:
        """Count one layer; returns its own {"error_before", "error_after"}."""
        w_sq, r_sq, l_sq = squared_norm(weight), squared_norm(residual), squared_norm(left)
        self.weight_sq += w_sq
        self.before_sq += r_sq
        self.after_sq += l_sq
        return {"error_before": (r_sq / w_sq) ** 0.5, "error_after": (l_sq / w_sq) ** 0.5}

    @property
    def error_before(self) -> float:
        return (self.before_sq / self.weight_sq) ** 0.5

    @property
    def error_after(self) -> float:
        return (self.after_sq / self.weight_sq) ** 0.5


def correct(
    weight: torch.Tensor, approximation: torch.Tensor, rank: int, scaling: float, tally: ErrorTally
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """LoftQ for one layer: the adapter factors that correct `approximation` (the weight
    the quantized layer computes with) towards `weight`, counted in `tally`. Returns
    (lora_A, lora_B, the layer's errors before and after)."""
    residual = weight - approximation
    lora_a, lora_b = low_rank_correction(residual, rank, scaling)
    errors = tally.add(weight, residual, residual - scaling * (lora_b @ lora_a))
    return lora_a, lora_b, errors


# ---------------------------------------------------------------- before training


def loftq_errors(
    model: torch.nn.Module,
    quant_type: str,
    double_quant: bool,
    rank: int,
    scaling: float,
    every: int = 1,
) -> dict:
    """The relative weight error ||W - approx|| / ||W|| of every `every`-th quantizable
    layer of `model` (full precision) in `quant_type`, without (error_before) and with
    (error_after) LoftQ's correction at the adapter's rank and scaling:
    {"summary": {..., "error_before", "error_after" (all measured layers as one vector),
    "reduction"}, "layers": [{"name", "shape", "error_before", "error_after"}]}."""
    start = time.perf_counter()
    rows, tally = [], ErrorTally()
    with one_cpu_thread():  # ~0.25 s an SVD of a SmolLM2 layer on one thread, 2x on two
        for name, module in list(quantizable_linears(model))[::every]:
            weight = module.weight.detach().float()
            approximation = dequantized(weight, quant_type, double_quant)
            *_, errors = correct(weight, approximation, rank, scaling, tally)
            rows.append({"name": name, "shape": list(weight.shape), **errors})
    before, after = tally.error_before, tally.error_after
    return {
        "summary": {
            "quant_type": quant_type,
            "rank": rank,
            "scaling": scaling,
            "every": every,
            "layers": len(rows),
            "error_before": before,
            "error_after": after,
            "reduction": 1 - after / before,
            "seconds": time.perf_counter() - start,
        },
        "layers": rows,
    }


# ---------------------------------------------------------------- the model to train


class CheckpointWeights:
    """Tensors of a saved HF model read one at a time from its safetensors files (a
    single file or a sharded index), so no second copy of the model is ever loaded."""

    def __init__(self, model_dir: Path | str):
        self.dir = Path(model_dir)
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            self.files = json.loads(index.read_text())["weight_map"]
        else:
            from safetensors import safe_open

            single = self.dir / "model.safetensors"
            if not single.is_file():
                raise StageError(f"{self.dir}: no model.safetensors or its index")
            with safe_open(str(single), "pt") as f:
                self.files = {key: single.name for key in f.keys()}  # noqa: SIM118

    def __getitem__(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        if key not in self.files:
            raise StageError(
                f"{self.dir}: no tensor {key!r} for LoftQ to correct (finetune.lora.init: "
                "loftq reads the base's full-precision weights by their module names)"
            )
        with safe_open(str(self.dir / self.files[key]), "pt") as f:
            return f.get_tensor(key)


def initialise(model: torch.nn.Module, base_dir: Path | str, adapter: str = "default") -> dict:
    """Set the LoRA pair on every quantized layer of peft `model` to the correction of that
    layer's quantization error, W (the base's saved weights) minus the weight the loaded
    layer actually computes with, at the pair's own rank and scaling. Layers kept in 16 bits
    keep peft's initialisation (they have no error). Returns what it did, for run.json:
    {"method": "loftq", "layers", "error_before", "error_after", "seconds"}."""
    from peft.tuners.lora import LoraLayer

    start = time.perf_counter()
    weights = CheckpointWeights(base_dir)
    layers, tally = 0, ErrorTally()
    with torch.no_grad(), one_cpu_thread():
        for name, module in model.named_modules():
            if not isinstance(module, LoraLayer) or adapter not in module.lora_A:
                continue
            deq = layer_weight(module.get_base_layer())
            if deq is None:
                continue
            # peft wraps the model twice ("base_model.model."); the checkpoint keys do not.
            key = name.removeprefix("base_model.model.") + ".weight"
            weight = weights[key].to(deq.device).float()
            rank, scaling = module.r[adapter], module.scaling[adapter]
            lora_a, lora_b, _ = correct(weight, deq, rank, scaling, tally)
            a, b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
            a.copy_(lora_a.to(a.dtype))
            b.copy_(lora_b.to(b.dtype))
            layers += 1
    if not layers:
        raise StageError(
            "finetune.lora.init: loftq found no quantized layer under a LoRA adapter "
            "(are finetune.lora.target_modules all in quantize.skip_modules?)"
        )
    return {
        "method": "loftq",
        "layers": layers,
        "error_before": tally.error_before,
        "error_after": tally.error_after,
        "seconds": time.perf_counter() - start,
    }
