"""QLoRA training: LoRA adapters on the 4-bit base (the `finetune` stage's library).

The base is loaded through qlora/models/loading.py, exactly as evaluate loads it. Only the
response tokens are trained (the prompt is masked in the labels, qlora/data/chat_template.py). The
transformers Trainer runs the loop: progress bar, validation loss every `eval_steps`,
paged AdamW on CUDA, gradient checkpointing when asked.
Outputs: data/prepared/adapter/ (standard peft format: adapter_config.json +
adapter_model.safetensors, loadable with plain `PeftModel.from_pretrained`), and
reports/train/: DVCLive's per-step log and summary, and run.json (qlora/train/log_layout.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

from qlora.core import paths
from qlora.core.io import StageError, read_jsonl, weights_identity, write_json
from qlora.core.lineage import environment
from qlora.core.params import Params
from qlora.data.chat_template import encode
from qlora.models.loading import (
    compute_dtype,
    device,
    footprint_bytes,
    keep_4bit_layout_trainable,
    load_full,
    load_quantized,
    load_tokenizer,
    resolve_compute_dtype,
)
from qlora.quant import calibration
from qlora.train import distributed, log_layout
from qlora.train.batching import BatchPlan, batch_plan
from qlora.train.callbacks import (
    COMPLETE,
    CheckpointSealer,
    DivergenceGuard,
    RunClock,
    UntouchedRandomness,
    seconds_recorded_in,
)
from qlora.train.log_writer import LiveLogger
from qlora.train.loss import unsupported_reason, use_chunked_loss

# checkpoints: scratch space, not a pipeline output


TRACKING_DIR = Path("tracking")  # local stores of finetune.report_to trackers (not DVC's)


def run_fingerprint(params: Params, files: list[Path], base_identity: dict[str, str]) -> str:
    """Checkpoints are reused only by a run with the same params, the same data and the
    same base weights (`weights_identity` of the base: LoRA deltas resumed onto another base
    would be meaningless)."""
    h = hashlib.sha256()
    for section in (params.finetune, params.quantize):
        h.update(section.model_dump_json().encode())
    h.update(str(params.dataset.max_length).encode())
    h.update(json.dumps(base_identity, sort_keys=True).encode())
    for f in files:
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def last_complete_checkpoint(run_dir: Path) -> Path | None:
    """The newest sealed checkpoint; unsealed ones (killed while saving) are deleted (by the
    main process: every process of a multi-process run resumes from the same one)."""
    found = []
    for ckpt in run_dir.glob("checkpoint-*"):
        if (ckpt / COMPLETE).exists():
            found.append((int(ckpt.name.split("-")[-1]), ckpt))
        elif distributed.is_main_process():
            print(f"skipping incomplete checkpoint {ckpt} (cut off while saving)")
            shutil.rmtree(ckpt, ignore_errors=True)
    return max(found)[1] if found else None


def out_of_memory_advice(params: Params, error: BaseException) -> str:
    p = params.finetune
    return (
        f"out of memory while training ({type(error).__name__}). Lower, in params.yaml: "
        f"finetune.batch_size (now {p.batch_size}; raise gradient_accumulation_steps to keep "
        f"the effective batch), dataset.max_length (now {params.dataset.max_length}), or turn "
        f"on finetune.gradient_checkpointing (now {p.gradient_checkpointing})"
    )


def encode_split(tokenizer, rows: list[dict], max_length: int) -> list[dict]:
    return [encode(tokenizer, r["prompt"], r["completion"], max_length) for r in rows]


def optimizer_name(choice: str) -> str:
    # Paged optimizers page their state to CPU RAM under GPU memory pressure; on a CPU
    # there is nothing to page to, so plain AdamW.
    if choice != "auto":
        return choice
    return "paged_adamw_32bit" if torch.cuda.is_available() else "adamw_torch"


@dataclass(frozen=True)
class TrainingPlan:
    """The choices finetune.* leaves to the device, resolved once and recorded in metrics."""

    # Every n-th decoder layer recomputes its activations in backward; 0: none does.
    checkpoint_every: int
    checkpointing_reason: str
    loss: str  # chunked | liger | standard
    loss_reason: str
    # How the adapters started: {"method": "default"} or calibration.initialise's record.
    lora_init: dict

    @property
    def checkpointing(self) -> bool:
        return self.checkpoint_every > 0


def activation_bytes(config, tokens: int, element_size: int) -> int:
    """Rough bytes a decoder keeps for backward without checkpointing, for `tokens` tokens
    at once. Per token and layer: about ten hidden-size tensors (norm outputs, q/k/v, rotated
    q/k, attention output, residuals) and four intermediate-size ones (gate, up, activation,
    product) in the compute dtype, plus the two norms' fp32 inputs."""
    hidden, inner = config.hidden_size, getattr(config, "intermediate_size", 4 * config.hidden_size)
    per_token_layer = (10 * hidden + 4 * inner) * element_size + 2 * hidden * 4
    return tokens * config.num_hidden_layers * per_token_layer


