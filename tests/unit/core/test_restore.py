"""Outputs are not persistent (so DVC's run cache works): DVC deletes a stage's outputs
before it runs. A stage that then fails must cost nothing: `restore_outputs` (`qlora
restore`, and `qlora run` and the flows on a failure) puts back what dvc.lock records, and
a param set seen before comes back from the run cache without running.

A toy DVC project in a temporary git repository, one stage with a cached folder and an
uncached (git-kept) metrics file as outputs, as the pipeline's stages have.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers.dag import files_under
from helpers.repo import git
from qlora.core import dvc
from qlora.core.io import StageError, pipeline_env

pytestmark = pytest.mark.slow

STAGE = """\
import json, pathlib, sys, yaml
p = yaml.safe_load(open("params.yaml"))["toy"]
if p["fail"]:
    sys.exit("toy: failed on purpose")
out = pathlib.Path("out"); out.mkdir(exist_ok=True)
(out / "weights.bin").write_bytes(bytes([p["value"] % 256]) * 64)
pathlib.Path("report.json").write_text(json.dumps({"value": p["value"]}))
pathlib.Path("runs.log").open("a").write("ran\\n")
"""

DAG = {
    "stages": {
        "toy": {
            "cmd": f"{sys.executable} toy.py",
            "deps": ["toy.py"],
            "params": ["toy"],
            "outs": ["out"],
            # As the pipeline's metrics: kept by git, and copied by the run cache only.
            "metrics": [{"report.json": {"cache": False}}],
        }
    }
}


def run_dvc(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        dvc.command(*args), cwd=repo, capture_output=True, text=True, env=pipeline_env()
    )


def set_params(repo: Path, value: int, fail: bool = False) -> None:
    (repo / "params.yaml").write_text(yaml.safe_dump({"toy": {"value": value, "fail": fail}}))


@pytest.fixture
def toy(tmp_path: Path) -> Path:
    repo = tmp_path / "toy"
    repo.mkdir()
    git(repo, "init", "-q")
    assert run_dvc(repo, "init", "-q").returncode == 0
    (repo / "toy.py").write_text(STAGE)
    (repo / "dvc.yaml").write_text(yaml.safe_dump(DAG))
    (repo / ".gitignore").write_text("runs.log\n")
    set_params(repo, 1)
    done = run_dvc(repo, "repro")
    assert done.returncode == 0, done.stderr
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "toy")
    return repo


def runs(repo: Path) -> int:
    return (repo / "runs.log").read_text().count("ran")


def test_a_failed_stage_loses_its_outputs_and_restore_brings_back_the_last_good(toy: Path):
    good = files_under(toy, "out", "report.json")
    set_params(toy, 2, fail=True)
    failed = run_dvc(toy, "repro")
    assert failed.returncode != 0
    # What DVC does to a non-persistent output before running its stage: gone.
    assert files_under(toy, "out", "report.json") == {}

    restored = dvc.restore_outputs(toy)

    assert sorted(restored) == ["out", "report.json"]
    assert files_under(toy, "out", "report.json") == good
    # Nothing else is stale but the param the user changed.
    state = dvc.status(toy)
    assert dvc.changed_outputs(state) == []
    assert "changed deps" in str(state) and "toy" in str(state)


def test_restore_with_nothing_lost_changes_nothing(toy: Path):
    before = files_under(toy, "out", "report.json")
    assert dvc.restore_outputs(toy) == []
    assert files_under(toy, "out", "report.json") == before


def test_an_edited_output_is_put_back_as_dvc_lock_records_it(toy: Path):
    good = files_under(toy, "report.json")
    (toy / "report.json").write_text('{"value": "hand-edited"}')
    assert dvc.restore_outputs(toy) == ["report.json"]
    assert files_under(toy, "report.json") == good


def test_an_output_no_cache_holds_is_named(toy: Path):
    subprocess.run(["rm", "-rf", str(toy / ".dvc/cache")], check=True)
    (toy / "report.json").unlink()
    with pytest.raises(StageError, match="report.json"):
        dvc.restore_outputs(toy)


def test_a_param_set_seen_before_comes_back_from_the_run_cache(toy: Path):
    first = files_under(toy, "out", "report.json")
    set_params(toy, 2)
    assert run_dvc(toy, "repro").returncode == 0
    assert runs(toy) == 2
    set_params(toy, 1)

    back = run_dvc(toy, "repro")

    assert back.returncode == 0, back.stderr
    assert "is cached - skipping run" in back.stdout, back.stdout
    assert runs(toy) == 2, "the stage ran again instead of coming from the run cache"
    assert files_under(toy, "out", "report.json") == first
    assert dvc.status(toy) == {}


def test_cached_outputs_reads_every_kind_of_output(tmp_path: Path):
    (tmp_path / "dvc.yaml").write_text(
        yaml.safe_dump(
            {
                "stages": {
                    "a": {"cmd": "x", "outs": ["d", {"f.json": {"cache": False}}]},
                    "b": {"cmd": "y", "metrics": [{"m.json": {"cache": False}}], "plots": ["p"]},
                }
            }
        )
    )
    assert dvc.cached_outputs(tmp_path) == {"d": True, "f.json": False, "m.json": False, "p": True}
