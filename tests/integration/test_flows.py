"""The Prefect flow that drives DVC, on a toy DVC project made in the test.

The toy project has the shape of the real one (a validation stage that can reject the data,
a training stage that can hit the network, a report stage that writes the files the
artifacts are made from) but runs in a second, so every path of the flow runs for real:
real `dvc` commands in a real git + DVC repository, real flow runs on a temporary Prefect
server (`prefect_test_harness`), read back through Prefect's API.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import yaml

from flows import dvc_workspace as ws
from flows import report_artifacts as ra
from helpers.repo import FIXTURES_DIR, REPO, git

STAGES_IN_DAG_ORDER = ["prepare", "validate", "train", "report"]
# The toy reads the project's own params.yaml (the flow checks overrides with its schema):
# rows to prepare, rows validation needs, and the rank training writes out.
ROWS, MIN_ROWS, RANK = "dataset.max_rows.train", "validate.min_rows.train", "finetune.lora.r"
LOG = logging.getLogger("test_flows")

# ---- the toy DVC project -------------------------------------------------------------

TOY_STAGE = textwrap.dedent(
    '''
    """Stages of a toy pipeline; params.yaml and marker files steer them."""
    import pathlib, shutil, sys, time
    import yaml

    name = sys.argv[1]
    params = yaml.safe_load(open("params.yaml"))  # the project's own params schema
    with open("runs.log", "a") as log:  # every command run, for the tests to count
        log.write(name + "\\n")
    if name == "prepare":
        rows = params["dataset"]["max_rows"]["train"]
        pathlib.Path("data.txt").write_text("".join(f"row {i}\\n" for i in range(rows)))
    elif name == "validate":
        rows = len(pathlib.Path("data.txt").read_text().splitlines())
        need = params["validate"]["min_rows"]["train"]
        if rows < need:  # as qlora.core.io.run_stage reports a StageError
            print(f"[validate] FAILED: data.txt has {rows} rows, fewer than "
                  f"validate.min_rows.train={need}", file=sys.stderr)
            sys.exit(1)
        pathlib.Path("validated.txt").write_text(str(rows))
    elif name == "train":
        pathlib.Path("train.started").write_text("")
        slow = pathlib.Path("slow.txt")
        time.sleep(float(slow.read_text()) if slow.exists() else 0)
        flaky = pathlib.Path("flaky.txt")
        if flaky.exists() and int(flaky.read_text()) > 0:
            flaky.write_text(str(int(flaky.read_text()) - 1))
            raise ConnectionError("Connection reset by peer while downloading the dataset")
        rows = pathlib.Path("validated.txt").read_text()
        pathlib.Path("model.txt").write_text(f"r={params['finetune']['lora']['r']} rows={rows}")
    elif name == "report":
        shutil.copytree("fixtures/reports", "reports", dirs_exist_ok=True)
    '''
)

REPORT_OUTS = [
    "reports/eval/metrics.json",
    "reports/gate.json",
    "reports/report.md",
    "reports/report.html",
]


def toy_dvc_yaml() -> dict:
    run = f"{sys.executable} toy_stage.py"
    # Listed out of DAG order on purpose: the order must come from DVC's graph.
    return {
        "stages": {
            "report": {
                "cmd": f"{run} report",
                "deps": ["toy_stage.py", "model.txt", "fixtures"],
                "outs": [{path: {"cache": False}} for path in REPORT_OUTS],
            },
            "train": {
                "cmd": f"{run} train",
                "deps": ["toy_stage.py", "validated.txt"],
                "params": [RANK],
                "outs": ["model.txt"],
            },
            "validate": {
                "cmd": f"{run} validate",
                "deps": ["toy_stage.py", "data.txt"],
                "params": [MIN_ROWS],
                "outs": ["validated.txt"],
            },
            "prepare": {
                "cmd": f"{run} prepare",
                "deps": ["toy_stage.py"],
                "params": [ROWS],
                "outs": ["data.txt"],
            },
        }
    }


def eval_metrics_fixture() -> dict:
    def m(value, stderr, higher):
        return {"value": value, "stderr": stderr, "higher_is_better": higher}

    def variant(label, bpb, acc):
        return {
            "label": label,
            "metrics": {
                "docstring_loss": {"bits_per_byte": m(bpb, 0.0, False)},
                "docstring_choice": {"acc": m(acc, 0.05, True)},
            },
        }

    return {
        "settings": {"tasks": ["docstring_loss", "docstring_choice"], "batch_size": 4},
        "variants": {
            "base_full": variant("base (float32)", 1.20, 0.40),
            "base_4bit": variant("base (nf4+double_quant)", 1.25, 0.38),
            "adapter_4bit": variant("base + adapter (nf4+double_quant)", 1.05, 0.55),
        },
    }


def gate_fixture(metrics: dict) -> dict:
    """The gate stage's own decision on the fixture metrics, so the schema cannot drift."""
    from helpers.tiny import gate_params
    from qlora.evaluation.gate import decide

    params = gate_params(min_gain=0.02, max_regression=0.10)
    return decide(metrics, params)


