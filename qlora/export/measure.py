"""Each exported GGUF artifact run under llama.cpp: the evaluation tasks (the same tasks,
few-shot count and limit as the PyTorch variants, scored by the same lm-eval code), its
decode speed and its memory. The `eval_gguf` stage's library.

Speed is what a user of the file gets: greedy decoding, one prompt at a time, exactly
evaluate.speed_new_tokens tokens after each of the first evaluate.speed_prompts test
prompts (the PyTorch variants' own timing workload), after one warm-up; the whole set is
timed export.speed_repeats times and the median reported, with the spread. A machine busy
with other work makes a run slower and noisier: the load average beside the engine's own
threads is recorded, and a note is added when it was high or the repeats disagree.
"""

from __future__ import annotations

import gc
import importlib.metadata
import os
import statistics
import time
from pathlib import Path

from qlora.core import paths
from qlora.core.io import StageError, read_json
from qlora.core.params import Params
from qlora.evaluation.benchmark import (
    build_tasks,
    fill_missing_stderr,
    run_tasks,
    speed_prompts_of,
    task_manager,
    task_metrics,
)
from qlora.export.llama_lm import LlamaCppLM

# Repeats whose slowest is more than this much slower than the fastest are flagged: the
# machine was not quiet enough for the median to be trusted to a few per cent.
SPREAD_NOTE = 1.15


def threads(params: Params) -> int:
    """llama.cpp's threads: the configured number, else the cores this process may use."""
    return params.export.threads or max(1, len(os.sched_getaffinity(0)))


def busy_note(load_before: float, load_after: float, used: int, spread: float) -> str | None:
    """Why the timing may read slow, or None when the machine looked quiet."""
    cores = os.cpu_count() or 1
    others = max(load_before, load_after) - used
    notes = []
    if others > 0.5:
        notes.append(
            f"the machine was busy: a load average of {max(load_before, load_after):.1f} on "
            f"{cores} cores while the engine used {used} threads"
        )
    if spread > SPREAD_NOTE:
        notes.append(f"the repeats differ by {spread:.2f}x (slowest over fastest)")
    return "; ".join(notes) or None


def decode_speed(lm: LlamaCppLM, prompts: list[str], new_tokens: int, repeats: int) -> dict:
    """Median tokens/s over `repeats` timings of the whole prompt set."""
    list(lm.greedy_tokens(prompts[0], 2))  # warm-up: first-call allocations are not speed
    before = os.getloadavg()[0]
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for prompt in prompts:
            for _token in lm.greedy_tokens(prompt, new_tokens):
                pass
        rates.append(len(prompts) * new_tokens / (time.perf_counter() - start))
    after = os.getloadavg()[0]
    spread = max(rates) / min(rates)
    return {
        "prompts": len(prompts),
        "new_tokens": new_tokens,
        "repeats": repeats,
        "tokens_per_s": statistics.median(rates),
        "tokens_per_s_each": rates,
        "spread": spread,
        "load_average": [before, after],
        "note": busy_note(before, after, lm.threads, spread),
    }


def measure_artifact(
    name: str, artifact: dict, folder: Path, params: Params, tasks: list, manager, aggregations
) -> dict:
    """One artifact: load, lm-eval tasks, decode speed, memory; freed before the next."""
    import llama_cpp

    p = params.evaluate
    model = folder / artifact["model"]
    lora = folder / artifact["lora"] if artifact.get("lora") else None
    n_threads = threads(params)
    tag = "[eval_gguf]"
    print(f"{tag} {name}: loading {model.name}" + (f" + {lora.name}" if lora else ""), flush=True)
    start = time.perf_counter()
    lm = LlamaCppLM(model, lora, params.export.n_ctx, n_threads)
    loaded = time.perf_counter()
    try:
        results, _ = run_tasks(lm, tasks, manager, p)
        evaluated = time.perf_counter()
        prompts = speed_prompts_of(p)
        speed = (
            decode_speed(lm, prompts, p.speed_new_tokens, params.export.speed_repeats)
            if prompts
            else None
        )
        weights = int(llama_cpp.llama_model_size(lm.llm.model))
    finally:
        lm.close()
    metrics = task_metrics(results, name)
    fill_missing_stderr(metrics, results.get("samples") or {}, aggregations)
    print(
        f"{tag} {name}: lm-eval {evaluated - loaded:.1f} s"
        + (f", decode {speed['tokens_per_s']:.1f} tokens/s" if speed else ""),
        flush=True,
    )
    del results
    gc.collect()
    files = [model, *([lora] if lora else [])]
    return {
        "model": artifact["model"],
        "lora": artifact.get("lora"),
        "gguf_type": artifact["gguf_type"],
        "file_bytes": sum(f.stat().st_size for f in files),
        "weights_bytes": weights,
        "load_seconds": loaded - start,
        "seconds": evaluated - loaded,
        "threads": n_threads,
        "metrics": metrics,
        **({"speed": speed} if speed else {}),
    }


def measure_all(params: Params, folder: Path = paths.GGUF_DIR) -> dict:
    """Every artifact of folder's manifest, on the configured tasks."""
    manifest_path = folder / paths.GGUF_MANIFEST.name
    if not manifest_path.is_file():
        raise StageError(f"{manifest_path}: not found (run the export stage)")
    manifest = read_json(manifest_path)
    p = params.evaluate
    manager = task_manager(p.tasks)
    tasks = build_tasks(manager, p.tasks)
    aggregations = {t.config.task: t.aggregation() for t in tasks if hasattr(t, "aggregation")}
    artifacts = {
        name: measure_artifact(name, a, folder, params, tasks, manager, aggregations)
        for name, a in manifest["artifacts"].items()
    }
    return {
        "settings": {
            "tasks": p.tasks,
            "num_fewshot": p.num_fewshot,
            "limit": p.limit,
            "n_ctx": params.export.n_ctx,
            "engine": f"llama-cpp-python {importlib.metadata.version('llama_cpp_python')}",
            "lm_eval_version": importlib.metadata.version("lm_eval"),
        },
        "artifacts": artifacts,
        "failed": manifest.get("failed", {}),
    }
