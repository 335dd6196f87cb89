"""A sweep fanned out across machines: one Prefect flow run per grid point, each on whatever
worker picks it up, then collected, ranked and applied in the checkout that started it.

    python -m flows.sweep_fanout -S finetune.learning_rate=1e-4,2e-4 --promote
    prefect deployment run qlora-sweep/qlora-sweep -p 'sweep=["finetune.learning_rate=1e-4,2e-4"]'

1. The grid is planned in this (the collecting) checkout as for a local sweep (flows/sweep.py):
   every point passes the params schema and the risky-change rule before anything starts, and
   no experiment of its name exists here or in `origin`.
2. The members run the commit the member deployment clones (`qlora-sweep-member` in
   prefect.yaml records it at `prefect deploy`), so this checkout must be at that commit, with
   nothing uncommitted that the members would not see.
3. One run of the member deployment per point (flows/pipeline.py): in a clone of its own it
   runs the pipeline with the point's overrides, fetching unchanged stages and the run cache
   from the DVC remote (`pull`), saves the DVC experiment under the point's name, pushes the
   outputs and run cache to the DVC remote (`push`) and the experiment's ref to `origin`.
4. Every member is waited for; one that failed, crashed or outlived the timeout is a failed
   row of the leaderboard, not a failed sweep.
5. Holding this workspace: `dvc exp pull origin <names>` (refs and outputs), the leaderboard
   (reports/sweep/), the best experiment the gate promoted applied (`dvc exp apply`, once it
   is seen to change nothing but params.yaml, dvc.lock and stage outputs) and, with `promote`,
   registered through the registry's champion check.
6. Artifacts: the leaderboard as a table (`qlora-sweep`) and as Markdown (`qlora-sweep-report`).
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows import dvc_workspace as ws
from flows import pipeline
from flows import sweep as local_sweep
from qlora.core import dvc
from qlora.core.io import StageError, some_names
from qlora.core.lineage import git_state
from qlora.core.paths import PARAMS_FILE
from qlora.report import sweep as sweep_report
from qlora.sweep import grid

if TYPE_CHECKING:
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.objects import FlowRun
    from prefect.client.schemas.responses import DeploymentResponse

Logger = logging.Logger | logging.LoggerAdapter
MEMBER_DEPLOYMENT = "qlora-pipeline/qlora-sweep-member"
GIT_CLONE_STEP = "prefect.deployments.steps.git_clone"
# The label a worker gives each flow run it starts (prefect.workers.base).
WORKER_LABEL = "prefect.worker.name"
# Seconds between two looks at the members' states: one request for all of them.
POLL_SECONDS = 5.0
# DVC's packed arguments of an experiment (BaseExecutor.PACKED_ARGS_FILE), which `dvc exp
# save` commits although .dvc/tmp is ignored (seen with DVC 3.67.1).
EXPERIMENT_ARGS = ".dvc/tmp/repro.dat"
# `qlora sweep`'s exit status when the gate promoted no experiment.
EXIT_NONE_PROMOTED = 3


def _git(repo: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True)
    if done.returncode != 0:
        raise StageError(f"`git {' '.join(args)}` failed in {repo}: {done.stderr.strip()}")
    return done.stdout


def cloned_commit(deployment: str, pull_steps: Sequence[dict] | None) -> str | None:
    """The commit the deployment's git_clone pull step checks out (None: its branch's tip).
    Raises StageError for a deployment that clones nothing: its runs would share one
    checkout, and the members of a sweep each need their own."""
    clones = [step[GIT_CLONE_STEP] or {} for step in pull_steps or [] if GIT_CLONE_STEP in step]
    if not clones:
        raise StageError(
            f"deployment {deployment} has no git_clone pull step: a sweep's members must each "
            "run in a clone of their own (deploy qlora-sweep-member from prefect.yaml)"
        )
    return clones[-1].get("commit_sha")


def check_baseline(repo: Path, deployment: str, commit: str | None) -> str:
    """This checkout's HEAD, which must be the commit the members clone (`commit`), with no
    uncommitted change the members would not see (pipeline results aside). Returns HEAD."""
    state = git_state(repo)
    head = state["commit"]
    if head is None:
        raise StageError(f"{repo}: {state['note']}; a sweep's members clone a commit")
    if state["dirty"]:
        changed = [line[3:] for line in state["changed"]]
        raise StageError(
            f"{repo} has uncommitted changes ({some_names(changed)}): the members run the "
            "committed code and params only; commit (and push) or stash them first"
        )
    if commit is not None and commit != head:
        raise StageError(
            f"deployment {deployment} runs commit {commit[:12]}, this checkout is at "
            f"{head[:12]}: `prefect deploy -n {deployment.partition('/')[2]}` from this commit "
            f"(after `git push`), or check out {commit[:12]}"
        )
    return head


def read_member_deployment(deployment: str) -> DeploymentResponse:
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            return client.read_deployment_by_name(deployment)
        except ObjectNotFound:
            raise StageError(
                f"no deployment {deployment} on the Prefect server at {client.api_url}: deploy "
                "it (`prefect deploy -n qlora-sweep-member`) and set PREFECT_API_URL to that "
                "server where the sweep starts"
            ) from None


def remote_experiments(repo: Path, logger: Logger) -> set[str]:
    """Names of the experiments `origin` holds for this checkout's HEAD."""
    done = ws.run_dvc(
        repo, ["exp", "list", pipeline.GIT_REMOTE, "--name-only"], logger, stream=False
    )
    return {line.strip() for line in done.lines if grid.NAME.fullmatch(line.strip())}


