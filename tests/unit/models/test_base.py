"""The base stage on local model directories: what it needs of a model, and what it says."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from helpers.tiny import CHAT_TEMPLATE, alpaca_rows, tiny_params
from qlora.core.io import StageError, write_jsonl
from stages import base, sources


@pytest.fixture
def no_template_model(tmp_path, tiny_model_dir):
    """The tiny model as a pretrained (non-chat) base: its tokenizer has no chat template."""
    model = tmp_path / "pretrained_only"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    for extra in model.glob("chat_template.j*"):
        extra.unlink()
    return model


def write_params(folder, model_dir, **base_overrides) -> None:
    """Tiny params with `model_dir` as the base, and the dataset file they name."""
    params = tiny_params(model_dir)
    params["base"].update(base_overrides)
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    write_jsonl(folder / params["dataset"]["source"], alpaca_rows())


def test_a_model_without_a_chat_template_names_the_setting(
    tmp_path, no_template_model, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path, no_template_model)
    sources.main()
    with pytest.raises(StageError, match="has no chat template.*base.chat_template"):
        base.main()
    assert not (tmp_path / "data/prepared/base_model").exists()


def test_base_chat_template_gives_such_a_model_one(tmp_path, no_template_model, monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.chdir(tmp_path)
    write_params(tmp_path, no_template_model, chat_template=CHAT_TEMPLATE)
    sources.main()
    base.main()
    saved = AutoTokenizer.from_pretrained(tmp_path / "data/prepared/base_model")
    assert saved.chat_template == CHAT_TEMPLATE
