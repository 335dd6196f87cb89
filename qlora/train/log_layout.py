"""The finetune stage's training log, as DVCLive lays it out, and how its readers see it.

The finetune stage logs through DVCLive (qlora/train/log_writer.py) into reports/train/:
- metrics.json: DVCLive's summary, the last value of every metric, plus run totals logged
  summary-only (`dvc metrics show`, `dvc exp show` columns);
- plots/metrics/<name>.tsv: one row per logged step (`dvc plots show`, `dvc plots diff`);
- run.json: how the run was made (device, dtypes, training path, environment), which are
  not metrics and so have no place in DVCLive's files.
This module only reads them (no DVCLive, no torch), for the report and the flows.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from qlora.core.io import StageError, read_json

# Metric names: DVCLive's paths under plots/metrics/ and keys of the summary ("a/b" is
# summary["a"]["b"]). Logged every `finetune.logging_steps` (train/*) or `eval_steps`.
TRAIN_LOSS = "train/loss"
LEARNING_RATE = "train/learning_rate"
GRAD_NORM = "train/grad_norm"
TOKENS_PER_S = "train/tokens_per_s"  # per step: the run's average so far; summary: whole run
PEAK_MEMORY_GB = "train/peak_memory_gb"
EVAL_LOSS = "eval/loss"
# Summary only: the run's totals, logged once at the end.
RUNTIME_S = "train/runtime_s"
TRAINED_TOKENS = "train/tokens"
MEAN_TRAIN_LOSS = "train/mean_loss"
PEAK_MEMORY_BYTES = "train/peak_memory_bytes"
INITIAL_EVAL_LOSS = "eval/initial_loss"
BEST_EVAL_LOSS = "eval/best_loss"

# The Trainer's log keys and the metric each becomes; other keys (runtimes, epoch) are noise.
FROM_TRAINER = {
    "loss": TRAIN_LOSS,
    "learning_rate": LEARNING_RATE,
    "grad_norm": GRAD_NORM,
    "tokens_per_s": TOKENS_PER_S,
    "peak_memory_gb": PEAK_MEMORY_GB,
    "eval_loss": EVAL_LOSS,
}


def summary_value(summary: dict, name: str) -> Any:
    node: Any = summary
    for part in name.split("/"):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def read_curve(train_dir: Path, name: str) -> list[dict[str, float]]:
    """One metric's rows as DVCLive wrote them: [{"step": 5, "loss": 1.96}, ...] (the value
    under the name's last part, as in the file's header). Missing file: no rows."""
    path = train_dir / "plots" / "metrics" / f"{name}.tsv"
    if not path.exists():
        return []
    column = name.rsplit("/", 1)[-1]
    rows = []
    with path.open(encoding="utf-8", newline="") as f:
        for line, row in enumerate(csv.DictReader(f, delimiter="\t"), start=2):
            try:
                rows.append({"step": int(row["step"]), column: float(row[column])})
            except (KeyError, TypeError, ValueError):
                raise StageError(
                    f"{path}, line {line}: expected a step and a number under {column!r}, got {row}"
                ) from None
    return rows


def train_curve(train_dir: Path) -> list[dict[str, float]]:
    """Training loss rows, each with the learning rate logged at its step."""
    rates = {r["step"]: r["learning_rate"] for r in read_curve(train_dir, LEARNING_RATE)}
    return [{**r, "learning_rate": rates.get(r["step"])} for r in read_curve(train_dir, TRAIN_LOSS)]


def eval_curve(train_dir: Path) -> list[dict[str, float]]:
    return read_curve(train_dir, EVAL_LOSS)


def training_view(train_dir: Path) -> dict[str, Any]:
    """What the report shows of a run, read from `train_dir` (see merged_view)."""
    run_file, summary_file = train_dir / "run.json", train_dir / "metrics.json"
    return merged_view(read_json(run_file), read_json(summary_file), run_file, summary_file)


def merged_view(run: Any, summary: Any, run_file: Path, summary_file: Path) -> dict[str, Any]:
    """run.json's record with the DVCLive summary's numbers under the names the report
    uses. Raises StageError naming a file that is not an object, or a missing metric."""
    if not isinstance(run, dict) or not isinstance(summary, dict):
        raise StageError(f"{run_file} and {summary_file} must each hold a JSON object")
    names = {
        "steps": "step",
        "train_runtime_s": RUNTIME_S,
        "tokens_per_s": TOKENS_PER_S,
        "trained_tokens": TRAINED_TOKENS,
        "peak_memory_bytes": PEAK_MEMORY_BYTES,
        "final_train_loss": TRAIN_LOSS,
        "mean_train_loss": MEAN_TRAIN_LOSS,
        "final_eval_loss": EVAL_LOSS,
        "initial_eval_loss": INITIAL_EVAL_LOSS,
        "best_eval_loss": BEST_EVAL_LOSS,
    }
    numbers = {key: summary_value(summary, name) for key, name in names.items()}
    missing = [names[k] for k in ("steps", "train_runtime_s", "tokens_per_s") if numbers[k] is None]
    if missing:
        raise StageError(f"{summary_file}: missing metric(s) {missing}")
    return {**run, **numbers}
