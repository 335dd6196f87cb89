"""The lean training path against ground truth: the chunked loss against the model's own
loss and gradients, a packed batch against each row run alone, the lean preparation's
dtypes, and gradient checkpointing's `auto` rule."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from helpers.tiny import make_tiny_model_dir
from qlora.core.io import StageError
from qlora.core.params import shipped_params
from qlora.models.loading import load_tokenizer
from qlora.train import loss as chunked
from qlora.train import recipe
from qlora.train.batching import batch_plan


@pytest.fixture(scope="module", params=["llama", "qwen2-untied"])
def model_dir(request, tmp_path_factory):
    arch, untied = request.param.partition("-")[::2]
    return make_tiny_model_dir(
        tmp_path_factory.mktemp(request.param), seed=3, arch=arch, tie_word_embeddings=not untied
    )


def fresh(model_dir) -> nn.Module:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    return model


def rows(count: int = 3, vocab: int = 200) -> list[dict]:
    """Rows of unequal lengths with their prompts masked, as chat.encode makes them."""
    g = torch.Generator().manual_seed(0)
    out = []
    for length, prompt in zip((17, 9, 23, 12)[:count], (6, 4, 10, 5), strict=False):
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def padded(batch_rows: list[dict], tokenizer) -> dict[str, torch.Tensor]:
    return batch_plan("padded", tokenizer).collator(copy.deepcopy(batch_rows))


def grads(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def test_the_chunked_loss_and_its_gradients_equal_the_models_own(model_dir, monkeypatch):
    # Two positions a chunk, so the rows span many chunks and chunk edges are crossed.
    monkeypatch.setattr(chunked, "CHUNK_BYTES", 2 * 4 * 256)
    reference, model = fresh(model_dir), fresh(model_dir)
    assert chunked.unsupported_reason(model) is None
    chunked.use_chunked_loss(model)
    inputs = padded(rows(), load_tokenizer(model_dir))
    for m in (reference, model):  # every weight trainable: embeddings and head get gradients
        m(**inputs).loss.backward()
    expected = reference(**inputs).loss
    got = model(**inputs)
    assert got.logits is None, "the full logits were computed"
    assert got.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert relative(grads(model), grads(reference)) < 1e-5
    with torch.no_grad():  # evaluation: the same value, no gradient work
        assert model(**inputs).loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_the_chunked_loss_divides_by_the_trainers_token_count(model_dir):
    """Under gradient accumulation the Trainer passes the token count of all accumulated
    batches: the loss is a sum over this batch divided by that count, as the model's own."""
    reference, model = fresh(model_dir), fresh(model_dir)
    chunked.use_chunked_loss(model)
    inputs = padded(rows(), load_tokenizer(model_dir))
    expected = reference(**inputs, num_items_in_batch=100).loss
    assert model(**inputs, num_items_in_batch=100).loss.item() == pytest.approx(
        expected.item(), rel=1e-5
    )


def test_models_the_chunked_loss_cannot_stand_in_for_are_named(model_dir):
    model = fresh(model_dir)
    model.config.final_logit_softcapping = 30.0
    assert "final_logit_softcapping=30.0" in chunked.unsupported_reason(model)
    with pytest.raises(StageError, match="finetune.loss=chunked does not fit this model"):
        recipe.resolve_loss("chunked", model)
    assert recipe.resolve_loss("auto", model)[0] == "standard"
    model.config.final_logit_softcapping = None
    model.lm_head = nn.Sequential(model.lm_head)  # anything but a plain Linear
    assert "not a plain Linear" in chunked.unsupported_reason(model)


def test_a_packed_batch_trains_each_row_as_if_it_were_alone(model_dir):
    """Ground truth: each row through its own forward pass. A packed batch must give the
    same token losses (no row attends to another, none predicts the next row's first
    token) and so the same gradients."""
    tokenizer, batch_rows = load_tokenizer(model_dir), rows(4)
    alone = fresh(model_dir)
    total = sum(sum(label != -100 for label in r["labels"][1:]) for r in batch_rows)
    # Each row's loss summed over its tokens, divided by the batch's token count: the mean.
    expected = sum(
        alone(**padded([r], tokenizer), num_items_in_batch=total).loss for r in batch_rows
    )
    expected.backward()
    packed_model = fresh(model_dir)
    chunked.use_chunked_loss(packed_model)
    packed = batch_plan("packed", tokenizer).collator(copy.deepcopy(batch_rows))
    assert packed["input_ids"].shape == (1, sum(len(r["input_ids"]) for r in batch_rows))
    assert "attention_mask" not in packed  # position ids alone delimit the rows
    loss = packed_model(**packed).loss
    loss.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert relative(grads(packed_model), grads(alone)) < 1e-4


def params_with(**finetune):
    params = shipped_params()
    update = params.finetune.model_copy(update=finetune)
    return params.model_copy(update={"finetune": update})


