"""Stage `evaluate`: the three variants' results side by side, as one benchmark.

Reads reports/eval/variants/{base_full,base_4bit,adapter_4bit}.json (each written by its own
`eval_<variant>` stage), checks they were measured with the same settings on the same
prompts (qlora/evaluation/variants.py), and writes
reports/eval/metrics.json (a DVC metric, checked against EvalMetrics) and
reports/eval/examples.json (greedy answers to the first test prompts) and
reports/eval/generations.json (every test row of each generation task: each variant's
answer and scores, for the report's row browser). Takes a second.
"""

from __future__ import annotations

from qlora.core import paths
from qlora.core.io import StageError, read_json, run_stage, write_json
from qlora.evaluation.variants import merge_generations, merge_variants
from qlora.schemas.base import validated
from qlora.schemas.metrics import EvalGenerations, EvalMetrics, VariantFile


def main() -> None:
    results = {}
    for name in paths.VARIANTS:
        file = paths.variant_file(name)
        if not file.is_file():
            raise StageError(f"{file}: not found (run `dvc repro {paths.variant_stage(name)}`)")
        results[name] = read_json(file)
        validated(VariantFile, results[name], file)  # checked, then used as written
    metrics, examples = merge_variants(results)
    generations = merge_generations(results)
    validated(EvalMetrics, metrics, paths.EVAL_METRICS)  # its schema
    validated(EvalGenerations, generations, paths.EVAL_GENERATIONS)
    write_json(paths.EVAL_METRICS, metrics)
    write_json(paths.EVAL_EXAMPLES, examples)
    write_json(paths.EVAL_GENERATIONS, generations)
    for v in metrics["variants"].values():
        print(f"[evaluate] {v['label']}: {v['seconds']:.1f} s of lm-eval")


if __name__ == "__main__":
    run_stage("evaluate", main)
