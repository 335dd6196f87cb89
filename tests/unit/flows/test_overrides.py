"""The flow's `overrides`: params.yaml keys only, checked by the params schema, and the keys
that run code or reach outside the project only where the deployment allows them.

Whoever may start a run of a deployment chooses its overrides, so they are untrusted input:
each refusal below was a way to rewrite the pipeline, run code on the worker, read data from
anywhere, or copy the worker's secrets into params.yaml. The override function is called
directly (a real flow run costs seconds; tests/integration/test_flows.py runs those).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml

from flows import dvc_workspace as ws
from flows import pipeline
from helpers.repo import REPO
from qlora.core.params import load_params


@pytest.fixture
def project(tmp_path) -> Path:
    """The files an override may touch or read: the shipped params.yaml (comments and all),
    dvc.yaml, the local lm-eval tasks and the accelerate configs."""
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy(REPO / name, tmp_path / name)
    for folder in ("data/eval_tasks", "configs/accelerate"):
        shutil.copytree(REPO / folder, tmp_path / folder)
    return tmp_path


def snapshot(project: Path) -> dict[str, bytes]:
    return {name: (project / name).read_bytes() for name in ("params.yaml", "dvc.yaml")}


def value_at(params: dict, key: str):
    for part in key.split("."):
        params = params[part]
    return params


def refused(project: Path, overrides: list[str], match: str, **kwargs) -> str:
    """The refusal's message; nothing on disk may have changed."""
    before = snapshot(project)
    with pytest.raises(ValueError, match=match) as caught:
        ws.apply_param_overrides(project, overrides, **kwargs)
    assert snapshot(project) == before, "a refused override changed a file"
    assert not list(project.glob(".params.yaml.tmp-*")), "a temporary file was left behind"
    return str(caught.value)


def test_a_normal_override_is_applied_and_keeps_the_rest_of_params_yaml(project):
    expected = yaml.safe_load((project / "params.yaml").read_text())
    expected["finetune"]["learning_rate"] = 1e-4

    ws.apply_param_overrides(project, ["finetune.learning_rate=1e-4"])

    text = (project / "params.yaml").read_text()
    assert yaml.safe_load(text) == expected
    assert "# QLoRA paper's clipping" in text, "the comments of params.yaml were lost"
    assert load_params(project / "params.yaml").finetune.learning_rate == 1e-4


@pytest.mark.parametrize(
    "override",
    [
        "dvc.yaml:stages.sources.cmd=touch pwned",
        "./dvc.yaml:stages.sources.cmd=touch pwned",
        "data/eval_tasks/docstring_loss.yaml:task=x",
    ],
)
def test_only_params_yaml_can_be_overridden(project, override):
    message = refused(project, [override], match="only params.yaml")
    assert override.partition(":")[0] in message


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("+finetune.extra=1", "finetune.extra"),
        ("++gate.max_regression_per_metric.docstring_choice=0.5", "gate.max_regression_per"),
        ("~finetune.seed", "finetune.seed"),
    ],
)
def test_overrides_neither_add_nor_delete_keys(project, override, key):
    message = refused(project, [override], match="adds or deletes")
    assert key in message


@pytest.mark.parametrize(
    "value",
    [
        "${oc.env:SOME_TOKEN}",
        # Hydra's escapes: the parsed value is `${oc.env:SOME_TOKEN}` all the same.
        r"$\{oc.env:SOME_TOKEN\}",
        r"'$\{oc.env:SOME_TOKEN\}'",
        "'prefix ${oc.env:SOME_TOKEN}'",
    ],
)
def test_an_override_cannot_copy_the_workers_environment_into_params(project, monkeypatch, value):
    monkeypatch.setenv("SOME_TOKEN", "secret-value")
    message = refused(project, [f"dataset.system_prompt={value}"], match="interpolation")
    assert "dataset.system_prompt" in message and "secret-value" not in message


def test_a_sweep_is_not_an_override(project):
    refused(project, ["finetune.learning_rate=1e-4,2e-4"], match="sweep")


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("finetune.learning_rate=-1", "finetune.learning_rate"),
        ("finetune.optimizer=sgd", "finetune.optimizer"),
        ("finetune.lr=1e-4", "finetune.lr"),  # not a key of params.yaml
        # The schema's cross-field check: the gate must read an evaluated task.
        ("gate.primary.task=docstring_choice_typo", "gate.primary.task"),
    ],
)
def test_a_value_the_schema_refuses_leaves_params_yaml_unchanged(project, override, key):
    message = refused(project, [override], match=re.escape(key))
    assert "params.yaml" in message
    assert str(project) not in message, "the message names a temporary copy"


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("base.trust_remote_code=true", "base.trust_remote_code"),
        ("base.source=/etc", "base.source"),
        ("base.source=someone/model", "base.source"),
        ("base.revision=main", "base.revision"),
        ("dataset.source=/home/someone/private.jsonl", "dataset.source"),
        ("finetune.accelerate_config=/tmp/launch.yaml", "finetune.accelerate_config"),
        (
            "finetune.accelerate_config=configs/accelerate/../../x.yaml",
            "finetune.accelerate_config",
        ),
        ("evaluate.tasks=[docstring_loss,/tmp/x.yaml]", "evaluate.tasks"),
        ("evaluate.tasks=[docstring_loss,hellaswag]", "evaluate.tasks"),
        # The gate decides what is promoted and served: a run may not loosen it.
        ("gate.max_regression=100", "gate"),
        ("gate.significance=false", "gate"),
        ("gate.champion.max_regression=100", "gate"),
        ("finetune.report_to=[wandb]", "finetune.report_to"),
        # A whole section at once is the same change.
        (
            "base={source: /etc, revision: null, trust_remote_code: false, chat_template: null, "
            "save_dtype: bfloat16}",
            "base.source",
        ),
    ],
)
def test_keys_that_run_code_or_reach_outside_need_the_deployments_allow(project, override, key):
    message = refused(project, [override], match=re.escape(key))
    assert ws.ALLOW_RISKY_ENV in message, "the refusal does not say how to allow it"

    ws.apply_param_overrides(project, [override], allow_risky=True)

    shipped = value_at(yaml.safe_load((REPO / "params.yaml").read_text()), key)
    assert value_at(yaml.safe_load((project / "params.yaml").read_text()), key) != shipped


