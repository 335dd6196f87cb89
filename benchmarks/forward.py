"""Inference speed and memory of the 4-bit base against the full-precision one, as ratios,
in one run (training is compared by benchmarks/train.py, `make bench`).

    python -m benchmarks.forward [--layers 30] [--steps 3]

A randomly initialised model of the embedded model's architecture (SmolLM2-135M: Llama,
hidden 576, 30 layers, vocab 49152) stands in for the real one: weights do not change speed
or memory, and no download is needed. On a GPU the same script measures the GPU.
Reference: the full-precision model in what quantize.compute_dtype auto picks here (bf16 on
a GPU and on a CPU with bf16 units, fp32 on other CPUs).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from benchmarks.train import ARCHS
from qlora.core.params import QuantizeParams, shipped_params
from qlora.models.loading import footprint_bytes, load_full, load_quantized, resolve_compute_dtype


def quantize_params(compute_dtype: str) -> QuantizeParams:
    """params.yaml's quantization (NF4, double quant) with the compute dtype under test."""
    return shipped_params().quantize.model_copy(update={"compute_dtype": compute_dtype})


def timed(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: first calls allocate and pick kernels
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=160)
    ap.add_argument("--steps", type=int, default=2)
    args = ap.parse_args()
    torch.manual_seed(0)
    batch = torch.randint(0, ARCHS["smollm2-135m"]["vocab_size"], (args.batch, args.seq))
    ref, why = resolve_compute_dtype()
    ref_dtype = str(ref).removeprefix("torch.")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(
        f"device {device}; model: SmolLM2-135M architecture, {args.layers} layers, random "
        f"weights; batch {args.batch} x {args.seq} tokens; reference: {ref_dtype} ({why})"
    )

    with tempfile.TemporaryDirectory() as tmp:
        LlamaForCausalLM(
            LlamaConfig(**{**ARCHS["smollm2-135m"], "num_hidden_layers": args.layers})
        ).save_pretrained(tmp, safe_serialization=True)
        rows = []

        def forward(model):
            with torch.no_grad():
                return timed(lambda: model(input_ids=batch.to(model.device)), args.steps)

        full = load_full(tmp)
        ref_fwd, ref_mem = forward(full), footprint_bytes(full)
        rows.append((f"forward, full ({ref_dtype})", ref_fwd, ref_mem))
        del full
        for dtype in ("float32", "bfloat16"):
            model = load_quantized(quantize_params(dtype), tmp)
            rows.append((f"forward, NF4 + {dtype} compute", forward(model), footprint_bytes(model)))
            del model
    print(f"\n{'forward pass':<42} {'s/batch':>8} {'vs ref':>7} {'memory MB':>10} {'vs ref':>7}")
    for label, seconds, mem in rows:
        print(
            f"{label:<42} {seconds:8.2f} {seconds / ref_fwd:6.2f}x {mem / 1e6:10.1f} "
            f"{mem / ref_mem:6.2f}x"
        )


if __name__ == "__main__":
    main()
