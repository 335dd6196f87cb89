"""Dataset formats, chat rendering with masked prompts, group splits, atomic outputs."""

from __future__ import annotations

import json

import pytest

from helpers.tiny import alpaca_rows
from qlora.core import paths
from qlora.core.io import StageError, atomic_dir, read_jsonl, write_jsonl
from qlora.core.params import DatasetParams, shipped_params
from qlora.data import splitting
from qlora.data.chat_template import IGNORE_INDEX, encode, render
from qlora.data.records import detect_format, read_records, to_messages
from qlora.models.loading import load_tokenizer


def dataset_params(**values) -> DatasetParams:
    """params.yaml's dataset section with `values` changed."""
    return shipped_params().dataset.model_copy(update=values)


CHAT = {
    "messages": [
        {"role": "user", "content": "Name a prime."},
        {"role": "assistant", "content": "Seven."},
    ]
}


@pytest.mark.parametrize(
    ("row", "fmt", "user", "answer"),
    [
        ({"instruction": "Sum.", "input": "1 2", "output": "3"}, "alpaca", "Sum.\n\n1 2", "3"),
        ({"instruction": "Say hi.", "output": "Hi"}, "alpaca", "Say hi.", "Hi"),
        ({"prompt": "2+2?", "completion": "4"}, "prompt_completion", "2+2?", "4"),
        (CHAT, "chat", "Name a prime.", "Seven."),
    ],
)
def test_every_format_becomes_a_conversation(row, fmt, user, answer):
    assert detect_format([row]) == fmt
    messages = to_messages(row, fmt, system_prompt="Be brief.")
    assert messages[0] == {"role": "system", "content": "Be brief."}
    assert messages[1]["content"] == user and messages[-1]["content"] == answer


def test_unknown_format_names_the_keys():
    with pytest.raises(StageError, match=r"unknown record format.*\['question'\]"):
        detect_format([{"question": "?"}])


def test_files_of_each_type_are_read(tmp_path):
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]
    write_jsonl(tmp_path / "d.jsonl", rows)
    (tmp_path / "d.json").write_text(json.dumps({"data": rows}))
    (tmp_path / "d.csv").write_text("prompt,completion\na,b\nc,d\n")
    import pandas as pd

    pd.DataFrame(rows).to_parquet(tmp_path / "d.parquet")
    for name in ("d.jsonl", "d.json", "d.csv", "d.parquet"):
        assert read_records(str(tmp_path / name)) == rows, name


def test_broken_files_name_the_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"prompt": oops}\n')
    with pytest.raises(StageError, match="line 2 is not valid JSON"):
        read_records(str(tmp_path / "bad.jsonl"))
    (tmp_path / "bad.csv").write_text("prompt,completion\na,b,extra\n")
    with pytest.raises(StageError, match="line 2 has more cells than the header"):
        read_records(str(tmp_path / "bad.csv"))
    with pytest.raises(StageError, match="no such file"):
        read_records(str(tmp_path / "missing.jsonl"))


