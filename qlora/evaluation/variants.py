"""The evaluation variants' files merged into one benchmark (torch-free).

Each variant is benchmarked by its own DVC stage (qlora/evaluation/benchmark.py), so a
cached base result can meet a fresh adapter result; `merge_variants` accepts them only
when they were measured with the same settings on the same prompts.
"""

from __future__ import annotations

from qlora.core import paths
from qlora.core.io import StageError

# Settings every variant must share for their scores to compare (the DAG makes them equal;
# a hand-edited or foreign file could not).
SHARED_SETTINGS = (
    "tasks",
    "num_fewshot",
    "limit",
    "batch_size",
    "max_new_tokens",
    "lm_eval_version",
)


def merge_variants(results: dict[str, dict]) -> tuple[dict, list[dict]]:
    """The variants' files as one benchmark: (metrics.json, examples.json) content.

    Each variant is its own DVC stage, so a cached base result can meet a fresh adapter
    result: they must have been measured with the same settings and on the same prompts."""
    missing = [n for n in paths.VARIANTS if n not in results]
    if missing:
        raise StageError(f"no evaluation of {', '.join(missing)}")
    first = results[paths.CANDIDATE]
    for name in paths.VARIANTS:
        for key in SHARED_SETTINGS:
            mine, theirs = results[name]["settings"].get(key), first["settings"].get(key)
            if mine != theirs:
                raise StageError(
                    f"{name} was evaluated with {key} = {mine!r}, {paths.CANDIDATE} with "
                    f"{theirs!r}: rerun `dvc repro` so that they compare"
                )
        prompts = [e["prompt"] for e in results[name]["examples"]]
        if prompts != [e["prompt"] for e in first["examples"]]:
            raise StageError(f"{name} answered other example prompts than {paths.CANDIDATE}")
    settings = dict(first["settings"])
    devices = {n: results[n]["settings"].get("device") for n in paths.VARIANTS}
    if len(set(devices.values())) > 1:  # a run cache filled on another machine: speeds differ
        settings["devices"] = devices
    variants = {n: results[n]["variant"] for n in paths.VARIANTS}
    examples = [
        {
            "id": e["id"],
            "prompt": e["prompt"],
            "reference": e["reference"],
            "outputs": {n: results[n]["examples"][i]["output"] for n in paths.VARIANTS},
        }
        for i, e in enumerate(first["examples"])
    ]
    return {"settings": settings, "variants": variants}, examples


def merge_generations(results: dict[str, dict]) -> dict:
    """Every variant's answers to each generation task's rows, side by side: the content of
    reports/eval/generations.json. The variants must have answered the same rows (same ids
    and prompts, in the same order); merge_variants has checked their settings."""
    first = results[paths.CANDIDATE].get("generations") or {}
    tasks = {}
    for task, rows in first.items():
        per_variant = {}
        for name in paths.VARIANTS:
            theirs = (results[name].get("generations") or {}).get(task)
            if theirs is None:
                raise StageError(f"{name} has no answers of generation task {task!r}")
            if [(r["id"], r["prompt"]) for r in theirs] != [(r["id"], r["prompt"]) for r in rows]:
                raise StageError(
                    f"{name} answered other rows of {task} than {paths.CANDIDATE}: rerun "
                    "`dvc repro` so that they compare"
                )
            per_variant[name] = theirs
        tasks[task] = [
            {
                "id": row["id"],
                "prompt": row["prompt"],
                "reference": row.get("reference"),
                "outputs": {n: per_variant[n][i]["output"] for n in paths.VARIANTS},
                "scores": {n: per_variant[n][i]["scores"] for n in paths.VARIANTS},
            }
            for i, row in enumerate(rows)
        ]
    return {"tasks": tasks}
