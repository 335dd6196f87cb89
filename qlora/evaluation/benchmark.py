"""The `evaluate` stage's library: the base and the adapter benchmarked with lm-eval.

Three variants, one at a time (each is freed before the next loads), with the same tasks,
batch size, few-shot count and limit:
- base_full:   the base in full precision (float32 on a CPU, bfloat16 on a GPU);
- base_4bit:    the base quantized to 4 bits (nf4 or fp4), exactly as finetune loads it;
- adapter_4bit: that 4-bit base with the trained adapter: the only difference from base_4bit.
(The "4bit" names stay for every format, quantize.quant_type int8 included: they are the
quantized variants.) Each variant's generation speed is timed on the same prompts
(`generation_speed`): the method's claim that 4 bits decode faster is checked on it.
Models are built by qlora/models/loading.py and handed to lm-eval as objects: lm-eval's own
`load_in_4bit` model argument no longer works with transformers 5.

The local tasks live in data/eval_tasks (docstring_loss, docstring_choice, prose_guard,
docstring_generate); any standard lm-eval task name works too where the datasets hub is
reachable. A generation task (docstring_generate: each variant's greedy answer to every
test prompt, scored with ROUGE-L and chrF, qlora/evaluation/generation.py) runs in its own
lm-eval call, timed apart, and keeps every row's answer in the variant file; the first
`evaluate.examples` of them are the report's examples (without a generation task they are
generated here).
Each variant is its own DVC stage (`eval_<variant>`, reports/eval/variants/<variant>.json),
so a change to the adapter reruns only the adapter's evaluation: the bases' results come
from their unchanged stages (or DVC's run cache). The `evaluate` stage merges the three
(qlora/evaluation/variants.py) into reports/eval/metrics.json (a DVC metric) and
reports/eval/examples.json (greedy answers of each variant to the first test prompts) and
reports/eval/generations.json (every generated row, for the report's row browser).
"""

from __future__ import annotations

import gc
import importlib.metadata
import math
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from qlora.core import paths
from qlora.core.io import StageError, read_jsonl
from qlora.core.params import EvaluateParams, Params
from qlora.evaluation.generation import answered_rows, is_generation_task
from qlora.models.loading import (
    compute_dtype,
    device,
    footprint_bytes,
    load_adapted,
    load_full,
    load_quantized,
    load_tokenizer,
)

TEST_SPLIT = paths.split_file("test")
BOOTSTRAP_ITERS = 1000  # resamples for a standard error lm-eval does not compute


def task_manager(names: list[str], tasks_dir: Path = paths.EVAL_TASKS_DIR):
    """A TaskManager that knows every name in `names`, or a StageError naming the unknown.

    Indexing lm-eval's ~15,000 built-in task files takes ~10 s on a small CPU, so that index
    is built only when a name is not one of the local tasks."""
    from lm_eval.tasks import TaskManager

    local = TaskManager(include_path=str(tasks_dir), include_defaults=False)
    if all(n in local.all_tasks for n in names):
        return local
    full = TaskManager(include_path=str(tasks_dir))
    unknown = [n for n in names if n not in full.all_tasks and not Path(n).is_file()]
    if unknown:
        raise StageError(
            f"evaluate.tasks: unknown lm-eval task(s) {unknown}; local tasks in {tasks_dir}: "
            f"{local.all_tasks}; `lm-eval ls tasks` lists the built-in ones"
        )
    return full


def build_tasks(manager, names: list[str]) -> list:
    """Task and Group objects, built once (datasets read once) and reused for every variant.
    A group stays a group, so lm-eval still reports its aggregate."""
    built = []
    for name in names:
        try:
            loaded = manager.load(name)
        except Exception as e:  # lm-eval and datasets raise many types; all mean "cannot build"
            raise StageError(f"evaluate.tasks: cannot build task {name!r}: {e}") from e
        groups = loaded.get("groups") or {}
        built += [groups[name]] if name in groups else list(loaded["tasks"].values())
    return built


