"""Stage `evaluate`: the base and the adapter benchmarked side by side with lm-eval.

Three variants, one at a time (each is freed before the next loads), with the same tasks,
batch size, few-shot count and limit:
- base_full:   the base in full precision (float32 on a CPU, bfloat16 on a GPU);
- base_4bit:    the base quantized to 4 bits (nf4 or fp4), exactly as finetune loads it;
- adapter_4bit: that 4-bit base with the trained adapter: the only difference from base_4bit.
Models are built by qlora/models.py and handed to lm-eval as objects: lm-eval's own
`load_in_4bit` model argument no longer works with transformers 5.

The local tasks live in data/eval_tasks (docstring_loss, docstring_choice, prose_guard);
any standard lm-eval task name works too where the datasets hub is reachable.
Outputs (written only once every variant has finished, so a failure leaves the previous
results in place): reports/eval/metrics.json (a DVC metric), reports/eval/examples.json
(greedy answers of each variant to the first test prompts).
"""

from __future__ import annotations

from qlora import artifacts
from qlora.evaluation import benchmark
from qlora.io import run_stage, write_json
from qlora.params import load_params


def main() -> None:
    metrics, examples = benchmark(load_params())
    artifacts.validated(artifacts.EvalMetrics, metrics, artifacts.EVAL_METRICS)  # its schema
    # Both files at the end: a variant that fails leaves the previous results untouched.
    write_json(artifacts.EVAL_METRICS, metrics)
    write_json(artifacts.EVAL_EXAMPLES, examples)
    for v in metrics["variants"].values():
        print(f"[evaluate] {v['label']}: {v['seconds']:.1f} s")
        for task, task_metrics in v["metrics"].items():
            shown = ", ".join(f"{m} {x['value']:.4g}" for m, x in task_metrics.items())
            print(f"    {task}: {shown}")


if __name__ == "__main__":
    run_stage("evaluate", main)