def available_memory_bytes() -> int:
    if torch.cuda.is_available():
        return int(torch.cuda.mem_get_info()[0])
    import psutil

    return int(psutil.virtual_memory().available)


def checkpoint_every_for(need: int, budget: int) -> int:
    """The sparsest checkpointing whose kept activations fit `budget`: every k-th layer
    recomputes, so (k-1)/k of `need` stays in memory, and k is the largest with
    (k-1)/k * need <= budget. 0 (none) when all of `need` fits, 1 (every layer) when even
    every other layer would keep too much."""
    if need <= budget:
        return 0
    return max(1, need // (need - budget))


def resolve_checkpointing(choice: bool | int | str, model, params: Params) -> tuple[int, str]:
    """How many layers recompute their activations (see TrainingPlan.checkpoint_every).

    `auto` keeps at most as many bytes of activations as the model's weights take, as
    loaded: a QLoRA run's memory is then at most about twice its 4-bit weights plus the
    adapters and their optimizer state. Activations beyond that are what checkpointing is
    for: on the default model (4-bit weights ~0.1 GiB, a batch's activations ~1 GiB) it
    checkpoints every layer, which measured 2.73 GiB peak at 224 tokens/s against 4.67 GiB
    at 269 without (bf16 compute on a 2-core CPU with AVX512-BF16; `make bench`), and the
    reference recipe's 3.33 GiB at 138. A big batch on a GPU that would take over half of
    the memory still free is checkpointed in every layer whatever the weights' size."""
    if choice is True:
        return 1, "set in params.yaml"
    if choice is False:
        return 0, "set in params.yaml"
    if choice != "auto":
        return int(choice), "set in params.yaml"
    rows = distributed.layout(params.finetune, distributed.world_size()).per_process_batch
    tokens = rows * params.dataset.max_length
    need = activation_bytes(
        model.config, tokens, compute_dtype(params.quantize.compute_dtype).itemsize
    )
    free, weights = available_memory_bytes(), footprint_bytes(model)
    gib = f"~{need / 2**30:.2f} GiB of activations per batch"
    if need > free / 2:
        return 1, f"auto: {gib}, above half of the {free / 2**30:.1f} GiB free"
    every = checkpoint_every_for(need, weights)
    fits = f"the weights' {weights / 2**30:.2f} GiB"
    if every == 0:
        return 0, f"auto: {gib}, within {fits}"
    where = "every layer" if every == 1 else f"every {every}th layer"
    return every, f"auto: {gib}, over {fits}: {where} recomputes"


def resolve_loss(choice: str, model) -> tuple[str, str]:
    if choice == "liger":
        if not torch.cuda.is_available():
            raise StageError(
                "finetune.loss=liger needs a CUDA GPU (Liger-Kernel runs Triton kernels)"
            )
        try:
            import liger_kernel  # noqa: F401
        except ImportError:
            raise StageError(
                "finetune.loss=liger needs the liger-kernel package: pip install liger-kernel"
            ) from None
        return "liger", "set in params.yaml"
    if choice == "standard":
        return "standard", "set in params.yaml"
    why_not = unsupported_reason(model)
    if why_not is None:
        return "chunked", f"{choice}: labelled positions only, in chunks (qlora/train/loss.py)"
    if choice == "chunked":
        raise StageError(f"finetune.loss=chunked does not fit this model: {why_not}")
    return "standard", f"auto: the model's own loss, because {why_not}"


def prepare_for_training(model, checkpoint_every: int) -> None:
    """Freeze the base and switch on checkpointing, keeping every tensor in the dtype it was
    loaded in. peft's prepare_model_for_kbit_training would cast the embeddings, lm_head and
    norms to fp32 (measured on the Llama-3-8B shape: 7.43 GiB of weights instead of about 5), and an
    fp32 embedding output turns the whole residual stream fp32. The QLoRA method needs the
    norms computed in fp32, which transformers' RMSNorm/LayerNorm already do internally
    whatever their weights' dtype."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    model.config.use_cache = False  # a cache is for generation; training only wastes memory
    if checkpoint_every:
        # On the model rather than through TrainingArguments, so that the plan holds wherever
        # the model is used (the Trainer, the benchmark, the tests). Non-reentrant
        # checkpointing needs no input that requires grad (reentrant does).
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False},
            every_n_layers=checkpoint_every,
        )


def lora_model(
    params: Params,
    trust_remote_code: bool,
    base_dir: Path = paths.BASE_MODEL_DIR,
    quantized: bool = True,
) -> tuple[torch.nn.Module, TrainingPlan]:
    """The model to train: LoRA adapters on the 4-bit base (or, `quantized=False`, on the
    16-bit base, the comparison the benchmark draws), and the plan it trains under."""
    p = params.finetune
    if quantized:
        model = load_quantized(params.quantize, base_dir, trust_remote_code)
        # The validation loss runs before and between training steps: without this, on CPUs
        # with AVX512-BF16 it would switch the base to a layout that drops gradients.
        keep_4bit_layout_trainable(model)
    else:
        model = load_full(base_dir, params.quantize.compute_dtype, trust_remote_code)
    checkpoint_every, checkpointing_reason = resolve_checkpointing(
        p.gradient_checkpointing, model, params
    )
    loss, loss_reason = resolve_loss(p.loss, model)
    prepare_for_training(model, checkpoint_every)
    if loss == "chunked":
        use_chunked_loss(model)
    config = LoraConfig(
        r=p.lora.r,
        lora_alpha=p.lora.alpha,
        lora_dropout=p.lora.dropout,
        target_modules=p.lora.target_modules,
        task_type="CAUSAL_LM",
    )
    set_seed(p.seed)  # LoRA's A matrices are initialised randomly: seed them first
    try:
        model = get_peft_model(model, config)
    except ValueError as e:
        raise StageError(f"finetune.lora.target_modules={p.lora.target_modules!r}: {e}") from None
    lora_init = {"method": "default"}
    if p.lora.init == "loftq" and quantized:  # a 16-bit base has no error to correct
        lora_init = calibration.initialise(model, base_dir)
        print(
            f"[finetune] LoftQ: {lora_init['layers']} adapters start as the correction of "
            f"their layer's quantization error (relative error {lora_init['error_before']:.4f}"
            f" -> {lora_init['error_after']:.4f}, {lora_init['seconds']:.1f} s)",
            flush=True,
        )
    plan = TrainingPlan(checkpoint_every, checkpointing_reason, loss, loss_reason, lora_init)
    return model, plan


def training_args(
    params: Params,
    run_dir: Path,
    plan: TrainingPlan,
    batches: BatchPlan,
    evaluate_first: bool = False,
) -> TrainingArguments:
    p = params.finetune
    dtype = compute_dtype(params.quantize.compute_dtype)
    spread = distributed.layout(p, distributed.world_size())
    return TrainingArguments(
        output_dir=str(run_dir),
        per_device_train_batch_size=spread.per_process_batch,
        per_device_eval_batch_size=spread.per_process_batch,
        gradient_accumulation_steps=spread.accumulation,
        # Every LoRA weight takes part in every forward pass: DDP need not search the graph
        # for unused ones (a whole extra traversal per step).
        ddp_find_unused_parameters=False,
        learning_rate=p.learning_rate,
        lr_scheduler_type=p.lr_scheduler,
        warmup_steps=p.warmup_ratio,  # a float below 1 is a fraction of all steps
        num_train_epochs=p.epochs,
        max_steps=p.max_steps,
        weight_decay=p.weight_decay,
        max_grad_norm=p.max_grad_norm,
        optim=optimizer_name(p.optimizer),
        use_liger_kernel=plan.loss == "liger",
        bf16=dtype == torch.bfloat16 and torch.cuda.is_available(),
        fp16=dtype == torch.float16 and torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available(),
        eval_strategy="steps",
        eval_steps=p.eval_steps,
        # The validation loss at step 0, the curve's start. Evaluated inside train(), after
        # the model is wrapped: a trainer.evaluate() before train() marks the model as
        # prepared by accelerate, and train() then never wraps it in DDP, so with several
        # processes each would step on its own gradients (measured: the two processes'
        # gradient norms 0.78 and 0.84 at the first step, one process 0.72).
        eval_on_start=evaluate_first,
        prediction_loss_only=True,  # the chunked loss returns no logits, none are needed
        logging_steps=p.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=p.checkpoint_steps,
        save_total_limit=2,
        train_sampling_strategy=batches.sampling,
        seed=p.seed,
        data_seed=p.seed,
        full_determinism=p.deterministic,
        include_num_input_tokens_seen=batches.token_count,
        report_to=list(p.report_to) or "none",
        dataloader_num_workers=0,
        remove_unused_columns=False,
    )


class QLoRATrainer(Trainer):
    """The Trainer, with speed and memory added to each training log, so that DVCLive and
    every tracker of `finetune.report_to` (whose callbacks run before ours) receive them."""

    def __init__(self, *args, clock: RunClock | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.clock = clock

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        seconds = self.clock.total_seconds() if self.clock else 0.0
        if "loss" in logs and seconds > 0:
            logs["tokens_per_s"] = int(self.state.num_input_tokens_seen) / seconds
            logs["peak_memory_gb"] = peak_memory_bytes() / 1e9
        super().log(logs, start_time)


def tensorboard_default(run_dir: Path) -> None:
    """TensorBoard's default folder is inside the checkpoint folder, deleted after a run:
    point it at tracking/tensorboard/ unless the user chose one."""
    name = f"{run_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(TRACKING_DIR / "tensorboard" / name))


def build_trainer(
    params: Params,
    model,
    plan: TrainingPlan,
    tokenizer,
    train_rows: list[dict],
    valid_rows: list[dict],
    run_dir: Path,
    callbacks: list[TrainerCallback],
    clock: RunClock | None = None,
    evaluate_first: bool = False,
) -> Trainer:
    """The Trainer the finetune stage runs, shared with the benchmark (benchmarks/train.py)
    so that what is measured is what ships."""
    batches = batch_plan(params.finetune.batching, tokenizer)
    if "tensorboard" in params.finetune.report_to:
        tensorboard_default(run_dir)
    try:
        return QLoRATrainer(
            model=model,
            args=training_args(params, run_dir, plan, batches, evaluate_first),
            train_dataset=train_rows,
            eval_dataset=valid_rows,
            data_collator=batches.collator,
            callbacks=[DivergenceGuard(), UntouchedRandomness(), *callbacks],
            clock=clock,
        )
    except (RuntimeError, ImportError, ModuleNotFoundError) as e:
        if params.finetune.report_to and "install" in str(e):
            raise StageError(f"finetune.report_to={params.finetune.report_to}: {e}") from None
        raise


def peak_memory_bytes() -> int:
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def save_adapter(model, out: Path, base_identity: dict[str, str]) -> None:
    """The adapter in plain peft format, byte-stable for the same weights: peft writes
    target_modules from a set, whose order changes from process to process, so it is
    rewritten sorted (else DVC sees a new adapter on every rerun). Beside it, the identity
    of the base it was trained on, which load_adapted checks."""
    model.save_pretrained(out, safe_serialization=True)
    config_file = out / "adapter_config.json"
    config = json.loads(config_file.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    write_json(out / paths.BASE_IDENTITY, {"weights_sha256": base_identity})


@dataclass
class Trained:
    model: torch.nn.Module
    record: dict  # how the run was made: reports/train/run.json
    summary: dict  # DVCLive's metrics.json, the run's numbers
    live_dir: Path  # DVCLive's files, to move into reports/train
    run_dir: Path
    base_identity: dict[str, str]  # sha256 of the base's weight files


def train(params: Params) -> Trained:
    """Train the adapter the params describe, resuming from a sealed checkpoint of the same
    run if one exists. Writes nothing but checkpoints (under .cache); the caller saves."""
    p, trust = params.finetune, params.base.trust_remote_code
    max_length = params.dataset.max_length
    split_files = [paths.split_file("train"), paths.split_file("validation")]
    tokenizer = load_tokenizer(paths.BASE_MODEL_DIR, trust)
    train_rows, valid_rows = (
        encode_split(tokenizer, read_jsonl(f), max_length) for f in split_files
    )
    model, plan = lora_model(params, trust)
    trainable, total = model.get_nb_trainable_parameters()
    # Hashed once: the resume fingerprint and the adapter's base identity both need it, and
    # reading a multi-GB base twice would cost minutes.
    base_identity = weights_identity(paths.BASE_MODEL_DIR)
    run_dir = paths.FINETUNE_WORK_DIR / run_fingerprint(params, split_files, base_identity)
    resume = last_complete_checkpoint(run_dir)
    if resume:
        print(f"resuming from {resume}")
    clock = RunClock(seconds_recorded_in(resume))
    live = LiveLogger(run_dir / "dvclive")
    spread = distributed.layout(p, distributed.world_size())
    trainer = build_trainer(
        params,
        model,
        plan,
        tokenizer,
        train_rows,
        valid_rows,
        run_dir,
        [clock, CheckpointSealer(clock), live],
        clock,
        evaluate_first=resume is None,  # a resumed run has step 0's in its restored history
    )
    try:
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    except (torch.OutOfMemoryError, MemoryError) as e:
        raise StageError(out_of_memory_advice(params, e)) from None
    session_seconds, total_seconds = clock.session_seconds(), clock.total_seconds()
    step = trainer.state.global_step
    evals = {e["step"]: e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e}
    initial_eval = evals[0]
    if step not in evals:  # the final point, unless eval_steps just logged it
        evals[step] = trainer.evaluate()["eval_loss"]
    tokens = int(trainer.state.num_input_tokens_seen)  # summed over the processes
    # Whole run: every step and token since step 0, over the training seconds of every
    # process that worked on it (a killed and resumed run counts both).
    summary = {
        log_layout.RUNTIME_S: total_seconds,
        log_layout.TRAINED_TOKENS: tokens,
        log_layout.TOKENS_PER_S: tokens / total_seconds,
        log_layout.PEAK_MEMORY_BYTES: peak_memory_bytes(),
        log_layout.MEAN_TRAIN_LOSS: result.training_loss,
        log_layout.INITIAL_EVAL_LOSS: initial_eval,
        log_layout.BEST_EVAL_LOSS: min(initial_eval, *evals.values()),
    }
    if distributed.is_main_process():  # one writer: the others' files would collide
        live.write_summary(summary)
    dtype, dtype_why = resolve_compute_dtype(params.quantize.compute_dtype)
    record = {
        "epochs": trainer.state.epoch,
        # This process alone: after a resume, the steps since the checkpoint.
        "resumed_from_step": clock.start_step or None,
        "session": {
            "steps": step - clock.start_step,
            "runtime_s": session_seconds,
            "tokens": tokens - clock.start_tokens,
            "tokens_per_s": (tokens - clock.start_tokens) / session_seconds,
        },
        "trainable_parameters": trainable,
        "total_parameters": total,
        "device": device(),
        "compute_dtype": str(dtype).removeprefix("torch."),
        "compute_dtype_why": dtype_why,  # beside the dtype: older run.json have no why
        "optimizer": optimizer_name(p.optimizer),
        "gradient_checkpointing": {
            "on": plan.checkpointing,
            "every_n_layers": plan.checkpoint_every,
            "why": plan.checkpointing_reason,
        },
        "loss": {"kind": plan.loss, "why": plan.loss_reason},
        "lora_init": plan.lora_init,
        "batching": p.batching,
        # Effective batch = per process x processes x accumulation: what params.yaml says.
        "batch": {
            "processes": spread.processes,
            "per_process": spread.per_process_batch,
            "accumulation_steps": spread.accumulation,
            "effective": spread.effective_batch,
        },
        "report_to": list(p.report_to),
        "lora": p.lora.model_dump(),
        "learning_rate": p.learning_rate,
        "train_rows": len(train_rows),
        "validation_rows": len(valid_rows),
        # What decides whether another machine reproduces this adapter bit for bit (CPU
        # model and ISA flags, torch build, threads): `qlora report --compare` names the
        # fields that differ between two runs.
        "environment": environment(),
    }
    live_summary = live.live.summary if live.live is not None else {}
    return Trained(model, record, live_summary, live.directory, run_dir, base_identity)
