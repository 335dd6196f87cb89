"""The 4-bit report's arithmetic, and a real (tiny) QLoRA training run."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from helpers.tiny import TINY_LINEAR_SHAPES
from qlora.core.io import StageError
from qlora.core.params import shipped_params
from qlora.quant.measure import measure
from qlora.train import callbacks, log_layout, recipe
from stages import finetune


def expected_bits_per_linear_weight(shapes: list[tuple[int, int]]) -> float:
    """NF4 with double quant: 4 bits a weight, one 8-bit absmax per 64-weight block, one fp32
    scale per 256 absmax values and a 256-entry fp32 code book per layer."""
    total_bits = total_weights = 0
    for out_f, in_f in shapes:
        n = out_f * in_f
        blocks = math.ceil(n / 64)
        total_bits += 4 * n + 8 * blocks + 32 * math.ceil(blocks / 256) + 32 * 256
        total_weights += n
    return total_bits / total_weights


@pytest.mark.cpu_paths
def test_quantize_report_on_a_tiny_llama(tiny_model_dir):
    params = shipped_params()
    report, layers = measure(params.quantize, params.finetune.lora, tiny_model_dir)
    layer = TINY_LINEAR_SHAPES
    assert report["bits_per_parameter"]["nf4_linear_layers"] == pytest.approx(
        expected_bits_per_linear_weight(layer * 2)
    )
    assert report["bytes"]["nf4"] < report["bytes"]["full"]
    assert report["bits_per_parameter"]["full"] == pytest.approx(16, rel=1e-3)
    # NF4's levels are placed for normally distributed weights: less error than FP4.
    nf4, fp4 = report["quant_error"]["nf4"], report["quant_error"]["fp4"]
    assert 0 < nf4["mean_relative_error"] < fp4["mean_relative_error"] < 0.5
    assert nf4["layers"] == 14


@pytest.mark.cpu_paths
def test_finetune_trains_an_adapter_in_standard_peft_format(workspace):
    finetune.main()
    adapter = workspace / "data/prepared/adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 16 and config["peft_type"] == "LORA"
    weights = load_file(adapter / "adapter_model.safetensors")
    lora_b = [t for name, t in weights.items() if "lora_B" in name]
    # LoRA initialises B to zero: a non-zero B proves the optimizer stepped.
    assert lora_b and any(t.abs().sum() > 0 for t in lora_b)
    metrics = log_layout.training_view(workspace / "reports/train")
    assert metrics["steps"] == 3 and metrics["tokens_per_s"] > 0
    assert metrics["optimizer"] == "adamw_torch" and metrics["compute_dtype"] == "float32"
    # The lean path as shipped: the chunked loss, and checkpointing in every layer, since a
    # batch's activations (~10 MB here) are far over the tiny model's weights (under 1 MB).
    assert metrics["loss"]["kind"] == "chunked"
    assert metrics["batching"] == "group_by_length"
    assert metrics["gradient_checkpointing"]["on"] is True
    assert metrics["gradient_checkpointing"]["every_n_layers"] == 1
    assert metrics["gradient_checkpointing"]["why"].startswith("auto: ")


def test_dvclive_logs_each_metric_at_its_optimizer_step(workspace):
    """DVCLive's files, as `dvc plots` and `dvc exp show` read them: every series on the
    Trainer's global step (validation at 0 and at the end), the summary's last values
    equal to the series' last rows, and the run totals beside them."""
    from qlora.core.params import load_params

    finetune.main()
    train_dir = workspace / "reports/train"
    evals = log_layout.eval_curve(train_dir)
    every = load_params().finetune.eval_steps
    assert [e["step"] for e in evals] == sorted({0, *range(every, 4, every), 3})
    assert all(math.isfinite(e["loss"]) for e in evals)
    for name in (log_layout.TRAIN_LOSS, log_layout.LEARNING_RATE, log_layout.TOKENS_PER_S):
        assert [r["step"] for r in log_layout.read_curve(train_dir, name)] == [1, 2, 3], name
    memory = log_layout.read_curve(train_dir, log_layout.PEAK_MEMORY_GB)
    assert all(r["peak_memory_gb"] > 0.01 for r in memory)  # a Python process alone is more
    summary = json.loads((train_dir / "metrics.json").read_text())
    assert summary["step"] == 3
    assert summary["eval"]["loss"] == evals[-1]["loss"]
    assert summary["eval"]["initial_loss"] == evals[0]["loss"]
    assert summary["eval"]["best_loss"] == min(e["loss"] for e in evals)
    last_train = log_layout.read_curve(train_dir, log_layout.TRAIN_LOSS)[-1]["loss"]
    assert summary["train"]["loss"] == last_train
    # The whole run's speed: every trained token over the training seconds.
    assert summary["train"]["tokens_per_s"] == pytest.approx(
        summary["train"]["tokens"] / summary["train"]["runtime_s"]
    )
    # No hand-written copy of DVCLive's numbers: run.json holds only how the run was made.
    run = json.loads((train_dir / "run.json").read_text())
    assert not {"steps", "tokens_per_s", "final_eval_loss", "train_runtime_s"} & set(run)
    assert not (train_dir / "dvc.yaml").exists()  # dvc.yaml of the project declares them


def test_a_target_module_that_matches_no_layer_is_named(workspace, monkeypatch):
    from qlora.core.params import load_params

    params = load_params()
    params.finetune.lora.target_modules = ["attention_qkv"]
    with pytest.raises(StageError, match=r"target_modules=\['attention_qkv'\]"):
        recipe.lora_model(params, trust_remote_code=False)


def test_a_nan_loss_stops_training_with_a_clear_error():
    class State:
        global_step = 7

    with pytest.raises(StageError, match="diverged: loss = nan at step 7"):
        callbacks.DivergenceGuard().on_log(None, State(), None, logs={"loss": float("nan")})
    callbacks.DivergenceGuard().on_log(None, State(), None, logs={"loss": 1.5})


def test_optimizer_is_paged_only_on_cuda():
    expected = "paged_adamw_32bit" if torch.cuda.is_available() else "adamw_torch"
    assert recipe.optimizer_name("auto") == expected
    assert recipe.optimizer_name("adamw_torch") == "adamw_torch"


def test_an_adapter_is_refused_on_a_different_base(workspace, tmp_path_factory):
    from helpers.tiny import make_tiny_model_dir
    from qlora.core.params import load_params
    from qlora.models.loading import check_adapter_base, load_adapted

    finetune.main()
    adapter = workspace / "data/prepared/adapter"
    check_adapter_base(adapter, workspace / "data/prepared/base_model")  # its own base: fine
    other = make_tiny_model_dir(tmp_path_factory.mktemp("other"), seed=1)
    with pytest.raises(StageError, match="was trained on a base with weights"):
        check_adapter_base(adapter, other)
    with pytest.raises(StageError, match="load it onto the base it was trained on"):
        load_adapted(load_params().quantize, adapter, other)


def test_out_of_memory_names_the_parameters_to_lower(workspace, monkeypatch):
    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(recipe.Trainer, "train", no_memory)
    with pytest.raises(StageError) as err:
        finetune.main()
    message = str(err.value)
    for key in (
        "finetune.batch_size (now 4",
        "dataset.max_length (now 256",
        "gradient_checkpointing",
    ):
        assert key in message
    assert not (workspace / "data/prepared/adapter").exists()
