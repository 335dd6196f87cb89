"""The `validate` stage's library: refuse data that would break fine-tuning, early.

Each check is a Great Expectations expectation on a column of the table that
qlora/data/check_table.py derives from the rows (empty answers, blank fields, duplicates, chat
turns out of order, test rows that repeat train rows, encoding junk, PII, the base
tokenizer's special tokens inside the text).
params.yaml `validate.checks` makes each one an error (stops the pipeline), a warning
(printed and reported) or off. Rows longer than dataset.max_length are judged by one rule
(length_policy) in the DAG and for a file: the dataset stage drops them, a warning up to
validate.max_dropped_fraction of the rows, an error past it.

In the DAG it checks data/prepared/splits/{train,validation,test}.jsonl and train against
validation and test (leakage), writes reports/validation/result.json and GX Data Docs
(reports/validation/data_docs/index.html), then fails if an error check failed. It writes
nothing else, so a rejected dataset leaves the last good adapter and reports alone.

`qlora validate PATH` (cli_validate) runs the same checks on any dataset file.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from qlora.data import check_table as dc
from qlora.core.params import RECORD_FORMATS
from qlora.data.records import REQUIRED, detect_format, read_records
from qlora.core.io import StageError, atomic_dir, read_json, write_json
from qlora.core.params import ValidateParams, load_params, shipped_params
from qlora.core import paths

N_EXAMPLES = 3  # example rows per failed check: enough to find the pattern, small to read


@dataclass(frozen=True)
class Check:
    name: str
    description: str
    expectation: object  # a great_expectations Expectation
    # The value that shows why a failing row fails (None for table-level checks).
    show: Callable[[pd.DataFrame, object], str] | None


def _first_other(frame: pd.DataFrame, column: str, row) -> str:
    value = frame.at[row, column]
    same = frame.index[frame[column] == value]
    other = next((r for r in same if r != row), None)
    return f"same as row {other}: {dc.clip(frame.at[row, 'text'])}"


def _tokens_shown(frame: pd.DataFrame, row) -> str:
    p, c = frame.at[row, "prompt_tokens"], frame.at[row, "completion_tokens"]
    return f"prompt {p:.0f} + response {c:.0f} = {p + c:.0f} tokens"


def _outlier_shown(frame: pd.DataFrame, row) -> str:
    lengths = frame["response_chars"]
    return (
        f"{frame.at[row, 'response_chars']:.0f} characters (mean {lengths.mean():.0f}, "
        f"sd {lengths.std():.0f}): {dc.clip(frame.at[row, 'response'], 80)}"
    )


def _encoding_shown(frame: pd.DataFrame, row) -> str:
    shown = dc.first_match(dc.ENCODING_RE, frame.at[row, "text"])
    invalid = row in frame.attrs.get("invalid_utf8_rows", ())
    return f"invalid UTF-8 bytes (read as \\ufffd): {shown}" if invalid else shown


def _control_tokens_description(tokens: list[str]) -> str:
    more = f" and {len(tokens) - 5} more" if len(tokens) > 5 else ""
    return (
        f"no text holds one of the base tokenizer's {len(tokens)} special tokens "
        f"({', '.join(map(repr, tokens[:5]))}{more}): each would be tokenized as the real "
        "token, a role marker or an end of text inside the data"
    )


def plan_checks(
    v: ValidateParams,
    frame: pd.DataFrame,
    min_rows: int,
    max_length: int | None,
) -> list[Check]:
    """The checks of one split (or file) that params.yaml does not switch off."""
    import great_expectations.expectations as gxe

    def col(name: str) -> Callable[[pd.DataFrame, object], str]:
        return lambda f, r: dc.clip(f.at[r, name])

    checks = [
        Check("schema", "required fields present with the right types",
              gxe.ExpectColumnValuesToBeNull(column="schema_problem"), col("schema_problem")),
        Check("missing_values", "no required field or chat turn is null",
              gxe.ExpectColumnValuesToBeNull(column="missing_value"), col("missing_value")),
        Check("empty_prompt", "the user turn has non-whitespace text",
              gxe.ExpectColumnValuesToMatchRegex(column="prompt_text", regex=r"\S"),
              col("prompt_text")),
        Check("empty_response", "the trained answer has non-whitespace text",
              gxe.ExpectColumnValuesToMatchRegex(column="response", regex=r"\S"),
              col("response")),
        Check("blank_fields", "no field or turn holds only white space",
              gxe.ExpectColumnValuesToBeNull(column="blank_fields"), col("blank_fields")),
        Check("exact_duplicates", "no conversation appears twice",
              gxe.ExpectColumnValuesToBeUnique(column="conversation"),
              lambda f, r: _first_other(f, "conversation", r)),
        Check("near_duplicates",
              "no two conversations are equal after lower-casing and dropping punctuation "
              "and spacing",
              gxe.ExpectColumnValuesToBeUnique(column="normalised_text"),
              lambda f, r: _first_other(f, "normalised_text", r)),
        Check("chat_roles", f"every turn's role is one of {list(dc.ROLES)}",
              gxe.ExpectColumnValuesToMatchRegex(column="roles", regex=dc.KNOWN_ROLES_RE),
              col("roles")),
        Check("chat_order",
              "system only first, then user and assistant alternate starting with the user",
              gxe.ExpectColumnValuesToMatchRegex(column="role_order", regex=dc.ROLE_ORDER_RE),
              col("roles")),
        Check("chat_last_turn", "the last turn is the assistant's (the answer trained on)",
              gxe.ExpectColumnValuesToMatchRegex(column="role_order", regex=dc.LAST_TURN_RE),
              col("roles")),
        Check("encoding",
              "no invalid UTF-8 (U+FFFD replacement characters) or control characters",
              gxe.ExpectColumnValuesToNotMatchRegex(column="text", regex=dc.ENCODING_RE),
              _encoding_shown),
        Check("min_rows", f"at least {min_rows} rows (found {len(frame)})",
              gxe.ExpectTableRowCountToBeBetween(min_value=min_rows), None),
        Check("length_outliers",
              f"response length within {v.length_outlier_zscore:g} standard deviations of "
              "the mean",
              gxe.ExpectColumnValueZScoresToBeLessThan(
                  column="response_chars", threshold=v.length_outlier_zscore,
                  double_sided=True),
              _outlier_shown),
        Check("pii", "no e-mail addresses, phone numbers or IP addresses",
              gxe.ExpectColumnValuesToNotMatchRegexList(
                  column="text", regex_list=list(dc.PII_PATTERNS.values())),
              lambda f, r: dc.pii_found(f.at[r, "text"])),
    ]  # fmt: skip
    if max_length is not None:  # (rows over max_length: length_policy)
        checks.append(
            Check("no_trained_tokens",
                  f"every row within max_length={max_length} tokens has at least one "
                  "response token to train on",
                  gxe.ExpectColumnValuesToBeBetween(column="n_trained_tokens", min_value=1),
                  _tokens_shown)
        )  # fmt: skip
    if "control_tokens" in frame:  # only where the base tokenizer's tokens are known
        checks.append(
            Check("control_tokens", _control_tokens_description(frame.attrs["control_tokens"]),
                  gxe.ExpectColumnValuesToBeNull(column="control_tokens"),
                  col("control_tokens"))
        )  # fmt: skip
    if "appears_in_train" in frame:
        n, most = v.ngram_overlap.n, v.ngram_overlap.max_fraction
        checks.append(
            Check("leakage",
                  f"no prompt equal to a train prompt (normalised) and under {most:.0%} of "
                  f"the word {n}-grams found in train",
                  gxe.ExpectColumnValuesToBeInSet(column="appears_in_train", value_set=[False]),
                  col("leak_detail"))
        )  # fmt: skip
    severity = v.checks.model_dump(by_alias=True)
    return [c for c in checks if severity[c.name] != "off"]


def length_policy(
    label: str,
    n_rows: int,
    n_dropped: int,
    max_length: int,
    v: ValidateParams,
    shown: dict[int, str] | None,
) -> list[dict]:
    """The check `over_max_length`: one rule for `qlora validate FILE` and the DAG.

    The dataset stage drops a row longer than dataset.max_length (a truncated answer would
    teach the model to stop mid-sentence), so such rows are "rows that will be dropped": a
    warning (the configured severity) while they are at most validate.max_dropped_fraction
    of the rows, an error past it, naming the settings that change the outcome. `shown`:
    row number -> what shows why (None where the dropped rows are not known by number)."""
    severity = v.checks.over_max_length
    if severity == "off":
        return []
    share = n_dropped / n_rows if n_rows else 0.0
    most = v.max_dropped_fraction
    description = (
        f"{n_dropped} of {n_rows} rows ({share:.1%}) will be dropped: longer than "
        f"dataset.max_length={max_length} tokens"
    )
    if shown:
        listed = list(shown)[:20]
        more = f" and {len(shown) - len(listed)} more" if len(shown) > len(listed) else ""
        description += f" (rows {', '.join(map(str, listed))}{more})"
    if share > most:
        severity = "error"
        description += (
            f"; more than validate.max_dropped_fraction={most:g} of the rows: raise "
            "dataset.max_length (within the base model's context), shorten those rows, or "
            "raise validate.max_dropped_fraction to accept the loss"
        )
    else:
        description += f"; up to validate.max_dropped_fraction={most:g} of the rows may go"
    examples = [{"row": r, "value": value} for r, value in (shown or {}).items()]
    return [{
        "name": "over_max_length",
        "split": label,
        "severity": severity,
        "success": n_dropped == 0,
        "failed_rows": n_dropped,
        "examples": examples[:N_EXAMPLES],
        "description": description,
    }]  # fmt: skip


def run_checks(
    frames: dict[str, pd.DataFrame],
    v: ValidateParams,
    plans: dict[str, list[Check]],
    docs_dir: Path | None = None,
    judged: list[dict] | None = None,
) -> list[dict]:
    """Validate each frame with its checks in one GX context; Data Docs under docs_dir.
    `judged`: results of checks made outside GX (length_policy), reported in order."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.checkpoint import UpdateDataDocsAction
    from great_expectations.data_context.types.base import ProgressBarsConfig
    from great_expectations.expectations.metadata_types import FailureSeverity

    severity = v.checks.model_dump(by_alias=True)
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    for site in list(context.list_data_docs_sites()):  # the default site is a temp dir
        context.delete_data_docs_site(site)
    if docs_dir is not None:
        context.add_data_docs_site(
            "validation",
            {
                "class_name": "SiteBuilder",
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
                "show_how_to_buttons": False,
                "store_backend": {
                    "class_name": "TupleFilesystemStoreBackend",
                    "base_directory": str(docs_dir.resolve()),
                },
            },
        )
    source = context.data_sources.add_pandas("prepared")
    results = list(judged or [])
    for split, frame in frames.items():
        by_name = {c.name: c for c in plans[split]}
        suite = gx.ExpectationSuite(name=split)
        for c in plans[split]:
            e = c.expectation
            e.meta = {"check": c.name}
            e.notes = c.description
            e.severity = (
                FailureSeverity.CRITICAL if severity[c.name] == "error" else FailureSeverity.WARNING
            )
            suite.add_expectation(e)
        suite = context.suites.add(suite)
        batch = source.add_dataframe_asset(split).add_batch_definition_whole_dataframe(split)
        definition = context.validation_definitions.add(
            gx.ValidationDefinition(name=split, data=batch, suite=suite)
        )
        actions = [UpdateDataDocsAction(name="data_docs")] if docs_dir is not None else []
        checkpoint = context.checkpoints.add(
            gx.Checkpoint(
                name=f"validate_{split}",
                validation_definitions=[definition],
                actions=actions,
                result_format={"result_format": "SUMMARY", "partial_unexpected_count": 20},
            )
        )
        run = checkpoint.run(batch_parameters={"dataframe": frame})
        for suite_result in run.run_results.values():
            for r in suite_result.results:
                check = by_name[r.expectation_config.meta["check"]]
                results.append(_summarise(check, split, severity[check.name], r, frame))
    order = {name: k for k, name in enumerate(severity)}
    results.sort(key=lambda c: (paths.SPLITS.index(c["split"]) if c["split"] in paths.SPLITS else 0,
                                order[c["name"]]))  # fmt: skip
    return results