def test_the_allowed_value_is_what_was_asked(project):
    ws.apply_param_overrides(
        project,
        ["base.trust_remote_code=true", "evaluate.tasks=[docstring_loss,/tmp/x.yaml]"],
        allow_risky=True,
    )
    params = load_params(project / "params.yaml")
    assert params.base.trust_remote_code is True
    assert params.evaluate.tasks == ["docstring_loss", "/tmp/x.yaml"]


@pytest.mark.parametrize(
    "override",
    [
        # What the project ships stays open to every run.
        "evaluate.tasks=[docstring_loss,prose_guard]",
        "finetune.accelerate_config=configs/accelerate/fsdp_qlora.yaml",
        "base.trust_remote_code=false",
        "base.source=embedded:smollm2-135m-instruct",  # the value it already has
    ],
)
def test_the_projects_own_tasks_and_configs_need_no_allow(project, override):
    ws.apply_param_overrides(project, [override])
    key, _, value = override.partition("=")
    got = value_at(yaml.safe_load((project / "params.yaml").read_text()), key)
    assert got == yaml.safe_load(value)


def test_turning_trust_remote_code_on_is_risky_turning_it_off_is_not(project):
    ws.apply_param_overrides(project, ["base.trust_remote_code=true"], allow_risky=True)
    ws.apply_param_overrides(project, ["base.trust_remote_code=false"])
    assert load_params(project / "params.yaml").base.trust_remote_code is False


# ---- where the allow may come from ------------------------------------------------------


def test_the_allow_comes_from_the_deployment_or_worker_not_from_the_run():
    allow = {ws.ALLOW_RISKY_ENV: "1"}
    assert not pipeline.risky_overrides_allowed(environ={}, run_job_variables=None)
    assert not pipeline.risky_overrides_allowed(
        environ={ws.ALLOW_RISKY_ENV: "0"}, run_job_variables={}
    )
    # Set where the worker starts, or in the deployment's job variables (prefect.yaml).
    assert pipeline.risky_overrides_allowed(environ=allow, run_job_variables=None)
    assert pipeline.risky_overrides_allowed(
        environ=allow, run_job_variables={"env": {"OTHER": "x"}}
    )
    # Whoever starts a run may pass job variables of their own: those do not count.
    per_run = [{"env": {ws.ALLOW_RISKY_ENV: "1"}}, {f"env.{ws.ALLOW_RISKY_ENV}": "1"}]
    for job_variables in per_run:
        assert not pipeline.risky_overrides_allowed(environ=allow, run_job_variables=job_variables)


def test_the_flow_takes_no_parameter_that_would_allow_them():
    import inspect

    names = inspect.signature(pipeline.qlora_pipeline.fn).parameters
    assert not [n for n in names if "allow" in n or "risk" in n]


def test_a_deployments_run_keeps_to_the_deployments_repository_and_registry():
    """repo_dir would run another repository's dvc.yaml on the worker; registry_dir would
    write a registry anywhere. A deployment's run may only use the deployment's own."""
    own = {"only_if_changed": True}
    assert pipeline.refused_places({"repo_dir": None, "registry_dir": None}, own) == []
    refused_ = pipeline.refused_places({"repo_dir": "/srv/other", "registry_dir": None}, own)
    assert len(refused_) == 1 and "repo_dir='/srv/other'" in refused_[0]
    assert len(pipeline.refused_places({"repo_dir": None, "registry_dir": "/x"}, own)) == 1
    pinned = {"repo_dir": "/srv/qlora"}
    assert pipeline.refused_places({"repo_dir": "/srv/qlora", "registry_dir": None}, pinned) == []
    # Not started by a deployment: the machine's own user, who may point it anywhere.
    assert pipeline.refused_places({"repo_dir": "/srv/other", "registry_dir": "/x"}, None) == []


def test_a_check_can_be_turned_off_by_override(project):
    """DVC writes `off` unquoted; to PyYAML (YAML 1.1) that is the boolean false."""
    ws.apply_param_overrides(project, ["validate.checks.pii=off"])
    assert "pii: off" in (project / "params.yaml").read_text()
    assert load_params(project / "params.yaml").validate_.checks.pii == "off"


def test_an_override_keeps_the_mode_of_params_yaml(project):
    (project / "params.yaml").chmod(0o600)
    ws.apply_param_overrides(project, ["finetune.learning_rate=1e-4"])
    assert (project / "params.yaml").stat().st_mode & 0o777 == 0o600
