"""Stage `finetune`: LoRA adapters trained on the 4-bit (NF4) base: QLoRA.

The base is loaded through qlora/models/loading.py, exactly as evaluate loads it. Only the
response tokens are trained (the prompt is masked in the labels, qlora/data/chat_template.py). The
transformers Trainer runs the loop: progress bar, validation loss every `eval_steps`,
paged AdamW on CUDA, gradient checkpointing when asked. A killed run resumes from its
last sealed checkpoint (.cache/finetune/<fingerprint>/).
Outputs: data/prepared/adapter/ (standard peft format: adapter_config.json +
adapter_model.safetensors, loadable with plain `PeftModel.from_pretrained`), and
reports/train/: DVCLive's metrics.json and plots/metrics/*.tsv, and run.json
(qlora/train/log_layout.py). Each output appears only once training has succeeded.
With finetune.processes > 1 (or an accelerate config) this command relaunches itself in
that many processes through accelerate (qlora/train/distributed.py); the first one writes.
"""

from __future__ import annotations

import shutil

from qlora.core import paths
from qlora.core.io import atomic_dir, run_stage, write_json
from qlora.core.params import load_params
from qlora.train import distributed
from qlora.train.recipe import save_adapter, train


def main() -> None:
    params = load_params()
    if distributed.needs_launch(params.finetune):
        distributed.relaunch(params, __spec__.name)
        return
    if distributed.world_size() > 1:
        distributed.die_with_parent()  # a killed job leaves no training process behind
    run = train(params)
    if not distributed.is_main_process():
        return  # the main process holds the same adapter (DDP keeps them in sync)
    with atomic_dir(paths.ADAPTER_DIR) as out:
        save_adapter(run.model, out, run.base_identity)
    with atomic_dir(paths.TRAIN_DIR) as out:
        shutil.copytree(run.live_dir, out, dirs_exist_ok=True)
        write_json(out / paths.TRAIN_RUN.name, run.record)
    shutil.rmtree(run.run_dir, ignore_errors=True)  # the adapter is safe: checkpoints are spent
    summary = run.summary
    print(
        f"trained {summary['step']} steps in {summary['train']['runtime_s']:.0f} s "
        f"({summary['train']['tokens_per_s']:.0f} tokens/s); validation loss "
        f"{summary['eval']['initial_loss']:.3f} -> {summary['eval']['loss']:.3f}; adapter in "
        f"{paths.ADAPTER_DIR}"
    )


if __name__ == "__main__":
    run_stage("finetune", main)