def _number(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def task_metrics(results: dict, variant: str) -> dict[str, dict[str, dict]]:
    """lm-eval's results as {task: {metric: {value, stderr, higher_is_better}}}.

    lm-eval keys a metric as "<metric>,<filter>"; the filter is dropped when it is "none"
    (every loglikelihood task). stderr is null where lm-eval has none ("N/A": the weighted
    aggregations such as bits_per_byte are not bootstrapped)."""
    out: dict[str, dict[str, dict]] = {}
    for task, entry in results["results"].items():
        directions = results.get("higher_is_better", {}).get(task, {})
        metrics = {}
        for key, raw in entry.items():
            if "," not in key or "_stderr," in key:
                continue  # "alias", "sample_len" and the stderr entries read below
            metric, filter_name = key.split(",", 1)
            value = _number(raw)
            if value is None or not math.isfinite(value):
                raise StageError(
                    f"{variant}: {task}/{key} is {raw!r}, not a finite number: the model's "
                    "log-likelihoods are broken (NaN weights in the adapter?)"
                )
            stderr = _number(entry.get(f"{metric}_stderr,{filter_name}"))
            hib = directions.get(metric)
            metrics[metric if filter_name == "none" else key] = {
                "value": value,
                "stderr": stderr if stderr is not None and math.isfinite(stderr) else None,
                "higher_is_better": None if hib is None else bool(hib),
            }
        out[task] = metrics
    return out


def bootstrap_stderr(aggregate: Callable[[list], float], items: list, seed: int = 0) -> float:
    """Standard error of an aggregate over examples by resampling them: lm-eval has none for
    its weighted scores (bits_per_byte, perplexities), and the gate's primary metric is one."""
    rng = random.Random(seed)  # seeded: the same inputs give the same metrics file
    n = len(items)
    stats = [aggregate([items[rng.randrange(n)] for _ in range(n)]) for _ in range(BOOTSTRAP_ITERS)]
    return statistics.stdev(stats)


def fill_missing_stderr(metrics: dict, samples: dict, aggregations: dict) -> None:
    """Give every metric without lm-eval's stderr a bootstrap one from the per-example values."""
    for task, task_metrics_ in metrics.items():
        for name, entry in task_metrics_.items():
            aggregate = aggregations.get(task, {}).get(name)
            items = [s[name] for s in samples.get(task, []) if name in s]
            if entry["stderr"] is None and aggregate is not None and len(items) > 1:
                entry["stderr"] = bootstrap_stderr(aggregate, items)
                entry["stderr_method"] = f"bootstrap ({BOOTSTRAP_ITERS} resamples)"


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy answers, only the new tokens, special tokens dropped."""
    if not prompts:
        return []
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # a batch of prompts must end where generation starts
    try:
        # The chat-templated prompts already hold their special tokens.
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    enc = enc.to(model.device)
    out = model.generate(
        **enc,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def synchronize(model) -> None:
    """Wait for the GPU's queued work, so a timer measures it (a no-op on a CPU)."""
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)


@torch.no_grad()
def generation_speed(model, tokenizer, prompts: list[str], new_tokens: int) -> dict | None:
    """Greedy generation timed one prompt at a time (batch 1: decoding a single sequence,
    where reading the weights is the bottleneck and 4 bits can pay off), exactly
    `new_tokens` tokens a prompt (end-of-sequence suppressed until then), so every variant
    does the same work. One short warm-up generation first: first-call allocations and
    kernel choices (and the CPU's one-time 4-bit layout repack) are not speed."""
    if not prompts:
        return None

    def run(prompt: str, tokens: int) -> None:
        enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(model.device)
        model.generate(
            **enc,
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )

    run(prompts[0], 2)
    synchronize(model)
    start = time.perf_counter()
    for prompt in prompts:
        run(prompt, new_tokens)
    synchronize(model)
    seconds = time.perf_counter() - start
    return {
        "prompts": len(prompts),
        "new_tokens": new_tokens,
        "seconds": seconds,
        "tokens_per_s": len(prompts) * new_tokens / seconds,
        "seconds_per_prompt": seconds / len(prompts),
    }


def _simple_evaluate(lm, tasks: list, manager, p: EvaluateParams, **kwargs) -> dict:
    import lm_eval

    return lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks,
        task_manager=manager,
        num_fewshot=p.num_fewshot,
        limit=p.limit,
        batch_size=p.batch_size,
        log_samples=True,  # per-example values: bootstrap errors, every generated answer
        **kwargs,
    )


