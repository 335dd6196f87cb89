"""The finetune stage's per-step log, written by DVCLive (layout: qlora/train/log_layout.py).

Why not transformers' own DVCLiveCallback: it numbers DVCLive's steps by log call, so the
validation loss of optimizer step 20 lands at DVCLive step 5 and the train and validation
curves no longer share an x axis; it also logs every TrainingArguments field (the scratch
checkpoint path among them) as params. Here each value is logged at the Trainer's global
step, and only the metrics of qlora.train.log_layout.FROM_TRAINER.

DVCLive writes into a scratch folder beside the run's checkpoints; the stage moves the
folder into reports/train only once training has succeeded, so a failed or killed run
leaves the last good log in place. A resumed run replays the Trainer's restored log
history, so its files read as those of one uninterrupted run.
"""

from __future__ import annotations

from pathlib import Path

from transformers import TrainerCallback

from qlora.train.log_layout import FROM_TRAINER


class LiveLogger(TrainerCallback):
    def __init__(self, directory: Path):
        self.directory = directory
        self.live = None

    def _open(self) -> None:
        from dvclive import Live

        # dvcyaml=None: dvc.yaml declares the stage's metrics and plots itself. No
        # experiment of its own: `dvc exp run` makes it, and `dvc repro` needs none.
        self.live = Live(
            dir=str(self.directory), save_dvc_exp=False, dvcyaml=None, report=None, resume=False
        )

    def _log(self, metrics: dict[str, float], plot: bool) -> None:
        if self.live is None:
            self._open()
        for name, value in metrics.items():
            self.live.log_metric(name, value, plot=plot)
        self.live.make_summary()

    def write(self, step: int, values: dict) -> None:
        """The Trainer's log `values` at `step`, each as its qlora.train.log_layout name."""
        if self.live is None:
            self._open()
        self.live.step = step
        self._log({name: values[key] for key, name in FROM_TRAINER.items() if key in values}, True)

    def write_summary(self, values: dict[str, float]) -> None:
        """Run totals: into metrics.json only, not plotted."""
        self._log(values, plot=False)

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step > 0 and state.is_world_process_zero:
            # Resumed: start the files afresh from the checkpoint's history, so that steps
            # logged after that checkpoint by the killed run appear once, not twice.
            self._open()
            for entry in state.log_history:  # the step-0 evaluation included
                self.write(entry["step"], entry)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            self.write(state.global_step, logs)
