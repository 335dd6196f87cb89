"""Stage `evaluate`: the base and the adapter benchmarked side by side with lm-eval.

Runs base_full, base_4bit and adapter_4bit one at a time on the same tasks and settings
(qlora/evaluation/benchmark.py says how, and why models are handed to lm-eval as objects).
Outputs, written only once every variant has finished (a failure leaves the previous
results in place): reports/eval/metrics.json (a DVC metric, checked against
EvalMetrics), reports/eval/examples.json (greedy answers to the first test
prompts).
"""

from __future__ import annotations

from qlora.core import paths
from qlora.core.io import run_stage, write_json
from qlora.core.params import load_params
from qlora.evaluation.benchmark import benchmark
from qlora.schemas.base import validated
from qlora.schemas.metrics import EvalMetrics


def main() -> None:
    metrics, examples = benchmark(load_params())
    validated(EvalMetrics, metrics, paths.EVAL_METRICS)  # its schema
    # Both files at the end: a variant that fails leaves the previous results untouched.
    write_json(paths.EVAL_METRICS, metrics)
    write_json(paths.EVAL_EXAMPLES, examples)
    for v in metrics["variants"].values():
        print(f"[evaluate] {v['label']}: {v['seconds']:.1f} s")
        for task, task_metrics in v["metrics"].items():
            shown = ", ".join(f"{m} {x['value']:.4g}" for m, x in task_metrics.items())
            print(f"    {task}: {shown}")


if __name__ == "__main__":
    run_stage("evaluate", main)