def test_the_lean_preparation_keeps_16_bit_tensors_16_bit(model_dir, monkeypatch):
    """peft's prepare_model_for_kbit_training would make embeddings, head and norms fp32;
    here only the LoRA weights are fp32 (peft keeps adapters in fp32 for stable updates)."""
    params = params_with(gradient_checkpointing=False)
    params.quantize.compute_dtype = "bfloat16"
    model, plan = recipe.lora_model(params, False, model_dir)
    widened = [
        name
        for name, p in model.named_parameters()
        if p.dtype == torch.float32 and "lora_" not in name
    ]
    assert not widened, f"upcast to fp32: {widened}"
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)
    assert plan.loss == "chunked" and plan.checkpointing is False


def test_checkpointing_auto_keeps_a_batchs_activations_within_the_weights(model_dir, monkeypatch):
    params = params_with(gradient_checkpointing="auto")
    model = fresh(model_dir)
    need = recipe.activation_bytes(
        model.config, params.finetune.batch_size * params.dataset.max_length, 4
    )
    monkeypatch.setattr(recipe, "available_memory_bytes", lambda: 100 * need)
    for weights in (need, 2 * need, need * 3 // 4, need * 2 // 3, need // 2, need // 10):
        monkeypatch.setattr(recipe, "footprint_bytes", lambda m, w=weights: w)
        every, why = recipe.resolve_checkpointing("auto", model, params)
        assert why.startswith("auto: ")
        if every == 0:
            assert need <= weights and "within" in why
            continue
        # Every k-th layer recomputes: (k-1)/k of the activations stay. The sparsest
        # checkpointing that keeps them within the weights, counted layer by layer.
        kept = [need * (k - 1) / k for k in range(1, 50)]
        assert kept[every - 1] <= weights and not kept[every] <= weights, (weights, every)
    monkeypatch.setattr(recipe, "footprint_bytes", lambda m: 4 * need)
    assert recipe.resolve_checkpointing("auto", model, params)[0] == 0
    monkeypatch.setattr(recipe, "available_memory_bytes", lambda: need)
    every, why = recipe.resolve_checkpointing("auto", model, params)
    assert every == 1 and "above half" in why  # scarce memory wins over big weights
    assert recipe.resolve_checkpointing(False, model, params) == (0, "set in params.yaml")
    assert recipe.resolve_checkpointing(True, model, params) == (1, "set in params.yaml")
    assert recipe.resolve_checkpointing(2, model, params) == (2, "set in params.yaml")


def test_the_shipped_default_checkpoints_the_embedded_models_shape():
    """On the default's shape (SmolLM2-135M, its 4-bit weights against a batch of the
    shipped params) auto recomputes in every layer: the memory target's choice."""
    from transformers import LlamaConfig

    params = shipped_params()
    config = LlamaConfig(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, vocab_size=49152
    )
    tokens = params.finetune.batch_size * params.dataset.max_length
    need = recipe.activation_bytes(config, tokens, 2)
    # 4-bit linears (~0.5 byte a weight) plus the 16-bit embeddings: under 0.15 GiB.
    assert recipe.checkpoint_every_for(need, int(0.15 * 2**30)) == 1


def test_activation_estimate_grows_with_tokens_layers_and_width(model_dir):
    config = fresh(model_dir).config
    base = recipe.activation_bytes(config, 100, 2)
    assert recipe.activation_bytes(config, 200, 2) == 2 * base
    wider = copy.deepcopy(config)
    wider.num_hidden_layers *= 3
    assert recipe.activation_bytes(wider, 100, 2) == 3 * base


def test_liger_is_refused_with_the_reason_where_it_cannot_run(model_dir):
    if torch.cuda.is_available():
        pytest.skip("on a GPU liger may be usable; this checks the CPU refusal")
    with pytest.raises(StageError, match="finetune.loss=liger needs a CUDA GPU"):
        recipe.resolve_loss("liger", fresh(model_dir))


def test_checkpointing_is_on_when_planned_and_leaves_the_gradients_unchanged(model_dir):
    """`auto` decides by the memory free on the machine, which no DVC input records: that is
    sound only because recomputing activations gives the same gradients, in every layer or
    in every second one. Ground truth: the same model trained without checkpointing."""
    tokenizer = load_tokenizer(model_dir)
    inputs = padded(rows(), tokenizer)
    found = {}
    for setting, every in ((False, 0), (True, 1), (2, 2)):
        model, plan = recipe.lora_model(
            params_with(gradient_checkpointing=setting), False, model_dir
        )
        assert plan.checkpoint_every == every and plan.checkpointing is (every > 0)
        assert model.is_activation_checkpointing is (every > 0)
        layers = model.base_model.model.model.layers
        assert [layer.gradient_checkpointing for layer in layers] == [
            every > 0 and i % every == 0 for i in range(len(layers))
        ]
        model.train()
        model(**inputs).loss.backward()
        found[every] = torch.cat(
            [p.grad.flatten() for n, p in model.named_parameters() if "lora_" in n]
        )
    assert relative(found[1], found[0]) < 1e-6
    assert relative(found[2], found[0]) < 1e-6
