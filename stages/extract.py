"""Stage `extract`: the embedded default corpus, from CPython's standard library.

qlora/corpus.py turns every public stdlib function with a docstring into an Alpaca
record, so `make run` needs no dataset hub.
Output: data/raw/stdlib_functions.jsonl
"""

from __future__ import annotations

from qlora.corpus import OUTPUT, extract
from qlora.io import run_stage, write_jsonl
from qlora.params import load_params


def main() -> None:
    p = load_params().corpus
    rows = extract(p)
    write_jsonl(OUTPUT, rows)
    modules = len({r["module"] for r in rows})
    print(f"extracted {len(rows)} functions from {modules} modules to {OUTPUT}")


if __name__ == "__main__":
    run_stage("extract", main)
