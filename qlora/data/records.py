"""Reading the dataset formats users bring, and turning each record into a conversation.

Files: JSONL, JSON (a list, or {"data": [...]}), CSV, Parquet; anything else that is not a
local path is taken as a hub dataset id. Record formats:
- alpaca: instruction, optional input, output
- chat: messages = [{role, content}, ...] ending with the assistant's answer
- prompt_completion: prompt, completion
Errors name the file, the row and the key, never a bare traceback. Every reader returns
plain Python values, a missing cell as None; a UTF-8 byte order mark (spreadsheet exports
start files with one) is not part of the first key.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
from collections.abc import Iterator
from pathlib import Path

from qlora.core.io import StageError, read_jsonl
from qlora.core.params import RECORD_FORMATS

REQUIRED = {
    "alpaca": ("instruction", "output"),
    "chat": ("messages",),
    "prompt_completion": ("prompt", "completion"),
}
# Characters one CSV cell may hold. The csv module's default (131,072) is less than one
# long example (dataset.max_length allows 131,072 tokens of several characters each); a
# cell past 16 Mi characters is no conversation a model fits, and is an error naming it.
CSV_FIELD_LIMIT = 1 << 24


def read_records(source: str, split: str = "train", revision: str | None = None) -> list[dict]:
    """Rows of a local file, or of split `split` of a hub dataset (at `revision`)."""
    path = Path(source)
    if not path.exists():
        if path.suffix.lower() in {".jsonl", ".json", ".csv", ".parquet"} or "/" not in source:
            raise StageError(f"dataset.source: {source}: no such file")
        return _read_hub(source, split, revision)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return read_jsonl(path)
    if suffix == ".json":
        return _read_json(path)
    if suffix == ".csv":
        return _read_csv(path)
    if suffix == ".parquet":
        return _read_parquet(path)
    raise StageError(
        f"{path}: unsupported file type {suffix!r} (use .jsonl, .json, .csv, .parquet)"
    )


def _read_json(path: Path) -> list[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as e:
        raise StageError(f"{path}: not valid UTF-8 at byte {e.start} ({e.reason})") from None
    except json.JSONDecodeError as e:
        msg = f"{path}: not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}"
        raise StageError(msg) from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise StageError(f"{path}: expected a JSON list of objects (or {{'data': [...]}})")
    return data


@contextlib.contextmanager
def _csv_field_limit(limit: int) -> Iterator[None]:
    """The csv module's limit is process-wide: raise it for one read, then restore it."""
    previous = csv.field_size_limit(limit)
    try:
        yield
    finally:
        csv.field_size_limit(previous)


def _read_csv(path: Path) -> list[dict]:
    with path.open(encoding="utf-8-sig", newline="") as f, _csv_field_limit(CSV_FIELD_LIMIT):
        reader = csv.DictReader(f)
        rows = []
        try:
            for row in reader:
                if None in row:  # more cells than header columns
                    msg = f"{path}: line {reader.line_num} has more cells than the header"
                    raise StageError(msg)
                rows.append(row)
        except UnicodeDecodeError as e:
            msg = f"{path}: not valid UTF-8 after line {reader.line_num} ({e.reason})"
            raise StageError(msg) from None
        except csv.Error as e:  # a cell over CSV_FIELD_LIMIT, a NUL byte, a stray quote
            # DictReader counts the lines of the rows it returned; its reader, the line that
            # failed.
            line = reader.reader.line_num
            raise StageError(f"{path}: line {line} cannot be read as CSV ({e})") from None
    return rows


def _read_parquet(path: Path) -> list[dict]:
    # pyarrow, not pandas: pandas turns a null string into NaN (the text "nan" once
    # rendered), a null int into a float, and lists into numpy arrays.
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as e:  # corrupt, truncated, or a feature it lacks
        raise StageError(f"{path}: not a readable Parquet file ({e})") from None


def _read_hub(dataset_id: str, split: str, revision: str | None = None) -> list[dict]:
    import datasets

    try:
        return list(datasets.load_dataset(dataset_id, split=split, revision=revision))
    except Exception as e:  # hub errors come in many classes; the message is what matters
        raise StageError(
            f"dataset.source: {dataset_id!r} is not a local file and could not be loaded from "
            f"the hub ({e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None


def detect_format(rows: list[dict], declared: str = "auto", where: str = "dataset") -> str:
    if declared != "auto":
        return declared
    if not rows:
        raise StageError(f"{where}: no rows")
    keys = set(rows[0])
    for fmt in RECORD_FORMATS:
        if set(REQUIRED[fmt]) <= keys:
            return fmt
    raise StageError(
        f"{where}: unknown record format: row 1 has keys {sorted(keys)}; expected one of "
        + "; ".join(f"{f}: {list(k)}" for f, k in REQUIRED.items())
    )


def is_null(value: object) -> bool:
    """A missing value: None, or a float NaN (JSON allows NaN; pandas writes a missing cell
    as one), which would otherwise reach the prompt as the text "nan"."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def _chat_turns(turns) -> list[dict]:
    messages = [dict(m) for m in turns]
    for k, m in enumerate(messages):
        missing = [f"messages[{k}].{key}" for key in ("role", "content") if is_null(m.get(key))]
        if missing:
            raise KeyError(f"missing {missing} for format 'chat'")
    return messages


def to_messages(row: dict, fmt: str, system_prompt: str | None = None) -> list[dict]:
    """One record as a conversation whose last message is the assistant's answer."""
    missing = [k for k in REQUIRED[fmt] if is_null(row.get(k))]
    if missing:
        raise KeyError(f"missing {missing} for format {fmt!r}")
    if fmt == "chat":
        messages = _chat_turns(row["messages"])
    elif fmt == "alpaca":
        extra = "" if is_null(row.get("input")) else row["input"]
        user = f"{row['instruction']}\n\n{extra}".strip() if extra else str(row["instruction"])
        messages = [
            {"role": "user", "content": user},
            {"role": "assistant", "content": row["output"]},
        ]
    else:
        messages = [
            {"role": "user", "content": row["prompt"]},
            {"role": "assistant", "content": row["completion"]},
        ]
    if system_prompt and messages[0].get("role") != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages
