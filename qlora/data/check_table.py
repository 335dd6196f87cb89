"""Rows -> a table of derived columns that Great Expectations can judge.

Most defects that break fine-tuning are not visible in a raw column: a row too long to
train on, chat turns in the wrong order, a test row that repeats a train row. Each gets a
derived column here (`n_trained_tokens`, `roles`, `appears_in_train`, ...) and an
expectation on that column in qlora/data/validation.py. Rows whose schema is broken keep nulls in
the derived columns, so one defect is reported once (as `schema`), not by every check.

The table's index is the row number users see: the line number for JSONL, else the
1-based record number.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from qlora.data.chat_template import encode, render
from qlora.data.records import REQUIRED, is_null, to_messages
from qlora.core.io import read_jsonl_numbered

ROLES = ("system", "user", "assistant")
# Fields of a prepared split row (stages/dataset.py) and the types training relies on.
PREPARED_FIELDS = {
    "messages": list,
    "prompt": str,
    "completion": str,
    "response": str,
    "prompt_tokens": int,
    "completion_tokens": int,
}

# Role sequences ("system>user>assistant") as regexes, so GX judges them directly.
KNOWN_ROLES_RE = r"^(?:system|user|assistant)(?:>(?:system|user|assistant))*$"
# System only first; user and assistant alternate, starting with the user.
ROLE_ORDER_RE = r"^(?:system>)?user(?:>assistant>user)*(?:>assistant)?$"
LAST_TURN_RE = r"(?:^|>)assistant$"
# C0/C1 control characters other than tab and newlines, and U+FFFD, which is what
# undecodable bytes become: text a tokenizer turns into junk tokens.
ENCODING_RE = "[\\x00-\\x08\\x0b\\x0c\\x0e-\\x1f\\x7f-\\x9f\\ufffd]"
PII_PATTERNS = {
    "e-mail": r"[\w.+-]+@[\w-]+(?:\.[\w-]+)*\.[A-Za-z]{2,}",
    "phone": r"(?:\+\d{1,3}[\s.-]?)?\(?\b\d{3}\)?[\s.-]\d{3}[\s.-]\d{4}\b",
    "IP address": r"\b(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)\b",
}

COLUMNS = [
    "schema_problem", "missing_value", "roles", "role_order", "prompt_text", "response", "text",
    "conversation", "normalised_text", "blank_fields", "prompt_tokens", "completion_tokens",
    "total_tokens", "n_trained_tokens", "response_chars", "prompt_turns",
]  # fmt: skip


# ------------------------------------------------------------------ reading


def read_jsonl_lenient(path: Path) -> tuple[dict[int, dict], list[int]]:
    """Rows keyed by line number, and the lines that were not valid UTF-8 (their bad bytes
    become U+FFFD, so the `encoding` check names the row instead of a traceback)."""
    rows, bad_utf8 = read_jsonl_numbered(path, lenient_utf8=True)
    return dict(rows), bad_utf8


# ------------------------------------------------------------------ schema


def _is_list(v) -> bool:
    # Lists of rows built with pandas come as numpy arrays.
    return isinstance(v, (list, tuple)) or type(v).__name__ == "ndarray"


def _type_name(v) -> str:
    return type(v).__name__


def _message_problems(messages) -> tuple[str | None, str | None]:
    """(schema problem, missing value) of a `messages` list."""
    if not _is_list(messages):
        return f"'messages' is {_type_name(messages)}, expected a list of turns", None
    if len(messages) == 0:
        return "'messages' is an empty list", None
    for k, m in enumerate(messages):
        if not isinstance(m, dict):
            return f"messages[{k}] is {_type_name(m)}, expected an object", None
        for key in ("role", "content"):
            if key not in m:
                return f"messages[{k}] has no {key!r}", None
            if is_null(m[key]):
                return None, f"messages[{k}].{key} is null"
            if not isinstance(m[key], str):
                return f"messages[{k}].{key} is {_type_name(m[key])}, expected str", None
    return None, None


def schema_problems(row: dict, fmt: str | None) -> tuple[str | None, str | None]:
    """(schema problem, missing value) of one row, each None when there is none.

    fmt None means a prepared split row; else one of qlora.core.params.RECORD_FORMATS.
    """
    fields = PREPARED_FIELDS if fmt is None else dict.fromkeys(REQUIRED[fmt], str)
    if fmt == "chat":
        fields["messages"] = list
    for key in fields:
        if key not in row:
            return f"no field {key!r}", None
    for key, typ in fields.items():
        v = row[key]
        if is_null(v):
            return None, f"{key!r} is null"
        if typ is list:
            if not _is_list(v):
                return f"{key!r} is {_type_name(v)}, expected a list", None
        elif typ is int:
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                return f"{key!r} = {v!r}, expected a count (int >= 0)", None
        elif not isinstance(v, typ):
            return f"{key!r} is {_type_name(v)}, expected {typ.__name__}", None
    if fmt == "alpaca" and not is_null(row.get("input")) and not isinstance(row["input"], str):
        return f"'input' is {_type_name(row['input'])}, expected str", None
    if "messages" in fields:
        return _message_problems(row["messages"])
    return None, None


# ------------------------------------------------------------------ derived columns


def normalise(text: str) -> str:
    """Lower case, punctuation and runs of white space as one space: near duplicates that
    differ only in case, spacing or punctuation become equal."""
    return " ".join(re.sub(r"[\W_]+", " ", text.lower()).split())


def _derive(messages: list[dict]) -> dict:
    roles = [m["role"] for m in messages]
    users = [m["content"] for m in messages if m["role"] == "user"]
    # Only the last answer is trained (qlora/data/chat_template.py), so it is "the response".
    response = messages[-1]["content"] if roles[-1] == "assistant" else None
    text = "\n".join(m["content"] for m in messages)
    return {
        "roles": ">".join(roles),
        # Order is judged only where every role is known: an unknown one is `chat_roles`.
        "role_order": ">".join(roles) if set(roles) <= set(ROLES) else None,
        "prompt_text": users[-1] if users else None,
        "response": response,
        "text": text,
        "conversation": json.dumps(
            [[m["role"], m["content"]] for m in messages], ensure_ascii=False
        ),
        # Everything before the answer: the dataset stage keeps one row per prompt.
        "prompt_turns": json.dumps(
            [[m["role"], m["content"]] for m in messages[:-1]], ensure_ascii=False
        ),
        "normalised_text": normalise(text),
        # An empty answer is `empty_response`'s, not also a length outlier.
        "response_chars": float(len(response)) if response and response.strip() else math.nan,
    }


def _text_fields(row: dict, fmt: str | None) -> dict[str, object]:
    """The texts of a row that become the conversation, by the name a user finds them by:
    a chat turn ("messages[1].content (user)") or a field ("'input'")."""
    if fmt is None or fmt == "chat":
        return {f"messages[{k}].content ({m['role']})": m["content"]
                for k, m in enumerate(row["messages"])}  # fmt: skip
    return {repr(k): row.get(k) for k in (*REQUIRED[fmt], "input")}


def _blank_fields(row: dict, fmt: str | None) -> str | None:
    """The fields (or chat turns) that hold only white space, such as an Alpaca `input` of
    spaces and tabs beside a real instruction: a value lost on the way, or junk the template
    renders. An empty string is no value (Alpaca's "no input"), not a blank one."""
    # Raw white space: the report's clip() shows it escaped (\t, \n).
    blank = [f"{name} = '{v[:20]}'" for name, v in _text_fields(row, fmt).items()
             if isinstance(v, str) and v and not v.strip()]  # fmt: skip
    return f"only white space: {', '.join(blank)}" if blank else None


def control_token_texts(tokenizer) -> list[str]:
    """The texts the tokenizer turns into its special tokens whatever surrounds them: its
    named special tokens (bos, eos, pad, ...) and every added token marked special (the
    chat template's <|im_start|>, a model's reserved tokens)."""
    added = (t.content for t in tokenizer.added_tokens_decoder.values() if t.special)
    return [t for t in dict.fromkeys([*tokenizer.all_special_tokens, *added]) if t]


def control_token_pattern(tokens: Sequence[str]) -> re.Pattern | None:
    # Longest first, so a token that contains another is named as itself.
    ordered = sorted(tokens, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, ordered))) if ordered else None


