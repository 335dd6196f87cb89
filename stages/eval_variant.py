"""Stages `eval_base_full`, `eval_base_4bit`, `eval_adapter_4bit`: one variant benchmarked.

`python -m stages.eval_variant <variant>` loads that one model and runs the lm-eval tasks,
the example generations and the timed generations on it (qlora/evaluation/benchmark.py).
Each variant is its own stage so that it depends only on what it loads: the bases not on
the adapter, the full-precision base not on the quantization settings. A finetune-only
change reruns the adapter's evaluation alone.
Output: reports/eval/variants/<variant>.json
"""

from __future__ import annotations

import sys

from qlora.core import paths
from qlora.core.io import StageError, run_stage, write_json
from qlora.core.params import load_params
from qlora.evaluation.benchmark import benchmark_variant
from qlora.schemas.base import validated
from qlora.schemas.metrics import VariantFile


def main(variant: str) -> None:
    result = benchmark_variant(load_params(), variant)
    out = paths.variant_file(variant)
    validated(VariantFile, result, out)
    write_json(out, result)
    v = result["variant"]
    print(f"[{paths.variant_stage(variant)}] {v['label']}: {v['seconds']:.1f} s")
    for task, task_metrics in v["metrics"].items():
        shown = ", ".join(f"{m} {x['value']:.4g}" for m, x in task_metrics.items())
        print(f"    {task}: {shown}")


def cli(argv: list[str]) -> None:
    if len(argv) != 1 or argv[0] not in paths.VARIANTS:
        raise StageError(f"usage: python -m stages.eval_variant {{{','.join(paths.VARIANTS)}}}")
    main(argv[0])


if __name__ == "__main__":
    name = sys.argv[1] if len(sys.argv) == 2 else "eval_variant"
    run_stage(
        paths.variant_stage(name) if name in paths.VARIANTS else name, lambda: cli(sys.argv[1:])
    )
