"""Tiny models, data and params made inside the tests: a tiny random Llama with a real BPE
tokenizer and chat template, Alpaca rows, params.yaml shrunk to seconds. Tests never need
a model hub or the embedded model."""

from __future__ import annotations

from pathlib import Path

from helpers.repo import REPO

# SmolLM2's template (ChatML with a default system turn): the embedded model's own.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


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


def make_adapter(base_dir: Path, out: Path, scale: float = 1.0) -> Path:
    """A real LoRA adapter on the tiny Llama, randomly initialised on both sides so that it
    changes the outputs (a fresh one, B = 0, would be invisible to the export check); B
    times `scale` (< 1: a weaker adapter)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from qlora.core.io import weights_identity, write_json

    model = AutoModelForCausalLM.from_pretrained(str(base_dir))
    config = LoraConfig(
        r=4,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj", "down_proj"],
        init_lora_weights=False,
    )
    model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(scale)
    model.save_pretrained(str(out))
    write_json(out / "base_identity.json", {"weights_sha256": weights_identity(base_dir)})
    return out


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
    # `auto` would compute in bf16 where the CPU has bf16 units
    # (tests/unit/models/test_compute_dtype.py covers that choice).
    params["quantize"]["compute_dtype"] = "float32"
    params["evaluate"].update(
        limit=8, examples=2, max_new_tokens=8, batch_size=4, speed_prompts=2, speed_new_tokens=6
    )
    # The tiny tokenizer is byte-level BPE with GPT-2's pre-tokenizer, a tokenizer llama.cpp's
    # converter cannot recognise by its hash (its table knows released models' only).
    # One quantized type and no LoRA route: every converter run is a Python process that
    # imports torch, and the DAG runs many times in the suite. The Qwen2 DAG test exports
    # every kind the shipped params.yaml does.
    params["export"].update(
        pre_tokenizer="gpt-2", n_ctx=512, speed_repeats=1, gguf_types=["q4_k_m"], lora=False
    )
    return params


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