def _control_tokens(row: dict, fmt: str | None, pattern: re.Pattern | None) -> str | None:
    """The fields whose text holds a special token's text. Tokenized as the real token, it
    is a role marker inside the data: a fake system turn, or an early end of text, trained."""
    if pattern is None:
        return None
    found = []
    for name, text in _text_fields(row, fmt).items():
        hits = dict.fromkeys(pattern.findall(text)) if isinstance(text, str) else {}
        if hits:
            found.append(f"{name} contains {', '.join(map(repr, hits))}")
    return "; ".join(found) or None


def _tokens(prompt_tokens: float, completion_tokens: float, max_length: int | None) -> dict:
    total = prompt_tokens + completion_tokens
    # A row over max_length is dropped by the dataset stage, never truncated: it trains
    # nothing and is `over_max_length`'s (validation.length_policy), not this column's.
    dropped = max_length is None or math.isnan(total) or total > max_length
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": total,
        "n_trained_tokens": math.nan if dropped else completion_tokens,
    }


def build_frame(
    rows: dict[int, dict],
    fmt: str | None,
    max_length: int | None,
    tokenizer=None,
    system_prompt: str | None = None,
    control_tokens: Sequence[str] | None = None,
) -> pd.DataFrame:
    """One row of derived columns per record, indexed by row number.

    fmt None: prepared split rows, whose token counts are already stored. Otherwise raw
    records of that format, rendered with `tokenizer` (None: no token columns).
    `control_tokens`: the base tokenizer's special tokens (control_token_texts), for the
    column `control_tokens` (None: not checked, no such column).
    """
    columns = COLUMNS + ([] if control_tokens is None else ["control_tokens"])
    pattern = control_token_pattern(control_tokens or [])
    records = []
    for _, row in rows.items():
        problem, missing = schema_problems(row, fmt)
        rec: dict = dict.fromkeys(columns)
        rec.update(schema_problem=problem, missing_value=missing)
        nan = math.nan
        rec.update(_tokens(nan, nan, None))
        rec["response_chars"] = nan
        if problem is None and missing is None:
            messages = row["messages"] if fmt is None else to_messages(row, fmt, system_prompt)
            rec.update(_derive(list(messages)))
            # A blank whole turn is `empty_prompt`'s or `empty_response`'s: one report.
            if all(isinstance(t, str) and t.strip() for t in (rec["prompt_text"], rec["response"])):
                rec["blank_fields"] = _blank_fields(row, fmt)
            if control_tokens is not None:
                rec["control_tokens"] = _control_tokens(row, fmt, pattern)
            if fmt is None:
                counts = (float(row["prompt_tokens"]), float(row["completion_tokens"]))
                rec.update(_tokens(*counts, max_length))
            elif tokenizer is not None and rec["response"] is not None:
                rec.update(_tokens(*_count_tokens(tokenizer, list(messages)), max_length))
        records.append(rec)
    frame = pd.DataFrame(records, columns=columns, index=pd.Index(list(rows)))
    frame.attrs["control_tokens"] = list(control_tokens or [])
    for col in ("prompt_tokens", "completion_tokens", "total_tokens", "n_trained_tokens"):
        frame[col] = frame[col].astype(float)
    # Only the first copy of an exact duplicate counts for near duplicates: one defect,
    # one report.
    repeat = frame["conversation"].notna() & frame["conversation"].duplicated(keep="first")
    frame.loc[repeat, "normalised_text"] = None
    return frame


