"""`qlora generate`: every row checked before the model loads, answers on disk batch by
batch, and a rerun that resumes where a run was cut short.

The speaker is a tiny random Llama of conftest with its real tokenizer and chat template,
loaded once (untied embeddings and a seed under which each prompt gets another answer, so a
misplaced answer shows); greedy generation is deterministic, so an uninterrupted run is the
ground truth a crashed and resumed one must equal byte for byte.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import qlora.evaluation.benchmark
from helpers.tiny import make_tiny_model_dir
from qlora.cli import app
from qlora.core.io import StageError
from qlora.talk import ANSWER_KEYS, Speaker, generate_file, read_prompts

PROMPTS = [
    {"prompt": "def add(a, b):"},
    {"instruction": "Summarise the function.", "input": "def f(x): return x * 2"},
    {"messages": [{"role": "user", "content": "What does os.path.join do?"}], "id": 3},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]},
    {"prompt": "Name a prime.", "answer": "7"},  # its own "answer" is replaced, as before
]
TOKENS, BATCH = 4, 2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = make_tiny_model_dir(tmp_path_factory.mktemp("talker"), seed=3, tie_word_embeddings=False)
    return AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path)


def make_speaker(tiny, loads: list, label: str = "tiny model") -> Speaker:
    tokenizer, model = tiny
    return Speaker(tokenizer, label, None, lambda: loads.append(label) or model)


def write_prompts(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def prompts_file(tmp_path) -> Path:
    return write_prompts(tmp_path / "prompts.jsonl", PROMPTS)


@pytest.fixture
def uninterrupted(tiny, prompts_file, tmp_path) -> bytes:
    """The output of one run from start to end: the ground truth."""
    out = tmp_path / "full.answers.jsonl"
    speaker = make_speaker(tiny, [])
    assert generate_file(speaker, read_prompts(prompts_file), out, TOKENS, BATCH) == (0, 5)
    answers = [json.loads(line)["answer"] for line in out.read_text().splitlines()]
    assert len(set(answers)) == len(PROMPTS)  # a misplaced answer would show
    return out.read_bytes()


def crash_on_call(monkeypatch, n: int) -> list[int]:
    """qlora.evaluation.benchmark.generate, failing at its n-th call (a kill, an out-of-memory);
    returns the sizes of the batches it was asked for."""
    real, calls = qlora.evaluation.benchmark.generate, []

    def generate(model, tokenizer, prompts, max_new_tokens):
        calls.append(len(prompts))
        if len(calls) == n:
            raise RuntimeError("killed")
        return real(model, tokenizer, prompts, max_new_tokens)

    monkeypatch.setattr(qlora.evaluation.benchmark, "generate", generate)
    return calls


# ---------------------------------------------------------------- rows checked first

ROW = "prompts.jsonl, line 2: "
BAD_ROWS = [
    ('{"messages": "hi"}', ROW + "'messages' is str, expected a list"),
    ('{"messages": []}', ROW + "'messages' is an empty list"),
    ('{"messages": ["hi"]}', ROW + "messages[0] is str, expected an object"),
    ('{"messages": [{"role": 1, "content": "x"}]}', ROW + "messages[0].role is int, expected str"),
    (
        '{"messages": [{"role": "system", "content": "s"}, {"role": "user"}]}',
        ROW + "messages[1] has no 'content'",
    ),
    ('{"messages": [{"role": "user", "content": " "}]}', ROW + "messages[0].content is empty"),
    ('{"messages": [{"role": "user", "content": null}]}', ROW + "messages[0].content is null"),
    (
        '{"messages": [{"role": "system", "content": "Be brief."}]}',
        ROW + "the last message is the system's",
    ),
    (
        '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}',
        ROW + "the last message is the assistant's",
    ),
    ('{"prompt": 3}', ROW + "'prompt' is int, expected str"),
    ('{"prompt": ""}', ROW + "'prompt' is empty"),
    ('{"instruction": "x", "input": {"a": 1}}', ROW + "'input' is dict, expected str"),
    ('{"question": "no known key"}', ROW + 'expected "messages"'),
    ('["a"]', "prompts.jsonl: line 2 is not a JSON object"),
]


@pytest.mark.parametrize(("line", "problem"), BAD_ROWS)
def test_a_malformed_row_is_refused_before_any_model_loads(tmp_path, monkeypatch, line, problem):
    calls = []
    monkeypatch.setattr("qlora.talk.load_speaker", lambda *a, **k: calls.append(a))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "fine"}\n' + line + "\n")
    done = CliRunner().invoke(app, ["generate", "prompts.jsonl"])
    assert done.exit_code == 1 and isinstance(done.exception, SystemExit), done.output
    assert f"FAILED: {problem}" in done.output
    assert calls == []  # neither the tokenizer nor the model was loaded
    assert not (tmp_path / "prompts.answers.jsonl").exists()


def test_a_conversation_the_chat_template_refuses_is_named_before_the_model_loads(tiny, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny[0].name_or_path)  # a copy to change
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}"
        "{{ m['content'] }}{% endfor %}"
    )
    loads = []
    speaker = Speaker(tokenizer, "strict", None, lambda: loads.append(1) or tiny[1])
    prompts = read_prompts(write_prompts(tmp_path / "prompts.jsonl", PROMPTS))
    with pytest.raises(StageError, match=r"prompts.jsonl, line 4: the chat template refuses it"):
        generate_file(speaker, prompts, tmp_path / "out.jsonl", TOKENS, BATCH)
    assert loads == [] and not (tmp_path / "out.jsonl").exists()


# ---------------------------------------------------------------- answers kept, resumed


def test_a_crash_keeps_the_finished_batches_and_a_rerun_generates_only_the_rest(
    tiny, prompts_file, uninterrupted, tmp_path, monkeypatch
):
    prompts, out = read_prompts(prompts_file), tmp_path / "prompts.answers.jsonl"
    crash_on_call(monkeypatch, 2)
    with pytest.raises(RuntimeError, match="killed"):
        generate_file(make_speaker(tiny, []), prompts, out, TOKENS, BATCH)
    expected = uninterrupted.splitlines(keepends=True)
    assert out.read_bytes() == b"".join(expected[:BATCH])  # the first batch, complete

    calls = crash_on_call(monkeypatch, 0)  # no crash this time
    assert generate_file(make_speaker(tiny, []), prompts, out, TOKENS, BATCH) == (2, 3)
    assert calls == [2, 1]  # only the prompts left: 3 and 4, then 5
    assert out.read_bytes() == uninterrupted


def test_the_output_is_each_row_as_it_was_with_its_answer(uninterrupted):
    rows = [json.loads(line) for line in uninterrupted.splitlines()]
    for row, prompt in zip(rows, PROMPTS, strict=True):
        assert {k: v for k, v in row.items() if k not in ANSWER_KEYS} == {
            k: v for k, v in prompt.items() if k not in ANSWER_KEYS
        }
        assert list(row) == list({**prompt, "answer": 0, "model": 0, "max_new_tokens": 0})
        assert (row["model"], row["max_new_tokens"]) == ("tiny model", TOKENS)
    assert rows[4]["answer"] != "7"  # the row's own "answer" is replaced, as before


@pytest.mark.parametrize("keep", [0.99, 0.5, 0.0])
def test_a_last_line_cut_short_is_answered_again(tiny, prompts_file, uninterrupted, tmp_path, keep):
    lines = uninterrupted.splitlines(keepends=True)
    line = lines[2].removesuffix(b"\n")  # killed before its newline, or earlier
    out = tmp_path / "prompts.answers.jsonl"
    out.write_bytes(b"".join(lines[:2]) + line[: max(1, int(len(line) * keep))])
    loads = []
    speaker = make_speaker(tiny, loads)
    assert generate_file(speaker, read_prompts(prompts_file), out, TOKENS, BATCH) == (2, 3)
    assert out.read_bytes() == uninterrupted and loads == ["tiny model"]


def test_a_last_answer_that_lost_only_its_newline_is_kept(
    tiny, prompts_file, uninterrupted, tmp_path
):
    """A whole answer line without its newline (an editor, another tool) is an answer: kept,
    not generated again."""
    lines = uninterrupted.splitlines(keepends=True)
    out = tmp_path / "prompts.answers.jsonl"
    out.write_bytes(b"".join(lines[:2]) + lines[2].removesuffix(b"\n"))
    loads = []
    speaker = make_speaker(tiny, loads)
    assert generate_file(speaker, read_prompts(prompts_file), out, TOKENS, BATCH) == (3, 2)
    assert out.read_bytes() == uninterrupted


def test_a_finished_output_loads_no_model(tiny, prompts_file, uninterrupted, tmp_path):
    out = tmp_path / "prompts.answers.jsonl"
    out.write_bytes(uninterrupted)
    loads = []
    speaker = make_speaker(tiny, loads)
    assert generate_file(speaker, read_prompts(prompts_file), out, TOKENS, BATCH) == (5, 0)
    assert loads == [] and out.read_bytes() == uninterrupted


def edit_prompt(rows: list, path: Path) -> None:
    rows[1] = {**rows[1], "instruction": "Explain the function."}
    write_prompts(path, rows)


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda p, s, o: edit_prompt(list(PROMPTS), p), "line 2 answers another prompt than"),
        (lambda p, s, o: s.update(label="adapter v2"), "line 1 was answered by 'tiny model', not"),
        (lambda p, s, o: s.update(tokens=8), "line 1 was generated with --max-new-tokens 4"),
        (lambda p, s, o: o.write_bytes(o.read_bytes() + b"hello"), "more lines than the 5"),
        (lambda p, s, o: write_prompts(p, PROMPTS[:3]), "more lines than the 3 prompts"),
        (
            lambda p, s, o: o.write_bytes(b"".join(o.read_bytes().splitlines(True)[:2]) + b"hi"),
            "line 3 is cut short and is not the start of an answer to",
        ),
        (lambda p, s, o: o.write_bytes(b"# my notes\n"), "line 1 is not an answer row"),
    ],
)
def test_an_output_that_is_not_these_answers_is_refused_and_kept(
    tiny, prompts_file, uninterrupted, tmp_path, change, problem
):
    out = tmp_path / "prompts.answers.jsonl"
    out.write_bytes(uninterrupted)
    settings = {"label": "tiny model", "tokens": TOKENS}
    change(prompts_file, settings, out)
    before = out.read_bytes()
    loads = []
    speaker = make_speaker(tiny, loads, settings["label"])
    with pytest.raises(StageError, match="move it away or choose another --output") as e:
        generate_file(speaker, read_prompts(prompts_file), out, settings["tokens"], BATCH)
    assert problem in str(e.value) and str(out) in str(e.value)
    assert out.read_bytes() == before and loads == []


def test_the_command_says_how_many_it_resumed_and_generated(
    tiny, prompts_file, uninterrupted, tmp_path, monkeypatch
):
    loads = []
    monkeypatch.setattr("qlora.talk.load_speaker", lambda *a, **k: make_speaker(tiny, loads))
    monkeypatch.setattr("qlora.core.params.load_params", lambda *a, **k: None)
    args = ["generate", str(prompts_file), "--max-new-tokens", str(TOKENS), "--batch-size", "2"]
    crash_on_call(monkeypatch, 3)
    first = CliRunner().invoke(app, args)
    assert isinstance(first.exception, RuntimeError)
    crash_on_call(monkeypatch, 0)
    second = CliRunner().invoke(app, args)
    assert second.exit_code == 0, second.output
    out = tmp_path / "prompts.answers.jsonl"
    assert f"5 answers from tiny model in {out}: 4 resumed from an earlier run, 1 generated" in (
        second.output
    )
    assert out.read_bytes() == uninterrupted
