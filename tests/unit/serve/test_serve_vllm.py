"""`qlora serve --engine vllm`: the `vllm serve` command for the base + adapter, an argv
list checked before it is printed or run."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qlora.cli import app
from qlora.core.io import StageError
from qlora.serve.vllm import adapter_rank, lora_rank_limit, vllm_command


def adapter(folder: Path, **config) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": 16, **config}))
    return folder


def base(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text("{}")
    return folder


def test_the_command_serves_the_adapter_under_its_name_on_the_base(tmp_path):
    # A path a shell would split or run: it stays one argument.
    odd = tmp_path / "my models; rm -rf x"
    argv = vllm_command(
        base(odd / "base"), adapter(odd / "adapter", r=8), "qlora-v3", "127.0.0.1", 8001
    )
    assert argv == [
        "vllm", "serve", str(odd / "base"),
        "--host", "127.0.0.1",
        "--port", "8001",
        "--enable-lora",
        "--lora-modules", f"qlora-v3={odd / 'adapter'}",
        "--max-loras", "1",
        "--max-lora-rank", "8",
    ]  # fmt: skip
    assert shlex.split(shlex.join(argv)) == argv


@pytest.mark.parametrize(
    ("rank", "asked", "limit"), [(4, None, 8), (8, None, 8), (9, None, 16), (200, None, 256),
                                 (16, 64, 64), (1, None, 1)]
)  # fmt: skip
def test_max_lora_rank_is_the_smallest_vllm_value_that_holds_the_adapter(rank, asked, limit):
    assert lora_rank_limit(rank, asked) == limit


def test_the_largest_rank_of_a_rank_pattern_counts(tmp_path):
    folder = adapter(tmp_path / "a", r=8, rank_pattern={"q_proj": 32, "v_proj": 4})
    assert adapter_rank(folder) == 32


@pytest.mark.parametrize(
    ("config", "problem"),
    [
        ({"use_dora": True}, "DoRA"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save ['lm_head']"),
        ({"r": "16"}, "no integer rank"),
    ],
)
def test_an_adapter_vllm_cannot_load_is_refused_saying_why(tmp_path, config, problem):
    folder = adapter(tmp_path / "a", **config)
    with pytest.raises(StageError, match=re.escape(problem)):
        vllm_command(base(tmp_path / "b"), folder, "m", "127.0.0.1", 8000)


def test_missing_files_and_a_rank_too_small_are_refused(tmp_path):
    b, a = base(tmp_path / "b"), adapter(tmp_path / "a", r=32)
    with pytest.raises(StageError, match="below the adapter's rank 32"):
        vllm_command(b, a, "m", "127.0.0.1", 8000, max_lora_rank=16)
    with pytest.raises(StageError, match="vLLM accepts"):
        vllm_command(b, a, "m", "127.0.0.1", 8000, max_lora_rank=48)
    with pytest.raises(StageError, match="no base model"):
        vllm_command(tmp_path / "nowhere", a, "m", "127.0.0.1", 8000)
    with pytest.raises(StageError, match="not a peft adapter"):
        vllm_command(b, tmp_path / "nowhere", "m", "127.0.0.1", 8000)
    with pytest.raises(StageError, match="without '='"):
        vllm_command(b, a, "a=b", "127.0.0.1", 8000)


def project(root: Path) -> Path:
    """The folders `qlora serve` reads in a project: params, the base, the adapter."""
    from helpers.repo import REPO

    (root / "params.yaml").write_text((REPO / "params.yaml").read_text())
    base(root / "data/prepared/base_model")
    adapter(root / "data/prepared/adapter", r=16)
    return root


def test_print_command_prints_the_checked_command_for_the_adapter_just_trained(
    tmp_path, monkeypatch
):
    monkeypatch.chdir(project(tmp_path))
    done = CliRunner().invoke(
        app,
        ["serve", "--engine", "vllm", "--print-command", "--port", "8123", "--vllm-arg",
         "--gpu-memory-utilization=0.8"],
    )  # fmt: skip
    assert done.exit_code == 0, done.output
    argv = shlex.split(done.output.strip().splitlines()[-1])
    adapter_dir = (tmp_path / "data/prepared/adapter").resolve()
    assert argv[:3] == ["vllm", "serve", str((tmp_path / "data/prepared/base_model").resolve())]
    assert f"qlora-current={adapter_dir}" in argv and argv[-1] == "--gpu-memory-utilization=0.8"
    assert argv[argv.index("--max-lora-rank") + 1] == "16"


def test_without_vllm_installed_the_command_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.chdir(project(tmp_path))
    monkeypatch.setattr("qlora.serve.vllm.vllm_available", lambda: False)
    ran = []
    monkeypatch.setattr("os.execvp", lambda *a: ran.append(a))
    done = CliRunner().invoke(app, ["serve", "--engine", "vllm"])
    assert done.exit_code == 1 and "pip install vllm" in done.output and not ran


def test_bad_engine_choices_are_refused_before_anything_loads(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    done = runner.invoke(app, ["serve", "--engine", "onnx"])
    assert done.exit_code == 1 and "one of llama.cpp, transformers, vllm" in done.output
    # Without --gguf: the last run's deployable artifact, and there has been no run here.
    done = runner.invoke(app, ["serve", "--engine", "llama.cpp"])
    assert done.exit_code == 1 and "parity.json: not found" in done.output
    done = runner.invoke(app, ["serve", "v1", "--gguf", "model.gguf"])
    assert done.exit_code == 1 and "give no VERSION" in done.output
    done = runner.invoke(app, ["serve", "--gguf", "missing.gguf"])
    assert done.exit_code == 1 and "missing.gguf: no such GGUF file" in done.output