def _summarise(check: Check, split: str, severity: str, r, frame: pd.DataFrame) -> dict:
    out = {
        "name": check.name,
        "split": split,
        "severity": severity,
        "success": bool(r.success),
        "failed_rows": int(r.result.get("unexpected_count") or 0),
        "examples": [],
        "description": check.description,
    }
    if r.exception_info.get("raised_exception"):
        out["success"] = False
        out["description"] += f" (could not be evaluated: {r.exception_info['exception_message']})"
    if check.show is not None:
        rows = r.result.get("partial_unexpected_index_list") or []
        out["examples"] = [
            {"row": int(row), "value": check.show(frame, row)} for row in rows[:N_EXAMPLES]
        ]
    return out


def failed(checks: list[dict], severity: str) -> list[dict]:
    return [c for c in checks if not c["success"] and c["severity"] == severity]


def describe(checks: list[dict]) -> str:
    """One paragraph per check: name, split, failing rows, a few rows with their values."""
    lines = []
    for c in checks:
        what = f"{c['failed_rows']} row(s) fail" if c["failed_rows"] else "fails"
        lines.append(f"  {c['severity'].upper()} {c['name']} [{c['split']}]: {what}: "
                     f"{c['description']}")  # fmt: skip
        lines += [f"      row {e['row']}: {e['value']}" for e in c["examples"]]
    return "\n".join(lines)


