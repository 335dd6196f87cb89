"""The QLoRA pipeline as a Prefect flow: Prefect drives, DVC decides.

    python -m flows.pipeline                              # run what is stale
    python -m flows.pipeline --set finetune.lora.r=32     # a recorded DVC experiment
    python -m flows.pipeline --only-if-changed            # what the nightly deployment does
    python -m flows.pipeline --promote                    # and register a passing adapter

A run takes the workspace (one run at a time), stops anything a crashed run left behind,
reads the stage order from dvc.yaml through DVC's own graph, then runs each stage as one
Prefect task, `dvc repro --single-item <stage>`, strictly one after another. DVC decides
whether a stage is stale and writes dvc.lock; Prefect adds the schedule, retries of
transient failures (network, a busy lock) with exponential backoff, the run history and
the artifacts: stage table, base vs adapter metrics, the gate decision, the report.

Overrides (`--set key=value`) are a DVC experiment: DVC's own `exp run -S` code sets the
params, the stages run as above, and `dvc exp save` records the result under the flow run's
name, or under `experiment` (see `dvc exp show`). Prefect's task cache is off everywhere: DVC
is the only cache, and its run cache travels with `push` (`dvc push --run-cache`) and `pull`
(`dvc repro --pull` fetches the remote's run cache first), so a stage run anywhere before
with the same inputs is restored instead of rerun.

A member of a distributed sweep (flows/sweep_fanout.py) runs in its own clone: `pull`,
`push`, its `experiment` name, and `push_experiment` (`dvc exp push origin <name>`), so the
machine that started the sweep can `dvc exp pull` every member's result.

Whoever starts a deployment's run chooses its overrides: they may set params.yaml keys
only, must pass the params schema, and may change a source, remote code or a task or
launcher file from outside the project only where the deployment allows it
(flows/dvc_workspace.py: ALLOW_RISKY_ENV). A run in this process (`qlora flow run`) is the
machine's own user, who may edit params.yaml anyway: it allows them.

With `promote`, an adapter that passed the gate is registered last, still holding the
workspace (qlora/registry/promotion.py: lineage from dvc.lock, the champion/challenger check, the
"champion" alias); a rejected one is only reported.
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import os
import re
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from prefect import Task, flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed
from prefect.tasks import exponential_backoff

from flows import dvc_workspace as ws
from flows import report_artifacts
from qlora.core import dvc
from qlora.core.io import StageError
from qlora.core.sources import settle_always_changed
from qlora.sweep.grid import NAME as EXPERIMENT_NAME

NOTHING_TO_DO = "nothing to do: no data, code or params changed since the last run"
# Seconds the temporary Prefect server (a run without PREFECT_API_URL) may take to start.
# Prefect's default, 20, is too short for a 2-core CPU: a start took 17.7 s here, and one
# made while other work shared the cores failed ("Timed out while attempting to connect to
# ephemeral Prefect API server") before the flow began.
EPHEMERAL_SERVER_STARTUP_S = 120
# True while `run_pipeline_flow` runs the flow in this process for the local user. Not a flow
# parameter: whoever starts a deployment's run sets those.
_LOCAL_RUN: contextvars.ContextVar[bool] = contextvars.ContextVar("local_run", default=False)
_YES = frozenset({"1", "true", "yes", "on"})
# The git remote experiments are pushed to and pulled from: the one a clone was made from.
GIT_REMOTE = "origin"


def risky_overrides_allowed(
    environ: Mapping[str, str], run_job_variables: Mapping[str, Any] | None
) -> bool:
    """Whether this run's overrides may change the risky keys: ALLOW_RISKY_ENV set where the
    worker starts or in the deployment's job variables. The run's own job variables (a run's
    starter may pass some, and the worker merges them into the environment) do not count."""
    if environ.get(ws.ALLOW_RISKY_ENV, "").strip().lower() not in _YES:
        return False
    own = run_job_variables or {}
    return ws.ALLOW_RISKY_ENV not in (own.get("env") or {}) and (
        f"env.{ws.ALLOW_RISKY_ENV}" not in own
    )


def risky_allowed_here() -> bool:
    """Whether this flow run may make the risky changes: a run of the machine's own user
    (`run_pipeline_flow`, `as_local_user`), or one its deployment or worker allows."""
    from prefect.runtime import flow_run

    return _LOCAL_RUN.get() or risky_overrides_allowed(os.environ, flow_run.job_variables)


# Flow parameters that point the worker at other folders: another DVC repository (whose
# dvc.yaml commands would run on the worker), or a registry written anywhere.
PLACE_PARAMETERS = ("repo_dir", "registry_dir")


def refused_places(
    given: Mapping[str, Any],
    deployment: Mapping[str, Any] | None,
    defaults: Mapping[str, Any] | None = None,
) -> list[str]:
    """The parameters in `given` (PLACE_PARAMETERS, or another flow's) that a deployment's
    run sets to something its deployment does not: `deployment` is the deployment's own
    parameters, None for a run that no deployment started (the machine's own user calling
    the flow); `defaults` the flow's defaults for those the deployment leaves unset."""
    if deployment is None:
        return []
    own = {**(defaults or {}), **deployment}
    return [
        f"{name}={value!r} (the deployment's is {own.get(name)!r})"
        for name, value in given.items()
        if value != own.get(name)
    ]


def check_places(given: Mapping[str, Any], defaults: Mapping[str, Any] | None = None) -> None:
    """Refuse a deployment's run that points these parameters elsewhere than its deployment
    does, unless the deployment or its worker allows risky runs (see `refused_places`)."""
    from prefect.runtime import deployment

    if risky_allowed_here():
        return
    refused = refused_places(given, deployment.parameters if deployment.id else None, defaults)
    if refused:
        raise StageError(
            f"this run sets {'; '.join(refused)}: a deployment's run keeps to the repository, "
            f"registry and deployments its deployment names; {ws.ALLOW_RISKY_ENV}=1 on the "
            "worker or in the deployment's job variables allows others"
        )


def with_retries(task_fn: Task, retries: int, backoff: float) -> Task:
    """The task retried `retries` times on a transient failure (retry_if_transient), after
    `backoff` seconds, then twice that, and so on."""
    return task_fn.with_options(
        retries=retries, retry_delay_seconds=exponential_backoff(backoff_factor=backoff)
    )


def retry_if_transient(_task, _task_run, state) -> bool:
    """Retry network hiccups and busy locks; never bad data or a diverged run."""
    try:
        state.result()
    except ws.TransientDvcFailure:
        return True
    except BaseException:
        return False
    return False


@task(name="prepare-workspace", cache_policy=NO_CACHE)
def prepare_workspace(repo_dir: Path) -> list[str]:
    """Stop what a crashed run left running, clear a stale DVC lock; DVC reruns the rest."""
    return ws.repair_workspace(repo_dir, get_run_logger())


@task(name="read-dag", cache_policy=NO_CACHE)
def read_dag(repo_dir: Path) -> list[str]:
    stages = ws.pipeline_stages(repo_dir)
    if not stages:
        raise ValueError(f"{repo_dir}/dvc.yaml defines no stages")
    get_run_logger().info("stages in DAG order: %s", ", ".join(stages))
    return stages


@task(name="dvc-status", cache_policy=NO_CACHE)
def find_changes(repo_dir: Path, pull: bool) -> list[str]:
    """What `dvc status` finds stale, one line per stage; empty when nothing changed. With
    `pull`, data that is only absent (a fresh clone) does not count: the remote has it."""
    status = settle_always_changed(ws.dvc_status(repo_dir, get_run_logger()), repo_dir)
    changes = ws.describe_status(ws.ignore_absent_data(status) if pull else status)
    for line in changes:
        get_run_logger().info("stale: %s", line)
    return changes


@task(name="set-params", cache_policy=NO_CACHE)
def set_params(repo_dir: Path, overrides: list[str], allow_risky: bool) -> dict[str, list[str]]:
    grouped = ws.apply_param_overrides(repo_dir, overrides, allow_risky=allow_risky)
    get_run_logger().info("params overridden for this experiment: %s", grouped)
    return grouped


@task(cache_policy=NO_CACHE, retry_condition_fn=retry_if_transient, retry_jitter_factor=0.5)
def run_stage(repo_dir: Path, stage: str, pull: bool = False) -> dict[str, Any]:
    """One DVC stage: `dvc repro --single-item`, so DVC checks only this stage's own inputs
    (its upstream stages ran just before, in DAG order)."""
    from prefect.runtime import task_run

    start = time.perf_counter()
    args = ["repro", "--single-item", *(["--pull"] if pull else []), stage]
    done = ws.run_dvc(repo_dir, args, get_run_logger())
    return {
        "stage": stage,
        "result": ws.stage_result(stage, done.lines),
        "seconds": time.perf_counter() - start,
        "attempts": task_run.run_count,
    }


@task(name="save-experiment", cache_policy=NO_CACHE)
def save_experiment(repo_dir: Path, name: str, overrides: list[str]) -> str:
    message = f"qlora flow run {name}: " + " ".join(overrides)
    ws.run_dvc(repo_dir, ["exp", "save", "--name", name, "--message", message], get_run_logger())
    return name


@task(
    name="dvc-push",
    cache_policy=NO_CACHE,
    retry_condition_fn=retry_if_transient,
    retry_jitter_factor=0.5,
)
def push_outputs(repo_dir: Path) -> None:
    """The outputs and the run cache: another machine then restores a stage it would run
    with the same inputs (`dvc repro --pull` fetches the run cache) instead of rerunning it."""
    logger = get_run_logger()
    ws.run_dvc(repo_dir, ["push", "--run-cache"], logger)
    copies = push_run_cache_copies(repo_dir)
    logger.info("pushed the run cache's copies of %d `cache: false` output(s)", copies)


# How push_run_cache_copies names itself in a DvcCommandFailed.
_COPIES = ["push", "(the run cache's copies of `cache: false` outputs)"]


def push_run_cache_copies(repo_dir: Path) -> int:
    """Upload the copies DVC's run cache keeps of this workspace's `cache: false` outputs
    (metrics and plots, git's to keep); returns how many. DVC 3.67's `dvc push --run-cache`
    sends the run-cache entries but not these copies, and another machine then reruns such
    a stage (finetune: its metrics and plots) instead of restoring it: the entry names an
    object its remote lacks. A failure is raised as `dvc` would fail, transient or not."""
    from dvc.repo import Repo
    from dvc_data.hashfile.tree import Tree

    try:
        with Repo(os.fspath(repo_dir)) as repo, repo.lock:
            local = repo.cache.local
            copies = [
                out.hash_info
                for stage in repo.index.stages
                for out in stage.outs
                if not out.use_cache and out.hash_info and local.exists(out.hash_info.value)
            ]
            # A directory is its manifest and its files: the transfer sends only the
            # objects named, and a manifest whose files are missing restores nothing.
            objects = {entry for h in copies if h.isdir for _, _, entry in Tree.load(local, h)}
            failed = repo.cloud.push(objects | set(copies)).failed if copies else set()
    except Exception as e:  # DVC's, the remote's (botocore) or the file system's
        transient, reason = ws.classify_failure([f"{type(e).__name__}: {e}"])
        error = ws.TransientDvcFailure if transient else ws.DvcCommandFailed
        raise error(_COPIES, 1, reason, str(e)) from e
    if failed:
        raise ws.DvcCommandFailed(_COPIES, 1, f"{len(failed)} object(s) were not uploaded", "")
    return len(copies)


@task(
    name="dvc-exp-push",
    cache_policy=NO_CACHE,
    retry_condition_fn=retry_if_transient,
    retry_jitter_factor=0.5,
)
def push_experiment_ref(repo_dir: Path, name: str, outputs_pushed: bool) -> None:
    """The experiment's git ref to GIT_REMOTE (and its outputs to the DVC remote, unless
    `dvc push` just sent them), for `dvc exp pull` on the machine that collects a sweep."""
    args = ["exp", "push", *(["--no-cache"] if outputs_pushed else []), GIT_REMOTE, name]
    ws.run_dvc(repo_dir, args, get_run_logger())
    if outputs_pushed:  # DVC's hint after --no-cache would say they still need pushing
        get_run_logger().info("the experiment's outputs reached the DVC remote with dvc push")


@task(name="promote", cache_policy=NO_CACHE)
def promote_adapter(repo_dir: Path, registry_dir: str | None) -> dict[str, Any]:
    """After a passing gate: register the adapter; it becomes champion only if it also holds
    up against the current champion (the registry decides, under its own lock)."""
    return ws.promote_if_passed(repo_dir, registry_dir, get_run_logger())


def restore_last_good(repo_dir: Path) -> None:
    """DVC deleted the failed stage's outputs before running it: put back what dvc.lock
    records (the last good run), from the DVC cache."""
    logger = get_run_logger()
    try:
        restored = dvc.restore_outputs(repo_dir)
    except StageError as e:  # the stage's own error is the one to raise
        logger.warning("could not restore the last good outputs: %s", e)
        return
    if restored:
        logger.warning("restored the last good outputs: %s", ", ".join(restored))


def experiment_name() -> str:
    """The flow run's name and id, so a DVC experiment points back at its Prefect run."""
    from prefect.runtime import flow_run

    name = re.sub(r"[^A-Za-z0-9-]+", "-", str(flow_run.name or "run")).strip("-") or "run"
    return f"{name}-{str(flow_run.id or '')[:8]}".rstrip("-")


def experiment_to_save(
    overrides: list[str], experiment: str | None, push_experiment: bool
) -> str | None:
    """The DVC experiment this run saves: `experiment` (a run's starter chooses it, so it is
    checked: a git ref name), else one named after the flow run when there are overrides,
    else none. Raises StageError before anything runs."""
    if experiment is not None and not EXPERIMENT_NAME.fullmatch(experiment):
        raise StageError(
            f"experiment {experiment!r}: letters, digits, - and _ only, starting with a letter "
            "or digit (61 at most): it becomes a git ref name"
        )
    name = experiment if experiment is not None else (experiment_name() if overrides else None)
    if push_experiment and name is None:
        raise StageError(
            "push_experiment: this run saves no DVC experiment (give overrides or experiment)"
        )
    return name


def _run_stages(
    repo_dir: Path, stages: list[str], pull: bool, retries: int, backoff: float
) -> list[dict]:
    outcomes: list[dict] = []
    for i, stage in enumerate(stages):
        stage_task = run_stage.with_options(
            name=stage,
            task_run_name=stage,
            retries=retries,
            retry_delay_seconds=exponential_backoff(backoff_factor=backoff),
        )
        try:
            outcomes.append(stage_task(repo_dir, stage, pull))
        except Exception:
            outcomes.append({"stage": stage, "result": "FAILED"})
            outcomes += [{"stage": s, "result": "not run"} for s in stages[i + 1 :]]
            restore_last_good(repo_dir)
            try:
                report_artifacts.publish_stage_table(outcomes, f"failed at stage {stage}")
            except Exception as e:  # the stage's own error is the one to report
                get_run_logger().warning("could not publish the stage table: %s", e)
            raise
    return outcomes


@flow(name="qlora-pipeline")
def qlora_pipeline(
    overrides: list[str] | None = None,
    only_if_changed: bool = False,
    repo_dir: str | None = None,
    pull: bool = False,
    push: bool = False,
    retries: int = 2,
    retry_backoff_seconds: float = 30.0,
    wait_for_workspace_seconds: float = 600.0,
    report_base_url: str | None = None,
    promote: bool = False,
    registry_dir: str | None = None,
    experiment: str | None = None,
    push_experiment: bool = False,
) -> Any:
    """Run the DVC pipeline of dvc.yaml, one Prefect task per stage, in DAG order.

    Args:
        overrides: `key=value` overrides of params.yaml (as `dvc exp run -S`), checked by
            the params schema; the run is recorded as a DVC experiment named after this
            flow run. A new source, remote code, or a task or launcher file from outside
            the project needs QLORA_ALLOW_RISKY_OVERRIDES=1 on the worker or deployment.
        only_if_changed: end at once, "nothing to do", when `dvc status` finds nothing stale
            (the scheduled deployment); ignored with overrides.
        repo_dir: the DVC repository (default: the one around the working directory). A
            deployment's run may not point it (nor registry_dir) elsewhere than the
            deployment does, unless QLORA_ALLOW_RISKY_OVERRIDES=1 allows it.
        pull: `dvc repro --pull`: fetch missing data and the run cache from the DVC remote
            instead of rebuilding (a fresh clone in a container).
        push: `dvc push --run-cache` the results to the DVC remote at the end.
        retries: retries of a transient failure per stage and push (never of a real one).
        retry_backoff_seconds: first retry delay; doubles for each further retry.
        wait_for_workspace_seconds: how long to wait for another run of this workspace.
        report_base_url: where reports/ is published, for the report link (default:
            a file:// link on the worker).
        promote: register the adapter after a passing gate (`qlora promote`).
        registry_dir: the adapter registry (default: $QLORA_REGISTRY, else registry/ in
            the repository).
        experiment: save the run as the DVC experiment of this name (letters, digits, -
            and _), with or without overrides, instead of one named after the flow run.
        push_experiment: after saving the experiment, `dvc exp push origin <name>` (the
            git remote the checkout was cloned from); retried like push.
    """
    logger = get_run_logger()
    check_places({"repo_dir": repo_dir, "registry_dir": registry_dir})
    repo = ws.find_repo_root(repo_dir)
    overrides = list(overrides or [])
    saved_as = experiment_to_save(overrides, experiment, push_experiment)
    owner = f"flow run {experiment_name()}"
    with ws.workspace_lock(repo, wait_for_workspace_seconds, logger, owner=owner):
        prepare_workspace(repo)
        stages = read_dag(repo)
        if only_if_changed and saved_as is None:
            if not find_changes(repo, pull):
                logger.info(NOTHING_TO_DO)
                return Completed(
                    message=NOTHING_TO_DO,
                    data={"status": "nothing to do", "repo": str(repo), "stages": []},
                )
        elif only_if_changed:
            logger.info("an experiment: running it whatever `dvc status` says")
        if overrides:
            set_params(repo, overrides, risky_allowed_here())
        try:
            outcomes = _run_stages(repo, stages, pull, retries, retry_backoff_seconds)
        except Exception:
            if overrides:
                logger.warning(
                    "params.yaml keeps the overrides %s (as `dvc exp run` leaves them): run "
                    "again to resume the experiment, or `git checkout params.yaml` to drop it",
                    overrides,
                )
            raise
        ran = [o["stage"] for o in outcomes if o["result"] == "ran"]
        experiment = save_experiment(repo, saved_as, overrides) if saved_as else None
        if push:
            with_retries(push_outputs, retries, retry_backoff_seconds)(repo)
        if experiment and push_experiment:
            with_retries(push_experiment_ref, retries, retry_backoff_seconds)(
                repo, experiment, push
            )
        description = f"ran: {', '.join(ran) or 'nothing (all up to date)'}"
        if experiment:
            description += f"; DVC experiment {experiment}"
            description += f", pushed to {GIT_REMOTE}" if push_experiment else ""
        report_artifacts.publish_stage_table(outcomes, description)
        artifacts = report_artifacts.publish_results(repo, logger, report_base_url)
        promotion = promote_adapter(repo, registry_dir) if promote else None
    logger.info("done: %s", description)
    return {
        "status": "completed",
        "repo": str(repo),
        "stages": outcomes,
        "experiment": experiment,
        "artifacts": ["qlora-stages", *artifacts],
        "promotion": promotion,
    }


@contextlib.contextmanager
def as_local_user() -> Iterator[None]:
    """Flows called inside run in this process for the machine's own user (`qlora flow ...`):
    risky overrides and other places are allowed, as that user may edit params.yaml anyway.
    Without PREFECT_API_URL, Prefect starts a temporary local server for the run (given
    EPHEMERAL_SERVER_STARTUP_S to start); with it, the run is recorded on that server."""
    # No telemetry from the temporary server either (its heartbeat also races the fresh
    # SQLite database at start-up and logs a spurious "database is locked").
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    from prefect.settings import (
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        get_current_settings,
        temporary_settings,
    )

    # Prefect read its settings when it was imported, so an environment variable set now
    # would come too late: a settings context it is, unless the user set a value (in the
    # environment or a Prefect profile).
    chosen = get_current_settings().server.ephemeral.model_fields_set
    updates = (
        {}
        if "startup_timeout_seconds" in chosen
        else {PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: EPHEMERAL_SERVER_STARTUP_S}
    )
    local = _LOCAL_RUN.set(True)
    try:
        with temporary_settings(updates=updates):
            yield
    finally:
        _LOCAL_RUN.reset(local)


def run_pipeline_flow(
    overrides: list[str] | None = None,
    only_if_changed: bool = False,
    repo_dir: str | Path | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Run the flow in this process (for `qlora flow run`) as the machine's own user
    (`as_local_user`); returns its summary. Raises the failing stage's error."""
    with as_local_user():
        return qlora_pipeline(
            overrides=list(overrides or []),
            only_if_changed=only_if_changed,
            repo_dir=str(repo_dir) if repo_dir is not None else None,
            **options,
        )


def main(argv: list[str] | None = None) -> int:
    """`python -m flows.pipeline`: the exit status is 1, with the stage's message, on failure."""
    parser = argparse.ArgumentParser(
        prog="python -m flows.pipeline", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--set",
        "-S",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a params.yaml key, as `dvc exp run -S` (repeatable); runs as a DVC "
        "experiment",
    )
    parser.add_argument(
        "--only-if-changed",
        action="store_true",
        help="end at once when `dvc status` finds nothing stale",
    )
    parser.add_argument("--repo", default=None, help="DVC repository (default: this one)")
    parser.add_argument("--pull", action="store_true", help="dvc repro --pull")
    parser.add_argument("--push", action="store_true", help="dvc push at the end")
    parser.add_argument("--retries", type=int, default=2, help="retries of transient failures")
    parser.add_argument(
        "--promote", action="store_true", help="register the adapter after a passing gate"
    )
    parser.add_argument("--registry", default=None, help="adapter registry folder")
    parser.add_argument(
        "--experiment", default=None, help="save the run as the DVC experiment of this name"
    )
    parser.add_argument(
        "--push-experiment",
        action="store_true",
        help=f"dvc exp push {GIT_REMOTE} <experiment> after saving it",
    )
    args = parser.parse_args(argv)
    try:
        summary = run_pipeline_flow(
            overrides=args.overrides,
            only_if_changed=args.only_if_changed,
            repo_dir=args.repo,
            pull=args.pull,
            push=args.push,
            retries=args.retries,
            promote=args.promote,
            registry_dir=args.registry,
            experiment=args.experiment,
            push_experiment=args.push_experiment,
        )
    except (ws.DvcCommandFailed, ws.WorkspaceBusy, StageError, ValueError) as e:
        print(f"pipeline failed: {e}", file=sys.stderr)
        return 1
    if summary["status"] == "nothing to do":
        print(NOTHING_TO_DO)
        return 0
    for outcome in summary["stages"]:
        print(f"  {outcome['stage']:<12} {outcome['result']:<24} {outcome['seconds']:7.1f} s")
    if summary["experiment"]:
        print(f"DVC experiment: {summary['experiment']} (dvc exp show)")
    print(f"artifacts: {', '.join(summary['artifacts'])} (prefect artifact ls)")
    if summary.get("promotion"):
        print(f"promotion: {summary['promotion']['summary']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