def dvc(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dvc", *args],
        cwd=cwd,
        env={**os.environ, "DVC_NO_ANALYTICS": "1"},
        capture_output=True,
        text=True,
    )


def make_toy_repo(root: Path) -> Path:
    root.mkdir(parents=True)
    git(root, "init", "-q")
    # `dvc exp save` commits: a CI machine may have no global git identity.
    git(root, "config", "user.name", "toy")
    git(root, "config", "user.email", "toy@example.com")
    assert dvc(root, "init", "-q").returncode == 0
    (root / "toy_stage.py").write_text(TOY_STAGE)
    (root / "dvc.yaml").write_text(yaml.safe_dump(toy_dvc_yaml(), sort_keys=False))
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    for key, value in ((ROWS, 3), (MIN_ROWS, 2), (RANK, 8)):
        set_param(root, key, value)
    (root / ".gitignore").write_text("runs.log\ntrain.started\nslow.txt\nflaky.txt\n")
    fixtures = root / "fixtures/reports"
    (fixtures / "eval").mkdir(parents=True)
    metrics = eval_metrics_fixture()
    (fixtures / "eval/metrics.json").write_text(json.dumps(metrics))
    (fixtures / "gate.json").write_text(json.dumps(gate_fixture(metrics)))
    (fixtures / "report.md").write_text("# QLoRA report\n\nThe adapter was promoted.\n")
    (fixtures / "report.html").write_text("<html><body>report</body></html>\n")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "toy pipeline")
    return root


@pytest.fixture(scope="module")
def built_toy(tmp_path_factory) -> Path:
    """The toy project with every stage run once and dvc.lock committed."""
    root = make_toy_repo(tmp_path_factory.mktemp("toy") / "template")
    done = dvc(root, "repro")
    assert done.returncode == 0, done.stdout + done.stderr
    git(root, "add", "-A")
    git(root, "commit", "-qm", "reproduced")
    for marker in ("runs.log", "train.started"):
        (root / marker).unlink()
    return root


@pytest.fixture
def toy(built_toy, tmp_path) -> Path:
    """A fresh copy of the reproduced toy project (git history, DVC cache and all)."""
    dest = tmp_path / "repo"
    shutil.copytree(built_toy, dest, symlinks=True)
    return dest


def set_param(repo: Path, key: str, value) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    *sections, last = key.split(".")
    inner = params
    for section in sections:
        inner = inner[section]
    inner[last] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def runs(repo: Path) -> list[str]:
    path = repo / "runs.log"
    return path.read_text().split() if path.exists() else []


# ---- a real Prefect server -------------------------------------------------------------


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A temporary Prefect server (SQLite) for the whole session: real flow runs."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        mp.setenv("DO_NOT_TRACK", "1")
        mp.setenv("PREFECT_HOME", str(tmp_path_factory.mktemp("prefect-home")))
        with prefect_test_harness(server_startup_timeout=120):
            yield PREFECT_API_URL.value()


def run_flow(**params):
    from flows.pipeline import qlora_pipeline

    params.setdefault("retry_backoff_seconds", 0.1)
    params.setdefault("wait_for_workspace_seconds", 5)
    return qlora_pipeline(**params, return_state=True)


def task_runs(state) -> dict:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        found = client.read_task_runs(
            flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=[state.state_details.flow_run_id])
            )
        )
    return {t.name: t for t in found}


def artifacts(state) -> dict:
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])
            )
        )
    return {a.key: a for a in found}


def flow_logs(state, contains: str, timeout: float = 15.0) -> list[str]:
    """Log lines of a flow run on the server (shipped in the background: poll)."""
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    deadline = time.monotonic() + timeout
    while True:
        with get_client(sync_client=True) as client:
            logs = client.read_logs(
                LogFilter(flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id]))
            )
        lines = [log.message for log in logs]
        if any(contains in line for line in lines) or time.monotonic() > deadline:
            return lines
        time.sleep(0.5)


