"""Speed and memory of the choices the pipeline makes, as ratios against a reference, in one run.

    make bench            # or: python -m benchmarks.run [--layers 30] [--steps 3]

A randomly initialised model of the embedded model's architecture (SmolLM2-135M: Llama,
hidden 576, 30 layers, vocab 49152) stands in for the real one: weights do not change speed
or memory, and no download is needed. On a GPU the same script measures the GPU.
Reference: the full-precision model (fp32 on a CPU, bf16 on a GPU).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from qlora.models import compute_dtype, footprint_bytes, load_4bit, load_full
from qlora.params import QuantizeParams, shipped_params


def quantize_params(compute_dtype: str) -> QuantizeParams:
    """params.yaml's quantization (NF4, double quant) with the compute dtype under test."""
    return shipped_params().quantize.model_copy(update={"compute_dtype": compute_dtype})


SMOLLM2_135M = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
)


def timed(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: first calls allocate and pick kernels
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def train_step_seconds(model, batch: torch.Tensor, steps: int, checkpointing: bool) -> float:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)

    def step():
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()

    return timed(step, steps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=160)
    ap.add_argument("--steps", type=int, default=2)
    args = ap.parse_args()
    torch.manual_seed(0)
    batch = torch.randint(0, SMOLLM2_135M["vocab_size"], (args.batch, args.seq))
    tokens = batch.numel()
    ref_dtype = str(compute_dtype()).removeprefix("torch.")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(
        f"device {device}; model: SmolLM2-135M architecture, {args.layers} layers, random "
        f"weights; batch {args.batch} x {args.seq} tokens; reference: {ref_dtype}"
    )

    with tempfile.TemporaryDirectory() as tmp:
        LlamaForCausalLM(
            LlamaConfig(num_hidden_layers=args.layers, **SMOLLM2_135M)
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
            model = load_4bit(quantize_params(dtype), tmp)
            rows.append((f"forward, NF4 + {dtype} compute", forward(model), footprint_bytes(model)))
            del model
        train_rows = []
        for dtype, ckpt in (("float32", False), ("float32", True), ("bfloat16", False)):
            model = load_4bit(quantize_params(dtype), tmp)
            model.train()
            seconds = train_step_seconds(model, batch.to(model.device), args.steps, ckpt)
            label = f"QLoRA step, NF4 + {dtype}" + (" + checkpointing" if ckpt else "")
            train_rows.append((label, seconds))
            del model

    print(f"\n{'forward pass':<42} {'s/batch':>8} {'vs ref':>7} {'memory MB':>10} {'vs ref':>7}")
    for label, seconds, mem in rows:
        print(
            f"{label:<42} {seconds:8.2f} {seconds / ref_fwd:6.2f}x {mem / 1e6:10.1f} "
            f"{mem / ref_mem:6.2f}x"
        )
    ref_train = train_rows[0][1]
    print(
        f"\n{'training step (LoRA r=16, all linear)':<42} {'s/step':>8} {'tokens/s':>9} "
        f"{'vs NF4+fp32':>12}"
    )
    for label, seconds in train_rows:
        print(f"{label:<42} {seconds:8.2f} {tokens / seconds:9.0f} {seconds / ref_train:11.2f}x")


if __name__ == "__main__":
    main()
