"""LoftQ calibration against ground truth: the Eckart-Young bound of the quantization
error, measured on what the loaded layers compute (forward passes), with the full-precision
weights loaded independently; and a real (tiny) int8 + LoftQ training run. On both of
bitsandbytes' CPU paths (tests/helpers/avx512bf16.py)."""

from __future__ import annotations

import json

import bitsandbytes.functional as bnbf
import pytest
import torch
import yaml
from peft import LoraConfig, get_peft_model

from helpers.avx512bf16 import is_repacked, weight_before_repacking
from qlora.core.io import StageError
from qlora.core.params import shipped_params
from qlora.models.loading import load_full, load_quantized
from qlora.quant import calibration
from qlora.quant.formats import layer_weight
from stages import finetune

pytestmark = pytest.mark.cpu_paths

LAYER = "model.layers.0.mlp.down_proj"  # 64 x 128


def eckart_young(residual: torch.Tensor, rank: int) -> float:
    """||R - R_r||: the root of the squares of R's singular values past the r-th."""
    return torch.linalg.svdvals(residual.double())[rank:].pow(2).sum().sqrt().item()


@pytest.mark.parametrize("scaling", [1.0, 2.0])
def test_the_scaled_correction_is_the_best_rank_r_approximation(scaling):
    residual = torch.randn(48, 96, generator=torch.Generator().manual_seed(4)) * 0.01
    lora_a, lora_b = calibration.low_rank_correction(residual, rank=6, scaling=scaling)
    assert lora_a.shape == (6, 96) and lora_b.shape == (48, 6)
    left = residual - scaling * (lora_b @ lora_a)
    assert left.double().norm().item() == pytest.approx(eckart_young(residual, 6), rel=1e-4)
    # Balanced factors: A's and B's norms are equal.
    assert lora_a.norm().item() == pytest.approx(lora_b.norm().item(), rel=1e-4)


def effective_weight(layer: torch.nn.Module, in_features: int) -> torch.Tensor:
    """The weight a layer computes with while it trains, read from its forward pass on the
    identity. The input asks for gradients, as training's do: a no-grad forward would repack
    a 4-bit layer for bf16 inference on an AVX512-BF16 CPU, and read the bf16 kernel's
    rounding (about 2^-9 of each weight) instead of the weight LoftQ corrects."""
    return layer(torch.eye(in_features).requires_grad_()).T.detach().double()


@pytest.mark.parametrize("quant_type", ["nf4", "int8"])
def test_loftq_adapters_bring_each_layer_to_the_eckart_young_bound(tiny_model_dir, quant_type):
    q = shipped_params().quantize.model_copy(update={"quant_type": quant_type})
    full = load_full(tiny_model_dir, "float32")  # the independent full-precision load
    model = get_peft_model(
        load_quantized(q, tiny_model_dir),
        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
    )
    lora = model.get_submodule(f"base_model.model.{LAYER}")
    weight = full.get_submodule(LAYER).weight.detach().double()
    quantized = effective_weight(lora.get_base_layer(), 128)
    before = (weight - quantized).norm().item()
    assert effective_weight(lora, 128) == pytest.approx(quantized)  # peft's B = 0: a no-op

    record = calibration.initialise(model, tiny_model_dir)

    after = (weight - effective_weight(lora, 128)).norm().item()
    # LLM.int8() rounds its inputs to fp16 and int8 on the way in: a looser tolerance.
    tolerance = 1e-3 if quant_type == "nf4" else 2e-2
    assert after == pytest.approx(eckart_young(weight - quantized, 4), rel=tolerance)
    assert after < before
    assert record["method"] == "loftq" and record["layers"] == 14
    assert record["error_after"] < record["error_before"]
    if quant_type == "int8":
        return  # its logits' error is the int8 rounding of the activations, not the weights'
    # The whole model: its logits move towards the full-precision model's.
    ids = torch.arange(3, 40).unsqueeze(0)
    with torch.no_grad():
        target = full(input_ids=ids).logits
        gap = (model(input_ids=ids).logits - target).norm().item()
        with model.disable_adapter():
            plain = (model(input_ids=ids).logits - target).norm().item()
    assert gap < plain


def test_the_quantize_stage_measure_matches_the_bound(tiny_model_dir):
    full = load_full(tiny_model_dir, "float32")
    result = calibration.loftq_errors(full, "nf4", True, rank=4, scaling=2.0, every=5)
    rows = result["layers"]
    assert [r["name"] for r in rows] == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.mlp.up_proj",
        "model.layers.1.self_attn.o_proj",
    ]
    q = shipped_params().quantize
    quantized = load_quantized(q, tiny_model_dir)
    for row in rows:
        weight = full.get_submodule(row["name"]).weight.detach().double()
        residual = weight - effective_weight(quantized.get_submodule(row["name"]), weight.shape[1])
        assert row["error_before"] == pytest.approx(
            (residual.norm() / weight.norm()).item(), rel=1e-4
        )
        expected = eckart_young(residual, 4) / weight.norm().item()
        assert row["error_after"] == pytest.approx(expected, rel=1e-3)
    summary = result["summary"]
    assert summary["layers"] == 3 and summary["rank"] == 4
    assert summary["reduction"] == pytest.approx(
        1 - summary["error_after"] / summary["error_before"]
    )


