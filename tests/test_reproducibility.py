"""Same inputs, same adapter; a killed training run resumes to the very same adapter."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from qlora import training
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
    (sealed / training.COMPLETE).write_text("4")
    cut.mkdir()
    (cut / "adapter_model.safetensors").write_bytes(b"half a file")
    assert training.last_complete_checkpoint(tmp_path) == sealed
    assert not cut.exists()


def test_sigkill_mid_training_then_rerun_resumes_to_the_same_adapter(workspace):
    set_finetune(workspace, max_steps=12, checkpoint_steps=2, eval_steps=100)
    finetune.main()
    uninterrupted = sha256(workspace / ADAPTER)
    (workspace / ADAPTER).unlink()

    cmd = [sys.executable, "-m", "stages.finetune"]
    env = {**os.environ, "PYTHONPATH": str(Path(finetune.__file__).parents[1])}
    proc = subprocess.Popen(
        cmd, cwd=workspace, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if list((workspace / training.WORK_DIR).glob(f"*/checkpoint-*/{training.COMPLETE}")):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "training ended before a checkpoint was sealed"
    assert not (workspace / ADAPTER).exists()

    rerun = subprocess.run(cmd, cwd=workspace, env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming from" in rerun.stdout
    assert sha256(workspace / ADAPTER) == uninterrupted
