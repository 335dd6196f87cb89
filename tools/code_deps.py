"""Which first-party source files a stage's result depends on, and whether the library's
imports form a circle.

dvc.yaml must list, for each stage, every project file its script imports (directly or
through the library), or an edit to shared code would change results without DVC seeing
it. `stage_code_deps` walks the imports statically (ast, nothing is executed), so the
test suite can hold dvc.yaml to it. `import_cycles` finds circles in the same graph: a
stage that reaches a module only through a circle would rerun for edits that cannot
change its result, so the library has none.

    python -m tools.code_deps            # the module graph, and any circle in it
    python -m tools.code_deps --write    # rewrite dvc.yaml's code deps from the imports
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path

FIRST_PARTY = ("qlora", "stages")
# Files a module reads at run time besides its imports (templates, task YAMLs).
DATA_FILES = {"qlora/report/build.py": ["qlora/report/templates"]}


def _module_file(root: Path, module: str) -> Path | None:
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(path: Path) -> set[str]:
    """First-party module names `path` imports (anywhere in the file, local imports too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            # `from qlora.train import recipe` imports the submodule qlora.train.recipe
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return {n for n in names if n.split(".")[0] in FIRST_PARTY}


def _logic(path: Path) -> bool:
    """Package __init__ files are left out: they hold docstrings, no logic."""
    return path.name != "__init__.py"


def import_graph(root: Path | str = ".") -> dict[str, set[str]]:
    """{file: the first-party files it imports}, repository-relative, __init__ files left out."""
    root = Path(root)
    graph: dict[str, set[str]] = {}
    for package in FIRST_PARTY:
        for path in sorted((root / package).rglob("*.py")):
            if not _logic(path):
                continue
            found = (_module_file(root, m) for m in _imports(path))
            graph[path.relative_to(root).as_posix()] = {
                f.relative_to(root).as_posix() for f in found if f is not None and _logic(f)
            } - {path.relative_to(root).as_posix()}
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every group of files that import each other, directly or around a circle (Tarjan's
    strongly connected components of more than one file), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(cycles)


_SCRIPT = re.compile(r"python -m (stages\.\w+)")


def stage_script(stage: str, root: Path | str = ".") -> str:
    """The script a stage's `cmd` runs (`python -m stages.X ...` -> stages/X.py); several
    stages may share one (the evaluation variants). stages/<stage>.py where dvc.yaml does
    not say."""
    import yaml

    dvc_yaml = Path(root) / "dvc.yaml"
    if dvc_yaml.is_file():
        cmd = (yaml.safe_load(dvc_yaml.read_text())["stages"].get(stage) or {}).get("cmd", "")
        if m := _SCRIPT.search(cmd):
            return m[1].replace(".", "/") + ".py"
    return f"stages/{stage}.py"


def stage_code_deps(
    stage: str, root: Path | str = ".", graph: dict[str, set[str]] | None = None
) -> list[str]:
    """Repository-relative paths of every first-party file the stage's script runs, plus
    the data files those modules read: the script first, then sorted.
    `graph`: import_graph(root), when the caller already has it."""
    root = Path(root)
    graph = import_graph(root) if graph is None else graph
    start = stage_script(stage, root)
    seen: set[str] = set()
    todo = [start]
    while todo:
        path = todo.pop()
        if path not in seen:
            seen.add(path)
            todo.extend(graph.get(path, set()) - seen)
    for f in list(seen):
        seen.update(DATA_FILES.get(f, []))
    return [start, *sorted(seen - {start})]


_CODE_DEP = re.compile(r"^\s+- (qlora|stages)/\S+\s*$")


def rewrite_dvc_yaml(root: Path | str = ".") -> str:
    """dvc.yaml's text with each stage's code deps (the `- qlora/...` and `- stages/...`
    lines) replaced by what the imports say; every other line, comments included, kept."""
    root = Path(root)
    graph = import_graph(root)  # parsed once for every stage
    out: list[str] = []
    stage = None
    for line in (root / "dvc.yaml").read_text().splitlines(keepends=True):
        if m := re.match(r"^  ([\w-]+):\s*$", line):
            stage = m[1]
        if _CODE_DEP.match(line):
            continue
        out.append(line)
        if stage and re.match(r"^    deps:\s*$", line):
            out.extend(f"      - {dep}\n" for dep in stage_code_deps(stage, root, graph))
    return "".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.code_deps", description=__doc__)
    parser.add_argument("--write", action="store_true", help="rewrite dvc.yaml's code deps")
    args = parser.parse_args(argv)
    if args.write:
        Path("dvc.yaml").write_text(rewrite_dvc_yaml())
        print("dvc.yaml: code deps rewritten from the imports")
        return 0
    graph = import_graph()
    for path, imported in graph.items():
        print(f"{path} -> {', '.join(sorted(imported)) or '(nothing first-party)'}")
    cycles = import_cycles(graph)
    for group in cycles:
        print("circle: " + " <-> ".join(group), file=sys.stderr)
    print(f"{len(graph)} files, {len(cycles)} import circles")
    return 1 if cycles else 0


if __name__ == "__main__":
    sys.exit(main())
