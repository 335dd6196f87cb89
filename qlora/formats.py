"""Reading the dataset formats users bring, and turning each record into a conversation.

Files: JSONL, JSON (a list, or {"data": [...]}), CSV, Parquet; anything else that is not a
local path is taken as a hub dataset id. Record formats:
- alpaca: instruction, optional input, output
- chat: messages = [{role, content}, ...] ending with the assistant's answer
- prompt_completion: prompt, completion
Errors name the file, the row and the key, never a bare traceback.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from qlora.io import StageError, read_jsonl

FORMATS = ("alpaca", "chat", "prompt_completion")
REQUIRED = {
    "alpaca": ("instruction", "output"),
    "chat": ("messages",),
    "prompt_completion": ("prompt", "completion"),
}


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
        import pandas as pd

        return pd.read_parquet(path).to_dict(orient="records")
    raise StageError(
        f"{path}: unsupported file type {suffix!r} (use .jsonl, .json, .csv, .parquet)"
    )


def _read_json(path: Path) -> list[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
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


def _read_csv(path: Path) -> list[dict]:
    with path.open(encoding="utf-8", newline="") as f:
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
    return rows


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
    for fmt in FORMATS:
        if set(REQUIRED[fmt]) <= keys:
            return fmt
    raise StageError(
        f"{where}: unknown record format: row 1 has keys {sorted(keys)}; expected one of "
        + "; ".join(f"{f}: {list(k)}" for f, k in REQUIRED.items())
    )


def to_messages(row: dict, fmt: str, system_prompt: str | None = None) -> list[dict]:
    """One record as a conversation whose last message is the assistant's answer."""
    missing = [k for k in REQUIRED[fmt] if row.get(k) is None]
    if missing:
        raise KeyError(f"missing {missing} for format {fmt!r}")
    if fmt == "chat":
        messages = [dict(m) for m in row["messages"]]
    elif fmt == "alpaca":
        extra = row.get("input") or ""
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
