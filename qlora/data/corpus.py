"""The `extract` stage's library: the embedded default corpus, from CPython's stdlib.

Every public function with a docstring becomes one Alpaca-style record: the instruction
asks for a one-line docstring summary, the input is the function's source with its
docstring removed, the output is the docstring's first paragraph. Real text that nobody
here wrote (PSF license), present on every machine with Python, so `make run` needs no
dataset hub. The extraction is a DVC stage output, so its hash is recorded in dvc.lock.
Output: data/raw/stdlib_functions.jsonl
"""

from __future__ import annotations

import ast
import sysconfig
import textwrap
from collections.abc import Iterator
from pathlib import Path

from qlora.core.params import CorpusParams
from qlora.core import paths

INSTRUCTION = "Write the one-line docstring summary for this Python function."
# Test suites and the IDE are not library code; site-packages is not the stdlib.
SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "__pycache__", "turtledemo"}


def summary_of(docstring: str) -> str:
    """First paragraph of a docstring, joined onto one line."""
    paragraph = docstring.strip().split("\n\n", 1)[0]
    return " ".join(line.strip() for line in paragraph.splitlines())


def source_without_docstring(lines: list[str], fn: ast.FunctionDef) -> str:
    doc = fn.body[0]
    start = min([fn.lineno] + [d.lineno for d in fn.decorator_list])
    kept = lines[start - 1 : doc.lineno - 1] + lines[doc.end_lineno : fn.end_lineno]
    return textwrap.dedent("".join(kept)).rstrip() + "\n"


def functions_in(path: Path, module: str, p: CorpusParams) -> Iterator[dict]:
    text = path.read_text(encoding="utf-8", errors="strict")
    tree = ast.parse(text)
    lines = text.splitlines(keepends=True)
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        doc = ast.get_docstring(node)
        if not doc or node.name.startswith("_") or len(node.body) < 2:
            continue
        summary = summary_of(doc)
        source = source_without_docstring(lines, node)
        if not (p.min_summary_chars <= len(summary) <= p.max_summary_chars):
            continue
        if len(source) > p.max_source_chars:
            continue
        yield {
            "instruction": INSTRUCTION,
            "input": source,
            "output": summary,
            "module": module,
            "function": node.name,
        }


def stdlib_modules(root: Path) -> Iterator[tuple[Path, str]]:
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if SKIP_DIRS.intersection(rel.parts[:-1]) or rel.name.startswith("test_"):
            continue
        parts = rel.with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        yield path, module


def extract(p: CorpusParams, root: Path | None = None) -> list[dict]:
    root = root or Path(sysconfig.get_paths()["stdlib"])
    rows: list[dict] = []
    for path, module in stdlib_modules(root):
        try:
            rows.extend(functions_in(path, module, p))
        except (SyntaxError, UnicodeDecodeError):
            continue  # a handful of stdlib files are deliberately broken (lib2to3 fixtures)
    return rows
