"""prefect.yaml, checked by Prefect's own deploy code, and the Docker image its containers run.

`prefect deploy` needs a Prefect server, and the Docker deployment a Docker daemon. So the
test runs the code of `prefect deploy` in this process, in a throwaway clone of this working
tree (committed, and pushed to a local `origin`), with stand-ins for those two only:
- Prefect's own loading (`_load_deploy_configs_and_actions`, its pydantic models,
  `_pick_deploy_configs`) and, per deployment, `_run_single_deploy`: templating, the
  entrypoint, the build steps run for real (git commands, prefect-docker's build step),
  schedules, `RunnerDeployment.apply`, and the client's `create_deployment`, which builds
  and serializes the request;
- a stand-in API answers: the two work pools exist (with the worker types' own job
  templates), and the request body must pass the server's own request schema and its
  job-variable check;
- a stand-in docker-py client answers the build step: it takes exactly docker-py's
  arguments and needs the Dockerfile in the context, as the daemon does.
Two of Prefect's functions are made stricter, not replaced: the entrypoint loads without
the placeholder-flow fallback, and steps run one at a time, each refusing a placeholder no
earlier step answers. On top come the checks `prefect deploy` leaves to the first run:
keys Prefect's models ignore, placeholders that resolve to nothing, parameters the flow
does not take (the server's and the engine's own validation), pull steps and job variables
that do not exist. A mutated copy of prefect.yaml proves each check bites
(`test_a_broken_prefect_yaml_is_refused`).

`prefect deploy`'s code lives in private modules (prefect.cli.deploy._core, ...) of the
pinned prefect 3.8.8: an upgrade that moves them fails this file at import, which is the
moment to re-read the deploy path.

The image itself is built only where a Docker daemon answers; elsewhere that test skips and
says why. The build context (docker-py's own .dockerignore matching) and the Dockerfile's
structure are checked everywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import io
import json
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import httpx
import prefect_docker.deployments.steps as docker_steps
import pytest
import yaml
from docker.utils.build import exclude_paths
from fastapi import HTTPException
from prefect.cli.deploy import _core
from prefect.cli.deploy._config import _load_deploy_configs_and_actions, _pick_deploy_configs
from prefect.cli.deploy._models import (
    ConcurrencyLimitSpec,
    DeploymentConfig,
    PrefectYamlModel,
    RawScheduleConfig,
    WorkPoolConfig,
)
from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.objects import WorkPool
from prefect.deployments import runner as prefect_runner
from prefect.deployments.steps.core import run_steps
from prefect.exceptions import ObjectNotFound
from prefect.flows import load_flow_from_entrypoint
from prefect.server.api.validation import validate_job_variables_for_deployment
from prefect.server.schemas.actions import DeploymentCreate as ServerDeploymentCreate
from prefect.settings import PREFECT_DEFAULT_DOCKER_BUILD_NAMESPACE, temporary_settings
from prefect.utilities.collections import get_from_dict
from prefect.utilities.importtools import import_object
from prefect.utilities.schema_tools.validation import validate as validate_against_schema
from prefect.utilities.templating import PlaceholderType, find_placeholders
from prefect.workers.base import BaseWorker
from prefect.workers.process import ProcessWorker
from prefect_docker.worker import DockerWorker
from pydantic import BaseModel, ValidationError
from rich.console import Console

from helpers.repo import REPO, git

PREFECT_YAML = REPO / "prefect.yaml"
DEPLOYMENTS = {
    "qlora-on-demand",
    "qlora-nightly",
    "qlora-nightly-docker",
    "qlora-sweep-member",
    "qlora-sweep",
}
DOCKER, MEMBER, SWEEP = "qlora-nightly-docker", "qlora-sweep-member", "qlora-sweep"
# What a run of a deployment whose flow has required parameters is started with.
RUN_PARAMETERS = {SWEEP: {"sweep": ["finetune.learning_rate=1e-4,2e-4"]}}
# The work pools README.md tells users to create, with their types.
POOL_WORKERS: dict[str, type[BaseWorker]] = {
    "qlora-process": ProcessWorker,
    "qlora-docker": DockerWorker,
}
FAKE_IMAGE_ID = "sha256:" + "0" * 64
STEP_SECTIONS = ("build", "push", "pull")


# ---- stand-ins for the Prefect API and the Docker daemon ------------------------------


class StubPrefectApi:
    """The Prefect API as `prefect deploy` talks to it: the work pools exist, no deployment
    does yet, and the POST that creates one is validated as the server validates it."""

    def __init__(self) -> None:
        self.pools = {
            name: WorkPool(
                name=name,
                type=worker.type,
                base_job_template=worker.get_default_base_job_template(),
            )
            for name, worker in POOL_WORKERS.items()
        }
        self.created: dict[str, dict[str, Any]] = {}

    async def __aenter__(self) -> StubPrefectApi:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        return None

    async def read_work_pool(self, work_pool_name: str) -> WorkPool:
        if work_pool_name not in self.pools:
            raise ObjectNotFound(http_exc=Exception(f"work pool {work_pool_name!r}: 404"))
        return self.pools[work_pool_name]

    async def read_deployment_by_name(self, name: str) -> None:
        raise ObjectNotFound(http_exc=Exception(f"deployment {name!r}: 404"))

    async def create_flow_from_name(self, flow_name: str) -> uuid.UUID:
        return uuid.uuid4()

    async def read_variable_by_name(self, name: str) -> None:
        return None

    async def read_workers_for_work_pool(self, *args: Any, **kwargs: Any) -> list[Any]:
        return []

    async def delete_resource_owned_automations(self, resource_id: str) -> None:
        return None

    async def create_deployment(self, **kwargs: Any) -> uuid.UUID:
        # The real client method: it builds DeploymentCreate and serializes the request.
        return await PrefectClient.create_deployment(self, **kwargs)  # type: ignore[arg-type]

    async def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        assert (method, path) == ("POST", "/deployments/"), (method, path)
        body = kwargs["json"]
        # The server's request model (it forbids unknown fields) and its job-variable check
        # against the pool's template, as in POST /deployments/.
        deployment = ServerDeploymentCreate.model_validate(body)
        pool = self.pools[body["work_pool_name"]]
        try:
            await validate_job_variables_for_deployment(None, pool, deployment)  # type: ignore[arg-type]
        except HTTPException as e:
            raise ValueError(e.detail) from None
        self.created[body["name"]] = body
        return httpx.Response(201, json={"id": str(uuid.uuid4())})


class StubDockerApi:
    """docker-py's low-level API as prefect-docker's steps call it, without a daemon."""

    def __init__(self) -> None:
        self.builds: list[dict[str, Any]] = []
        self.pushes: list[dict[str, Any]] = []

    def build(self, **kwargs: Any) -> Iterator[dict[str, Any]]:
        # docker-py's own signature: a misspelt build option fails here as it does there.
        inspect.signature(docker.APIClient.build).bind(self, **kwargs)
        self.builds.append(kwargs)
        if not (Path(kwargs["path"]) / kwargs["dockerfile"]).is_file():
            # What the daemon answers; prefect-docker turns it into a BuildError.
            return iter([{"error": f"Cannot locate specified Dockerfile: {kwargs['dockerfile']}"}])
        return iter([{"stream": "(no daemon: stand-in build)\n"}, {"aux": {"ID": FAKE_IMAGE_ID}}])

    def push(self, repository: str, **kwargs: Any) -> Iterator[dict[str, Any]]:
        inspect.signature(docker.APIClient.push).bind(self, repository, **kwargs)
        self.pushes.append({"repository": repository, **kwargs})
        return iter([])


class StubImage:
    def tag(self, repository: str, tag: str | None = None, **kwargs: Any) -> bool:
        return True


class StubDockerClient:
    def __init__(self) -> None:
        self.api = StubDockerApi()
        self.images = self

    def get(self, image_id: str) -> StubImage:  # client.images.get
        assert image_id == FAKE_IMAGE_ID
        return StubImage()

    def login(self, **kwargs: Any) -> dict[str, Any]:
        return {}


# ---- `prefect deploy --all`, up to the HTTP request ------------------------------------


@dataclass
class DeployRun:
    """What `prefect deploy --all` would register, and every problem found on the way."""

    requests: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> POST body
    step_outputs: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> outputs
    docker: StubDockerClient = field(default_factory=StubDockerClient)
    problems: list[str] = field(default_factory=list)
    console: io.StringIO = field(default_factory=io.StringIO)


def known_keys(model: type[BaseModel]) -> set[str]:
    return {info.alias or name for name, info in model.model_fields.items()}


def keys_prefect_ignores(raw: dict[str, Any]) -> list[str]:
    """Keys Prefect's models drop without a word (they use extra="ignore"): a misspelt
    `schedules` or `work_pool` would deploy a deployment without them."""
    problems: list[str] = []

    def check(where: str, data: Any, model: type[BaseModel]) -> None:
        if isinstance(data, dict):
            for key in sorted(set(data) - known_keys(model)):
                problems.append(f"{where}: unknown key {key!r}")

    check("prefect.yaml", raw, PrefectYamlModel)
    deployments = raw.get("deployments")
    for i, d in enumerate(deployments if isinstance(deployments, list) else []):
        where = f"deployment {d.get('name', i)!r}" if isinstance(d, dict) else f"#{i}"
        check(where, d, DeploymentConfig)
        if not isinstance(d, dict):
            continue
        check(f"{where}: work_pool", d.get("work_pool"), WorkPoolConfig)
        check(f"{where}: concurrency_limit", d.get("concurrency_limit"), ConcurrencyLimitSpec)
        for schedule in d.get("schedules") or []:
            try:  # the documented schedule shape; Prefect's own model, which forbids extras
                RawScheduleConfig.model_validate(schedule)
            except ValidationError as e:
                problems.append(f"{where}: schedule {schedule}: {e}")
    return problems


def unresolved(template: Any, outputs: dict[str, Any]) -> list[str]:
    """Step-output placeholders (`{{ id.key }}`) with no value: Prefect would drop the key
    (or pass the literal text on) with only a log warning. `ctx.*` is the worker's."""
    return sorted(
        p.full_match
        for p in find_placeholders(template)
        if p.type is PlaceholderType.STANDARD
        and not p.name.startswith("ctx.")
        and get_from_dict(outputs, p.name, None) is None
    )