@task(name="plan-sweep", cache_policy=NO_CACHE)
def plan_sweep(
    repo: Path, specs: list[str], name: str, deployment: str, allow_risky: bool
) -> tuple[list[grid.Point], str]:
    """The checked points and the baseline commit, before any member starts."""
    logger = get_run_logger()
    points = local_sweep.plan(repo, specs, name, logger, allow_risky=allow_risky)
    member = read_member_deployment(deployment)
    baseline = check_baseline(repo, deployment, cloned_commit(deployment, member.pull_steps))
    taken = sorted({p.name for p in points} & remote_experiments(repo, logger))
    if taken:
        raise StageError(
            f"{pipeline.GIT_REMOTE} holds experiments named {', '.join(taken)} already: give "
            "the sweep another name"
        )
    logger.info("sweep %s: %d member(s) of %s at %s", name, len(points), deployment, baseline)
    return points, baseline


def member_parameters(point: grid.Point) -> dict[str, Any]:
    """What a member's flow run is given: the point's overrides, saved and pushed under its
    name; unchanged stages come from the DVC remote, results go back there."""
    return {
        "overrides": list(point.overrides),
        "experiment": point.name,
        "pull": True,
        "push": True,
        "push_experiment": True,
    }


def member_summary(experiment: str, flow_run: FlowRun, timed_out: bool = False) -> dict[str, Any]:
    """One member's final word: its flow run, the worker that ran it, its state."""
    state = flow_run.state
    return {
        "experiment": experiment,
        "flow_run": flow_run.name,
        "flow_run_id": str(flow_run.id),
        "worker": (flow_run.labels or {}).get(WORKER_LABEL),
        "state": "timed out" if timed_out else (state.name if state else "unknown"),
        "completed": bool(state and state.is_completed()) and not timed_out,
        "message": state.message if state else None,
    }


def _submit(points: list[grid.Point], deployment: str, sweep: str) -> dict[str, FlowRun]:
    from prefect.deployments import run_deployment
    from prefect.runtime import flow_run

    runs = {}
    for point in points:
        runs[point.name] = run_deployment(
            deployment,
            parameters=member_parameters(point),
            flow_run_name=point.name,
            timeout=0,  # submit only: all members run at once, on whichever workers are free
            tags=["qlora-sweep", f"sweep:{sweep}"],
            # A retried collector finds the members it already started instead of new ones.
            idempotency_key=f"{flow_run.id}:{point.name}",
        )
    return runs


def _cancel(client: SyncPrefectClient, flow_run: FlowRun, timeout: float) -> None:
    from prefect.states import Cancelling

    message = f"the sweep stopped waiting after {timeout:.0f} s"
    client.set_flow_run_state(flow_run.id, Cancelling(message=message), force=True)


def _wait(runs: dict[str, FlowRun], timeout: float, logger: Logger) -> list[dict[str, Any]]:
    """Poll every member until all are final or `timeout` seconds have passed; cancel the
    late ones. Summaries in the order of `runs`."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    by_id = {run.id: name for name, run in runs.items()}
    latest = dict(runs)
    final: set[str] = set()
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            ids = [run.id for name, run in latest.items() if name not in final]
            found = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)), limit=len(ids)
            )
            for run in found:
                name = by_id[run.id]
                latest[name] = run
                if run.state and run.state.is_final():
                    final.add(name)
                    logger.info("member %s: %s", name, member_summary(name, run))
            if len(final) == len(runs) or time.monotonic() >= deadline:
                break
            time.sleep(POLL_SECONDS)
        late = [name for name in runs if name not in final]
        for name in late:
            logger.warning("member %s: not finished after %.0f s, cancelled", name, timeout)
            _cancel(client, latest[name], timeout)
    return [member_summary(name, latest[name], name in late) for name in runs]


@task(name="run-members", cache_policy=NO_CACHE)
def run_members(
    points: list[grid.Point], deployment: str, sweep: str, timeout: float
) -> list[dict[str, Any]]:
    """Start one flow run of the member deployment per point and wait for all of them."""
    logger = get_run_logger()
    runs = _submit(points, deployment, sweep)
    for name, run in runs.items():
        logger.info("member %s: flow run %s (%s)", name, run.name, run.id)
    return _wait(runs, timeout, logger)


@task(
    name="dvc-exp-pull",
    cache_policy=NO_CACHE,
    retry_condition_fn=pipeline.retry_if_transient,
    retry_jitter_factor=0.5,
)
def pull_experiments(repo: Path, names: list[str]) -> None:
    """The members' experiment refs from `origin` and their outputs from the DVC remote."""
    ws.run_dvc(repo, ["exp", "pull", pipeline.GIT_REMOTE, *names], get_run_logger())


