"""A real DVC remote: the pipeline's outputs go to S3 and come back, by DVC and by the flow.

An S3-compatible server (moto's server mode) listens on the loopback address; the tiny DAG
of test_pipeline_e2e is reproduced in a copy of the repository, whose committed .dvc/config
names the bucket and the endpoint. `dvc push` uploads every DVC-cached output (data, base
model, adapter, Data Docs, the reports); the outputs marked `cache: false` (the metrics and
plots) are git's to keep and never reach the bucket. With the local cache and the cached
outputs deleted, `dvc pull` brings back the same bytes and `dvc repro` has nothing to run.
Then the Prefect flow, `python -m flows.pipeline --pull --push` in a fresh clone (a
container's view), fetches what is unchanged rather than rebuilding it and uploads what a
changed param made it rerun.

The fake credentials live only in the environment of the commands started here: nothing
committed in the copy holds more than the bucket's URL and endpoint (tests/helpers/s3.py).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from flows import dvc_workspace as ws
from helpers.dag import files_under, repro_in_copy
from helpers.repo import REPO, git
from helpers.s3 import (
    BUCKET,
    FAKE_CREDENTIALS,
    PREFIX,
    Remote,
    aws_env,
    dvc,
    free_port,
    moto_s3,
    run,
)
from helpers.tiny import alpaca_rows, tiny_params
from qlora.core.io import write_jsonl
from qlora.core.sources import settle_always_changed

pytestmark = pytest.mark.slow


def commit(work: Path, message: str) -> None:
    git(work, "add", "-A")
    git(work, "commit", "-qm", message)


@dataclass(frozen=True)
class Output:
    stage: str
    path: str
    cached: bool  # False: `cache: false`, kept by git
    md5: str  # as in dvc.lock; a directory's ends in ".dir"

    @property
    def key(self) -> str:
        """Where DVC 3 stores it in the remote."""
        return f"{PREFIX}/files/md5/{self.md5[:2]}/{self.md5[2:]}"


def outputs(work: Path) -> dict[str, Output]:
    """Every stage output with its hash in dvc.lock, as DVC itself reads dvc.yaml (its
    defaults included: a metric or plot is cached unless it says otherwise)."""
    from dvc.repo import Repo

    with Repo(str(work)) as repo:
        return {
            str(out.def_path): Output(
                stage.name, str(out.def_path), out.use_cache, out.hash_info.value
            )
            for stage in repo.index.stages
            for out in stage.outs
        }


def cached_paths(work: Path) -> list[str]:
    return sorted(o.path for o in outputs(work).values() if o.cached)


def wipe(work: Path) -> None:
    """What a fresh checkout lacks: DVC's cache and every output DVC keeps there."""
    for rel in [".dvc/cache", *cached_paths(work)]:
        path = work / rel
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def s3(tmp_path_factory) -> Iterator[Remote]:
    with moto_s3(tmp_path_factory.mktemp("aws-home")) as remote:
        yield remote


@dataclass(frozen=True)
class Pushed:
    work: Path
    push: subprocess.CompletedProcess
    files: dict[str, bytes]  # every file of every cached output, as the DAG made it
    outputs: dict[str, Output]


@pytest.fixture(scope="module")
def pushed(tmp_path_factory, tiny_model_dir, s3) -> Pushed:
    """The tiny DAG reproduced and committed (dvc.lock and the `cache: false` metrics, as a
    user commits them), an S3 remote added as the default and committed, then `dvc push`."""
    work = tmp_path_factory.mktemp("remote") / "repo"
    # The user's own small dataset (no link from the stdlib corpus to the splits): a changed
    # corpus param then reruns `extract`, a cheap stage with a DVC-cached output, and
    # `dataset`, which writes the same splits again.
    write_jsonl(work / "data/user/train.jsonl", alpaca_rows())
    done = repro_in_copy(work, tiny_params(tiny_model_dir, source="data/user/train.jsonl"))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    commit(work, "tiny run")

    s3.add_to(work)
    commit(work, "DVC remote")
    files = files_under(work, *cached_paths(work))
    push = dvc(work, s3.env, "push")
    return Pushed(work, push, files, outputs(work))


def test_push_uploads_every_cached_output_and_leaves_the_reports_to_git(pushed, s3):
    assert pushed.push.returncode == 0, pushed.push.stdout + pushed.push.stderr
    cached = {o.path for o in pushed.outputs.values() if o.cached}
    # data, base model, adapter (and the Data Docs' images): what git must not hold.
    assert {
        "data/raw/stdlib_functions.jsonl",
        "data/prepared/base_model",
        "data/prepared/splits",
        "data/prepared/eval",
        "data/prepared/adapter",
    } <= cached
    keys = s3.keys()
    for out in pushed.outputs.values():
        # A directory is one manifest object (.dir) plus one object per file.
        assert (out.key in keys) == out.cached, f"{out.path}: cached={out.cached}"
    assert len(keys) > len(cached), "the directories' files were not uploaded"
    tracked = set(git(pushed.work, "ls-files", "-z").split("\0")) - {""}
    for out in pushed.outputs.values():
        if not out.cached:  # reports, metrics, plots: in the commit instead
            assert any(f == out.path or f.startswith(out.path + "/") for f in tracked), out.path
    assert not (tracked & set(pushed.files)), "a DVC-cached file is also in git"

    status = dvc(pushed.work, s3.env, "status", "--cloud")
    assert status.returncode == 0, status.stderr
    assert "in sync" in status.stdout, status.stdout

    # Committed: where the remote is. Not committed: anything secret.
    config = (pushed.work / ".dvc/config").read_text()
    assert f"s3://{BUCKET}/{PREFIX}" in config and s3.endpoint in config
    for value in FAKE_CREDENTIALS.values():
        assert value not in config
    assert not (pushed.work / ".dvc/config.local").exists()