# ------------------------------------------------------------------ the DAG stage


def read_split(path: Path) -> tuple[dict[int, dict], list[int]]:
    if not path.exists():
        raise StageError(f"{path}: not found (run the dataset stage first: dvc repro dataset)")
    return dc.read_jsonl_lenient(path)


def dropped_by_dataset(v: ValidateParams, max_length: int) -> list[dict]:
    """length_policy on the rows the dataset stage dropped for length (its report counts
    them): in the DAG those rows are gone before the splits are checked."""
    if not paths.DATASET_REPORT.exists():
        raise StageError(f"{paths.DATASET_REPORT}: not found (run the dataset stage first)")
    summary = read_json(paths.DATASET_REPORT)
    rows = summary.get("dropped_over_max_length_rows") or []
    shown = {int(r): f"over {max_length} tokens: dropped by the dataset stage" for r in rows}
    return length_policy(
        Path(summary["source"]).name, summary["raw_rows"], summary["dropped_over_max_length"],
        max_length, v, shown,
    )  # fmt: skip


def validate_splits(v: ValidateParams, max_length: int, control_tokens: Sequence[str]) -> dict:
    """Check the prepared splits; write reports/validation (even when checks fail).
    `control_tokens`: the base tokenizer's special tokens (dc.control_token_texts)."""
    frames = {}
    for split in paths.SPLITS:
        rows, bad_utf8 = read_split(paths.split_file(split))
        frames[split] = dc.build_frame(rows, None, max_length, control_tokens=control_tokens)
        frames[split].attrs["invalid_utf8_rows"] = bad_utf8
    for split in ("validation", "test"):
        g = v.ngram_overlap
        dc.add_leakage(frames[split], frames["train"], g.n, g.max_fraction, g.common_fraction)
    plans = {s: plan_checks(v, frames[s], getattr(v.min_rows, s), max_length) for s in paths.SPLITS}
    with atomic_dir(paths.VALIDATION_DIR) as out:
        checks = run_checks(
            frames, v, plans, docs_dir=out / "data_docs", judged=dropped_by_dataset(v, max_length)
        )
        result = {
            "success": not failed(checks, "error"),
            "checks": checks,
            "data_docs": (paths.VALIDATION_DIR / "data_docs" / "index.html").as_posix(),
        }
        write_json(out / "result.json", result)
    return result


