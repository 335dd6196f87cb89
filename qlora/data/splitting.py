"""The `dataset` stage's library: raw records -> train / validation / test in chat format.

Rows sharing `dataset.group_field` (the module, for the default corpus) land in one split,
so no module is in two splits. Each row is rendered with the base model's chat template
into `prompt` + `completion`; token counts are stored for validation. Rows longer than
`dataset.max_length` are dropped and counted, never silently truncated.

Also writes the evaluation data the local lm-eval tasks read:
- eval/choice.jsonl: each test prompt with its true answer among distractors (same group
  first), for a multiple-choice accuracy;
- eval/prose.jsonl: general prose that ships with CPython (pydoc_data topics), outside the
  training task, to catch forgetting.
Outputs: data/prepared/splits/, data/prepared/eval/, reports/dataset.json
"""

from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path

from qlora.core.paths import SPLITS
from qlora.data.chat_template import encode, render
from qlora.data.records import detect_format, read_records, to_messages
from qlora.core.io import StageError, read_json
from qlora.core.params import DatasetParams


def check_context(max_length: int, model_dir: Path) -> None:
    """A max_length beyond the model's context would train on positions it never learned."""
    config = read_json(model_dir / "config.json")
    context = config.get("max_position_embeddings") or config.get("n_positions")
    if context and max_length > context:
        raise StageError(
            f"dataset.max_length = {max_length} exceeds the base model's context of {context} "
            f"tokens ({model_dir}/config.json); use at most {context}"
        )


def split_by_group(rows: list[dict], p: DatasetParams) -> dict[str, list[dict]]:
    """Assign whole groups to test, then validation, until each holds its fraction of rows."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for i, row in enumerate(rows):
        key = str(row.get(p.group_field)) if p.group_field else str(i)
        groups[key].append(row)
    order = sorted(groups)
    random.Random(p.seed).shuffle(order)
    total = len(rows)
    targets = {"test": p.test_fraction * total, "validation": p.validation_fraction * total}
    out: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for key in order:
        split = next((s for s in ("test", "validation") if len(out[s]) < targets[s]), "train")
        for row in groups[key]:
            out[split].append({**row, "group": key})
    return out


def cap(rows: list[dict], limit: int | None, seed: int) -> list[dict]:
    if limit is None or len(rows) <= limit:
        return rows
    keep = sorted(random.Random(seed).sample(range(len(rows)), limit))
    return [rows[i] for i in keep]


def choice_rows(test: list[dict], n_candidates: int, seed: int) -> list[dict]:
    """Each test prompt with its true answer among distractors, preferring the same group
    (harder: same vocabulary), then any other test row."""
    rng = random.Random(seed)
    by_group: dict[str, list[str]] = defaultdict(list)
    for r in test:
        by_group[r["group"]].append(r["response"])
    every = sorted({r["response"] for r in test})
    out = []
    for r in test:
        same = [x for x in dict.fromkeys(by_group[r["group"]]) if x != r["response"]]
        rng.shuffle(same)
        others = [x for x in every if x != r["response"] and x not in same]
        rng.shuffle(others)
        distractors = (same + others)[: n_candidates - 1]
        if len(distractors) < n_candidates - 1:
            continue  # too few distinct answers in the test split for this row
        choices = distractors + [r["response"]]
        rng.shuffle(choices)
        out.append(
            {
                "id": r["id"],
                "prompt": r["prompt"],
                "choices": choices,
                "gold": choices.index(r["response"]),
            }
        )
    return out


def prose_rows(n_documents: int, max_chars: int, seed: int) -> list[dict]:
    """Reference-manual prose that ships with CPython: text unlike the training task."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    random.Random(seed).shuffle(names)
    rows = []
    for name in names[:n_documents]:
        text = topics[name].strip()
        if len(text) > max_chars:  # cut at a paragraph boundary where there is one
            cut = text.rfind("\n\n", 0, max_chars)
            text = text[: cut if cut > max_chars // 2 else max_chars]
        rows.append({"id": name, "text": text})
    return rows


def prepare(
    p: DatasetParams, tokenizer, revision: str | None = None
) -> tuple[dict[str, list[dict]], dict]:
    """Splits and a summary; `revision` pins a hub dataset (the sources stage resolves it)."""
    raw = read_records(p.source, revision=revision)
    fmt = detect_format(raw, p.format, where=p.source)
    rows, dropped_long, dropped_dup, seen = [], [], 0, set()
    for i, rec in enumerate(raw, start=1):
        try:
            messages = to_messages(rec, fmt, p.system_prompt)
            prompt, completion = render(tokenizer, messages)
        except (KeyError, TypeError, ValueError) as e:
            raise StageError(f"{p.source}: row {i}: {e}") from None
        # The same prompt twice (stdlib has copied functions) would leak across splits.
        if prompt in seen:
            dropped_dup += 1
            continue
        seen.add(prompt)
        ids = encode(tokenizer, prompt, completion, max_length=10**9)
        prompt_tokens = sum(1 for x in ids["labels"] if x < 0)
        completion_tokens = len(ids["input_ids"]) - prompt_tokens
        if prompt_tokens + completion_tokens > p.max_length:
            dropped_long.append(i)
            continue
        row = {
            "id": f"row-{i}",
            "messages": messages,
            "prompt": prompt,
            "completion": completion,
            "response": messages[-1]["content"],
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
        }
        if p.group_field:
            if p.group_field not in rec:
                raise StageError(f"{p.source}: row {i}: no group field {p.group_field!r}")
            row[p.group_field] = rec[p.group_field]
        rows.append(row)
    if not rows:
        raise StageError(f"{p.source}: no row fits dataset.max_length={p.max_length} tokens")
    splits = split_by_group(rows, p)
    capped = {s: cap(splits[s], getattr(p.max_rows, s), p.seed + k) for k, s in enumerate(SPLITS)}
    summary = {
        "source": p.source,
        "format": fmt,
        "raw_rows": len(raw),
        "dropped_over_max_length": len(dropped_long),
        # Row numbers in dataset.source, so the validate stage can point at them.
        "dropped_over_max_length_rows": dropped_long,
        "dropped_duplicate_prompts": dropped_dup,
        "max_length": p.max_length,
        "rows": {s: len(capped[s]) for s in SPLITS},
        "rows_before_cap": {s: len(splits[s]) for s in SPLITS},
        "groups": {s: len({r["group"] for r in capped[s]}) for s in SPLITS},
        "tokens": {
            s: [r["prompt_tokens"] + r["completion_tokens"] for r in capped[s]] for s in SPLITS
        },
    }
    return capped, summary
