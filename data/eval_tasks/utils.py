"""Hooks of the local lm-eval tasks (referenced from the YAMLs as `!function utils.<name>`)."""

from __future__ import annotations


def scored_answer(doc: dict) -> str:
    """The text scored after the prompt: the answer with its end-of-turn marker when the
    row has one (what finetune trains on), else the plain answer."""
    return doc.get("completion") or doc["response"]


def answer_bytes(doc: dict) -> int:
    # The marker is one special token, not text a reader sees: per byte of the answer itself.
    return max(1, len((doc.get("response") or scored_answer(doc)).encode("utf-8")))


def answer_bits(doc: dict, results: list) -> dict:
    """(log-likelihood, bytes) pairs that lm-eval's weighted aggregations sum over the split,
    so the score is total bits over total bytes, not a mean of per-row ratios."""
    loglikelihood, _is_greedy = results[0]
    n_bytes = answer_bytes(doc)
    return {"bits_per_byte": (loglikelihood, n_bytes), "byte_perplexity": (loglikelihood, n_bytes)}


def reference_answer(doc: dict) -> str:
    """What a generated answer is scored against: the answer as a reader sees it (the
    prepared rows' `response`, the last assistant message of any input format), without the
    end-of-turn marker that `completion` carries for training."""
    return doc.get("response") or doc["completion"]


def generation_scores(doc: dict, results: list) -> dict:
    """Per-row ROUGE-L (F-measure, 0-1) and chrF (sacrebleu's sentence chrF, 0-100) of the
    greedy answer against the reference; lm-eval averages them and gives each mean its
    standard error, which the gate's significance rule uses."""
    from qlora.evaluation.generation import score_answer

    return score_answer(results[0], reference_answer(doc))
