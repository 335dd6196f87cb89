"""The GPU path: a QLoRA training run, the adapter reloaded independently, and an lm-eval
pass on model objects, on a CUDA device (bf16 compute where the GPU has it, paged AdamW,
CUDA 4-bit kernels). Run them with `pytest -m gpu` on a machine with a GPU; everything
else in the suite covers the CPU path."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from qlora.train.log_layout import training_view

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="needs a CUDA GPU: checks the GPU training and evaluation path "
        "(the CPU path is covered by the rest of the suite)",
    ),
]


@pytest.fixture
def trained(workspace):
    from stages import finetune

    finetune.main()
    return workspace


def test_qlora_trains_on_the_gpu_with_its_gpu_settings(trained):
    import bitsandbytes as bnb
    from safetensors.torch import load_file

    from qlora.core.params import load_params
    from qlora.models.loading import load_quantized

    metrics = training_view(trained / "reports/train")
    assert metrics["device"] == "cuda"
    assert metrics["optimizer"] == "paged_adamw_32bit"
    expected = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    assert metrics["compute_dtype"] == expected
    assert math.isfinite(metrics["final_eval_loss"]) and metrics["steps"] == 3
    assert metrics["peak_memory_bytes"] > 0
    weights = load_file(trained / "data/prepared/adapter/adapter_model.safetensors")
    assert any(t.abs().sum() > 0 for n, t in weights.items() if "lora_B" in n)
    base = load_quantized(load_params().quantize, trained / "data/prepared/base_model")
    layers = [m for m in base.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(m.weight.device.type == "cuda" for m in layers)


def test_the_gpu_adapter_matches_an_independent_load(trained):
    """The project's loader against plain transformers + peft, built here from the saved
    files alone: the same logits, and different from the base's (the adapter acts)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from qlora.core.params import load_params
    from qlora.models.loading import compute_dtype, load_adapted

    base_dir, adapter = trained / "data/prepared/base_model", trained / "data/prepared/adapter"
    params = load_params()
    dtype = compute_dtype(params.quantize.compute_dtype)
    plain_base = AutoModelForCausalLM.from_pretrained(
        base_dir,
        dtype=dtype,
        device_map="cuda",
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        ),
    )
    ids = torch.tensor([[1, 5, 9, 14, 3, 7, 11, 2]], device="cuda")
    with torch.no_grad():
        base_logits = plain_base(input_ids=ids).logits.float()
        plain = PeftModel.from_pretrained(plain_base, adapter).eval()
        expected = plain(input_ids=ids).logits.float()
        ours = load_adapted(params.quantize, adapter, base_dir).eval()
        got = ours(input_ids=ids).logits.float()
    assert torch.allclose(got, expected, atol=1e-3, rtol=1e-3)
    assert not torch.allclose(expected, base_logits, atol=1e-4)


def test_lm_eval_scores_the_three_variants_on_the_gpu(trained):
    pytest.importorskip("lm_eval", reason="lm-eval is not installed on this GPU machine")
    from qlora.core import paths
    from stages import eval_variant, evaluate

    shutil.rmtree(trained / "reports/eval", ignore_errors=True)
    for variant in paths.VARIANTS:
        eval_variant.main(variant)
    evaluate.main()
    metrics = json.loads((trained / "reports/eval/metrics.json").read_text())
    variants = metrics["variants"]
    assert set(variants) == {"base_full", "base_4bit", "adapter_4bit"}
    for name, entry in variants.items():
        values = [m["value"] for task in entry["metrics"].values() for m in task.values()]
        assert values and all(math.isfinite(v) for v in values), name
