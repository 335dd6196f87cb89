"""NF4, FP4 and LLM.int8() side by side, layers kept in 16 bits, and a format the device
cannot run: checked against what transformers and bitsandbytes actually load."""

from __future__ import annotations

import json

import bitsandbytes as bnb
import pytest
import torch
import yaml

from helpers.tiny import TINY_LINEAR_SHAPES as LAYER
from qlora.core.io import StageError
from qlora.core.params import shipped_params
from qlora.models.loading import UnsupportedFormat, format_unsupported, load_quantized, skip_list
from qlora.quant.measure import measure

pytestmark = pytest.mark.cpu_paths

KEEP = "model.layers.1.mlp.down_proj"  # 64 x 128


def quantize_params(**changes):
    return shipped_params().quantize.model_copy(update=changes)


# The adapter LoftQ is measured for: rank 4, scaling alpha / r = 2.
LORA = shipped_params().finetune.lora.model_copy(update={"r": 4, "alpha": 8})


def sixteen_bit(model: torch.nn.Module) -> set[str]:
    return {name for name, m in model.named_modules() if type(m) is torch.nn.Linear}


@pytest.fixture(scope="module")
def measured(tiny_model_dir, bnb_cpu_path) -> tuple[dict, dict]:
    return measure(quantize_params(), LORA, tiny_model_dir)


def test_every_format_is_loaded_and_measured(measured):
    report, layers = measured
    formats = report["formats"]
    assert {f: e["supported"] for f, e in formats.items()} == {
        "nf4": True,
        "fp4": True,
        "int8": True,
    }
    # LLM.int8(): one byte a weight and one fp32 scale per output row.
    weights = sum(o * i for o, i in LAYER * 2)
    rows = sum(o for o, _ in LAYER * 2)
    assert formats["int8"]["linear_bits"] == pytest.approx((8 * weights + 32 * rows) / weights)
    assert formats["nf4"]["linear_bits"] == report["bits_per_parameter"]["nf4_linear_layers"]
    assert formats["nf4"]["bytes"] == report["bytes"]["nf4"]
    assert formats["nf4"]["bytes"] < formats["int8"]["bytes"] < report["bytes"]["full"]
    # Everything but the quantized layers is the same 16-bit bytes in both.
    extra = formats["int8"]["bytes"] - formats["nf4"]["bytes"]
    per_weight = (formats["int8"]["linear_bits"] - formats["nf4"]["linear_bits"]) / 8
    assert extra == pytest.approx(per_weight * weights, abs=1)
    errors = {f: e["error"]["mean_relative_error"] for f, e in formats.items()}
    assert errors["int8"] < errors["nf4"] < errors["fp4"]
    assert report["quant_error"]["int8"] == formats["int8"]["error"]
    # The analysis' ranking is in the per-layer file, its top names in the summary.
    names = [row["name"] for row in layers["layers"]]
    assert report["analysis"]["most_sensitive"] == names[:5]
    assert len(names) == 14 and len(layers["histogram"]["code_points"]) == 16


def test_the_suggested_skips_cost_what_16_bits_cost(measured):
    report, layers = measured
    skips = report["skip_modules"]
    assert skips["configured"] == [] and skips["configured_extra_bytes"] == 0
    top = layers["layers"][:5]
    bits = report["bits_per_parameter"]["nf4_linear_layers"]
    weights = sum(r["shape"][0] * r["shape"][1] for r in top)
    assert skips["suggested_extra_bytes"] == round(weights * (2 - bits / 8))
    squared = [(r["nf4_error"] * r["norm"]) ** 2 for r in layers["layers"]]
    assert skips["suggested_error_share"] == pytest.approx(sum(squared[:5]) / sum(squared))


def test_loftq_is_measured_at_the_adapters_rank(measured):
    report, layers = measured
    loftq = report["loftq"]
    assert (loftq["rank"], loftq["scaling"], loftq["every"]) == (4, 2.0, 4)
    assert loftq["layers"] == len(layers["loftq_layers"]) == 4  # 14 layers, every 4th
    assert 0 < loftq["error_after"] < loftq["error_before"]