def checked_run_steps(run: DeployRun, name: str) -> Callable[..., Any]:
    """Prefect's run_steps, one step at a time, refusing a step whose inputs name an output
    no earlier step produced; records the outputs for the deployment's own templates."""

    async def run_checked(
        steps: list[dict[str, Any]], upstream_outputs: dict[str, Any] | None = None, **kw: Any
    ) -> dict[str, Any]:
        outputs = dict(upstream_outputs or {})
        for step in steps:
            if missing := unresolved(step, outputs):
                raise ValueError(f"step {next(iter(step))} uses {missing}: no earlier step output")
            outputs = await run_steps([step], outputs, **kw)
        run.step_outputs.setdefault(name, {}).update(outputs)
        return outputs

    return run_checked


def pull_step_problems(steps: list[dict[str, Any]]) -> list[str]:
    """Pull steps run only on the worker, at run time: the function must exist, take these
    arguments, and any placeholder left must name an earlier pull step's output."""
    problems: list[str] = []
    ids: set[str] = set()
    for step in steps:
        if len(step) != 1:
            problems.append(f"pull step with several functions: {sorted(step)}")
            continue
        ((fqn, inputs),) = step.items()
        inputs = dict(inputs or {})
        step_id = inputs.pop("id", None)
        inputs.pop("requires", None)
        for p in find_placeholders(inputs):
            if p.type is PlaceholderType.STANDARD and p.name.split(".")[0] not in ids:
                problems.append(f"pull step {fqn}: {p.full_match} is not resolved at deploy time")
        try:
            inspect.signature(import_object(fqn)).bind(**inputs)
        except (ImportError, AttributeError, TypeError) as e:
            problems.append(f"pull step {fqn}: {type(e).__name__}: {e}")
        if step_id:
            ids.add(step_id)
    return problems


