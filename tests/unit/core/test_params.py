"""params.yaml is checked once, by one schema, and a bad value names its key."""

from __future__ import annotations

import pytest
import yaml
from pydantic import BaseModel

from helpers.repo import REPO
from qlora.core.params import Params, ParamsError, load_params, shipped_params


def test_shipped_params_file_is_valid():
    params = load_params(REPO / "params.yaml")
    assert params.quantize.quant_type == "nf4" and params.quantize.double_quant
    assert params.finetune.learning_rate == pytest.approx(2e-4)
    assert params.gate.primary.task in params.evaluate.tasks


def write(tmp_path, mutate) -> str:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    mutate(raw)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda p: p["finetune"]["lora"].update(r=0), "finetune.lora.r = 0"),
        (lambda p: p["finetune"].update(learning_rate="fast"), "finetune.learning_rate = 'fast'"),
        (lambda p: p["finetune"].update(lr=1e-4), "finetune.lr"),
        (lambda p: p["quantize"].update(quant_type="int3"), "quantize.quant_type = 'int3'"),
        (lambda p: p["dataset"].update(test_fraction=0.9), "dataset.test_fraction = 0.9"),
        (lambda p: p["finetune"]["lora"].update(target_modules=[]), "target_modules"),
        (lambda p: p["gate"]["primary"].update(task="nope"), "gate.primary.task: 'nope'"),
        (lambda p: p.pop("base"), "base"),
    ],
    ids=[
        "range",
        "type",
        "unknown-key",
        "choice",
        "fraction",
        "empty-targets",
        "gate-task",
        "missing-section",
    ],
)
def test_bad_value_is_rejected_naming_the_key(tmp_path, mutate, expected):
    with pytest.raises(ParamsError) as err:
        load_params(write(tmp_path, mutate))
    assert expected in str(err.value)


def test_missing_and_broken_files_are_named(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("base: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(tmp_path / "params.yaml")


def _fields(model: type[BaseModel], prefix: str = ""):
    for name, info in model.model_fields.items():
        key = f"{prefix}{info.alias or name}"
        yield key, info
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from _fields(annotation, f"{key}.")


def test_params_yaml_is_the_only_source_of_values():
    """A default in the schema would be a second source that drifts from params.yaml (it
    did: gate.min_gain 0.0 vs 0.02, dataset.max_length 512 vs 320)."""
    with_defaults = [key for key, info in _fields(Params) if not info.is_required()]
    assert not with_defaults, f"schema fields with a default in code: {with_defaults}"


def test_a_missing_key_is_named_not_filled_in(tmp_path):
    with pytest.raises(ParamsError, match="gate.min_gain"):
        load_params(write(tmp_path, lambda p: p["gate"].pop("min_gain")))


def test_outside_a_project_the_shipped_params_yaml_gives_the_values(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no params.yaml here
    shipped = shipped_params()
    assert shipped == load_params(REPO / "params.yaml")
    assert (
        shipped.dataset.max_length
        == yaml.safe_load((REPO / "params.yaml").read_text())["dataset"]["max_length"]
    )
