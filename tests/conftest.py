"""Shared fixtures: a tiny Llama with a real BPE tokenizer and chat template, made here.

Tests never need a model hub or the embedded model: the tokenizer is trained in a second
on text that ships with Python, the model is randomly initialised from a config.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

REPO = Path(__file__).resolve().parents[1]

# SmolLM2's template (ChatML with a default system turn): the embedded model's own.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@pytest.fixture(scope="session", autouse=True)
def fp32_compute_on_every_cpu() -> Iterator[None]:
    """`quantize.compute_dtype: auto` computes in bf16 on CPUs with bf16 units. The numerical
    tests compare against fp32 references at fp32 tolerances, so in this process every CPU
    answers torch's bf16-unit checks with no, and auto means float32 as on a CPU without
    them (tiny_params pins float32 for the stages the tests run as subprocesses).
    tests/test_compute_dtype.py sets the checks itself to test the choice both ways."""
    import torch

    from qlora.models.loading import CPU_BF16_UNITS

    with pytest.MonkeyPatch.context() as patch:
        for check in CPU_BF16_UNITS.values():
            if hasattr(torch.cpu, check):
                patch.setattr(torch.cpu, check, lambda: False)
        yield


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests marked `cpu_paths` (those that quantize, calibrate, evaluate or export) run on
    both of bitsandbytes' 4-bit CPU paths, one native and one simulated (tests/avx512bf16.py).
    Module scope, so a module's expensive fixtures are built once per path."""
    if metafunc.definition.get_closest_marker("cpu_paths") is not None:
        from avx512bf16 import PATHS

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
    from avx512bf16 import cpu_path

    with cpu_path(path):
        yield path


def make_tokenizer(vocab_size: int = 600):
    """A byte-level BPE tokenizer trained on stdlib docstrings: real merges, any text encodes."""
    import pydoc_data.topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(list(pydoc_data.topics.topics.values())[:30], trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


# The linear layers of make_tiny_model_dir's Llama, one decoder layer: q, k, v, o (hidden
# 64, 2 key/value heads of 16), gate, up, down (MLP 128).
TINY_LINEAR_SHAPES = [(64, 64), (32, 64), (32, 64), (64, 64), (128, 64), (128, 64), (64, 128)]


def make_tiny_model_dir(
    path: Path, seed: int = 0, arch: str = "llama", tie_word_embeddings: bool = True
) -> Path:
    """Save a tiny random model (2 layers, hidden 64) and its tokenizer as a HF directory.

    arch "llama": LlamaForCausalLM, no biases. arch "qwen2": Qwen2ForCausalLM, whose q/k/v
    projections carry a bias (the shape that broke training on AVX512-BF16 CPUs)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_cls, model_cls = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    }[arch]
    tokenizer = make_tokenizer()
    torch.manual_seed(seed)
    config = config_cls(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=tie_word_embeddings,
    )
    model_cls(config).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama + BPE tokenizer with a chat template, saved once per session."""
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny_model"))


def alpaca_rows(n: int = 40, groups: int = 8) -> list[dict]:
    """Small but real-looking Alpaca records: functions and their docstring summaries."""
    verbs = ["Return", "Compute", "Parse", "Format", "Check", "Build", "Read", "Write"]
    nouns = ["path", "header", "token", "record", "message", "value", "buffer", "name"]
    rows = []
    for i in range(n):
        verb, noun = verbs[i % len(verbs)], nouns[(i * 3) % len(nouns)]
        rows.append(
            {
                "instruction": "Write the one-line docstring summary for this Python function.",
                "input": f"def {verb.lower()}_{noun}_{i}(x):\n    return x + {i}\n",
                "output": f"{verb} the {noun} number {i}.",
                "module": f"mod{i % groups}",
            }
        )
    return rows


def tiny_params(model_dir: Path | None = None, source: str = "data/raw/train.jsonl") -> dict:
    """params.yaml shrunk for tests: a few rows, a few steps, tiny eval."""
    import yaml

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    if model_dir is not None:
        params["base"]["source"] = str(model_dir)
    params["dataset"].update(
        source=source,
        max_rows={"train": 24, "validation": 8, "test": 8},
        max_length=256,
        guard_documents=2,
        guard_chars=300,
        validation_fraction=0.2,
        test_fraction=0.2,
    )
    params["validate"]["min_rows"] = {"train": 4, "validation": 2, "test": 2}
    params["finetune"].update(max_steps=3, batch_size=4, eval_steps=2, logging_steps=1)
    # The numerical tests compare against fp32 references at fp32 tolerances, on every CPU:
    # `auto` would compute in bf16 where the CPU has bf16 units (tests/test_compute_dtype.py
    # covers that choice).
    params["quantize"]["compute_dtype"] = "float32"
    params["evaluate"].update(
        limit=8, examples=2, max_new_tokens=8, batch_size=4, speed_prompts=2, speed_new_tokens=6
    )
    return params


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


def gate_params(**values):
    """A gate section for tests on hand-made metrics: these thresholds unless given
    (params.yaml's are tuned for the default run; the schema has no defaults)."""
    from qlora.core.params import GateParams

    rules = {
        "primary": {"task": "docstring_loss", "metric": "bits_per_byte"},
        "min_gain": 0.0,
        "max_regression": 0.05,
        "max_regression_per_metric": {},
        "significance": True,
        "champion": {"min_gain": 0.0, "max_regression": 0.05, "significance": False},
    }
    return GateParams.model_validate({**rules, **values})


def git(cwd: Path, *args: str) -> str:
    """Run git in `cwd` (with a committer identity, which a CI machine may lack); stdout."""
    return subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
        cwd=cwd,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
