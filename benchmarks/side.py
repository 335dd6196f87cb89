"""One side of the training benchmark, in a process of its own so that its peak memory is
its own: `python -m benchmarks.side SIDE MODEL_DIR ROWS_JSON OUT_JSON --batch N`.
benchmarks/train.py runs every side this way and compares them.

Sides:
- qlora: the finetune stage's own path as shipped (qlora.train.recipe.lora_model and
  build_trainer, params.yaml's finetune and quantize sections).
- qlora-no-ckpt: the same with gradient checkpointing forced off: the speed the shipped
  `auto` gives up for memory on the default model (where it checkpoints every layer).
- lora16: the qlora side on the 16-bit base instead of the 4-bit one.
- reference: the reference QLoRA recipe in plain Hugging Face code (peft's
  prepare_model_for_kbit_training, r=64, alpha=16, dropout 0.1 on q/k/v/o, gradient
  checkpointing, AdamW at 2e-4, rows in random order padded to the longest).
- previous: the finetune stage's path before the lean path: peft's fp32
  preparation, r=16, alpha=32, dropout 0.05 on all linear layers, no checkpointing, rows
  grouped by length, the model's own loss.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

STARTED = time.perf_counter()


def synchronize() -> None:
    """Wait for the GPU's queued work, so that a clock read after it counts that work."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StepClock(TrainerCallback):
    """When each optimizer step ended and how many trained tokens the run had seen by then."""

    def __init__(self):
        self.marks: list[tuple[float, int]] = []

    def on_step_end(self, args, state, control, **kwargs):
        synchronize()
        self.marks.append((time.perf_counter(), int(state.num_input_tokens_seen)))