def flow_run_problems(
    body: dict[str, Any], flow: Any, run_parameters: dict[str, Any] | None = None
) -> list[str]:
    """A flow run of the deployment (started with `run_parameters`): parameters as the
    server validates them when it creates the run, and as the engine binds them to the flow
    function."""
    problems = []
    parameters = {**body["parameters"], **(run_parameters or {})}
    try:
        validate_against_schema(parameters, body["parameter_openapi_schema"], raise_on_error=True)
        flow.validate_parameters(parameters)
    except Exception as e:
        problems.append(f"parameters {parameters}: {type(e).__name__}: {e}")
    return problems


def deploy(
    prefect_file: Path,
    monkeypatch: pytest.MonkeyPatch,
    names: list[str] | None = None,
    options: dict[str, Any] | None = None,
) -> DeployRun:
    """`prefect deploy --all` (or `-n NAME ...`, with the CLI's `options` such as
    {"variables": ["env.KEY=value"]} for `-jv`) on `prefect_file`, in the current directory
    (a checkout)."""
    run = DeployRun()
    console = Console(file=run.console, width=200)
    raw = yaml.safe_load(prefect_file.read_text())
    run.problems += keys_prefect_ignores(raw)
    try:  # `prefect deploy` prints these errors and deploys nothing: here they fail
        PrefectYamlModel.model_validate(raw)
    except ValidationError as e:
        run.problems.append(f"prefect.yaml: {e}")
        return run
    configs, actions = _load_deploy_configs_and_actions(prefect_file, console=console)
    configs = _pick_deploy_configs(
        configs, names, deploy_all=not names, console=console, is_interactive=lambda: False
    )

    api = StubPrefectApi()
    monkeypatch.setattr(prefect_runner, "get_client", lambda *a, **kw: api)
    monkeypatch.setattr("prefect.client.orchestration.get_client", lambda *a, **kw: api)

    @contextlib.contextmanager
    def docker_client() -> Iterator[StubDockerClient]:
        yield run.docker

    monkeypatch.setattr(docker_steps, "docker_client", docker_client)
    # `prefect deploy` falls back on a placeholder flow when the entrypoint fails to import
    # (for deploying without the flow's dependencies); they are installed here, so a failed
    # import is a real error. One strict load per deployment, kept for the checks below.
    flows: dict[str, Any] = {}

    def load_flow_strictly(entrypoint: str, **kwargs: Any) -> Any:
        flows[entrypoint] = load_flow_from_entrypoint(entrypoint, use_placeholder_flow=False)
        return flows[entrypoint]

    monkeypatch.setattr(_core, "load_flow_from_entrypoint", load_flow_strictly)
    docker_steps.STEP_OUTPUT_CACHE.clear()  # prefect-docker caches step results by input

    async def deploy_each() -> None:
        # Each deployment through `_run_single_deploy`, as `_run_multi_deploy` does, but on:
        # a failed deployment is one more problem, not the end; and an unnamed one, which
        # `prefect deploy --all` skips with a yellow line, is an error.
        for config in configs:
            name = config.get("name") or "(no name)"
            monkeypatch.setattr(_core, "run_steps", checked_run_steps(run, name))
            try:
                await _core._run_single_deploy(
                    config,
                    actions,
                    options=options,
                    client=api,  # type: ignore[arg-type]
                    prefect_file=prefect_file,
                    console=console,
                    is_interactive=lambda: False,
                )
            except Exception as e:
                cause = f" ({e.__cause__})" if e.__cause__ else ""
                run.problems.append(f"deployment {name!r}: {type(e).__name__}: {e}{cause}")
                continue
            body = api.created[config["name"]]
            run.requests[config["name"]] = body
            if missing := unresolved(
                # Steps were checked as they ran; triggers keep `{{ event.* }}` for later.
                {k: v for k, v in config.items() if k not in STEP_SECTIONS + ("triggers",)},
                run.step_outputs.get(name, {}),
            ):
                run.problems.append(f"deployment {name!r}: {missing} name no build step output")
            pool = api.pools[body["work_pool_name"]]
            allowed = set(pool.base_job_template["variables"]["properties"])
            # `env.NAME` (as `prefect deploy -jv env.NAME=value` writes it) is Prefect's
            # dotted form of a key inside `env`: the worker nests it.
            used = {key.split(".")[0] for key in body.get("job_variables") or {}}
            for key in sorted(used - allowed):
                run.problems.append(
                    f"deployment {name!r}: job variable {key!r} is not one of the "
                    f"{pool.type} pool's: {sorted(allowed)}"
                )
            flow = flows[body["entrypoint"]]
            run.problems += [
                f"deployment {name!r}: {p}"
                for p in flow_run_problems(body, flow, RUN_PARAMETERS.get(name))
            ]
            run.problems += [
                f"deployment {name!r}: {p}" for p in pull_step_problems(body["pull_steps"])
            ]

    asyncio.run(deploy_each())
    return run


