"""Stage `finetune`: LoRA adapters trained on the 4-bit (NF4) base: QLoRA.

The base is loaded through qlora/models.py, exactly as evaluate loads it. Only the
response tokens are trained (the prompt is masked in the labels, qlora/chat.py). The
transformers Trainer runs the loop: progress bar, validation loss every `eval_steps`,
paged AdamW on CUDA, gradient checkpointing when asked. A killed run resumes from its
last sealed checkpoint (.cache/finetune/<fingerprint>/).
Outputs: data/prepared/adapter/ (standard peft format: adapter_config.json +
adapter_model.safetensors, loadable with plain `PeftModel.from_pretrained`),
reports/train/metrics.json, reports/train/{train,eval}_loss.json (DVC plots).
"""

from __future__ import annotations

import shutil

from qlora import artifacts
from qlora.io import atomic_dir, run_stage, write_json
from qlora.params import load_params
from qlora.training import save_adapter, train


def main() -> None:
    run = train(load_params())
    with atomic_dir(artifacts.ADAPTER_DIR) as out:
        save_adapter(run.model, out, run.base_identity)
    write_json(artifacts.TRAIN_LOSS, run.train_curve)
    write_json(artifacts.EVAL_LOSS, run.eval_curve)
    write_json(artifacts.TRAIN_METRICS, run.metrics)
    shutil.rmtree(run.run_dir, ignore_errors=True)  # the adapter is safe: checkpoints are spent
    m = run.metrics
    print(
        f"trained {m['steps']} steps in {m['train_runtime_s']:.0f} s "
        f"({m['tokens_per_s']:.0f} tokens/s); validation loss {run.eval_curve[0]['loss']:.3f} "
        f"-> {m['final_eval_loss']:.3f}; adapter in {artifacts.ADAPTER_DIR}"
    )


if __name__ == "__main__":
    run_stage("finetune", main)
