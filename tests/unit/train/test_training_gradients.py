"""QLoRA gradients against ground truth: a fresh model's, on the same batch.

bitsandbytes repacks 4-bit weights for CPU inference after a no-grad eval-mode forward on
CPUs with AVX512-BF16, and the repacked path has no autograd (qlora/models/loading.py,
keep_4bit_layout_trainable). The Trainer's step-0 validation loss is such a forward, so the
tests below run one before the training step and compare the LoRA gradients with those of
a model that never ran it. Both CPU paths run on every machine (tests/helpers/avx512bf16.py): on a
CPU without AVX512-BF16, bitsandbytes is made to believe the CPU has it, so the same
repacking code runs (only the final kernel differs), which is the state the guard must keep
the model out of.
"""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch

from helpers.avx512bf16 import is_repacked
from helpers.tiny import make_tiny_model_dir, tiny_params
from qlora.core.params import Params
from qlora.data.chat_template import encode, render
from qlora.models.loading import load_quantized, load_tokenizer
from qlora.train import recipe

pytestmark = pytest.mark.cpu_paths


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def base_dir(request, tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp(request.param), arch=request.param)


def params_for(base_dir) -> Params:
    return Params.model_validate(tiny_params(base_dir))


def batch(base_dir) -> dict[str, torch.Tensor]:
    tok = load_tokenizer(base_dir)
    rows = []
    for i in range(3):
        messages = [
            {"role": "user", "content": f"Summarise function number {i} in one line."},
            {"role": "assistant", "content": f"Return the value {i} plus the offset."},
        ]
        rows.append(encode(tok, *render(tok, messages), max_length=128))
    width = max(len(r["input_ids"]) for r in rows)
    pad = tok.pad_token_id
    ids = [r["input_ids"] + [pad] * (width - len(r["input_ids"])) for r in rows]
    labels = [r["labels"] + [-100] * (width - len(r["labels"])) for r in rows]
    mask = [[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in rows]
    return {
        "input_ids": torch.tensor(ids),
        "labels": torch.tensor(labels),
        "attention_mask": torch.tensor(mask),
    }


def lora_gradients(model, inputs) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad()
    torch.manual_seed(0)  # the same LoRA dropout masks in every model
    model(**inputs).loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    return grads


def no_grad_evaluation(model, inputs) -> None:
    """What Trainer.evaluate does to the model: eval mode, no grad, a forward pass."""
    model.eval()
    with torch.no_grad():
        model(**inputs)


def test_lora_gradients_after_an_evaluation_equal_a_fresh_models(base_dir):
    params, inputs = params_for(base_dir), batch(base_dir)
    expected = lora_gradients(recipe.lora_model(params, False, base_dir)[0], inputs)

    model, _ = recipe.lora_model(params, False, base_dir)
    no_grad_evaluation(model, inputs)
    got = lora_gradients(model, inputs)

    assert got.keys() == expected.keys()
    worst = max(
        float((got[n] - expected[n]).norm() / expected[n].norm().clamp_min(1e-12)) for n in expected
    )
    assert worst < 1e-5, f"LoRA gradients differ from a fresh model's by {worst:.1%} (rel. norm)"


def test_the_training_models_4bit_layers_never_switch_to_the_packed_layout(base_dir):
    params, inputs = params_for(base_dir), batch(base_dir)
    model, _ = recipe.lora_model(params, False, base_dir)
    no_grad_evaluation(model, inputs)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers, "the training model has no 4-bit layers"
    packed = [m for m in layers if is_repacked(m)]
    assert not packed, f"{len(packed)} of {len(layers)} 4-bit layers were repacked for inference"


def test_an_inference_model_keeps_the_fast_path(base_dir, bnb_cpu_path):
    """Evaluation only infers: there the repacking is wanted (it is bitsandbytes' fast CPU
    kernel), so the guard must not be applied to models built for evaluate."""
    params, inputs = params_for(base_dir), batch(base_dir)
    model = load_quantized(params.quantize, base_dir)
    with torch.no_grad():
        model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(is_repacked(m) == (bnb_cpu_path == "avx512bf16") for m in layers)
