"""Stage `validate`: refuse data that would break fine-tuning, before any training starts.

Each check is a Great Expectations expectation on a column of the table that
qlora/data/check_table.py derives from the rows (empty answers, blank fields, duplicates, chat
turns out of order, test rows that repeat train rows, encoding junk, PII, the base
tokenizer's special tokens inside the text).
params.yaml `validate.checks` makes each one an error (stops the pipeline), a warning
(printed and reported) or off.

In the DAG it checks data/prepared/splits/{train,validation,test}.jsonl (control tokens:
those of data/prepared/base_model's tokenizer), train against validation and test
(leakage), and the rows the dataset stage dropped as longer than
dataset.max_length (reports/dataset.json: an error past validate.max_dropped_fraction of
the rows, as `qlora validate FILE` judges them), writes reports/validation/result.json and
GX Data Docs (reports/validation/data_docs/index.html), then fails if an error check
failed. It writes nothing else, so a rejected dataset leaves the last good adapter and
reports alone.

`qlora validate PATH` (cli_validate) runs the same checks on any dataset file.
"""

from __future__ import annotations

from qlora.core import paths
from qlora.core.io import StageError, run_stage
from qlora.core.params import load_params
from qlora.data.check_table import control_token_texts
from qlora.data.validation import describe, failed, validate_splits
from qlora.models.loading import load_tokenizer


def main() -> None:
    params = load_params()
    # The text the base tokenizer reads as its own control tokens must not be in the data.
    tokenizer = load_tokenizer(paths.BASE_MODEL_DIR, params.base.trust_remote_code)
    result = validate_splits(
        params.validate_, params.dataset.max_length, control_token_texts(tokenizer)
    )
    checks = result["checks"]
    warnings, errors = failed(checks, "warning"), failed(checks, "error")
    if warnings:
        print(f"{len(warnings)} warning(s):\n{describe(warnings)}")
    where = f"details: {paths.VALIDATION_DIR / 'result.json'}, Data Docs: {result['data_docs']}"
    if errors:
        raise StageError(
            f"{len(errors)} error check(s) failed; the data is refused before training:\n"
            f"{describe(errors)}\n{where}"
        )
    print(f"{len(checks)} checks on {', '.join(paths.SPLITS)}: no error ({where})")


if __name__ == "__main__":
    run_stage("validate", main)