# ---- stage order and failure classification (no server) -------------------------------


def test_stage_order_comes_from_dvc_graph_not_file_order(built_toy):
    assert ws.pipeline_stages(built_toy) == STAGES_IN_DAG_ORDER


def test_a_folder_without_dvc_is_refused_with_a_clear_message(tmp_path):
    with pytest.raises(ValueError, match="not a DVC repository"):
        ws.find_repo_root(tmp_path)


DVC_FAILED = "ERROR: failed to reproduce 'x': failed to run: python -m stages.x, exited with"


@pytest.mark.parametrize(
    ("lines", "transient", "reason"),
    [
        # A stage's own verdict (StageError) is final, whatever words it quotes from data.
        (
            ["[validate] FAILED: data.txt has 2 rows", f"{DVC_FAILED} 1"],
            False,
            "[validate] FAILED",
        ),
        (
            ["[validate] FAILED: row 3 is 'Connection refused' (too short)", f"{DVC_FAILED} 1"],
            False,
            "[validate] FAILED",
        ),
        (["[finetune] FAILED: loss is nan at step 12", f"{DVC_FAILED} 1"], False, "nan"),
        # ...unless it exits with EX_TEMPFAIL (75): "temporary, try again".
        (["[base] FAILED: could not download x", f"{DVC_FAILED} 75"], True, "[base] FAILED"),
        # Uncaught network exceptions, from the standard library or from HTTP clients.
        (
            ["Traceback (most recent call last):", '  File "a.py", line 1, in <module>']
            + ["ConnectionError: Connection reset by peer", f"{DVC_FAILED} 1"],
            True,
            "ConnectionError",
        ),
        (
            ["requests.exceptions.ReadTimeout: HTTPSConnectionPool(host='hf.co'): Read timed out."]
            + [f"{DVC_FAILED} 1"],
            True,
            "ReadTimeout",
        ),
        (
            ["huggingface_hub.errors.HfHubHTTPError: 503 Server Error: Service Unavailable"]
            + [f"{DVC_FAILED} 1"],
            True,
            "503",
        ),
        # DVC's own errors: a busy lock, an unreachable remote.
        (["ERROR: Unable to acquire lock. Most likely another DVC process is running"], True, ""),
        (["ERROR: failed to push data to the cloud - Cannot connect to host s3:443"], True, ""),
        # Bugs, crashes and kills are real failures: a retry would only delay the report.
        (["Traceback (most recent call last):", "KeyError: 'lora'", f"{DVC_FAILED} 1"], False, ""),
        ([f"{DVC_FAILED} -9"], False, "-9"),
        ([], False, "no output"),
    ],
)
def test_failures_are_sorted_into_transient_and_real(lines, transient, reason):
    got_transient, got_reason = ws.classify_failure(lines)
    assert got_transient is transient
    assert reason in got_reason


def test_dvc_status_is_described_per_stage():
    status = {
        "train": [{"changed deps": {"params.yaml": {"train.r": 16}}}],
        "prepare": [{"changed outs": {"data.txt": "deleted"}}, "always changed"],
    }
    lines = ws.describe_status(status)
    assert lines == [
        "train: changed deps: params.yaml (train.r)",
        "prepare: changed outs: data.txt (deleted) | always changed",
    ]


def test_absent_data_is_not_a_change_when_a_remote_has_it():
    fresh_clone = {
        "prepare": [{"changed outs": {"data.txt": "not in cache"}}],
        "train": [{"changed deps": {"data.txt": "deleted"}}, {"changed outs": {"m": "deleted"}}],
    }
    assert ws.ignore_absent_data(fresh_clone) == {}
    edited = {"train": [{"changed deps": {"data.txt": "deleted", "params.yaml": {"train.r": 9}}}]}
    assert ws.ignore_absent_data(edited) == {
        "train": [{"changed deps": {"params.yaml": {"train.r": 9}}}]
    }


# ---- one run per workspace, repair after a crash -----------------------------------------


HOLD_LOCK = textwrap.dedent(
    """
    import logging, sys, time
    from pathlib import Path
    from flows.dvc_workspace import workspace_lock
    with workspace_lock(Path(sys.argv[1]), 0, logging.getLogger(), owner="holder"):
        print("held", flush=True)
        time.sleep(60)
    """
)


