"""Stage `eval_gguf`: every exported GGUF artifact under llama.cpp, on the evaluation tasks.

The same tasks, few-shot count and limit as the PyTorch variants (evaluate.*), scored by
the same lm-eval code through an in-process llama.cpp model; then each artifact's decode
speed (median of export.speed_repeats timings) and memory (qlora/export/measure.py).
Input: data/prepared/gguf
Output: reports/export/gguf_eval.json
"""

from __future__ import annotations

from qlora.core import paths
from qlora.core.io import run_stage, write_json
from qlora.core.params import load_params
from qlora.export.measure import measure_all
from qlora.schemas.base import validated
from qlora.schemas.export import GgufEval


def main() -> None:
    result = measure_all(load_params())
    validated(GgufEval, result, paths.GGUF_EVAL)
    write_json(paths.GGUF_EVAL, result)
    for name, a in result["artifacts"].items():
        speed = a.get("speed")
        print(
            f"  {name}: {a['file_bytes'] / 2**20:.1f} MiB"
            + (f", {speed['tokens_per_s']:.1f} tokens/s" if speed else "")
            + (f" ({speed['note']})" if speed and speed["note"] else "")
        )
        for task, metrics in a["metrics"].items():
            print(f"    {task}: " + ", ".join(f"{m} {x['value']:.4g}" for m, x in metrics.items()))


if __name__ == "__main__":
    run_stage("eval_gguf", main)
