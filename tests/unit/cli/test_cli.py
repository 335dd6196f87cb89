"""The `qlora` commands that drive DVC: `run` (stage times, whatever a stage printed),
`restore` and `sweep`."""

from __future__ import annotations

import shutil
import subprocess
import sys

from typer.testing import CliRunner

from helpers.repo import REPO, git
from qlora.cli import app

# A progress bar that ends in "\r" without a newline sits in front of the stage's last line.
TOY_STAGE = """print("Calculating: 100%|###|", end="\\r")
print("[toy] done in 1.5 s")
"""
TOY_DVC_YAML = "stages:\n  toy:\n    cmd: python toy.py\n    deps: [toy.py]\n"


def test_qlora_run_prints_stage_times_then_nothing_to_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], check=True)
    (tmp_path / "toy.py").write_text(TOY_STAGE)
    (tmp_path / "dvc.yaml").write_text(TOY_DVC_YAML)
    first = CliRunner().invoke(app, ["run"])
    assert first.exit_code == 0, first.output
    assert "stage times:" in first.output
    assert "toy" in first.output.split("stage times:")[1]
    second = CliRunner().invoke(app, ["run"])
    assert second.exit_code == 0
    assert "nothing to run: every stage is up to date" in second.output


def test_flow_run_passes_its_options_to_the_flow(monkeypatch):
    import flows.pipeline

    seen: list[list[str]] = []
    monkeypatch.setattr(flows.pipeline, "main", lambda argv: seen.append(argv) or 0)
    result = CliRunner().invoke(
        app, ["flow", "run", "--pull", "--push", "--only-if-changed", "-S", "finetune.lora.r=8"]
    )
    assert result.exit_code == 0, result.output
    # The flow's own parser takes these (tests/integration/test_remote.py runs it against an
    # S3 server).
    assert seen == [["--set=finetune.lora.r=8", "--only-if-changed", "--pull", "--push"]]


def test_flow_sweep_hands_its_options_to_the_sweep_flows_own_parser(monkeypatch):
    import flows.sweep_fanout

    seen: list[dict] = []

    def fake_run(specs, **options):
        seen.append({"specs": specs, **options})
        raise flows.sweep_fanout.StageError("stopped by the test")

    monkeypatch.setattr(flows.sweep_fanout, "run_sweep_flow", fake_run)
    result = CliRunner().invoke(
        app,
        [
            "flow",
            "sweep",
            "-S",
            "finetune.seed=1,2",
            "-S",
            "finetune.lora.r=8,16",
            "--name",
            "grid",
            "--promote",
            "--timeout",
            "60",
        ],
    )
    assert result.exit_code == 1 and "stopped by the test" in result.output
    (call,) = seen
    assert call["specs"] == ["finetune.seed=1,2", "finetune.lora.r=8,16"]
    assert (call["name"], call["promote"], call["member_timeout_seconds"]) == ("grid", True, 60.0)
    assert call["deployment"] == "qlora-pipeline/qlora-sweep-member"


def test_qlora_restore_in_a_project_whose_outputs_match_dvc_lock(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], check=True)
    (tmp_path / "toy.py").write_text(TOY_STAGE)
    (tmp_path / "dvc.yaml").write_text(TOY_DVC_YAML)
    assert CliRunner().invoke(app, ["run"]).exit_code == 0
    done = CliRunner().invoke(app, ["restore"])
    assert done.exit_code == 0, done.output
    assert "nothing to restore" in done.output


def test_a_sweep_with_a_point_the_schema_refuses_queues_nothing(tmp_path, monkeypatch):
    """Every point is checked before any is queued: the second value of the rank is bad."""
    monkeypatch.chdir(tmp_path)
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    git(tmp_path, "init", "-q")
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], check=True)
    (tmp_path / "toy.py").write_text(TOY_STAGE)
    (tmp_path / "dvc.yaml").write_text(TOY_DVC_YAML)
    git(tmp_path, "add", "-A")
    git(tmp_path, "commit", "-qm", "toy")
    done = CliRunner().invoke(app, ["sweep", "-S", "finetune.lora.r=8,-3", "--name", "bad"])
    assert done.exit_code == 1
    assert "experiment bad-2" in done.output and "finetune.lora.r" in done.output
    queued = subprocess.run(
        [sys.executable, "-m", "dvc", "queue", "status"], capture_output=True, text=True
    )
    assert "bad-1" not in queued.stdout