def start_python(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def test_runs_of_one_workspace_never_overlap_and_a_killed_holder_frees_it(built_toy):
    holder = start_python(HOLD_LOCK, str(built_toy))
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ws.WorkspaceBusy, match=f"pid {holder.pid}"):
            with ws.workspace_lock(built_toy, 0.5, LOG):
                pass
    finally:
        holder.kill()  # SIGKILL: no clean-up code runs
        holder.wait()
    with ws.workspace_lock(built_toy, 5, LOG):
        pass


def processes_running(needle: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            if needle in " ".join(proc.cmdline()):
                found.append(proc)
        except psutil.Error:
            continue
    return found


CRASHING_RUN = textwrap.dedent(
    """
    import logging, sys
    from pathlib import Path
    from flows.dvc_workspace import run_dvc, workspace_lock
    repo = Path(sys.argv[1])
    with workspace_lock(repo, 0, logging.getLogger()):
        run_dvc(repo, ["repro"], logging.getLogger())
    """
)


def test_a_killed_run_leaves_a_workspace_the_next_run_repairs(toy, prefect_server):
    """SIGKILL the process driving DVC mid-stage: its stage command lives on as an orphan.
    The next flow run stops it, and DVC reruns only the stage that was cut off."""
    set_param(toy, RANK, 4)
    (toy / "slow.txt").write_text("60")
    crashed = start_python(CRASHING_RUN, str(toy))
    deadline = time.monotonic() + 60
    while not (toy / "train.started").exists():
        assert crashed.poll() is None, crashed.stdout.read()
        assert time.monotonic() < deadline, "the train stage never started"
        time.sleep(0.2)
    crashed.kill()
    crashed.wait()
    orphans = processes_running("toy_stage.py")
    assert orphans, "expected the stage command to outlive its killed parent"
    (toy / "slow.txt").unlink()
    before = runs(toy)

    state = run_flow(repo_dir=str(toy), retries=0)

    assert state.is_completed(), state.message
    assert not any(p.is_running() for p in orphans), "the orphaned stage was not stopped"
    results = {s["stage"]: s["result"] for s in state.result()["stages"]}
    assert results == {
        "prepare": "up to date",
        "validate": "up to date",
        "train": "ran",
        "report": "ran",
    }
    assert runs(toy)[len(before) :] == ["train", "report"]
    assert (toy / "model.txt").read_text() == "r=4 rows=3"
    assert dvc(toy, "status", "--json").stdout.strip() == "{}"


def test_a_stale_hardlink_dvc_lock_is_removed_only_when_no_dvc_runs(toy):
    """With core.hardlink_lock (network file systems) a killed DVC leaves .dvc/tmp/lock
    behind for good; DVC's default lock (an OS file lock) cannot go stale."""
    assert dvc(toy, "config", "core.hardlink_lock", "true").returncode == 0
    tmp = toy / ".dvc/tmp"
    claim = tmp / ("0123456789abcdef" * 2 + ".lock")
    claim.write_text(str(claim))
    # What a killed DVC leaves: the lock, hard-linked to its owner's claim file (replacing
    # the empty file DVC's default lock leaves, which in this mode blocks just the same).
    (tmp / "lock").unlink(missing_ok=True)
    os.link(claim, tmp / "lock")
    with pytest.raises(ws.TransientDvcFailure, match="Unable to acquire lock"):
        ws.run_dvc(toy, ["repro"], LOG)

    notes = ws.repair_workspace(toy, LOG)

    assert any("removed stale DVC lock" in n for n in notes)
    assert not (tmp / "lock").exists() and not claim.exists()
    ws.run_dvc(toy, ["repro"], LOG)


# ---- flow runs on a real (temporary) Prefect server ---------------------------------------


def test_flow_runs_each_stage_as_a_task_in_dag_order_and_publishes_artifacts(
    tmp_path, prefect_server
):
    repo = make_toy_repo(tmp_path / "fresh")  # nothing run yet: every stage is stale

    state = run_flow(repo_dir=str(repo))

    assert state.is_completed(), state.message
    summary = state.result()
    assert [s["stage"] for s in summary["stages"]] == STAGES_IN_DAG_ORDER
    assert all(s["result"] == "ran" and s["attempts"] == 1 for s in summary["stages"])
    assert runs(repo) == STAGES_IN_DAG_ORDER
    assert dvc(repo, "status", "--json").stdout.strip() == "{}"

    tasks = task_runs(state)
    for stage in STAGES_IN_DAG_ORDER:
        assert tasks[stage].state_type.value == "COMPLETED"
    starts = [tasks[s].start_time for s in STAGES_IN_DAG_ORDER]
    assert starts == sorted(starts)
    for earlier, later in zip(STAGES_IN_DAG_ORDER, STAGES_IN_DAG_ORDER[1:], strict=False):
        assert tasks[earlier].end_time <= tasks[later].start_time, "two DVC commands overlapped"

    found = artifacts(state)
    assert set(found) >= {
        "qlora-stages",
        "qlora-eval-metrics",
        "qlora-gate",
        "qlora-report",
        "qlora-report-html",
    }
    table = json.loads(found["qlora-eval-metrics"].data)
    bpb = next(row for row in table if row["metric"] == "bits_per_byte")
    assert bpb["base (nf4+double_quant)"] == "1.25"
    assert bpb["base + adapter (nf4+double_quant)"] == "1.05"
    assert bpb["adapter vs NF4 base"] == "+16.00%"
    gate = found["qlora-gate"].data
    assert "PROMOTED" in gate and "docstring_loss/bits_per_byte" in gate
    assert "The adapter was promoted." in found["qlora-report"].data
    assert (repo / "reports/report.html").resolve().as_uri() in found["qlora-report-html"].data
    stages_table = json.loads(found["qlora-stages"].data)
    assert [row["stage"] for row in stages_table] == STAGES_IN_DAG_ORDER


def test_scheduled_run_ends_with_nothing_to_do_when_nothing_changed(toy, prefect_server):
    start = time.monotonic()
    state = run_flow(repo_dir=str(toy), only_if_changed=True)
    seconds = time.monotonic() - start

    assert state.is_completed()
    assert "nothing to do" in state.message
    assert state.result()["status"] == "nothing to do"
    assert runs(toy) == []
    assert not set(task_runs(state)) & set(STAGES_IN_DAG_ORDER), "a stage task ran"
    assert seconds < 30

    set_param(toy, ROWS, 5)
    state = run_flow(repo_dir=str(toy), only_if_changed=True)
    assert state.is_completed()
    assert [s["result"] for s in state.result()["stages"]] == ["ran"] * 4


def test_a_fresh_clone_pulls_from_the_remote_instead_of_rebuilding(toy, tmp_path, prefect_server):
    """A container's checkout: no data, a DVC remote. Absent data is no change; a changed
    param reruns its stage, the rest is pulled, and the results are pushed back."""
    assert dvc(toy, "remote", "add", "-d", "store", str(tmp_path / "remote")).returncode == 0
    assert dvc(toy, "push").returncode == 0
    git(toy, "commit", "-qam", "a DVC remote")
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(toy), str(clone))

    state = run_flow(repo_dir=str(clone), only_if_changed=True, pull=True)
    assert "nothing to do" in state.message

    set_param(clone, RANK, 3)
    state = run_flow(repo_dir=str(clone), only_if_changed=True, pull=True, push=True)

    assert state.is_completed(), state.message
    results = [s["result"] for s in state.result()["stages"]]
    assert results == ["pulled from remote", "pulled from remote", "ran", "ran"]
    assert runs(clone) == ["train", "report"]
    assert (clone / "model.txt").read_text() == "r=3 rows=3"
    assert "new" not in dvc(clone, "status", "--cloud").stdout, "results were not pushed"


