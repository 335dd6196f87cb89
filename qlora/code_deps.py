"""Which first-party source files a stage's result depends on.

dvc.yaml must list, for each stage, every project file its script imports (directly or
through the library), or an edit to shared code would change results without DVC seeing
it. `stage_code_deps` walks the imports statically (ast, nothing is executed), so the
test suite can hold dvc.yaml to it (tests/test_dvc_deps.py).
"""

from __future__ import annotations

import ast
from pathlib import Path

FIRST_PARTY = ("qlora", "stages")
# Files a module reads at run time besides its imports (templates, task YAMLs).
DATA_FILES = {"qlora/report.py": ["qlora/templates"]}


def _module_file(root: Path, module: str) -> Path | None:
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(root: Path, path: Path) -> set[str]:
    """First-party module names `path` imports (anywhere in the file, local imports too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            # `from qlora import training` imports the submodule qlora.training
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return {n for n in names if n.split(".")[0] in FIRST_PARTY}


def stage_code_deps(stage: str, root: Path | str = ".") -> list[str]:
    """Repository-relative paths of every first-party file `python -m stages.<stage>` runs,
    plus the data files those modules read, sorted. Package __init__ files are left out
    (they hold no logic)."""
    root = Path(root)
    start = root / "stages" / f"{stage}.py"
    seen: set[Path] = set()
    todo = [start]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for module in _imports(root, path):
            found = _module_file(root, module)
            if found is not None and found not in seen:
                todo.append(found)
    files = {p.relative_to(root).as_posix() for p in seen if p.name != "__init__.py"}
    for f in list(files):
        files.update(DATA_FILES.get(f, []))
    return sorted(files)
