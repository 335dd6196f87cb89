"""Stage `extract`: the embedded default corpus, from CPython's standard library.

Every public function with a docstring becomes one Alpaca-style record: the instruction
asks for a one-line docstring summary, the input is the function's source with its
docstring removed, the output is the docstring's first paragraph. Real text that nobody
here wrote (PSF license), present on every machine with Python, so `make run` needs no
dataset hub. The extraction is a DVC stage output, so its hash is recorded in dvc.lock.
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