def _merge_results(parts: list[dict]) -> dict:
    """The results of several simple_evaluate calls as one (their tasks are disjoint)."""
    merged: dict = {"results": {}, "higher_is_better": {}, "samples": {}}
    for part in parts:
        for key in merged:
            merged[key].update(part.get(key) or {})
    return merged


def run_tasks(lm, tasks: list, manager, p: EvaluateParams) -> tuple[dict, float]:
    """lm-eval on `tasks` for any lm-eval model (transformers, llama.cpp): the scoring tasks
    in one call, the generation tasks in another (greedy, evaluate.max_new_tokens new
    tokens at most), merged. Returns the results and the generation tasks' seconds."""
    generating = [t for t in tasks if is_generation_task(t)]
    scoring = [t for t in tasks if not is_generation_task(t)]
    parts = [_simple_evaluate(lm, scoring, manager, p)] if scoring else []
    start = time.perf_counter()
    if generating:
        parts.append(
            _simple_evaluate(
                lm, generating, manager, p, gen_kwargs={"max_gen_toks": p.max_new_tokens}
            )
        )
    return _merge_results(parts), time.perf_counter() - start


def evaluate_variant(
    name: str,
    load: Callable[[], torch.nn.Module],
    tokenizer,
    tasks: list,
    manager,
    p: EvaluateParams,
    prompts: list[str],
    aggregations: dict | None = None,
    speed_prompts: list[str] | None = None,
) -> tuple[dict, list[str] | None, dict[str, list[dict]]]:
    """Load one variant, run lm-eval and the timed generations (speed_prompts) on it, free it.

    Returns (entry, example answers, generations). The generation tasks run in their own
    lm-eval call (batched greedy decoding, evaluate.max_new_tokens new tokens at most), so
    their time is measured apart: `generation_task_seconds`. Their answers to every test
    row are the generations; the example answers are generated here only when no
    generation task is configured (None otherwise: the first rows' answers serve)."""
    from lm_eval.models.huggingface import HFLM

    tag = f"[{paths.variant_stage(name)}]"
    print(f"{tag} loading", flush=True)
    start = time.perf_counter()
    try:
        model = load()
    except Exception as e:  # missing or corrupt files raise many types (safetensors has its own)
        raise StageError(f"{name}: the model did not load: {type(e).__name__}: {e}") from e
    loaded = time.perf_counter()
    memory = footprint_bytes(model)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=p.batch_size)
    print(f"{tag} loaded in {loaded - start:.1f} s, running lm-eval", flush=True)
    generating = [t for t in tasks if is_generation_task(t)]
    results, generation_seconds = run_tasks(lm, tasks, manager, p)
    evaluated = time.perf_counter()
    scored = evaluated - generation_seconds
    samples = results["samples"]
    generations = {
        t.config.task: answered_rows(samples[t.config.task], t.config.task) for t in generating
    }
    outputs = None if generations else generate(model, tokenizer, prompts, p.max_new_tokens)
    done = time.perf_counter()
    speed = generation_speed(model, tokenizer, speed_prompts or [], p.speed_new_tokens)
    rows = sum(len(r) for r in generations.values())
    print(
        f"{tag} lm-eval {evaluated - loaded:.1f} s"
        + (f" (generation tasks {evaluated - scored:.1f} s, {rows} answers)" if generating else "")
        + (f", {len(prompts)} examples {done - evaluated:.1f} s" if outputs is not None else "")
        + (f", generation {speed['tokens_per_s']:.1f} tokens/s" if speed else ""),
        flush=True,
    )
    entry = {
        "memory_bytes": memory,
        "seconds": evaluated - loaded,
        "load_seconds": loaded - start,
        "metrics": task_metrics(results, name),
    }
    if generating:
        entry["generation_task_seconds"] = evaluated - scored
    if outputs is not None:
        entry["generate_seconds"] = done - evaluated
    if speed is not None:
        entry["speed"] = speed
    fill_missing_stderr(entry["metrics"], samples, aggregations or {})
    del lm, model, results, samples
    gc.collect()  # the next variant must not load while this one is still in memory
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return entry, outputs, generations