def unexpected_changes(repo: Path, baseline: str, rev: str) -> list[str]:
    """Files the experiment commit `rev` changes against `baseline` that no pipeline run
    writes: a member's commit comes from another machine, and applying it must not bring
    code (a stage script, dvc.yaml) into this checkout. params.yaml, dvc.lock, the outputs
    dvc.yaml declares, the .gitignore entries DVC writes for them and the arguments file
    `dvc exp save` commits (EXPERIMENT_ARGS) are expected."""
    changed = _git(repo, "diff", "--name-only", baseline, rev).splitlines()
    outputs = [path.rstrip("/") for path in dvc.cached_outputs(repo)]
    expected = {str(PARAMS_FILE), str(dvc.LOCK), EXPERIMENT_ARGS}
    return [
        path
        for path in changed
        if path not in expected
        and Path(path).name != ".gitignore"
        and not any(path == out or path.startswith(f"{out}/") for out in outputs)
    ]


@task(name="apply-best", cache_policy=NO_CACHE)
def apply_checked_best(repo: Path, board: dict[str, Any], baseline: str) -> str | None:
    """`dvc exp apply` the best experiment, once it is seen to hang off the commit the sweep
    started from and to change nothing a pipeline run would not."""
    best = next((r for r in board["rows"] if r["name"] == board["best"]), None)
    if best is not None:
        head = git_state(repo)["commit"]
        if head != baseline:
            raise StageError(
                f"{repo}: HEAD moved from {baseline[:12]} to {str(head)[:12]} during the "
                "sweep; the leaderboard is written, apply an experiment yourself "
                "(`dvc exp apply NAME`)"
            )
        if foreign := unexpected_changes(repo, baseline, best["rev"]):
            raise StageError(
                f"experiment {best['name']} changes {some_names(foreign)}, which no pipeline "
                "run writes: not applied (the leaderboard is written)"
            )
    return local_sweep.apply_best(repo, board, get_run_logger())


@task(name="collect-leaderboard", cache_policy=NO_CACHE)
def collect_leaderboard(
    repo: Path, name: str, points: list[grid.Point], keys: list[str], members: list[dict]
) -> dict[str, Any]:
    hints = {m["experiment"]: member_hint(m) for m in members}
    return local_sweep.collect(repo, name, points, keys, get_run_logger(), hints)


@task(name="promote", cache_policy=NO_CACHE)
def promote_applied(repo: Path, registry_dir: str | None) -> dict[str, Any]:
    return ws.promote_if_passed(repo, registry_dir, get_run_logger())


def member_hint(member: dict) -> str:
    """What became of a member's flow run, for its failed row."""
    return f"flow run {member.get('flow_run', '?')} {member.get('state', 'not run')}"


def table_rows(board: dict[str, Any]) -> list[dict[str, str]]:
    """The leaderboard's cells (qlora/report/sweep.py) with the flow run and worker of each
    member; a failed row says what became of its flow run."""
    members = {m["experiment"]: m for m in board.get("members") or []}
    return [
        sweep_report.cells(row)
        | {
            "flow run": (members.get(row["name"]) or {}).get("flow_run") or "",
            "worker": (members.get(row["name"]) or {}).get("worker") or "",
        }
        for row in board["rows"]
    ]


def publish(board: dict[str, Any]) -> None:
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    headline = sweep_report.headline(board)
    create_table_artifact(table_rows(board), key="qlora-sweep", description=headline)
    create_markdown_artifact(
        sweep_report.markdown(board), key="qlora-sweep-report", description=headline
    )