def _count_tokens(tokenizer, messages: list[dict]) -> tuple[float, float]:
    """(prompt, completion) tokens exactly as stages/dataset.py counts them."""
    try:
        prompt, completion = render(tokenizer, messages)
    except Exception:  # a template that rejects the role order: the chat checks name it
        return math.nan, math.nan
    ids = encode(tokenizer, prompt, completion, max_length=10**9)
    n_prompt = sum(1 for x in ids["labels"] if x < 0)
    return float(n_prompt), float(len(ids["input_ids"]) - n_prompt)


# ------------------------------------------------------------------ leakage


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def add_leakage(
    frame: pd.DataFrame,
    train: pd.DataFrame,
    n: int,
    max_fraction: float,
    common_fraction: float,
) -> None:
    """Columns `appears_in_train` and `leak_detail`: the row's prompt is a train prompt
    (after normalisation), or at least `max_fraction` of its word n-grams occur in train.

    N-grams found in more than `common_fraction` of the train rows are the instruction or
    template every row repeats, not leakage: they count neither way.
    """
    prompts: dict[str, int] = {}
    owner: dict[tuple[str, ...], int] = {}
    seen_in = Counter()
    for row, p, text in zip(train.index, train["prompt_text"], train["text"], strict=True):
        if not is_null(p):
            prompts.setdefault(normalise(p), row)
        if not is_null(text):
            grams = ngrams(text, n)
            seen_in.update(grams)
            for g in grams:
                owner.setdefault(g, row)
    common = {g for g, k in seen_in.items() if k > common_fraction * len(train)}
    leaks: list[bool | None] = []
    details: list[str | None] = []
    for p, text in zip(frame["prompt_text"], frame["text"], strict=True):
        if is_null(p) or is_null(text):
            leaks.append(None)
            details.append(None)
            continue
        same = prompts.get(normalise(p))
        grams = ngrams(text, n) - common
        shared = [owner[g] for g in grams if g in owner]
        fraction = len(shared) / len(grams) if grams else 0.0
        if same is not None:
            leaks.append(True)
            details.append(f"same prompt as train row {same}")
        elif grams and fraction >= max_fraction:
            top = Counter(shared).most_common(1)[0][0]
            leaks.append(True)
            details.append(f"{fraction:.0%} of its {n}-grams occur in train (most in row {top})")
        else:
            leaks.append(False)
            details.append(None)
    frame["appears_in_train"] = pd.Series(leaks, index=frame.index, dtype=object)
    frame["leak_detail"] = pd.Series(details, index=frame.index, dtype=object)


# ------------------------------------------------------------------ showing a failing row


def clip(text: str, limit: int = 120) -> str:
    text = repr(text)[1:-1] if isinstance(text, str) else str(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def first_match(pattern: str, text: str) -> str:
    """The match with a little context, escaped so control characters are visible."""
    m = re.search(pattern, text)
    if not m:
        return clip(text)
    return clip(text[max(0, m.start() - 30) : m.end() + 30])


def pii_found(text: str) -> str:
    hits = ((kind, re.search(pattern, text)) for kind, pattern in PII_PATTERNS.items())
    return "; ".join(f"{kind}: {m.group(0)}" for kind, m in hits if m)
