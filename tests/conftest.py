"""Shared fixtures: a tiny Llama with a real BPE tokenizer and chat template, made here.

Tests never need a model hub or the embedded model: the tokenizer is trained in a second
on text that ships with Python, the model is randomly initialised from a config.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers.repo import REPO
from helpers.tiny import alpaca_rows, make_tiny_model_dir, tiny_params

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")


@pytest.fixture(scope="session", autouse=True)
def fp32_compute_on_every_cpu() -> Iterator[None]:
    """`quantize.compute_dtype: auto` computes in bf16 on CPUs with bf16 units. The numerical
    tests compare against fp32 references at fp32 tolerances, so in this process every CPU
    answers torch's bf16-unit checks with no, and auto means float32 as on a CPU without
    them (tiny_params pins float32 for the stages the tests run as subprocesses).
    tests/unit/models/test_compute_dtype.py sets the checks itself to test the choice both ways."""
    import torch

    from qlora.models.loading import CPU_BF16_UNITS

    with pytest.MonkeyPatch.context() as patch:
        for check in CPU_BF16_UNITS.values():
            if hasattr(torch.cpu, check):
                patch.setattr(torch.cpu, check, lambda: False)
        yield


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests marked `cpu_paths` (those that quantize, calibrate, evaluate or export) run on
    both of bitsandbytes' 4-bit CPU paths, one native and one simulated
    (tests/helpers/avx512bf16.py). Module scope, so a module's expensive fixtures are built
    once per path."""
    if metafunc.definition.get_closest_marker("cpu_paths") is not None:
        from helpers.avx512bf16 import PATHS

        metafunc.parametrize("bnb_cpu_path", PATHS, indirect=True, scope="module")


@pytest.fixture(scope="module", autouse=True)
def bnb_cpu_path(request) -> Iterator[str | None]:
    """The bitsandbytes CPU path a `cpu_paths` test runs on; None (nothing changed) for the
    others. Module fixtures that load 4-bit models must request it, so they are rebuilt on
    each path."""
    path = getattr(request, "param", None)
    if path is None:
        yield None
        return
    from helpers.avx512bf16 import cpu_path

    with cpu_path(path):
        yield path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama + BPE tokenizer with a chat template, saved once per session."""
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture
def workspace(tmp_path, tiny_model_dir, monkeypatch) -> Path:
    """A repo-shaped folder (cwd) with tiny params, the tiny model as the base and prepared
    splits made by the real dataset stage, so a stage's main() can run as in `dvc repro`."""
    import yaml

    from qlora.core.io import write_jsonl
    from stages import dataset, sources

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params(tiny_model_dir)))
    shutil.copytree(tiny_model_dir, tmp_path / "data/prepared/base_model")
    if (REPO / "data/eval_tasks").is_dir():
        shutil.copytree(REPO / "data/eval_tasks", tmp_path / "data/eval_tasks")
    write_jsonl(tmp_path / "data/raw/train.jsonl", alpaca_rows())
    sources.main()
    dataset.main()
    return tmp_path
