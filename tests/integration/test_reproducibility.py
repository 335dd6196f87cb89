"""Same inputs, same adapter; a killed training run resumes to the very same adapter."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from qlora.core import paths
from qlora.train import callbacks, log_layout, recipe
from qlora.train.log_layout import read_curve
from stages import finetune

ADAPTER = Path("data/prepared/adapter/adapter_model.safetensors")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def set_finetune(workspace: Path, **values) -> None:
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    params["finetune"].update(values)
    (workspace / "params.yaml").write_text(yaml.safe_dump(params))


def test_two_runs_give_byte_identical_adapters(workspace):
    finetune.main()
    first = sha256(workspace / ADAPTER)
    finetune.main()
    assert sha256(workspace / ADAPTER) == first


def test_incomplete_checkpoint_is_skipped(tmp_path):
    sealed, cut = tmp_path / "checkpoint-4", tmp_path / "checkpoint-6"
    sealed.mkdir()
    (sealed / callbacks.COMPLETE).write_text("4")
    cut.mkdir()
    (cut / "adapter_model.safetensors").write_bytes(b"half a file")
    assert recipe.last_complete_checkpoint(tmp_path) == sealed
    assert not cut.exists()


@pytest.mark.parametrize("processes", [1, 2])
def test_sigkill_mid_training_then_rerun_resumes_to_the_same_adapter(
    workspace, processes, monkeypatch
):
    """Killed as a job is killed (its whole process group: with 2 processes, the launcher
    and both trainers), then rerun: the same adapter as a run never killed."""
    set_finetune(workspace, max_steps=12, checkpoint_steps=2, eval_steps=100, processes=processes)
    monkeypatch.setenv("PYTHONPATH", str(Path(finetune.__file__).parents[1]))
    finetune.main()
    uninterrupted = sha256(workspace / ADAPTER)
    (workspace / ADAPTER).unlink()
    train_dir = workspace / "reports/train"
    curves = {n: read_curve(train_dir, n) for n in (log_layout.TRAIN_LOSS, log_layout.EVAL_LOSS)}

    cmd = [sys.executable, "-m", "stages.finetune"]
    env = {**os.environ, "PYTHONPATH": str(Path(finetune.__file__).parents[1])}
    proc = subprocess.Popen(
        cmd,
        cwd=workspace,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group, as a job runner gives it
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        if list((workspace / paths.FINETUNE_WORK_DIR).glob(f"*/checkpoint-*/{callbacks.COMPLETE}")):
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "training ended before a checkpoint was sealed"
    assert not (workspace / ADAPTER).exists()
    # The killed run logged to DVCLive's scratch folder: the last good log is untouched.
    assert {n: read_curve(train_dir, n) for n in curves} == curves

    rerun = subprocess.run(cmd, cwd=workspace, env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming from" in rerun.stdout
    assert sha256(workspace / ADAPTER) == uninterrupted

    # The speed describes the whole run: every token over the seconds of both processes,
    # and the resumed process's own share is reported apart.
    # DVCLive's curves read as one uninterrupted run: each step once, the same losses.
    assert {n: read_curve(train_dir, n) for n in curves} == curves
    m = log_layout.training_view(train_dir)
    assert m["steps"] == 12 and 0 < m["resumed_from_step"] < 12
    assert m["session"]["steps"] == 12 - m["resumed_from_step"]
    assert m["session"]["tokens"] < m["trained_tokens"]
    assert m["train_runtime_s"] > m["session"]["runtime_s"] > 0
    assert m["tokens_per_s"] == pytest.approx(m["trained_tokens"] / m["train_runtime_s"])


def test_the_adapter_directory_is_byte_identical_across_processes(workspace):
    """DVC hashes the whole adapter directory: a file whose bytes depend on the process
    (peft writes target_modules from a set, ordered by the string hash seed) would make
    every forced rerun look like a new adapter and rerun evaluate, gate and report."""
    cmd = [sys.executable, "-m", "stages.finetune"]
    adapters = []
    for seed in ("1", "2"):
        env = {
            **os.environ,
            "PYTHONPATH": str(Path(finetune.__file__).parents[1]),
            "PYTHONHASHSEED": seed,
        }
        done = subprocess.run(cmd, cwd=workspace, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
        folder = workspace / ADAPTER.parent
        adapters.append({f.name: f.read_bytes() for f in sorted(folder.iterdir())})
    assert adapters[0].keys() == adapters[1].keys()
    differing = [name for name in adapters[0] if adapters[0][name] != adapters[1][name]]
    assert not differing, f"adapter files differ between processes: {differing}"


def test_checkpoints_are_not_resumed_onto_another_base(workspace, tmp_path_factory):
    from helpers.tiny import make_tiny_model_dir
    from qlora.core.io import weights_identity
    from qlora.core.params import load_params
    from qlora.core.paths import BASE_MODEL_DIR, split_file

    params, splits = load_params(), [split_file("train"), split_file("validation")]
    other = make_tiny_model_dir(tmp_path_factory.mktemp("other_base"), seed=1)
    base = weights_identity(BASE_MODEL_DIR)
    same = recipe.run_fingerprint(params, splits, base)
    assert recipe.run_fingerprint(params, splits, base) == same
    assert recipe.run_fingerprint(params, splits, weights_identity(other)) != same