@pytest.fixture(scope="module")
def pushed_checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This working tree as a developer's checkout after commit and push: a git repository
    whose `origin` (a bare repository beside it) holds its HEAD."""
    root = tmp_path_factory.mktemp("deploy")
    checkout, origin = root / "checkout", root / "origin.git"
    git(root, "init", "-q", "-b", "main", str(checkout))
    listed = git(REPO, "ls-files", "-z", "--cached", "--others", "--exclude-standard")
    for rel in filter(None, listed.split("\0")):
        if (REPO / rel).is_file():  # a tracked file deleted in the working tree is gone
            (checkout / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, checkout / rel)
    git(checkout, "add", "-A")
    git(checkout, "commit", "-q", "-m", "the working tree")
    git(root, "init", "-q", "--bare", str(origin))
    git(checkout, "remote", "add", "origin", str(origin))
    git(checkout, "push", "-q", "-u", "origin", "main")
    return checkout


@pytest.fixture(scope="module")
def deployed(pushed_checkout: Path) -> DeployRun:
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(pushed_checkout)
        return deploy(pushed_checkout / "prefect.yaml", mp)


# ---- the file as it is -----------------------------------------------------------------


def test_every_deployment_deploys_with_prefects_own_code(deployed: DeployRun):
    assert deployed.problems == [], "\n".join(deployed.problems) + deployed.console.getvalue()
    assert set(deployed.requests) == DEPLOYMENTS


def test_no_deployment_lets_its_runs_change_risky_params(deployed: DeployRun):
    """A run's starter chooses its overrides; running code or reading from outside the
    project (a new source, remote code) stays off unless the owner turns it on."""
    from flows.dvc_workspace import ALLOW_RISKY_ENV

    for name, body in deployed.requests.items():
        env = (body.get("job_variables") or {}).get("env") or {}
        assert ALLOW_RISKY_ENV not in env, f"{name} allows risky overrides"
        assert ALLOW_RISKY_ENV not in json.dumps(body.get("parameters")), name


def test_the_process_deployments_run_in_the_deploying_checkout(
    deployed: DeployRun, pushed_checkout: Path
):
    for name in ("qlora-on-demand", "qlora-nightly", SWEEP):
        body = deployed.requests[name]
        assert body["work_pool_name"] == "qlora-process"
        assert body["job_variables"] == {}
        (step,) = body["pull_steps"]
        directory = step["prefect.deployments.steps.set_working_directory"]["directory"]
        assert Path(directory).resolve() == pushed_checkout.resolve()
    nightly = deployed.requests["qlora-nightly"]
    assert nightly["parameters"] == {"only_if_changed": True}
    (schedule,) = nightly["schedules"]
    assert (schedule["schedule"]["cron"], schedule["schedule"]["timezone"]) == ("0 3 * * *", "UTC")
    assert nightly["concurrency_options"] == {"collision_strategy": "CANCEL_NEW"}
    # The sweep collects into this checkout: a second one waits for the first.
    sweep = deployed.requests[SWEEP]
    assert sweep["entrypoint"] == "flows/sweep_fanout.py:qlora_sweep"
    assert (sweep["concurrency_limit"], sweep["concurrency_options"]) == (
        1,
        {"collision_strategy": "ENQUEUE"},
    )


def test_the_docker_deployment_runs_the_image_of_the_deployed_commit(
    deployed: DeployRun, pushed_checkout: Path
):
    body = deployed.requests["qlora-nightly-docker"]
    commit = git(pushed_checkout, "rev-parse", "HEAD").strip()
    assert body["work_pool_name"] == "qlora-docker"
    assert body["job_variables"] == {"image": f"qlora-pipeline:{commit}"}
    assert body["version"] == commit
    assert body["parameters"] == {"only_if_changed": True, "pull": True, "push": True}
    (schedule,) = body["schedules"]
    assert schedule["schedule"]["cron"] == "0 3 * * *"
    # The container clones the commit the image was built from, from `origin`.
    (step,) = body["pull_steps"]
    clone = step["prefect.deployments.steps.git_clone"]
    assert clone == {"repository": str(pushed_checkout.parent / "origin.git"), "commit_sha": commit}
    (build,) = deployed.docker.api.builds  # built once, from this checkout's Dockerfile
    assert (Path(build["path"]), build["dockerfile"]) == (pushed_checkout, "Dockerfile")
    # What the Docker worker makes of the job variables: its own job configuration, from
    # the pool's default template.
    job = asyncio.run(
        DockerWorker.job_configuration.from_template_and_values(
            DockerWorker.get_default_base_job_template(),
            body["job_variables"],
            client=StubPrefectApi(),  # type: ignore[arg-type]
        )
    )
    assert job.image == f"qlora-pipeline:{commit}"


def run_pull_steps(body: dict[str, Any], where: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The deployment's recorded pull steps, run in `where` as the worker runs them in a flow
    run's folder; the directory they leave the flow in."""
    monkeypatch.chdir(where)
    # Steps look up block and variable references through the API (none are used here);
    # without one Prefect would start a temporary server.
    api = StubPrefectApi()
    monkeypatch.setattr("prefect.client.orchestration.get_client", lambda *a, **kw: api)
    outputs = asyncio.run(run_steps(body["pull_steps"]))
    return (where / outputs["directory"]).resolve()