# ------------------------------------------------------------------ qlora validate PATH


def load_file(path: str) -> tuple[dict[int, dict], list[int]]:
    """Records keyed by row number (the line number for JSONL) and lines of invalid UTF-8."""
    p = Path(path)
    if p.suffix.lower() == ".jsonl":
        return dc.read_jsonl_lenient(p)
    try:
        records = read_records(path)
        bad: list[int] = []
    except UnicodeDecodeError:
        records, bad = _read_replacing_bad_bytes(p)
    return dict(enumerate(records, start=1)), bad


def _read_replacing_bad_bytes(path: Path) -> tuple[list[dict], list[int]]:
    """Read a JSON/CSV file whose bad bytes become U+FFFD, so the encoding check can name the
    rows instead of the reader raising on the first bad byte."""
    import tempfile

    raw = path.read_bytes().splitlines(keepends=True)
    bad = []
    for lineno, line in enumerate(raw, start=1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError:
            bad.append(lineno)
    text = b"".join(raw).decode("utf-8", errors="replace")
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / path.name
        copy.write_text(text, encoding="utf-8")
        try:
            return read_records(str(copy)), bad
        except StageError as e:
            raise StageError(str(e).replace(str(copy), str(path))) from None


def _format_of(path: str, records: dict[int, dict], fmt: str) -> str:
    rows = list(records.values())
    is_csv = Path(path).suffix.lower() == ".csv"
    expected = "; ".join(f"{f}: {list(k)}" for f, k in REQUIRED.items())
    if is_csv and rows:
        header = list(rows[0])
        wanted = [REQUIRED[fmt]] if fmt != "auto" else list(REQUIRED.values())
        if not any(set(w) <= set(header) for w in wanted):
            raise StageError(
                f"{path}: line 1 (the CSV header) has columns {header}; expected "
                + (f"{list(REQUIRED[fmt])} for format {fmt!r}" if fmt != "auto" else expected)
            )
    return detect_format(rows, fmt, where=path)


def _tokenizer(tokenizer_dir: str | None, trust_remote_code: bool):
    from qlora.core.paths import BASE_MODEL_DIR
    from qlora.models.loading import load_tokenizer

    where = Path(tokenizer_dir) if tokenizer_dir else BASE_MODEL_DIR
    if not where.exists():
        if tokenizer_dir:
            raise StageError(f"--tokenizer {tokenizer_dir}: no such directory")
        print(
            f"note: no tokenizer ({BASE_MODEL_DIR} does not exist): token-length checks "
            "skipped, and control_tokens (its special tokens are unknown); pass --tokenizer "
            "DIR to run them"
        )
        return None
    return load_tokenizer(where, trust_remote_code)


def cli_validate(
    path: str, fmt: str = "auto", tokenizer_dir: str | None = None, max_length: int | None = None
) -> int:
    """`qlora validate PATH`: 0 if the file passes every error check, 1 if a check fails,
    2 if the file (or params.yaml) cannot be read. Prints every failed check."""
    try:
        if fmt not in ("auto", *RECORD_FORMATS):
            raise StageError(f"--format {fmt!r}: expected auto or one of {list(RECORD_FORMATS)}")
        # Outside a project: the values of the params.yaml that ships with this code.
        params = load_params() if Path("params.yaml").exists() else shipped_params()
        v, data = params.validate_, params.dataset
        limit = max_length or data.max_length
        records, bad_utf8 = load_file(path)
        record_format = _format_of(path, records, fmt)
        tokenizer = _tokenizer(tokenizer_dir, params.base.trust_remote_code)
        tokens = dc.control_token_texts(tokenizer) if tokenizer is not None else None
        frame = dc.build_frame(
            records, record_format, limit if tokenizer else None, tokenizer, data.system_prompt,
            tokens,
        )  # fmt: skip
    except StageError as e:  # ParamsError is one too
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # a reader library's own error (corrupt parquet, bad CSV quoting)
        print(f"error: {path}: cannot be read ({e.__class__.__name__}: {e})", file=sys.stderr)
        return 2
    frame.attrs["invalid_utf8_rows"] = bad_utf8
    if bad_utf8:
        print(f"note: {path}: invalid UTF-8 on line(s) {bad_utf8[:10]}, read as U+FFFD")
    label = Path(path).name
    plans = {label: plan_checks(v, frame, v.min_rows.train, limit if tokenizer else None)}
    judged = []
    if tokenizer is not None:
        # What the dataset stage drops for length: a repeated prompt it drops as such first.
        first = ~frame["prompt_turns"].duplicated() | frame["prompt_turns"].isna()
        over = frame[first & (frame["total_tokens"] > limit)]
        shown = {int(r): _tokens_shown(frame, r) for r in over.index}
        judged = length_policy(label, len(frame), len(over), limit, v, shown)
    checks = run_checks({label: frame}, v, plans, judged=judged)
    errors, warnings = failed(checks, "error"), failed(checks, "warning")
    print(f"{path}: {len(frame)} {record_format} rows, {len(checks)} checks")
    if warnings:
        print(f"{len(warnings)} warning(s):\n{describe(warnings)}")
    if errors:
        print(f"FAILED: {len(errors)} error check(s):\n{describe(errors)}")
        return 1
    print("PASSED: no error check failed")
    return 0