def quantization_name(params: Params) -> str:
    q = params.quantize
    if q.quant_type == "int8":  # double quantization is of 4-bit scales only
        return q.quant_type
    return q.quant_type + ("+double_quant" if q.double_quant else "")


Loader = Callable[[], torch.nn.Module]


def variant_plan(params: Params) -> dict[str, tuple[str, str | None, Loader]]:
    """Each variant's (label, quantization, loader), by name."""
    trust = params.base.trust_remote_code
    quant = quantization_name(params)
    full_dtype = str(compute_dtype()).removeprefix("torch.")  # what load_full picks here
    return {
        paths.REFERENCE: (
            f"base ({full_dtype})",
            None,
            lambda: load_full(paths.BASE_MODEL_DIR, trust_remote_code=trust),
        ),
        paths.BASELINE: (
            f"base ({quant})",
            quant,
            lambda: load_quantized(params.quantize, paths.BASE_MODEL_DIR, trust),
        ),
        paths.CANDIDATE: (
            f"base + adapter ({quant})",
            quant,
            lambda: load_adapted(params.quantize, paths.ADAPTER_DIR, paths.BASE_MODEL_DIR, trust),
        ),
    }


def _test_rows(p: EvaluateParams) -> list[dict]:
    """The first test rows: the example prompts and the timed ones."""
    wanted = max(p.examples, p.speed_prompts)
    if wanted and not TEST_SPLIT.is_file():
        raise StageError(f"{TEST_SPLIT}: not found (run the dataset stage)")
    rows = read_jsonl(TEST_SPLIT)[:wanted] if wanted else []
    for i, row in enumerate(rows):
        if not isinstance(row.get("prompt"), str):
            raise StageError(f"{TEST_SPLIT}: row {i + 1} has no string 'prompt'")
    return rows


def speed_prompts_of(p: EvaluateParams) -> list[str]:
    """The prompts every engine's decode speed is timed on: the first speed_prompts test rows."""
    return [r["prompt"] for r in _test_rows(p)[: p.speed_prompts]]


def benchmark_variant(params: Params, name: str) -> dict:
    """One variant on the configured tasks: the content of its reports/eval/variants file
    (its settings, its results, its answers to the example prompts)."""
    if name not in paths.VARIANTS:
        raise StageError(f"unknown variant {name!r}: one of {', '.join(paths.VARIANTS)}")
    p = params.evaluate
    manager = task_manager(p.tasks)  # unknown names fail here, before any model loads
    if name == paths.CANDIDATE and not (paths.ADAPTER_DIR / "adapter_config.json").is_file():
        raise StageError(f"{paths.ADAPTER_DIR}: no adapter_config.json (run the finetune stage)")
    test_rows = _test_rows(p)
    rows = test_rows[: p.examples]
    speed_prompts = speed_prompts_of(p)
    tasks = build_tasks(manager, p.tasks)
    aggregations = {t.config.task: t.aggregation() for t in tasks if hasattr(t, "aggregation")}
    tokenizer = load_tokenizer(paths.BASE_MODEL_DIR, params.base.trust_remote_code)
    label, quantization, load = variant_plan(params)[name]
    entry, outputs, generations = evaluate_variant(
        name,
        load,
        tokenizer,
        tasks,
        manager,
        p,
        [r["prompt"] for r in rows],
        aggregations,
        speed_prompts,
    )
    settings = {
        "tasks": p.tasks,
        "num_fewshot": p.num_fewshot,
        "limit": p.limit,
        "batch_size": p.batch_size,
        "max_new_tokens": p.max_new_tokens,
        "device": device(),
        "lm_eval_version": importlib.metadata.version("lm_eval"),
    }
    if generations:  # the first generation task's answers to the first rows are the examples
        examples = [
            {k: row[k] for k in ("id", "prompt", "reference", "output")}
            for row in next(iter(generations.values()))[: p.examples]
        ]
    else:
        examples = [
            {
                "id": row.get("id", i),
                "prompt": row["prompt"],
                "reference": row.get("response", row.get("completion")),
                "output": output,
            }
            for i, (row, output) in enumerate(zip(rows, outputs or [], strict=True))
        ]
    return {
        "settings": settings,
        "variant": {"label": label, "quantization": quantization, **entry},
        "examples": examples,
        "generations": generations,
    }