def test_the_containers_pull_step_gives_the_flow_a_dvc_checkout(
    deployed: DeployRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """What a container does before the flow starts, minus the image: the recorded pull
    steps clone the commit, and the flow and DVC's pipeline load from that clone."""
    from flows import dvc_workspace as ws

    body = deployed.requests["qlora-nightly-docker"]
    clone = run_pull_steps(body, tmp_path, monkeypatch)
    assert git(clone, "rev-parse", "HEAD").strip() == body["version"]
    monkeypatch.chdir(clone)  # as the worker does after the pull steps
    flow = load_flow_from_entrypoint(body["entrypoint"], use_placeholder_flow=False)
    assert flow.name == "qlora-pipeline"
    assert ws.find_repo_root(None) == clone
    assert "finetune" in ws.pipeline_stages(clone)


def commit_not_pushed(local: Path) -> None:
    git(local, "commit", "-q", "--allow-empty", "-m", "not pushed")


def dockerfile_not_committed(local: Path) -> None:
    with (local / "Dockerfile").open("a") as f:
        f.write("# an edit\n")


@pytest.mark.parametrize(
    ("change", "expected", "refused"),
    [
        (commit_not_pushed, "git push it first", {DOCKER, MEMBER}),
        (dockerfile_not_committed, "commit Dockerfile", {DOCKER}),
    ],
)
def test_a_deployment_that_clones_refuses_a_commit_its_runs_cannot_have(
    change: Callable[[Path], None],
    expected: str,
    refused: set[str],
    pushed_checkout: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
):
    """The container and the sweep's members clone the commit from `origin`, and the image
    is tagged with it: `prefect deploy` fails on an unpushed commit (both) or uncommitted
    image files (the container), rather than the first run."""
    local = tmp_path / "local"
    git(tmp_path, "clone", "-q", str(pushed_checkout), str(local))
    change(local)
    monkeypatch.chdir(local)

    run = deploy(local / "prefect.yaml", monkeypatch)

    assert set(run.requests) == DEPLOYMENTS - refused
    assert len(run.problems) == len(refused), "\n".join(run.problems)
    for name in refused:
        (problem,) = [p for p in run.problems if p.startswith(f"deployment {name!r}")]
        assert expected in problem, problem


def test_the_sweep_members_clone_the_deployed_commit_and_run_side_by_side(
    deployed: DeployRun, pushed_checkout: Path
):
    from flows.sweep_fanout import cloned_commit

    body = deployed.requests[MEMBER]
    commit = git(pushed_checkout, "rev-parse", "HEAD").strip()
    assert body["work_pool_name"] == "qlora-process"
    assert body["entrypoint"] == "flows/pipeline.py:qlora_pipeline"
    assert body["version"] == commit
    assert body["parameters"] == {"pull": True, "push": True, "push_experiment": True}
    # Each run has a clone of its own: no limit keeps members from running at once.
    assert body.get("concurrency_limit") is None and body.get("concurrency_options") is None
    (step,) = body["pull_steps"]
    origin = str(pushed_checkout.parent / "origin.git")
    assert step[CLONE] == {"repository": origin, "commit_sha": commit}
    # The sweep reads the commit its members run from the recorded pull step.
    assert cloned_commit(MEMBER, body["pull_steps"]) == commit
    # No working_dir: the process worker makes a temporary folder per flow run (and removes
    # it after), which is where the pull step clones.
    assert body["job_variables"] == {}
    job = asyncio.run(
        ProcessWorker.job_configuration.from_template_and_values(
            ProcessWorker.get_default_base_job_template(),
            body["job_variables"],
            client=StubPrefectApi(),  # type: ignore[arg-type]
        )
    )
    assert job.working_dir is None


def test_two_members_pull_steps_give_two_checkouts_of_the_commit(
    deployed: DeployRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    body = deployed.requests[MEMBER]
    clones = []
    for run in ("flow-run-1", "flow-run-2"):
        (tmp_path / run).mkdir()
        clones.append(run_pull_steps(body, tmp_path / run, monkeypatch))

    assert clones[0] != clones[1]
    origin = body["pull_steps"][0][CLONE]["repository"]
    for clone in clones:
        assert git(clone, "rev-parse", "HEAD").strip() == body["version"]
        # Where the member pushes its experiment: the repository it was cloned from.
        assert git(clone, "remote", "get-url", "origin").strip() == origin
    # What one member's run writes, the other's checkout does not see.
    (clones[0] / "params.yaml").write_text("changed by the first member\n")
    assert git(clones[1], "status", "--porcelain") == ""


def test_what_the_sweep_sends_a_member_passes_the_member_deployments_checks(
    deployed: DeployRun, pushed_checkout: Path, monkeypatch: pytest.MonkeyPatch
):
    """flows/sweep_fanout.py starts each member with these parameters: the server's schema
    of the deployment and the flow's own binding take them (and would refuse a typo)."""
    from flows.sweep_fanout import member_parameters
    from qlora.sweep.grid import Point

    body = deployed.requests[MEMBER]
    monkeypatch.chdir(pushed_checkout)
    flow = load_flow_from_entrypoint(body["entrypoint"], use_placeholder_flow=False)
    sent = member_parameters(Point("lr-1", ("finetune.learning_rate=0.0001",)))

    assert flow_run_problems(body, flow, sent) == []
    assert sent["experiment"] == "lr-1" and sent["overrides"] == ["finetune.learning_rate=0.0001"]
    (problem,) = flow_run_problems(body, flow, {**sent, "experimnt": "lr-1"})
    assert "experimnt" in problem


# ---- a broken prefect.yaml is refused ----------------------------------------------------

Mutation = Callable[[dict[str, Any]], None]
BUILD = "prefect_docker.deployments.steps.build_docker_image"
CLONE = "prefect.deployments.steps.git_clone"


def deployment(config: dict[str, Any], name: str) -> dict[str, Any]:
    return next(d for d in config["deployments"] if d.get("name") == name)


def step_args(config: dict[str, Any], section: str, fqn: str) -> dict[str, Any]:
    return next(s[fqn] for s in deployment(config, DOCKER)[section] if fqn in s)


def set_in(name: str, path: str, value: Any) -> Mutation:
    """Set `key.key.0.key` of deployment `name` to value; None deletes the key."""
    *parents, last = path.split(".")

    def mutate(config: dict[str, Any]) -> None:
        target: Any = deployment(config, name)
        for key in parents:
            target = target[int(key)] if isinstance(target, list) else target[key]
        if value is None:
            del target[last]
        else:
            target[last] = value

    return mutate


def rename(section: str, fqn: str, old: str, new: str) -> Mutation:
    """Rename an argument of a step of the Docker deployment (`old` == fqn: the step)."""

    def mutate(config: dict[str, Any]) -> None:
        if old == fqn:
            step = next(s for s in deployment(config, DOCKER)[section] if fqn in s)
            step[new] = step.pop(fqn)
        else:
            args = step_args(config, section, fqn)
            args[new] = args.pop(old)

    return mutate


def set_step_arg(section: str, fqn: str, key: str, value: Any) -> Mutation:
    def mutate(config: dict[str, Any]) -> None:
        step_args(config, section, fqn)[key] = value

    return mutate


def rename_top_level(config: dict[str, Any]) -> None:
    config["deployment"] = config.pop("deployments")


def rename_schedules(config: dict[str, Any]) -> None:
    d = deployment(config, "qlora-nightly")
    d["schedule_s"] = d.pop("schedules")


NIGHTLY = "qlora-nightly"
# case: (deployment to deploy, None = all; mutation; a fragment the problems must contain)
BROKEN: dict[str, tuple[str | None, Mutation, str]] = {
    "unknown top-level key": (None, rename_top_level, "unknown key 'deployment'"),
    "unknown deployment key": (NIGHTLY, rename_schedules, "unknown key 'schedule_s'"),
    "unknown schedule key": (NIGHTLY, set_in(NIGHTLY, "schedules.0.timezon", "UTC"), "timezon"),
    "bad cron": (NIGHTLY, set_in(NIGHTLY, "schedules.0.cron", "0 3 * *"), "cron"),
    "bad time zone": (
        NIGHTLY,
        set_in(NIGHTLY, "schedules.0.timezone", "Mars/Olympus"),
        "Mars/Olympus",
    ),
    "bad collision strategy": (
        NIGHTLY,
        set_in(NIGHTLY, "concurrency_limit.collision_strategy", "SKIP"),
        "SKIP",
    ),
    "bad entrypoint": (
        DOCKER,
        set_in(DOCKER, "entrypoint", "flows/pipeline.py:qlora_pipelin"),
        "qlora_pipelin",
    ),
    "deployment without a name": (
        None,
        set_in("qlora-on-demand", "name", None),
        "name must be provided",
    ),
    "missing work pool name": (
        NIGHTLY,
        set_in(NIGHTLY, "work_pool.name", None),
        "A work pool is required",
    ),
    "work pool that does not exist": (
        DOCKER,
        set_in(DOCKER, "work_pool.name", "qlora-dockr"),
        "'qlora-dockr' which does not exist",
    ),
    "unknown job variable": (
        DOCKER,
        set_in(DOCKER, "work_pool.job_variables.imagee", "x"),
        "job variable 'imagee'",
    ),
    "job variable of the wrong type": (
        DOCKER,
        set_in(DOCKER, "work_pool.job_variables.image_pull_policy", "Sometimes"),
        "Sometimes",
    ),
    "unknown template reference": (
        DOCKER,
        set_in(DOCKER, "work_pool.job_variables.image", "{{ build-imag.image }}"),
        "build-imag.image",
    ),
    "unknown template reference in a build step": (
        DOCKER,
        set_step_arg("build", BUILD, "tag", "{{ git-comit.stdout }}"),
        "git-comit.stdout",
    ),
    "parameter the flow does not take": (
        NIGHTLY,
        set_in(NIGHTLY, "parameters.only_if_changd", True),
        "only_if_changd",
    ),
    "parameter of the wrong type": (
        NIGHTLY,
        set_in(NIGHTLY, "parameters.retries", "twice"),
        "retries",
    ),
    "unknown pull step": (DOCKER, rename("pull", CLONE, CLONE, CLONE[:-1]), "git_clon"),
    "unknown pull step argument": (
        DOCKER,
        rename("pull", CLONE, "commit_sha", "commit"),
        "unexpected keyword argument 'commit'",
    ),
    "unknown docker build option": (
        DOCKER,
        set_step_arg("build", BUILD, "buildarg", {"A": "1"}),
        "buildarg",
    ),
    "Dockerfile that is not there": (
        DOCKER,
        set_step_arg("build", BUILD, "dockerfile", "Dockerfile.gpu"),
        "Dockerfile.gpu",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_prefect_yaml_is_refused(
    case: str, pushed_checkout: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    name, mutate, expected = BROKEN[case]
    config = yaml.safe_load(PREFECT_YAML.read_text())
    mutate(config)
    broken = tmp_path / "prefect.yaml"
    broken.write_text(yaml.safe_dump(config, sort_keys=False))
    monkeypatch.chdir(pushed_checkout)

    problems = "\n".join(deploy(broken, monkeypatch, [name] if name else None).problems)

    assert expected in problems, f"{case}: not refused; problems found:\n{problems or '(none)'}"


def test_the_registry_variant_deploys_too(
    pushed_checkout: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """prefect.yaml's commented `push` section and PREFECT_DEFAULT_DOCKER_BUILD_NAMESPACE,
    for a worker on another machine: the image is pushed and the job uses that name."""
    config = yaml.safe_load(PREFECT_YAML.read_text())
    deployment(config, DOCKER)["push"] = [
        {
            "prefect_docker.deployments.steps.push_docker_image": {
                "image_name": "{{ build-image.image_name }}",
                "tag": "{{ build-image.tag }}",
            }
        }
    ]
    variant = tmp_path / "prefect.yaml"
    variant.write_text(yaml.safe_dump(config, sort_keys=False))
    monkeypatch.chdir(pushed_checkout)
    namespace = "registry.example.com/team"

    with temporary_settings({PREFECT_DEFAULT_DOCKER_BUILD_NAMESPACE: namespace}):
        run = deploy(variant, monkeypatch, [DOCKER])

    assert run.problems == [], "\n".join(run.problems)
    commit = git(pushed_checkout, "rev-parse", "HEAD").strip()
    image = f"{namespace}/qlora-pipeline"
    assert run.requests[DOCKER]["job_variables"]["image"] == f"{image}:{commit}"
    assert [(p["repository"], p["tag"]) for p in run.docker.api.pushes] == [(image, commit)]


def test_the_remotes_credentials_come_from_the_work_pool(deployed: DeployRun):
    """README: the DVC remote's credentials are the pool's default `env` (kept out of git and
    of each deployment); the Docker worker merges them with the deployment's image."""
    template = DockerWorker.get_default_base_job_template()
    secrets = {"AWS_ACCESS_KEY_ID": "key-id", "AWS_SECRET_ACCESS_KEY": "se/cr=et="}
    template["variables"]["properties"]["env"]["default"] = secrets
    body = deployed.requests[DOCKER]

    job = asyncio.run(
        DockerWorker.job_configuration.from_template_and_values(
            template,
            body["job_variables"],
            client=StubPrefectApi(),  # type: ignore[arg-type]
        )
    )

    assert job.env == secrets
    assert job.image == body["job_variables"]["image"]


def test_job_variables_given_to_prefect_deploy_would_drop_the_image(
    pushed_checkout: Path, monkeypatch: pytest.MonkeyPatch
):
    """Why README does not say `prefect deploy -n qlora-nightly-docker -jv env.KEY=...`:
    prefect 3.8.8's `_apply_cli_options_to_deploy_config` looks for `work_pool.variables`
    (a key prefect.yaml no longer has), so any `-jv` replaces prefect.yaml's job variables,
    the built image included, and the run would start Prefect's own image. When this test
    fails, Prefect has fixed it and README may offer `-jv` again."""
    monkeypatch.chdir(pushed_checkout)
    options = {"variables": ["env.AWS_ACCESS_KEY_ID=key-id"]}

    run = deploy(pushed_checkout / "prefect.yaml", monkeypatch, [DOCKER], options)

    assert run.problems == [], "\n".join(run.problems)
    assert run.requests[DOCKER]["job_variables"] == {"env.AWS_ACCESS_KEY_ID": "key-id"}


def test_the_gpu_variant_deploys_too(
    pushed_checkout: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """README's GPU variant: a CUDA torch through a build argument, and the container given
    the host's GPUs through docker-py's device requests."""
    config = yaml.safe_load(PREFECT_YAML.read_text())
    cuda = "https://download.pytorch.org/whl/cu130"
    step_args(config, "build", BUILD)["buildargs"] = {"TORCH_INDEX_URL": cuda}
    gpus = {"device_requests": [{"count": -1, "capabilities": [["gpu"]]}]}
    deployment(config, DOCKER)["work_pool"]["job_variables"]["container_create_kwargs"] = gpus
    variant = tmp_path / "prefect.yaml"
    variant.write_text(yaml.safe_dump(config, sort_keys=False))
    monkeypatch.chdir(pushed_checkout)

    run = deploy(variant, monkeypatch, [DOCKER])

    assert run.problems == [], "\n".join(run.problems)
    (build,) = run.docker.api.builds
    assert build["buildargs"] == {"TORCH_INDEX_URL": cuda}
    job = asyncio.run(
        DockerWorker.job_configuration.from_template_and_values(
            DockerWorker.get_default_base_job_template(),
            run.requests[DOCKER]["job_variables"],
            client=StubPrefectApi(),  # type: ignore[arg-type]
        )
    )
    assert job.container_create_kwargs == gpus
    # docker-py turns each into a DeviceRequest when the worker creates the container.
    (request,) = [docker.types.DeviceRequest(**r) for r in gpus["device_requests"]]
    assert request["Capabilities"] == [["gpu"]]


# ---- the image: build context and Dockerfile (no daemon needed) --------------------------


def dockerignore_patterns(root: Path = REPO) -> list[str]:
    lines = (root / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def build_context(root: Path) -> set[str]:
    """The files `docker build` sends to the daemon: docker-py's own .dockerignore matching,
    which prefect-docker's build step uses."""
    paths = exclude_paths(str(root), dockerignore_patterns(), dockerfile="Dockerfile")
    return {p for p in paths if (root / p).is_file()}


SOURCE_DIRS = {"qlora", "stages", "flows"}
CONTEXT_FILES = {
    "Dockerfile",
    ".dockerignore",
    "requirements.lock",
    "requirements-dev.lock",
    "pyproject.toml",
    "README.md",
}


def test_the_build_context_holds_source_and_lock_files_only(tmp_path: Path):
    """A working tree after a real run, in miniature: weights, data, caches, the venv."""
    kept = CONTEXT_FILES | {
        "qlora/core/io.py",
        "qlora/report/templates/report.html.j2",
        "stages/base.py",
        "flows/pipeline.py",
    }
    left_out = {
        ".venv/lib/python3.11/site-packages/torch/__init__.py",
        ".git/config",
        ".dvc/config",
        ".dvc/cache/files/md5/ab/cdef",
        ".cache/base/SmolLM2-135M-Instruct.Q4_1.gguf",
        ".cache/finetune/abc/checkpoint-8/adapter_model.safetensors",
        "data/prepared/base_model/model.safetensors",
        "data/raw/stdlib_functions.jsonl",
        "reports/report.html",
        "registry/v1/adapter_model.safetensors",
        "tracking/mlflow.db",
        "tests/integration/test_flows.py",
        "params.yaml",
        "dvc.yaml",
        "qlora/__pycache__/io.cpython-311.pyc",
    }
    for rel in kept | left_out:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")

    assert build_context(tmp_path) == kept


def test_the_real_build_context_has_no_weights_data_or_venv():
    context = build_context(REPO)
    assert {"requirements.lock", "pyproject.toml", "qlora/core/params.py"} <= context
    assert {p for p in context if p.split("/")[0] not in SOURCE_DIRS} <= CONTEXT_FILES
    assert not [p for p in context if re.search(r"\.(safetensors|gguf|bin|pt|pth|ckpt)$", p)]


def dockerfile_instructions(text: str) -> list[str]:
    """A Dockerfile's instructions, one string each: continuations joined, comments dropped,
    white space collapsed."""
    instructions: list[str] = []
    pending = ""
    for line in text.splitlines():
        if line.strip().startswith("#") or (not line.strip() and not pending):
            continue
        pending += line.rstrip().removesuffix("\\") + " "
        if not line.rstrip().endswith("\\"):
            instructions.append(" ".join(pending.split()))
            pending = ""
    return instructions


def test_the_dockerfile_installs_the_locked_libraries_before_the_source_and_drops_root():
    steps = dockerfile_instructions((REPO / "Dockerfile").read_text())

    def first(pattern: str) -> int:
        return next(i for i, step in enumerate(steps) if re.search(pattern, step))

    # The project's Python: the one running this test.
    assert re.search(
        rf"^ARG PYTHON_IMAGE=python:{sys.version_info[0]}\.{sys.version_info[1]}-", steps[0]
    )
    # Every COPY source is in the build context (else `docker build` fails).
    context = build_context(REPO)
    for step in steps:
        if step.startswith("COPY "):
            for src in step.split()[1:-1]:
                assert src in context or any(p.startswith(f"{src}/") for p in context), step
    # Libraries first, source last: a code change rebuilds one small layer.
    torch = first(r"^RUN pip install .*--constraint /tmp/qlora/requirements.lock torch$")
    # The locked libraries in one layer with the compiler llama-cpp-python's build needs,
    # which leaves in that same layer (a later purge would not shrink the image).
    lock = first(r"^RUN .*pip install --requirement /tmp/qlora/requirements.lock ")
    assert re.search(r"apt-get install .*\bbuild-essential\b.*\bcmake\b", steps[lock])
    assert re.search(r"apt-get purge .*\bbuild-essential\b.*\bcmake\b", steps[lock])
    source = first(r"^COPY qlora ")
    project = first(r"^RUN pip install --no-deps --no-build-isolation /tmp/qlora/src ")
    assert first(r"^COPY requirements.lock ") < torch < lock < source < project
    # torch: the CPU build by default; GPU users change the index.
    assert steps[torch - 1] == "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu"
    # The dev lock only pins the optional packages (a constraint); every package installed
    # by default is pinned in a lock file.
    assert all(
        "--constraint /tmp/qlora/requirements-dev.lock" in step
        for step in steps
        if "requirements-dev.lock" in step and not step.startswith("COPY ")
    )
    extras = re.search(r'^ARG EXTRA_PACKAGES="(.*)"$', steps[first("^ARG EXTRA_PACKAGES=")])
    assert extras is not None
    locked = {
        line.split("==")[0].lower()
        for lock_file in ("requirements.lock", "requirements-dev.lock")
        for line in (REPO / lock_file).read_text().splitlines()
        if "==" in line
    }
    assert set(extras.group(1).lower().split()) <= locked
    # git for the clone and DVC; not root at run time; tini reaps the stages' children.
    assert re.search(r"apt-get install .*\bgit\b.*\btini\b", steps[first("apt-get install")])
    user = [step.split()[1] for step in steps if step.startswith("USER ")]
    assert user and user[-1].split(":")[0] not in {"0", "root"}
    assert 'ENTRYPOINT ["tini", "--"]' in steps


# ---- the image, built (where a Docker daemon answers) ------------------------------------


def docker_daemon_problem() -> str | None:
    """Why no image can be built here, or None when a daemon answers."""
    if shutil.which("docker") is None:
        return "no docker CLI on PATH"
    try:
        info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "`docker info` did not answer within 30 s"
    if info.returncode != 0:
        reason = (info.stderr.strip().splitlines() or ["no output"])[-1]
        return f"no Docker daemon (`docker info` failed: {reason})"
    return None


@pytest.mark.slow  # minutes where a daemon exists (torch alone is ~200 MB); else a skip
def test_the_image_builds_and_runs_the_cli_without_weights():
    if problem := docker_daemon_problem():
        pytest.skip(problem)
    tag = f"qlora-pipeline:test-{uuid.uuid4().hex[:8]}"
    build = subprocess.run(
        ["docker", "build", "-t", tag, "."], cwd=REPO, capture_output=True, text=True, timeout=3600
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    try:

        def in_image(*cmd: str) -> str:
            done = subprocess.run(
                ["docker", "run", "--rm", tag, *cmd], capture_output=True, text=True, timeout=300
            )
            assert done.returncode == 0, (cmd, done.stdout[-2000:], done.stderr[-2000:])
            return done.stdout

        assert "Usage" in in_image("qlora", "--help")
        assert in_image("id", "-u").strip() == "1000"
        in_image("pip", "check")
        found = json.loads(
            in_image(
                "python",
                "-c",
                "import json, sys, torch, prefect, dvc_s3; print(json.dumps({'python': "
                "list(sys.version_info[:2]), 'torch': torch.__version__, 'cuda': "
                "torch.version.cuda, 'prefect': prefect.__version__}))",
            )
        )
        lock = dict(
            line.split("==", 1)
            for line in (REPO / "requirements.lock").read_text().splitlines()
            if "==" in line
        )
        assert found["python"] == list(sys.version_info[:2])  # the project's Python
        assert found["torch"].split("+")[0] == lock["torch"] and found["cuda"] is None  # CPU
        assert found["prefect"] == lock["prefect"]
        # No weights (by name, or any big file outside the installed libraries), no DVC
        # workspace or cache, no virtualenv, and an empty work directory.
        leftovers = in_image(
            "sh",
            "-c",
            "find / -xdev -path /usr/local/lib -prune -o \\( -name '*.safetensors' "
            "-o -name '*.gguf' -o -name '*.ckpt' -o -name '*.pt' -o -name '*.pth' "
            "-o -name .dvc -o -name .venv -o -type f -size +50M \\) -print; "
            "ls -A /home/qlora/work",
        )
        assert leftovers.strip() == "", f"in the image:\n{leftovers}"
    finally:
        subprocess.run(["docker", "image", "rm", "-f", tag], capture_output=True)