@pytest.mark.parametrize("quant_type", ["nf4", "int8"])
def test_skip_modules_keep_exactly_the_named_layers_in_16_bits(tiny_model_dir, quant_type):
    """Ground truth: the module types transformers' quantizer actually left."""
    q = quantize_params(quant_type=quant_type, skip_modules=[KEEP])
    model = load_quantized(q, tiny_model_dir)
    assert sixteen_bit(model) == {KEEP, "lm_head"}  # lm_head: the model's own default
    layer = bnb.nn.Linear8bitLt if quant_type == "int8" else bnb.nn.Linear4bit
    assert sum(isinstance(m, layer) for m in model.modules()) == 14 - 1
    assert "model.layers.0.mlp.down_proj" not in sixteen_bit(model)


def test_a_skipped_layer_costs_its_16_bit_bytes(tiny_model_dir, measured):
    report, _ = measured
    q = quantize_params(skip_modules=[KEEP])
    skipped, _ = measure(q, LORA, tiny_model_dir)
    cost = skipped["skip_modules"]["configured_extra_bytes"]
    assert skipped["skip_modules"]["configured_layers"] == [KEEP]
    # Measured on the loaded models: the layer's 16-bit bytes less its 4-bit ones. The
    # estimate charges every layer the average bits per weight; double quantization's
    # 1 KB code book per layer weighs more on this 8192-weight layer than on average.
    measured_cost = skipped["bytes"]["nf4"] - report["bytes"]["nf4"]
    assert measured_cost == 64 * 128 * 2 - (64 * 128 // 2 + 128 + 256 * 4 + 4)
    assert measured_cost == pytest.approx(cost, rel=0.1)
    assert skipped["quantized_weights"] == report["quantized_weights"] - 64 * 128
    # Its error is gone from what is quantized.
    assert skipped["quant_error"]["nf4"]["layers"] == 13


def test_a_skip_name_that_catches_nothing_is_refused_with_its_name(tiny_model_dir):
    q = quantize_params(skip_modules=["model.layers.7.mlp.down_proj"])
    with pytest.raises(StageError, match=r"quantize.skip_modules: 'model.layers.7.mlp.down_proj'"):
        load_quantized(q, tiny_model_dir)


def test_a_skip_name_never_catches_a_layer_with_a_longer_number(tmp_path):
    """transformers' rule matches a key as a prefix at a module boundary or as a suffix:
    layer 1's full name must not keep layer 11 in 16 bits."""
    from transformers import LlamaConfig
    from transformers.quantizers.quantizers_utils import should_convert_module

    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=12,
        num_attention_heads=2, num_key_value_heads=1,
    )  # fmt: skip
    config.save_pretrained(tmp_path)  # the architecture is all skip_list reads
    keys = skip_list(quantize_params(skip_modules=[KEEP]), tmp_path)
    assert keys == [KEEP, "lm_head"]
    caught = [
        f"model.layers.{i}.mlp.down_proj"
        for i in range(12)
        if not should_convert_module(f"model.layers.{i}.mlp.down_proj", keys)
    ]
    assert caught == [KEEP]


def test_a_format_the_device_cannot_run_is_reported_not_failed(
    tiny_model_dir, workspace, monkeypatch
):
    """bitsandbytes without int8 kernels here (its forward raises, as a backend without
    them does): the quantize stage reports int8 as unsupported and why, and succeeds; a
    run configured for int8 fails before loading, naming the key."""

    def no_kernel(self, x):
        raise NotImplementedError("no int8 matmul on this backend")

    monkeypatch.setattr(bnb.nn.Linear8bitLt, "forward", no_kernel)
    reason = format_unsupported("int8")
    assert reason == (
        f"bitsandbytes {bnb.__version__} cannot run int8 on cpu: "
        "NotImplementedError: no int8 matmul on this backend"
    )
    assert format_unsupported("nf4") is None

    from stages import quantize

    quantize.main()
    report = json.loads((workspace / "reports/quantize.json").read_text())
    assert report["formats"]["int8"] == {"supported": False, "reason": reason}
    assert report["formats"]["nf4"]["supported"] is True

    with pytest.raises(UnsupportedFormat, match=r"params.yaml quantize.quant_type int8: "):
        load_quantized(quantize_params(quant_type="int8"), tiny_model_dir)
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    params["quantize"]["quant_type"] = "int8"
    (workspace / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(UnsupportedFormat, match="cannot run int8 on cpu"):
        quantize.main()
    # The last good report is left as it was.
    assert json.loads((workspace / "reports/quantize.json").read_text()) == report
