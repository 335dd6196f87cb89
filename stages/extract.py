"""Stage `extract`: the embedded default corpus, from CPython's standard library.

qlora/data/corpus.py turns every public stdlib function with a docstring into an Alpaca
record, so `make run` needs no dataset hub.
Output: data/raw/stdlib_functions.jsonl
"""

from __future__ import annotations

from qlora.core import paths
from qlora.core.io import run_stage, write_jsonl
from qlora.core.params import load_params
from qlora.data.corpus import extract


def main() -> None:
    p = load_params().corpus
    rows = extract(p)
    write_jsonl(paths.DEFAULT_CORPUS, rows)
    modules = len({r["module"] for r in rows})
    print(f"extracted {len(rows)} functions from {modules} modules to {paths.DEFAULT_CORPUS}")


if __name__ == "__main__":
    run_stage("extract", main)