def test_pull_after_deleting_cache_and_outputs_restores_the_bytes_and_repro_runs_nothing(
    pushed, s3
):
    work = pushed.work
    wipe(work)
    missing = dvc(work, s3.env, "status", "--json")
    assert "data/prepared/adapter" in missing.stdout, "the wipe left the adapter"

    pull = dvc(work, s3.env, "pull")
    assert pull.returncode == 0, pull.stdout + pull.stderr
    assert files_under(work, *cached_paths(work)) == pushed.files

    status = dvc(work, s3.env, "status", "--json")
    assert status.returncode == 0, status.stderr
    # `sources` is "always changed" by design; settled, it has nothing to do either.
    assert settle_always_changed(yaml.safe_load(status.stdout), work) == {}
    repro = dvc(work, s3.env, "repro")
    assert repro.returncode == 0, repro.stdout[-3000:] + repro.stderr[-3000:]
    ran = re.findall(r"Running stage '([^']+)'", repro.stdout)
    assert ran == ["sources"], f"stages rebuilt after a pull: {ran}"
    for stage in {s.split(":")[0] for s in ws.pipeline_stages(work)} - {"sources"}:
        assert f"Stage '{stage}' didn't change, skipping" in repro.stdout, stage
    # sources re-fingerprinted the same inputs: no file changed, dvc.lock included.
    assert git(work, "status", "--porcelain") == ""


STAGE_LINE = re.compile(r"^  (?P<stage>\S+)\s+(?P<result>\S.*?)\s+[\d.]+ s$", re.MULTILINE)


def test_the_flow_pulls_unchanged_outputs_and_pushes_what_it_reran(pushed, s3, tmp_path):
    """A fresh clone (no cache, no outputs: a container) and a changed corpus param: the flow
    with --pull --push reruns `extract` (and `sources`, always) and `dataset`, which depends
    on the default corpus file whatever dataset.source names (here the tiny rows: it writes
    the same splits again), fetches the rest from the remote (the adapter is not retrained:
    same bytes) and uploads the new corpus."""
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(pushed.work), str(clone))
    params = yaml.safe_load((clone / "params.yaml").read_text())
    params["corpus"]["max_source_chars"] += 100
    (clone / "params.yaml").write_text(yaml.safe_dump(params))
    env = {
        **s3.env,
        # A temporary Prefect server of the flow's own, never a server the developer uses.
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
    }
    env.pop("PREFECT_API_URL", None)

    flow = ("-m", "flows.pipeline", "--repo", str(clone), "--pull", "--push", "--retries", "0")
    done = run(REPO, env, sys.executable, *flow)

    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    results = {m["stage"]: m["result"] for m in STAGE_LINE.finditer(done.stdout)}
    ran = {"extract", "sources", "dataset"}
    assert {s for s, r in results.items() if r == "ran"} == ran, results
    corpus_path = "data/raw/stdlib_functions.jsonl"
    for out in pushed.outputs.values():
        if out.cached and out.stage not in ran:
            assert results[out.stage] == "pulled from remote", (out.path, results)
    unchanged = [p for p in cached_paths(clone) if p != corpus_path]
    expected = {k: v for k, v in pushed.files.items() if k != corpus_path}
    assert files_under(clone, *unchanged) == expected, "an output was rebuilt, not pulled"

    corpus = outputs(clone)[corpus_path]
    assert corpus.md5 != pushed.outputs[corpus_path].md5
    assert corpus.key in s3.keys(), "the rerun stage's output was not pushed"
    status = dvc(clone, s3.env, "status", "--cloud")
    assert "in sync" in status.stdout, status.stdout + status.stderr


def test_an_unreachable_remote_is_transient_and_missing_credentials_are_not(pushed, s3):
    """The flow retries a transient failure only (a network error), so the text a real
    dvc-s3 failure prints must be sorted right: an endpoint nobody listens on, no keys."""
    work = pushed.work
    nobody = f"http://127.0.0.1:{free_port()}"
    for args in (
        ("remote", "add", "--local", "offline", f"s3://{BUCKET}/{PREFIX}"),
        ("remote", "modify", "--local", "offline", "endpointurl", nobody),
    ):
        assert dvc(work, s3.env, *args).returncode == 0
    try:
        offline = dvc(work, s3.env, "push", "--remote", "offline")
    finally:
        dvc(work, s3.env, "remote", "remove", "--local", "offline")
    assert offline.returncode != 0
    transient, reason = ws.classify_failure((offline.stdout + offline.stderr).splitlines())
    assert transient, reason
    assert "Could not connect to the endpoint URL" in reason

    # push asks the remote which objects it has, so it needs the keys even when in sync.
    no_keys = dvc(work, aws_env(s3.home, credentials=False), "push")
    assert no_keys.returncode != 0
    transient, reason = ws.classify_failure((no_keys.stdout + no_keys.stderr).splitlines())
    assert not transient, reason
    assert "credentials" in reason.lower()
