"""Generated answers scored on the task, row by row (torch-free).

A generation task (output_type generate_until, e.g. data/eval_tasks/docstring_generate) has
lm-eval produce each variant's greedy answer to every test prompt; `score_answer` (called
by the task's process_results) scores one answer against its reference:
- rouge_l: ROUGE-L F-measure (rouge_score, no stemming): the longest common subsequence of
  lower-cased alphanumeric words, 0-1;
- chrf: sacrebleu's sentence chrF (character 1- to 6-grams, whitespace ignored, beta 2), 0-100.
lm-eval averages each over the rows (aggregation mean) and gives the mean's standard error,
so the gate judges a generation score with the same significance rule as the others.
`answered_rows` keeps every row's prompt, reference, answer and scores from lm-eval's
samples for the variant file; the report's row browser and examples are built from them.
"""

from __future__ import annotations

from functools import lru_cache

from qlora.core.io import StageError

METRICS = ("rouge_l", "chrf")


@lru_cache(maxsize=1)
def _rouge():
    from rouge_score.rouge_scorer import RougeScorer

    return RougeScorer(["rougeL"], use_stemmer=False)


@lru_cache(maxsize=1)
def _chrf():
    from sacrebleu.metrics import CHRF

    return CHRF()  # sacrebleu's defaults: the chrF of its papers and leaderboards


def score_answer(answer: str, reference: str) -> dict[str, float]:
    """One generated answer's scores against its reference (both plain text)."""
    if not isinstance(answer, str) or not isinstance(reference, str):
        raise StageError(
            f"a generated answer and its reference must be text, got "
            f"{type(answer).__name__} and {type(reference).__name__}"
        )
    return {
        "rouge_l": float(_rouge().score(reference, answer)["rougeL"].fmeasure),
        "chrf": float(_chrf().sentence_score(answer, [reference]).score),
    }


def is_generation_task(task) -> bool:
    """A built lm-eval Task whose model output is free text (a Group is not one)."""
    config = getattr(task, "config", None)
    return getattr(config, "output_type", None) == "generate_until"


def _answer(sample: dict) -> str:
    # lm-eval keeps the filtered response ("none" filter: the answer itself) next to the raw.
    answer = sample.get("filtered_resps")
    while isinstance(answer, list) and answer:
        answer = answer[0]
    return answer if isinstance(answer, str) else ""


def answered_rows(samples: list[dict], task: str) -> list[dict]:
    """Every row of one generation task, in test-split order: its id, prompt, reference,
    the variant's answer and that answer's scores (as lm-eval's process_results gave them)."""
    rows = []
    for sample in sorted(samples, key=lambda s: s["doc_id"]):
        doc = sample.get("doc") or {}
        missing = [m for m in METRICS if m not in sample]
        if missing or not isinstance(doc.get("prompt"), str):
            raise StageError(
                f"{task}: row {sample['doc_id'] + 1} has no {missing or 'prompt'} in lm-eval's "
                f"samples: a generation task's process_results must return {list(METRICS)}"
            )
        rows.append(
            {
                "id": doc.get("id", sample["doc_id"]),
                "prompt": doc["prompt"],
                "reference": sample.get("target"),
                "output": _answer(sample),
                "scores": {m: float(sample[m]) for m in METRICS},
            }
        )
    return rows