@flow(name="qlora-sweep")
def qlora_sweep(
    sweep: list[str],
    name: str | None = None,
    deployment: str = MEMBER_DEPLOYMENT,
    promote: bool = False,
    registry_dir: str | None = None,
    repo_dir: str | None = None,
    member_timeout_seconds: float = 24 * 3600.0,
    wait_for_workspace_seconds: float = 600.0,
    retries: int = 2,
    retry_backoff_seconds: float = 30.0,
) -> dict[str, Any]:
    """A sweep whose experiments run as flow runs of `deployment`, possibly on other machines
    (module docstring); returns the leaderboard with `members`, `applied` and `promotion`.

    Args:
        sweep: `key=v1,v2` specs as `qlora sweep -S` takes them (every combination runs).
        name: the sweep's name, the prefix of its experiments (default: sweep-<time>).
        deployment: the member deployment, `flow/deployment`. Like repo_dir and
            registry_dir, a deployment's run may not set it to other than its deployment
            does, unless QLORA_ALLOW_RISKY_OVERRIDES=1 allows it.
        promote: register the applied experiment's adapter (champion check).
        registry_dir: the adapter registry (default: $QLORA_REGISTRY, else registry/).
        repo_dir: the collecting checkout (default: the one around the working directory).
        member_timeout_seconds: how long to wait for all members; later ones are cancelled.
        wait_for_workspace_seconds: how long collecting waits for another run of the checkout.
        retries: retries of a transient failure of `dvc exp pull`.
        retry_backoff_seconds: first retry delay; doubles for each further retry.
    """
    logger = get_run_logger()
    places = {"repo_dir": repo_dir, "registry_dir": registry_dir, "deployment": deployment}
    pipeline.check_places(places, defaults={"deployment": MEMBER_DEPLOYMENT})
    repo = ws.find_repo_root(repo_dir)
    name = name or local_sweep.default_name()
    start = time.perf_counter()
    points, baseline = plan_sweep(
        repo, list(sweep), name, deployment, pipeline.risky_allowed_here()
    )
    members = run_members(points, deployment, name, member_timeout_seconds)
    done = [m["experiment"] for m in members if m["completed"]]
    with ws.workspace_lock(repo, wait_for_workspace_seconds, logger, owner=f"sweep {name}"):
        if done:
            pipeline.with_retries(pull_experiments, retries, retry_backoff_seconds)(repo, done)
        board = collect_leaderboard(repo, name, points, grid.swept_keys(list(sweep)), members)
        board["members"] = members
        board["seconds"] = time.perf_counter() - start
        if board["failed"]:
            logger.warning("experiments failed: %s", ", ".join(board["failed"]))
        board["applied"] = apply_checked_best(repo, board, baseline)
        board["promotion"] = (
            promote_applied(repo, registry_dir) if promote and board["applied"] else None
        )
    publish(board)
    logger.info("%s", sweep_report.headline(board))
    return board


def run_sweep_flow(specs: Sequence[str], **options: Any) -> dict[str, Any]:
    """Run the collector in this process (for `qlora flow sweep`) as the machine's own user
    (flows.pipeline.as_local_user); the members run on the workers of the Prefect server
    PREFECT_API_URL names. Returns the leaderboard; raises what stopped the sweep."""
    with pipeline.as_local_user():
        return qlora_sweep(sweep=list(specs), **options)


def main(argv: list[str] | None = None) -> int:
    """`python -m flows.sweep_fanout`: 0 when the best experiment was applied,
    EXIT_NONE_PROMOTED when the gate promoted none, 1 when the sweep failed."""
    parser = argparse.ArgumentParser(
        prog="python -m flows.sweep_fanout", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--set",
        "-S",
        dest="specs",
        action="append",
        required=True,
        metavar="KEY=V1,V2",
        help="a params.yaml key and its values (repeat for a grid)",
    )
    parser.add_argument("--name", "-n", default=None, help="sweep name (default: sweep-<time>)")
    parser.add_argument("--deployment", default=MEMBER_DEPLOYMENT, help="the member deployment")
    parser.add_argument("--promote", action="store_true", help="register the best adapter")
    parser.add_argument("--registry", default=None, help="adapter registry folder")
    parser.add_argument("--repo", default=None, help="the collecting checkout (default: this)")
    parser.add_argument(
        "--timeout", type=float, default=24 * 3600.0, help="seconds to wait for the members"
    )
    args = parser.parse_args(argv)
    try:
        board = run_sweep_flow(
            args.specs,
            name=args.name,
            deployment=args.deployment,
            promote=args.promote,
            registry_dir=args.registry,
            repo_dir=args.repo,
            member_timeout_seconds=args.timeout,
        )
    except (ws.DvcCommandFailed, ws.WorkspaceBusy, StageError, ValueError) as e:
        print(f"sweep failed: {e}", file=sys.stderr)
        return 1
    for m in board["members"]:
        print(f"  {m['experiment']:<24} {m['state']:<12} {m['flow_run']} on {m['worker']}")
    print("\n" + sweep_report.text_table(board))
    if board["applied"]:
        print(f"applied {board['applied']} to the workspace (`dvc exp apply`)")
    if board["promotion"]:
        print(f"promotion: {board['promotion']['summary']}")
    return 0 if board["applied"] else EXIT_NONE_PROMOTED


if __name__ == "__main__":
    sys.exit(main())
