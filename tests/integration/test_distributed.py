"""Several training processes (qlora/train/distributed.py): DDP on the CPU with gloo, and the
FSDP + QLoRA configuration.

The ground truth for two processes is one process trained on the same rows: with the same
effective batch, DDP's averaged gradient is the one-process gradient, so the adapters must
agree up to float rounding (the two processes pad their halves of a batch separately and
sum in another order)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from helpers.repo import REPO
from qlora.core.io import StageError
from qlora.core.params import load_params
from qlora.train import distributed, log_layout
from stages import finetune

FSDP_CONFIG = REPO / "configs/accelerate/fsdp_qlora.yaml"
ADAPTER = Path("data/prepared/adapter")
# LoRA weights of two processes vs one: measured 7.5e-9 apart after 3 steps of the tiny
# model, where the largest lora_B entry is 3e-4 (float32 rounding). A DDP that stopped
# averaging (each process stepping on its own half) moved them by 6e-4.
WEIGHT_TOLERANCE = 1e-6


def set_params(workspace: Path, section: str, **values) -> None:
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    params[section].update(values)
    (workspace / "params.yaml").write_text(yaml.safe_dump(params))


def train_with(workspace: Path, processes: int) -> tuple[dict, dict, dict, list[dict]]:
    """The adapter's tensors, the run's numbers, run.json and the validation curve."""
    set_params(workspace, "finetune", processes=processes)
    finetune.main()
    train_dir = workspace / "reports/train"
    weights = load_file(workspace / ADAPTER / "adapter_model.safetensors")
    run = json.loads((train_dir / "run.json").read_text())
    return weights, log_layout.training_view(train_dir), run, log_layout.eval_curve(train_dir)


def test_two_processes_train_the_adapter_one_process_trains(workspace, monkeypatch):
    # `padded`: random order, so both runs see the same rows in each optimizer step
    # (group_by_length sorts within mega-batches sized by the per-process batch).
    set_params(workspace, "finetune", batching="padded", batch_size=4)
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # the launched processes import stages/
    one_weights, one, one_run, one_evals = train_with(workspace, 1)
    shutil.rmtree(workspace / ADAPTER)
    two_weights, two, two_run, two_evals = train_with(workspace, 2)

    # The same effective batch, spread differently, as run.json records it.
    assert one_run["batch"] == {
        "processes": 1,
        "per_process": 4,
        "accumulation_steps": 1,
        "effective": 4,
    }
    assert two_run["batch"] == {
        "processes": 2,
        "per_process": 2,
        "accumulation_steps": 1,
        "effective": 4,
    }
    # The adapter of the main process loads as plain peft weights, the same tensors...
    assert one_weights.keys() == two_weights.keys() and one_weights
    assert any(t.abs().max() > 0 for k, t in two_weights.items() if "lora_B" in k)
    for name, tensor in one_weights.items():
        diff = (tensor - two_weights[name]).abs().max().item()
        assert diff <= WEIGHT_TOLERANCE, f"{name}: {diff}"
    # ... trained on the same tokens, to the same validation losses.
    assert two["trained_tokens"] == one["trained_tokens"]
    assert two["steps"] == one["steps"] == 3
    assert [e["step"] for e in two_evals] == [e["step"] for e in one_evals] == [0, 2, 3]
    for a, b in zip(two_evals, one_evals, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    # One writer: each step appears once in DVCLive's series.
    steps = [r["step"] for r in log_layout.read_curve(workspace / "reports/train", "train/loss")]
    assert steps == [1, 2, 3]


def test_a_batch_that_does_not_split_over_the_processes_is_refused_before_launch(workspace):
    set_params(workspace, "finetune", processes=2, batch_size=3)
    with pytest.raises(StageError, match=r"finetune.batch_size=3 does not split evenly over 2"):
        finetune.main()
    assert not (workspace / ADAPTER).exists()


def test_the_launcher_runs_the_stage_module_under_accelerate(tmp_path):
    plain = distributed.launch_command("stages.finetune", 2, None)
    assert plain[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert plain[-2:] == ["-m", "stages.finetune"]
    assert "--multi_gpu" in plain and plain[plain.index("--num_processes") + 1] == "2"
    with_config = distributed.launch_command("stages.finetune", 4, FSDP_CONFIG)
    assert with_config[with_config.index("--config_file") + 1] == str(FSDP_CONFIG)
    assert "--multi_gpu" not in with_config  # the file says FSDP; the flag would contradict


def test_auto_is_one_process_per_gpu_and_one_on_a_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert distributed.resolve_processes("auto") == 1
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert distributed.resolve_processes("auto") == 8
    assert distributed.resolve_processes(3) == 3


def test_fsdp_config_needs_quant_storage_equal_to_the_model_dtype(workspace):
    set_params(workspace, "finetune", accelerate_config=str(FSDP_CONFIG))
    set_params(workspace, "quantize", quant_storage="uint8")
    with pytest.raises(StageError, match=r"quantize.quant_storage equal to the model's dtype"):
        distributed.relaunch(load_params(), "stages.finetune")
    set_params(workspace, "finetune", accelerate_config="configs/nowhere.yaml")
    with pytest.raises(StageError, match=r"finetune.accelerate_config: no file"):
        distributed.relaunch(load_params(), "stages.finetune")


def test_fsdp_wraps_the_4bit_lora_model_only_with_float_quant_storage(workspace, monkeypatch):
    """What can run without GPUs: the shipped FSDP config loads with accelerate's own
    loader, and FSDP (one CPU process, gloo) wraps the QLoRA model with peft's wrap policy,
    runs forward and backward, and gives LoRA gradients, when the 4-bit weights are stored
    in the model's dtype; stored as uint8 (bitsandbytes' default) it cannot wrap at all.
    Sharding over several processes needs NCCL on GPUs (gloo has no reduce-scatter)."""
    import torch.distributed as dist
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType
    from peft.utils.other import fsdp_auto_wrap_policy
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from qlora.train.recipe import lora_model

    config = load_config_from_file(str(FSDP_CONFIG))
    assert config.distributed_type == DistributedType.FSDP
    assert config.fsdp_config["fsdp_use_orig_params"] is False  # frozen 4-bit + LoRA mixed
    assert config.fsdp_config["fsdp_cpu_ram_efficient_loading"] is True

    port = distributed.free_port()
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        outcome = {}
        for storage in ("uint8", "float32"):  # float32: the compute dtype on a CPU
            set_params(workspace, "quantize", quant_storage=storage)
            params = load_params()
            model, _ = lora_model(params, False, workspace / "data/prepared/base_model")
            try:
                wrapped = FSDP(
                    model,
                    auto_wrap_policy=fsdp_auto_wrap_policy(model),
                    use_orig_params=config.fsdp_config["fsdp_use_orig_params"],
                    device_id=torch.device("cpu"),
                )
            except ValueError as e:
                outcome[storage] = str(e)
                continue
            ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
            wrapped(input_ids=ids, labels=ids).loss.backward()
            units = sum(isinstance(m, FSDP) for m in wrapped.modules())
            grads = [p.grad for p in wrapped.parameters() if p.requires_grad]
            outcome[storage] = (units, any(g is not None and g.abs().sum() > 0 for g in grads))
    finally:
        dist.destroy_process_group()
    assert "Cannot flatten integer dtype tensors" in outcome["uint8"]
    units, has_grad = outcome["float32"]
    assert units > model.config.num_hidden_layers  # a unit per decoder layer, and the root
    assert has_grad