def test_prompt_is_masked_and_completion_trained(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    prompt, completion = render(tok, CHAT["messages"])
    assert prompt.endswith("<|im_start|>assistant\n")
    assert completion == "Seven.<|im_end|>\n"
    ids = encode(tok, prompt, completion, max_length=512)
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert ids["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert ids["labels"][n_prompt:] == ids["input_ids"][n_prompt:]
    assert tok.decode(ids["input_ids"][n_prompt:]) == completion
    assert len(encode(tok, prompt, completion, max_length=5)["input_ids"]) == 5


def test_groups_never_span_two_splits_and_splits_are_deterministic():
    rows = alpaca_rows(60, groups=12)
    p = dataset_params(source="x", group_field="module", max_length=256, seed=3)
    splits = splitting.split_by_group([{**r, "id": str(i)} for i, r in enumerate(rows)], p)
    groups = [{r["group"] for r in splits[s]} for s in paths.SPLITS]
    assert all(not (a & b) for i, a in enumerate(groups) for b in groups[i + 1 :])
    assert sum(len(v) for v in splits.values()) == 60
    assert splits == splitting.split_by_group([{**r, "id": str(i)} for i, r in enumerate(rows)], p)


def test_dataset_stage_writes_splits_eval_data_and_summary(workspace):
    summary = json.loads((workspace / "reports/dataset.json").read_text())
    assert summary["format"] == "alpaca" and summary["groups_in_two_splits"] == []
    train = read_jsonl(workspace / "data/prepared/splits/train.jsonl")
    assert len(train) == summary["rows"]["train"] > 0
    assert {"prompt", "completion", "response", "prompt_tokens", "completion_tokens"} <= set(
        train[0]
    )
    choice = read_jsonl(workspace / "data/prepared/eval/choice.jsonl")
    assert all(c["choices"][c["gold"]] for c in choice) and len(choice[0]["choices"]) == 4
    assert len(read_jsonl(workspace / "data/prepared/eval/prose.jsonl")) == 2


def test_duplicate_prompts_are_dropped_once(tmp_path, tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    rows = alpaca_rows(20)
    write_jsonl(tmp_path / "d.jsonl", rows + rows[:3])
    p = dataset_params(source=str(tmp_path / "d.jsonl"), group_field="module", max_length=256)
    _, summary = splitting.prepare(p, tok)
    assert summary["dropped_duplicate_prompts"] == 3


def test_a_row_missing_its_answer_is_named(tmp_path, tiny_model_dir):
    rows = alpaca_rows(5)
    del rows[3]["output"]
    write_jsonl(tmp_path / "d.jsonl", rows)
    p = dataset_params(source=str(tmp_path / "d.jsonl"), format="alpaca", max_length=256)
    with pytest.raises(StageError, match=r"row 4: .*missing \['output'\]"):
        splitting.prepare(p, load_tokenizer(tiny_model_dir))


def test_atomic_dir_keeps_the_old_output_when_the_writer_fails(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target) as d:
        (d / "good.txt").write_text("good")
    with pytest.raises(RuntimeError), atomic_dir(target) as d:
        (d / "half.txt").write_text("half")
        raise RuntimeError("killed mid-write")
    assert [p.name for p in target.iterdir()] == ["good.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp left behind


def test_invalid_utf8_is_named_not_a_traceback(tmp_path):
    good = b'{"prompt": "a", "completion": "b"}\n'
    (tmp_path / "bad.jsonl").write_bytes(good + b'{"prompt": "\xff"}\n')
    with pytest.raises(StageError, match="line 2 is not valid UTF-8"):
        read_records(str(tmp_path / "bad.jsonl"))
    (tmp_path / "bad.json").write_bytes(b'[{"prompt": "\xff"}]')
    with pytest.raises(StageError, match="not valid UTF-8"):
        read_records(str(tmp_path / "bad.json"))


def test_max_length_beyond_the_model_context_is_refused(tiny_model_dir):
    splitting.check_context(512, tiny_model_dir)  # the tiny model's context is 512
    with pytest.raises(StageError, match="dataset.max_length = 4096 exceeds .* context of 512"):
        splitting.check_context(4096, tiny_model_dir)


def test_parquet_nulls_are_missing_values_not_the_text_nan(tmp_path, tiny_model_dir):
    import pandas as pd

    rows = alpaca_rows(6)
    rows[0]["input"] = None  # optional: no input, as in JSONL
    rows[2]["output"] = None  # required: the answer is missing
    path = tmp_path / "d.parquet"
    pd.DataFrame(rows).to_parquet(path)
    records = read_records(str(path))
    assert records[0]["input"] is None and records[2]["output"] is None
    assert to_messages(records[0], "alpaca")[0]["content"] == rows[0]["instruction"]
    p = dataset_params(source=str(path), format="alpaca", max_length=256)
    with pytest.raises(StageError, match=r"d\.parquet: row 3: .*missing \['output'\]"):
        splitting.prepare(p, load_tokenizer(tiny_model_dir))


def test_parquet_chat_turns_come_back_as_plain_lists_and_dicts(tmp_path):
    import pandas as pd

    rows = [CHAT, {"messages": [{"role": "user", "content": None}, CHAT["messages"][1]]}]
    pd.DataFrame(rows).to_parquet(tmp_path / "chat.parquet")
    records = read_records(str(tmp_path / "chat.parquet"))
    assert records == rows and type(records[0]["messages"]) is list
    with pytest.raises(KeyError, match=r"messages\[0\]\.content"):
        to_messages(records[1], "chat")


def test_corrupt_parquet_is_named_not_a_traceback(tmp_path):
    import random

    path = tmp_path / "corrupt.parquet"
    path.write_bytes(random.Random(0).randbytes(512))
    with pytest.raises(StageError, match=r"corrupt\.parquet: not a readable Parquet file \(.+\)"):
        read_records(str(path))


def test_csv_cell_longer_than_the_csv_module_default_loads(tmp_path):
    import csv

    default = csv.field_size_limit()
    long_cell = "x" * 200_000  # over the csv module's 131,072-character default
    (tmp_path / "d.csv").write_text(f"prompt,completion\na,b\nc,{long_cell}\n")
    rows = read_records(str(tmp_path / "d.csv"))
    assert rows == [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": long_cell}]
    assert csv.field_size_limit() == default  # the process-wide setting is left as it was


def test_csv_cell_over_the_limit_names_the_file_and_line(tmp_path, monkeypatch):
    from qlora.data import records

    monkeypatch.setattr(records, "CSV_FIELD_LIMIT", 1000)
    (tmp_path / "d.csv").write_text("prompt,completion\na,b\nc,d\ne," + "x" * 1001 + "\n")
    with pytest.raises(StageError, match=r"d\.csv: line 4 cannot be read as CSV \(field larger"):
        read_records(str(tmp_path / "d.csv"))


BOM_ROWS = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("d.csv", "prompt,completion\na,b\nc,d\n"),
        ("d.jsonl", "".join(json.dumps(r) + "\n" for r in BOM_ROWS)),
        ("d.json", json.dumps(BOM_ROWS)),
    ],
    ids=["csv", "jsonl", "json"],
)
def test_a_utf8_bom_is_not_part_of_the_first_key(tmp_path, name, text):
    # Spreadsheet exports (Excel's "CSV UTF-8") and some editors start the file with one.
    (tmp_path / name).write_text("\ufeff" + text, encoding="utf-8")
    assert read_records(str(tmp_path / name)) == BOM_ROWS


def test_an_invisible_character_in_a_key_is_shown_escaped():
    with pytest.raises(StageError, match=r"unknown record format.*'\\u200bprompt'"):
        detect_format([{"\u200bprompt": "a", "completion": "b"}])