def test_loftq_corrects_a_layer_repacked_for_inference(tiny_model_dir, bnb_cpu_path):
    """A model that has already run an inference forward (evaluate's, a notebook's) holds its
    4-bit layers repacked on an AVX512-BF16 CPU. LoftQ must correct what such a layer
    computes with: its codes at its bf16 scales, taken here from an independent load that
    never ran a forward."""
    q = shipped_params().quantize
    lora_config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    model = get_peft_model(load_quantized(q, tiny_model_dir), lora_config)
    model.eval()
    with torch.no_grad():
        model(input_ids=torch.arange(3, 20).unsqueeze(0))
    lora = model.get_submodule(f"base_model.model.{LAYER}")
    assert is_repacked(lora.get_base_layer()) == (bnb_cpu_path == "avx512bf16")

    calibration.initialise(model, tiny_model_dir)

    untouched = load_quantized(q, tiny_model_dir).get_submodule(LAYER).weight
    if bnb_cpu_path == "avx512bf16":
        computed = weight_before_repacking(untouched.data, untouched.quant_state)
    else:
        computed = bnbf.dequantize_4bit(untouched.data, untouched.quant_state).float()
    weight = load_full(tiny_model_dir, "float32").get_submodule(LAYER).weight.detach()
    residual = (weight - computed).double()
    correction = lora.scaling["default"] * (
        lora.lora_B["default"].weight @ lora.lora_A["default"].weight
    )
    left = (residual - correction.double()).norm().item()
    assert left == pytest.approx(eckart_young(residual, 4), rel=1e-4)


def test_a_repacked_layer_reads_as_its_codes_at_its_bf16_scales(tiny_model_dir, bnb_cpu_path):
    """formats.layer_weight on a layer before and after an inference forward, against
    the weight recomputed from an independent load's plain storage; the layer keeps its
    layout (reading it changes nothing)."""
    q = shipped_params().quantize
    layer = load_quantized(q, tiny_model_dir).get_submodule(LAYER)
    untouched = load_quantized(q, tiny_model_dir).get_submodule(LAYER).weight
    plain = bnbf.dequantize_4bit(untouched.data, untouched.quant_state).float()
    assert torch.equal(layer_weight(layer), plain)

    layer.eval()
    x = torch.randn(2, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = layer(x)
    if bnb_cpu_path == "plain":
        assert not is_repacked(layer) and torch.equal(layer_weight(layer), plain)
        return
    assert is_repacked(layer)
    read = layer_weight(layer)
    assert torch.equal(read, weight_before_repacking(untouched.data, untouched.quant_state))
    # bf16 keeps 8 significant bits of each block's scale: no weight moves by more.
    assert ((read - plain).abs() <= plain.abs() * 2**-8).all()
    assert is_repacked(layer)
    with torch.no_grad():
        assert torch.equal(layer(x), y)


def test_loftq_needs_the_bases_weights_by_name(tiny_model_dir, tmp_path):
    weights = calibration.CheckpointWeights(tiny_model_dir)
    with pytest.raises(StageError, match=r"no tensor 'model.nothing.weight'"):
        weights["model.nothing.weight"]
    with pytest.raises(StageError, match="no model.safetensors"):
        calibration.CheckpointWeights(tmp_path)


def test_finetune_in_int8_with_loftq(workspace):
    """The int8 format and LoftQ through the real stage: it trains, and run.json says how
    the adapters started."""
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    params["quantize"]["quant_type"] = "int8"
    params["finetune"]["lora"]["init"] = "loftq"
    (workspace / "params.yaml").write_text(yaml.safe_dump(params))
    finetune.main()
    run = json.loads((workspace / "reports/train/run.json").read_text())
    init = run["lora_init"]
    assert init["method"] == "loftq" and init["layers"] == 14
    assert 0 < init["error_after"] < init["error_before"] < 0.02  # int8: ~1 % error
    adapter = workspace / "data/prepared/adapter"
    assert (adapter / "adapter_model.safetensors").is_file()

    # Evaluation loads it the way an independent plain transformers + peft int8 load does.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from qlora.core.params import load_params
    from qlora.models.loading import load_adapted

    base = workspace / "data/prepared/base_model"
    ours = load_adapted(load_params().quantize, adapter, base)
    plain = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(
            base, quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map="cpu"
        ),
        adapter,
    ).eval()
    ids = torch.arange(3, 30).unsqueeze(0)
    with torch.no_grad():
        assert torch.allclose(ours(input_ids=ids).logits, plain(input_ids=ids).logits, atol=1e-5)
