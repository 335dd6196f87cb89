"""The Trainer callbacks of the QLoRA recipe: stop on divergence, seal checkpoints, keep
the data order's randomness untouched on resume, and clock the run across resumes."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from transformers import (
    TrainerCallback,
)

from qlora.core.io import StageError

COMPLETE = "CHECKPOINT_COMPLETE"  # written after every file of a checkpoint is on disk


class DivergenceGuard(TrainerCallback):
    """Stop at the first NaN or infinite loss: every later step would be wasted."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in ("loss", "eval_loss"):
            value = (logs or {}).get(key)
            if value is not None and not math.isfinite(value):
                raise StageError(
                    f"training diverged: {key} = {value} at step {state.global_step}; lower "
                    "finetune.learning_rate or raise finetune.max_grad_norm clipping"
                )


class CheckpointSealer(TrainerCallback):
    """Mark a checkpoint complete once the Trainer has written all of it (on_save runs after
    the weights, optimizer, RNG and trainer state are saved). A checkpoint without the mark
    was cut off mid-save and is never resumed from. The mark also carries the training
    seconds spent up to it, so a resumed run reports the speed of the whole run."""

    def __init__(self, clock: RunClock):
        self.clock = clock

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            mark = {"step": state.global_step, "train_seconds": self.clock.total_seconds()}
            (folder / COMPLETE).write_text(json.dumps(mark))


class UntouchedRandomness(TrainerCallback):
    """The validation loss at step 0 (eval_on_start) leaves the random state as it found it.
    Every DataLoader iterator draws its base seed from torch's global generator, and the
    length-grouped sampler draws the epoch's order from it right after: without this, a run
    resumed from a checkpoint (which does not evaluate at step 0 again) would train on
    another order than the run that was killed, and end on another adapter."""

    def __init__(self) -> None:
        self.saved: tuple | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step == 0:
            cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
            self.saved = (torch.get_rng_state(), cuda)

    def on_evaluate(self, args, state, control, **kwargs):
        if state.global_step == 0 and self.saved is not None:
            cpu, cuda = self.saved
            torch.set_rng_state(cpu)
            if cuda is not None:
                torch.cuda.set_rng_state_all(cuda)
            self.saved = None


class RunClock(TrainerCallback):
    """Training seconds of the whole run, across resumes: the seconds recorded in the
    checkpoint resumed from, plus this process's. Also remembers where this process began
    (step and tokens), so its own share can be told apart from the run's."""

    def __init__(self, seconds_before: float = 0.0):
        self.seconds_before = seconds_before
        self.started: float | None = None
        self.start_step = 0
        self.start_tokens = 0

    def on_train_begin(self, args, state, control, **kwargs):
        # Runs after the Trainer restored the checkpoint's state.
        self.started = time.perf_counter()
        self.start_step = state.global_step
        self.start_tokens = int(state.num_input_tokens_seen)

    def session_seconds(self) -> float:
        return 0.0 if self.started is None else time.perf_counter() - self.started

    def total_seconds(self) -> float:
        return self.seconds_before + self.session_seconds()


def seconds_recorded_in(checkpoint: Path | None) -> float:
    """Training seconds a sealed checkpoint recorded (0 for none, or an older mark)."""
    if checkpoint is None:
        return 0.0
    try:
        return float(json.loads((checkpoint / COMPLETE).read_text())["train_seconds"])
    except (ValueError, KeyError, TypeError):
        return 0.0