def test_command_line_reports_nothing_to_do_and_a_failing_stage(
    toy, prefect_server, capsys, monkeypatch
):
    from flows.pipeline import main

    monkeypatch.delenv(ws.ALLOW_RISKY_ENV, raising=False)
    assert main(["--repo", str(toy), "--only-if-changed"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    set_param(toy, MIN_ROWS, 10)
    # The machine's own user may change a source (a deployment's run may not): the override
    # is applied and the stages run, up to the failing one.
    assert main(["--repo", str(toy), "--retries", "0", "-S", "base.revision=v1"]) == 1
    assert "[validate] FAILED: data.txt has 3 rows" in capsys.readouterr().err
    assert yaml.safe_load((toy / "params.yaml").read_text())["base"]["revision"] == "v1"


def test_transient_failure_is_retried_with_backoff(toy, prefect_server):
    set_param(toy, RANK, 16)
    (toy / "flaky.txt").write_text("1")  # the first attempt loses its connection

    state = run_flow(repo_dir=str(toy), retries=2)

    assert state.is_completed(), state.message
    train = next(s for s in state.result()["stages"] if s["stage"] == "train")
    assert train["attempts"] == 2
    assert runs(toy) == ["train", "train", "report"]
    assert task_runs(state)["train"].run_count == 2
    assert (toy / "model.txt").read_text() == "r=16 rows=3"


def test_validation_failure_is_not_retried_and_its_message_is_in_the_logs(toy, prefect_server):
    set_param(toy, MIN_ROWS, 10)

    state = run_flow(repo_dir=str(toy), retries=3)

    assert state.is_failed()
    error = state.result(raise_on_failure=False)
    assert isinstance(error, ws.DvcCommandFailed)
    assert not isinstance(error, ws.TransientDvcFailure)
    message = "[validate] FAILED: data.txt has 3 rows, fewer than validate.min_rows.train=10"
    assert message in str(error)
    assert runs(toy) == ["validate"], "retried, or a later stage ran"
    assert task_runs(state)["validate"].run_count == 1
    assert any(message in line for line in flow_logs(state, message))
    table = json.loads(artifacts(state)["qlora-stages"].data)
    assert [(r["stage"], r["result"]) for r in table] == [
        ("prepare", "up to date"),
        ("validate", "FAILED"),
        ("train", "not run"),
        ("report", "not run"),
    ]


def test_a_failed_stage_leaves_the_last_good_outputs_in_the_workspace(toy, prefect_server):
    """DVC deletes a stage's outputs before running it (they are not persistent, for the
    run cache); when the stage then fails, the flow puts back what dvc.lock records."""
    before = (toy / "validated.txt").read_bytes()
    set_param(toy, MIN_ROWS, 10)

    state = run_flow(repo_dir=str(toy), retries=0)

    assert state.is_failed()
    assert runs(toy) == ["validate"]  # it ran, so DVC had removed its output first
    assert (toy / "validated.txt").read_bytes() == before
    status = json.loads(dvc(toy, "status", "--json").stdout)
    assert status == {"validate": [{"changed deps": {"params.yaml": {MIN_ROWS: "modified"}}}]}
    assert any(
        "restored the last good outputs: validated.txt" in line
        for line in flow_logs(state, "restored")
    )


def test_overrides_run_as_a_recorded_dvc_experiment(toy, prefect_server):
    state = run_flow(repo_dir=str(toy), overrides=[f"{RANK}=7"])

    assert state.is_completed(), state.message
    summary = state.result()
    name = summary["experiment"]
    assert name
    assert [s["result"] for s in summary["stages"]] == ["up to date", "up to date", "ran", "ran"]
    assert (toy / "model.txt").read_text() == "r=7 rows=3"
    # The experiment is a git ref holding the params and the dvc.lock of the run.
    ref = next(line.split()[-1] for line in git(toy, "show-ref").splitlines() if name in line)
    assert yaml.safe_load(git(toy, "show", f"{ref}:params.yaml"))["finetune"]["lora"]["r"] == 7
    lock = yaml.safe_load(git(toy, "show", f"{ref}:dvc.lock"))
    assert lock["stages"]["train"]["params"]["params.yaml"][RANK] == 7
    shown = dvc(toy, "exp", "show", "--json")
    assert shown.returncode == 0 and name in shown.stdout


def test_a_refused_override_fails_the_run_before_anything_runs(toy, prefect_server, monkeypatch):
    """A deployment's run (the flow called, not `run_pipeline_flow`) without the
    deployment's allow: remote code stays off, and no stage runs."""
    monkeypatch.delenv(ws.ALLOW_RISKY_ENV, raising=False)
    before = (toy / "params.yaml").read_bytes()
    state = run_flow(repo_dir=str(toy), overrides=[f"{RANK}=7", "base.trust_remote_code=true"])

    assert state.is_failed()
    error = str(state.result(raise_on_failure=False))
    assert "base.trust_remote_code" in error and ws.ALLOW_RISKY_ENV in error
    assert (toy / "params.yaml").read_bytes() == before
    assert runs(toy) == []


# ---- deployments ------------------------------------------------------------------------


def test_prefect_yaml_deployments_load_and_register(prefect_server, tmp_path, monkeypatch):
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.flows import load_flow_from_entrypoint
    from prefect.workers.process import ProcessWorker

    config = yaml.safe_load((REPO / "prefect.yaml").read_text())
    # The pipeline's deployments that run in the deploying checkout; the Docker one needs a
    # daemon, the sweep's clone from `origin` (tests/integration/test_deployments.py).
    wanted = ("qlora-on-demand", "qlora-nightly")
    deployments = {d["name"]: d for d in config["deployments"] if d["name"] in wanted}
    assert set(deployments) == set(wanted)
    monkeypatch.chdir(REPO)
    for d in deployments.values():
        flow = load_flow_from_entrypoint(d["entrypoint"], use_placeholder_flow=False)
        assert flow.name == "qlora-pipeline"
        flow.validate_parameters(d.get("parameters") or {})  # names and types exist
        assert d["work_pool"]["name"] == "qlora-process"
    nightly = deployments["qlora-nightly"]
    assert nightly["parameters"] == {"only_if_changed": True}
    assert nightly["schedules"][0]["cron"] and nightly["schedules"][0]["timezone"]

    with get_client(sync_client=True) as client:
        client.create_work_pool(
            WorkPoolCreate(
                name="qlora-process",
                type="process",
                base_job_template=ProcessWorker.get_default_base_job_template(),
            ),
            overwrite=True,
        )
    env = {**os.environ, "PREFECT_API_URL": prefect_server, "PREFECT_HOME": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "prefect", "--no-prompt", "deploy"]
        + [arg for name in deployments for arg in ("-n", name)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    with get_client(sync_client=True) as client:
        registered = {d.name: d for d in client.read_deployments()}
    assert {"qlora-on-demand", "qlora-nightly"} <= set(registered)
    nightly = registered["qlora-nightly"]
    schedule = nightly.schedules[0].schedule
    assert (schedule.cron, schedule.timezone) == ("0 3 * * *", "UTC")
    assert nightly.parameters == {"only_if_changed": True}
    assert nightly.work_pool_name == "qlora-process"
    step = nightly.pull_steps[0]["prefect.deployments.steps.set_working_directory"]
    assert Path(step["directory"]).resolve() == REPO


# ---- artifacts from fixture files (no server) ---------------------------------------------


def test_metrics_table_puts_variants_side_by_side_and_signs_the_change_as_better():
    rows = ra.metrics_table(eval_metrics_fixture())
    assert [(r["task"], r["metric"], r["better"]) for r in rows] == [
        ("docstring_loss", "bits_per_byte", "lower"),
        ("docstring_choice", "acc", "higher"),
    ]
    acc = rows[1]
    assert acc["base (float32)"] == "0.4 ± 0.05"
    assert acc["adapter vs NF4 base"] == "+44.74%"  # (0.55 - 0.38) / 0.38


def test_gate_markdown_shows_decision_checks_and_reasons():
    metrics = eval_metrics_fixture()
    metrics["variants"]["adapter_4bit"]["metrics"]["docstring_choice"]["acc"]["value"] = 0.2
    md = ra.gate_markdown(gate_fixture(metrics))
    assert md.startswith("# Gate: REJECTED ❌")
    shown = md.replace("\\", "")  # names and reasons are Markdown-escaped: read as rendered
    assert "| docstring_choice | acc | 0.38 | 0.2 | -47.37% | -10.0% | ❌ |" in shown
    assert "**Reasons**" in md and "FAIL: docstring_choice/acc" in shown


def test_missing_report_files_give_notes_not_a_failed_run(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        made = ra.publish_results(tmp_path, LOG)
    assert made == {}
    assert "metrics.json: not found" in caplog.text
    assert "gate.json: not found" in caplog.text


def test_the_training_artifact_reads_dvclives_summary():
    fixture = FIXTURES_DIR / "report/reports/train/metrics.json"
    rows = ra.training_table(json.loads(fixture.read_text()))
    values = {row["metric"]: row["value"] for row in rows}
    assert values["optimizer steps"] == "80"
    assert values["validation loss before training"] == "2.211"
    assert values["final validation loss"] == "1.579"
    assert values["tokens / s (whole run)"] == "106.9"
    assert {row["dvclive"] for row in rows} >= {"eval/loss", "train/tokens_per_s"}
    with pytest.raises(ValueError, match="no metric of the training log"):
        ra.training_table({"unrelated": 1})