def best_seconds(fn: Callable[[], object], repeats: int = 5) -> float:
    """The fastest of `repeats` calls after a warm-up one: the rate the hardware gives when
    nothing else is running (the machine may be shared), for a peak."""
    fn()
    synchronize()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def matmul_peak(dtype: torch.dtype, tokens: int, hidden: int, intermediate: int) -> dict:
    """This machine's matmul rate in `dtype`, on this process's device and threads, at the
    shapes a batch of `tokens` tokens meets in the model's linear layers (tokens x in times
    in x out: attention's hidden x hidden, the MLP's hidden x intermediate and back). The
    peak is the best of them: the denominator of the side's model FLOP utilisation."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rates = {}
    for n_in, n_out in ((hidden, hidden), (hidden, intermediate), (intermediate, hidden)):
        x = torch.randn(tokens, n_in, dtype=dtype, device=device)
        w = torch.randn(n_in, n_out, dtype=dtype, device=device)
        seconds = best_seconds(lambda x=x, w=w: x @ w)
        rates[f"{tokens}x{n_in}x{n_out}"] = 2 * tokens * n_in * n_out / seconds
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "flops_per_s": rates,
        "peak_flops_per_s": max(rates.values()),
    }


def project_trainer(side: str, model_dir: Path, rows: list[dict], batch: int, out: Path):
    from qlora.core.params import shipped_params
    from qlora.models.loading import compute_dtype, load_tokenizer
    from qlora.train.recipe import build_trainer, lora_model

    params = shipped_params()
    never = 10**9  # no evaluation, checkpoint or log line inside the timed steps
    finetune = params.finetune.model_copy(
        update=dict(
            batch_size=batch,
            max_steps=-1,
            epochs=1,
            eval_steps=never,
            checkpoint_steps=never,
            logging_steps=never,
        )
    )
    if side == "qlora-no-ckpt":
        finetune.gradient_checkpointing = False
    longest = max(len(r["input_ids"]) for r in rows)
    dataset = params.dataset.model_copy(update={"max_length": longest})
    params = params.model_copy(update={"finetune": finetune, "dataset": dataset})
    model, plan = lora_model(params, False, model_dir, quantized=side != "lora16")
    clock = StepClock()
    trainer = build_trainer(
        params, model, plan, load_tokenizer(model_dir), rows, rows[:batch], out, [clock]
    )
    settings = {
        "lora": params.finetune.lora.model_dump(),
        "gradient_checkpointing": plan.checkpointing,
        "loss": plan.loss,
        "batching": params.finetune.batching,
        "compute_dtype": str(compute_dtype(params.quantize.compute_dtype)).removeprefix("torch."),
    }
    return trainer, clock, settings


# The reference recipe and the project's previous default, as (r, alpha, dropout, targets,
# gradient checkpointing, sampling) in plain Hugging Face code.
RECIPES = {
    "reference": (64, 16, 0.1, ["q_proj", "k_proj", "v_proj", "o_proj"], True, "random"),
    "previous": (16, 32, 0.05, "all-linear", False, "group_by_length"),
}


def recipe_trainer(recipe: str, model_dir: Path, rows: list[dict], batch: int, out: Path):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        BitsAndBytesConfig,
        DataCollatorForSeq2Seq,
    )

    from qlora.models.loading import compute_dtype

    r, alpha, dropout, targets, checkpointing, sampling = RECIPES[recipe]
    cuda = torch.cuda.is_available()
    # The reference recipe computes in fp16 on a GPU; the previous default in bf16 where the
    # GPU has it. On a CPU both take the project's own choice (bf16 where the CPU has bf16
    # units, fp32 elsewhere), so that the sides differ in recipe, not in compute dtype.
    if not cuda:
        dtype = compute_dtype()
    elif recipe == "reference" or not torch.cuda.is_bf16_supported():
        dtype = torch.float16
    else:
        dtype = torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir),
        dtype=dtype,
        device_map="cuda" if cuda else "cpu",
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        ),
    )
    if not cuda:
        from qlora.models.loading import keep_4bit_layout_trainable

        keep_4bit_layout_trainable(model)  # correct gradients on AVX512-BF16 CPUs too
    model = prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    model = get_peft_model(
        model,
        LoraConfig(
            r=r,
            lora_alpha=alpha,
            lora_dropout=dropout,
            target_modules=targets,
            task_type="CAUSAL_LM",
        ),
    )
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    clock = StepClock()
    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=batch,
        learning_rate=2e-4,
        lr_scheduler_type="constant",
        max_grad_norm=0.3,
        num_train_epochs=1,
        optim="paged_adamw_32bit" if cuda else "adamw_torch",
        activation_checkpointing=checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        fp16=cuda and dtype == torch.float16,
        bf16=cuda and dtype == torch.bfloat16,
        use_cpu=not cuda,
        train_sampling_strategy=sampling,
        include_num_input_tokens_seen="non_padding",
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="no",
        report_to="none",
        remove_unused_columns=False,
        seed=42,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=rows,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
        callbacks=[clock],
    )
    settings = {
        "lora": {"r": r, "alpha": alpha, "dropout": dropout, "target_modules": targets},
        "gradient_checkpointing": checkpointing,
        "loss": "standard",
        "batching": "group_by_length" if sampling == "group_by_length" else "padded",
        "compute_dtype": str(dtype).removeprefix("torch."),
    }
    return trainer, clock, settings


def peak_memory() -> dict[str, int]:
    """The finetune stage's own measure (max allocated on a GPU, peak RSS on a CPU), plus
    what the CUDA allocator reserved on a GPU."""
    from qlora.train.recipe import peak_memory_bytes

    if torch.cuda.is_available():
        return {
            "max_allocated": peak_memory_bytes(),
            "max_reserved": int(torch.cuda.max_memory_reserved()),
        }
    return {"max_rss": peak_memory_bytes()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("side", choices=["qlora", "qlora-no-ckpt", "lora16", *RECIPES])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("rows", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--batch", type=int, required=True)
    args = ap.parse_args()
    rows = json.loads(args.rows.read_text())
    with tempfile.TemporaryDirectory() as scratch:
        if args.side in RECIPES:
            trainer, clock, settings = recipe_trainer(
                args.side, args.model_dir, rows, args.batch, Path(scratch)
            )
        else:
            trainer, clock, settings = project_trainer(
                args.side, args.model_dir, rows, args.batch, Path(scratch)
            )
        trainer.train()
        memory = peak_memory()  # training's own: before the matmuls below allocate theirs
        # After training, so that neither the timed steps nor time_to_first_step_s pay for it.
        config = trainer.model.config
        peak = matmul_peak(
            getattr(torch, settings["compute_dtype"]),
            args.batch * max(len(r["input_ids"]) for r in rows),  # a padded batch's tokens
            config.hidden_size,
            config.intermediate_size,
        )
    (first_end, first_tokens), (last_end, last_tokens) = clock.marks[0], clock.marks[-1]
    result = {
        "side": args.side,
        "settings": settings,
        "steps": len(clock.marks),
        "trained_tokens": last_tokens,
        # Steps after the first: the first one also pays for warm-up (kernel choice,
        # allocator growth), which time_to_first_step_s reports instead.
        "tokens_per_s": (last_tokens - first_tokens) / (last_end - first_end),
        "time_to_first_step_s": first_end - STARTED,
        "peak_memory_bytes": memory,
        "matmul": peak,
    }
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
