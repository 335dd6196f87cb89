"""The generation task's scores against independent references.

ROUGE-L and chrF are recomputed from their definitions (tests/helpers/text_scores.py), not
through rouge_score or sacrebleu. The task itself (data/eval_tasks/docstring_generate.yaml) runs
through real lm-eval with stand-in models whose answers are known: one that answers the
reference exactly, one that echoes the prompt back.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest

from helpers.repo import REPO
from helpers.text_scores import reference_chrf, reference_rouge_l
from qlora.core.io import StageError, write_jsonl
from qlora.evaluation.generation import answered_rows, score_answer

TASK = "docstring_generate"


PAIRS = [
    ("Return True if the object is empty.", "Return True if the object is empty."),
    ("the cat sat on the mat", "the cat on the mat"),
    (
        "Return disk usage statistics for the given path.",
        "Return disk usage statistics about the given path.",
    ),
    (
        "def disk_usage(path):\n    st = os.statvfs(path)",
        "Return disk usage statistics about the given path.",
    ),
    (
        "Replace & < > with HTML-safe sequences.",
        'Replace special characters "&", "<" and ">" to HTML-safe sequences.',
    ),
    ("", "Same as a + b."),
    ("Größe der Datei zurückgeben.", "Return the size of the file."),
    ("a a a b", "a b a b"),
]


@pytest.mark.parametrize(("answer", "reference"), PAIRS)
def test_scores_match_the_reference_definitions(answer: str, reference: str):
    got = score_answer(answer, reference)
    assert got["rouge_l"] == pytest.approx(reference_rouge_l(answer, reference), abs=1e-9)
    assert got["chrf"] == pytest.approx(reference_chrf(answer, reference), abs=1e-9)


def test_a_hand_computed_rouge_l():
    # LCS of "the cat sat on the mat" and "the cat on the mat" is 5 words: P 5/6, R 1.
    assert score_answer("the cat sat on the mat", "the cat on the mat")["rouge_l"] == (
        pytest.approx(2 * (5 / 6) * 1 / (5 / 6 + 1))
    )


def test_the_exact_answer_scores_the_maximum_and_nothing_in_common_zero():
    assert score_answer("Same as a + b.", "Same as a + b.") == {"rouge_l": 1.0, "chrf": 100.0}
    assert score_answer("xyz", "Same as a + b.") == {"rouge_l": 0.0, "chrf": 0.0}


def test_an_answer_that_is_not_text_is_named():
    with pytest.raises(StageError, match="must be text, got NoneType"):
        score_answer(None, "x")  # type: ignore[arg-type]


# ------------------------------------------------------------ the task through lm-eval


def templated(user: str) -> str:
    return f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


ROWS = [
    {
        "id": f"m.f{i}",
        "prompt": templated(f"Write a one-line docstring for this Python function:\n\n{code}"),
        "response": summary,
        "completion": summary + "<|im_end|>",
    }
    for i, (code, summary) in enumerate(
        [
            ("def is_empty(x):\n    return not x", "Return True if the object is empty."),
            ("def add(a, b):\n    return a + b", "Same as a + b."),
            ("def dedent(text):\n    ...", "Remove any common leading whitespace from every line."),
            ("def join(a, *p):\n    ...", "Join two or more pathname components."),
        ]
    )
]


def stand_in(answer):
    """An lm-eval model whose answer to each request is `answer(context, doc)`."""
    from lm_eval.api.model import LM

    class StandIn(LM):
        def __init__(self):
            super().__init__()
            self.requests = []

        def loglikelihood(self, requests):
            raise NotImplementedError

        def loglikelihood_rolling(self, requests):
            raise NotImplementedError

        def generate_until(self, requests):
            self.requests += requests
            return [answer(r.args[0], r.doc) for r in requests]

    return StandIn()


def run_task(root: Path, model, max_new_tokens: int = 12) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(REPO / "data/eval_tasks"), include_defaults=False)
    return lm_eval.simple_evaluate(
        model=model,
        tasks=[TASK],
        task_manager=manager,
        log_samples=True,
        gen_kwargs={"max_gen_toks": max_new_tokens},
    )


@pytest.fixture
def split(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)  # the task reads data/prepared/splits/test.jsonl from here
    write_jsonl(tmp_path / "data/prepared/splits/test.jsonl", ROWS)
    return tmp_path


def test_a_model_that_answers_the_reference_scores_the_maximum(split: Path):
    model = stand_in(lambda context, doc: doc["response"])
    results = run_task(split, model)
    got = results["results"][TASK]
    assert got["rouge_l,none"] == 1.0 and got["chrf,none"] == 100.0
    assert got["rouge_l_stderr,none"] == 0.0 and got["chrf_stderr,none"] == 0.0
    assert results["higher_is_better"][TASK] == {"rouge_l": True, "chrf": True}
    # Greedy, the token limit from the caller, the templated prompt as it is.
    assert [r.args[0] for r in model.requests] == [r["prompt"] for r in ROWS]
    kwargs = model.requests[0].args[1]
    assert kwargs["do_sample"] is False and kwargs["max_gen_toks"] == 12


def test_a_model_that_echoes_the_prompt_scores_what_the_definitions_give(split: Path):
    results = run_task(split, stand_in(lambda context, doc: context))
    rouge = [reference_rouge_l(r["prompt"], r["response"]) for r in ROWS]
    chrf = [reference_chrf(r["prompt"], r["response"]) for r in ROWS]
    got = results["results"][TASK]
    assert got["rouge_l,none"] == pytest.approx(statistics.fmean(rouge))
    assert got["chrf,none"] == pytest.approx(statistics.fmean(chrf))
    # The standard error of a mean: sample standard deviation over the square root of n.
    assert got["rouge_l_stderr,none"] == pytest.approx(statistics.stdev(rouge) / math.sqrt(4))
    assert got["chrf_stderr,none"] == pytest.approx(statistics.stdev(chrf) / math.sqrt(4))
    assert 0 < got["rouge_l,none"] < 1  # the echo holds the function's words, not the summary

    rows = answered_rows(results["samples"][TASK], TASK)
    assert [r["id"] for r in rows] == [r["id"] for r in ROWS]
    for row, source, r, c in zip(rows, ROWS, rouge, chrf, strict=True):
        assert row["prompt"] == row["output"] == source["prompt"]
        assert row["reference"] == source["response"]  # no end-of-turn marker
        assert row["scores"] == {"rouge_l": pytest.approx(r), "chrf": pytest.approx(c)}
    json.dumps(rows)  # what the variant file stores


def test_rows_without_the_scores_are_named():
    sample = {"doc_id": 2, "doc": {"prompt": "p"}, "filtered_resps": ["a"], "rouge_l": 0.5}
    with pytest.raises(StageError, match=r"docstring_generate: row 3 has no \['chrf'\]"):
        answered_rows([sample], TASK)
