"""The README and the manual in docs/ stay true to the repository.

Every check is a function from Markdown text to a list of problems (empty: true), run on
README.md and every docs/*.md page, and each is also run on a small planted bad line to
show that it can fail:

- every project path in backticks or in a code block exists; a pipeline output's path
  names something dvc.yaml declares (or `registry/`, which `qlora promote` writes);
- every `qlora ...` command names real subcommands and options (typer's own `--help`);
- every `make TARGET` is a Makefile target;
- every `python -m MODULE` names a module file of the repository (or an installed module);
- every `dvc ...` command parses with DVC's own command-line parser;
- every params.yaml key named in backticks, a `-S`/`--set` override or a YAML block exists;
- every YAML block parses;
- every relative link between README.md and docs/ resolves, anchors included;
- README.md stays a lobby: at most 170 lines, linking to every page of the manual, and
  each page opens by saying what it covers.

Nothing heavy is imported: modules are checked as files, the CLI through `--help`.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import glob
import importlib.util
import io
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest
import yaml

from qlora.core import paths

ROOT = Path(__file__).resolve().parents[3]
README = ROOT / "README.md"
DOCS_DIR = ROOT / "docs"
PAGES = [README, *sorted(DOCS_DIR.glob("*.md"))]
README_MAX_LINES = 170

# Paths under these folders are the repository's own files: they must exist.
PROJECT_PREFIXES = (
    "qlora/",
    "stages/",
    "flows/",
    "tools/",
    "tests/",
    "configs/",
    "docs/",
    "benchmarks/",
    "data/eval_tasks",
)
# `qlora promote` creates the registry; no DVC stage declares it.
REGISTRY_PREFIX = "registry/"
# Written by `qlora sweep`, not by a DVC stage: the files qlora/report/sweep.py writes.
SWEEP_FILES = {
    paths.SWEEP_LEADERBOARD.with_suffix(ext).as_posix() for ext in (".json", ".md", ".html")
}

SHELL_LANGS = {"bash", "sh", "shell", "console", "zsh"}
# Programs whose commands are checked, by the name a command line calls them.
CHECKED_PROGRAMS = {"qlora", "make", "dvc", "python", "python3", "accelerate"}
FILE_EXTENSIONS = {"json", "jsonl", "py", "yaml", "yml", "md", "html", "lock", "csv", "txt"}


# ---- reading Markdown -------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    """A fenced code block: its info string's first word, its text, its first line."""

    lang: str
    body: str
    line: int


FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`\s]*)")


def split_markdown(text: str) -> tuple[list[Block], str]:
    """(the fenced blocks, the prose with every block blanked out, line numbers kept)."""
    blocks: list[Block] = []
    prose: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            prose.append(lines[i])
            i += 1
            continue
        indent, fence = len(m["indent"]), m["fence"]
        body: list[str] = []
        start = i + 1
        prose.append("")
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            line = lines[i]
            body.append(line[indent:] if line[:indent].strip() == "" else line.lstrip())
            prose.append("")
            i += 1
        prose.append("")  # the closing fence (or the end of a block left open)
        i += 1
        blocks.append(Block(m["info"].lower(), "\n".join(body), start + 1))
    return blocks, "\n".join(prose)


# A code span may wrap onto the next line of its paragraph, never past a blank line.
CODE_SPAN = re.compile(r"(?<!`)(`+)(?!`)((?:(?!\n\s*\n).)+?)(?<!`)\1(?!`)", re.S)


def code_spans(prose: str) -> list[tuple[int, str]]:
    """(line number, text) of every inline code span of the prose."""
    return [
        (prose.count("\n", 0, m.start()) + 1, " ".join(m.group(2).split()))
        for m in CODE_SPAN.finditer(prose)
    ]


def code_texts(text: str) -> list[tuple[int, str]]:
    """Every piece of code of a page: inline spans, and each line of each block."""
    blocks, prose = split_markdown(text)
    pieces = code_spans(prose)
    for block in blocks:
        pieces += [(block.line + k, line) for k, line in enumerate(block.body.splitlines())]
    return pieces


# ---- command lines ----------------------------------------------------------------------


def _program(word: str) -> str:
    return word.rsplit("/", 1)[-1]


def split_command(line: str) -> list[list[str]]:
    """One shell line as its simple commands (split at |, &&, ;), each an argv with the
    leading VAR=value assignments dropped. `[a | b]` (a usage line's alternatives) stays
    one argument list."""
    line = re.sub(r"\[[^\]]*\]", lambda m: m.group(0).replace("|", " "), line)
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    lexer.commenters = ""  # comments are gone already; a # inside a word is text
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token and set(token) <= set(";&|"):
            commands.append([])
        else:
            commands[-1].append(token)
    out = []
    for argv in commands:
        while argv and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", argv[0]):
            argv = argv[1:]
        if argv:
            out.append(argv)
    return out


def command_lines(text: str) -> list[tuple[int, str]]:
    """(line, command) of every command a page shows: each line of a shell block
    (continuations joined), each `$ ` line of another block, and each inline code span
    that starts with a checked program."""
    blocks, prose = split_markdown(text)
    found: list[tuple[int, str]] = []
    for block in blocks:
        pending, first = "", 0
        for k, raw in enumerate(block.body.splitlines()):
            if block.lang not in SHELL_LANGS:
                if raw.startswith("$ "):
                    found.append((block.line + k, raw[2:]))
                continue
            if not pending:
                first = block.line + k
            if raw.rstrip().endswith("\\"):
                pending += raw.rstrip()[:-1] + " "
                continue
            line, pending = pending + raw, ""
            if line.strip() and not line.lstrip().startswith("#"):
                found.append((first, line))
    for n, span in code_spans(prose):
        words = span.split()  # a program alone (`dvc`) is a name, not a command
        if len(words) > 1 and _program(words[0]) in CHECKED_PROGRAMS:
            found.append((n, span))
    return found


def commands(text: str) -> list[tuple[int, list[str]]]:
    """(line, argv) of every simple command of every command line of a page, comments
    dropped; a line that does not parse as shell is returned as argv ["<unparsable>", line].
    """
    out: list[tuple[int, list[str]]] = []
    for n, line in command_lines(text):
        try:
            parts = split_command(_drop_comment(line))
        except ValueError:
            out.append((n, ["<unparsable>", line]))
            continue
        out += [(n, argv) for argv in parts]
    return out


def _drop_comment(line: str) -> str:
    """The line without its trailing `# comment` (a # that starts a word, outside quotes)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def unparsable_problems(text: str) -> list[str]:
    return [
        f"line {n}: not a shell command: {argv[1]!r}"
        for n, argv in commands(text)
        if argv[0] == "<unparsable>"
    ]


# ---- the checks -------------------------------------------------------------------------


@functools.cache
def dvc_outputs() -> tuple[str, ...]:
    """Every path dvc.yaml's stages write (outs, metrics, plots)."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    found = []
    for stage in stages.values():
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind, []):
                found.append(next(iter(entry)) if isinstance(entry, dict) else entry)
    return tuple(p.rstrip("/") for p in found)


@functools.cache
def output_prefixes() -> tuple[str, ...]:
    """The folders dvc.yaml's outputs live in (`reports/`, `data/prepared/`, ...): a path
    under one is made by a run, so it must name an output. Its top folder, or its top two
    where the top one also holds project files (`data/` holds `data/eval_tasks`)."""
    prefixes = set()
    for out in dvc_outputs():
        parts = out.split("/")
        shared = any(p.startswith(parts[0] + "/") for p in PROJECT_PREFIXES)
        prefixes.add("/".join(parts[: 2 if shared else 1]) + "/")
    return tuple(sorted(prefixes))


@functools.cache
def path_token() -> re.Pattern:
    """A path in code that starts with a project, output or registry folder."""
    roots = sorted(
        {p.rstrip("/") for p in (*PROJECT_PREFIXES, *output_prefixes(), REGISTRY_PREFIX)}
    )
    return re.compile(
        r"(?<![\w.\-/~$:@])"
        rf"(?P<path>(?:{'|'.join(map(re.escape, roots))})"
        r"(?:/(?:[\w.\-*<>]|\{[\w,.\-]*\})*)*)"
        r"(?![\w\-])"
    )


def _expand(path: str) -> list[str]:
    """`a/{x,y}/<run>/*.tsv` -> the glob patterns `a/x/*/*.tsv`, `a/y/*/*.tsv`."""
    path = re.sub(r"<[^>]*>", "*", path)
    m = re.search(r"\{([^}]*)\}", path)
    if not m:
        return [path]
    return [
        q for alt in m[1].split(",") for q in _expand(path[: m.start()] + alt + path[m.end() :])
    ]


def _is_output(pattern: str) -> bool:
    """Whether `pattern` names a dvc.yaml output, something inside one, or a folder of them."""
    pattern = pattern.rstrip("/")
    return any(
        fnmatch.fnmatchcase(out, pattern)
        or fnmatch.fnmatchcase(out, pattern + "/*")
        or pattern.startswith(out + "/")
        for out in dvc_outputs()
    )


def path_problem(path: str) -> str | None:
    """Why `path`, as the manual names it, is not true of the repository (None: it is)."""
    path = path.rstrip(".,")
    folder = path.rstrip("/") + "/"
    if folder.startswith(REGISTRY_PREFIX):
        return None
    if folder.startswith(paths.SWEEP_DIR.as_posix() + "/"):
        return None if path in SWEEP_FILES else f"{path}: not a file `qlora sweep` writes"
    if folder.startswith(output_prefixes()):
        if all(_is_output(p) for p in _expand(path)):
            return None
        return f"{path}: not an output dvc.yaml declares"
    if not path.startswith(PROJECT_PREFIXES) or "/" not in path.rstrip("/"):
        return None if (ROOT / path.rstrip("/")).is_dir() else f"{path}: no such folder"
    for pattern in _expand(path):
        matches = glob.glob(str(ROOT / pattern.rstrip("/")))
        if not matches:
            return f"{path}: no such file or folder"
        if pattern.endswith("/") and not any(Path(m).is_dir() for m in matches):
            return f"{path}: not a folder"
    return None


def path_problems(text: str) -> list[str]:
    problems = []
    for n, code in code_texts(text):
        for m in path_token().finditer(code):
            problem = path_problem(m["path"])
            if problem:
                problems.append(f"line {n}: {problem}")
    return problems


@functools.cache
def cli_command():
    import typer

    from qlora.cli import app

    return typer.main.get_command(app)


@functools.cache
def cli_help_exit_code(path: tuple[str, ...]) -> int:
    from typer.testing import CliRunner

    from qlora.cli import app

    return CliRunner().invoke(app, [*path, "--help"]).exit_code


def _is_group(command) -> bool:
    """A command with subcommands (typer carries its own click, so no isinstance)."""
    return isinstance(getattr(command, "commands", None), dict)


def qlora_problem(argv: list[str]) -> str | None:
    """Why `qlora ARGS` names no real command or option (None: it does)."""
    command, path = cli_command(), []
    words = [w.strip("[]") for w in argv[1:]]
    words = [w for w in words if w]
    for word in words:
        if not _is_group(command) or word.startswith("-"):
            break
        if word not in command.commands:
            return f"`qlora {' '.join([*path, word])}`: no such subcommand"
        command, path = command.commands[word], [*path, word]
    if _is_group(command) and path:
        return f"`qlora {' '.join(path)}` needs a subcommand: {sorted(command.commands)}"
    if cli_help_exit_code(tuple(path)) != 0:
        return f"`qlora {' '.join([*path, '--help'])}` exits with an error"
    options = {"--help"} | {o for p in command.params for o in (*p.opts, *p.secondary_opts)}
    for word in words:
        name = word.split("=", 1)[0]
        if name.startswith("-") and name not in options:
            return f"`qlora {' '.join(path)}` has no option {name}"
    return None


@functools.cache
def make_targets() -> frozenset[str]:
    targets = set()
    for line in (ROOT / "Makefile").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-/ ]+?)\s*:(?![=:])", line)
        if m:
            targets.update(t for t in m[1].split() if not t.startswith("."))
    return frozenset(targets)


def make_problem(argv: list[str]) -> str | None:
    goals = [w for w in argv[1:] if not w.startswith("-") and "=" not in w]
    missing = [g for g in goals if g not in make_targets()]
    return f"`make {' '.join(missing)}`: no such Makefile target" if missing else None


def module_problem(module: str) -> str | None:
    """Why `python -m module` would not find its module (None: it would)."""
    parts = module.split(".")
    if "<" in module:  # `python -m stages.<name>`: the package must exist
        parts = parts[: next(i for i, p in enumerate(parts) if "<" in p)]
    top = ROOT / parts[0]
    if not (top.is_dir() or top.with_suffix(".py").is_file()):
        if importlib.util.find_spec(parts[0]) is None:
            return f"`python -m {module}`: no such module"
        return None
    base = ROOT.joinpath(*parts)
    if "<" in module:
        return None if (base / "__init__.py").is_file() else f"{module}: no such package"
    if base.with_suffix(".py").is_file() or (base / "__main__.py").is_file():
        return None
    return f"`python -m {module}`: no file {'/'.join(parts)}.py in the repository"


def python_m_problem(argv: list[str]) -> str | None:
    program = _program(argv[0])
    if program == "accelerate" or re.fullmatch(r"python(3(\.\d+)?)?", program):
        if "-m" in argv[:-1]:
            return module_problem(argv[argv.index("-m") + 1])
    return None


@functools.cache
def dvc_parser():
    from dvc.cli.parser import get_main_parser

    return get_main_parser()


def dvc_problem(argv: list[str]) -> str | None:
    """Why DVC's own parser refuses `dvc ARGS` (None: it accepts it)."""
    import dvc.cli.parser

    errors: list[str] = []

    def record(message, *args, **kwargs):
        errors.append(str(message) % args if args else str(message))

    try:
        # DVC's parser also reads sys.argv (pytest's own flags would clash with its -q/-v),
        # logs what it refuses and prints help.
        with (
            mock.patch.object(sys, "argv", ["dvc", *argv[1:]]),
            mock.patch.object(dvc.cli.parser.logger, "error", record),
            contextlib.redirect_stderr(io.StringIO()) as err,
            contextlib.redirect_stdout(io.StringIO()),
        ):
            args = dvc_parser().parse_args(argv[1:])
    except (SystemExit, Exception):
        why = errors or err.getvalue().strip().splitlines()[-1:] or ["refused"]
        return f"`{' '.join(argv)}`: {why[-1]}"
    if getattr(args, "func", None) is None:
        return f"`{' '.join(argv)}`: names no dvc command"
    return None


def command_problems(text: str) -> list[str]:
    """The qlora, make, python -m and dvc commands of a page that are not true."""
    checks = {"qlora": qlora_problem, "make": make_problem, "dvc": dvc_problem}
    problems = unparsable_problems(text)
    for n, argv in commands(text):
        if argv[0] == "<unparsable>":
            continue
        check = checks.get(_program(argv[0]), python_m_problem)
        problem = check(argv)
        if problem:
            problems.append(f"line {n}: {problem}")
    return problems


@functools.cache
def params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def param_problem(key: str) -> str | None:
    """Why `key` (a dotted params.yaml key) is not in params.yaml (None: it is)."""
    node = params()
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return f"{key}: not a key of params.yaml"
        node = node[part]
    return None


PARAM_KEY = re.compile(r"^(?P<key>[a-z_]+(?:\.[A-Za-z0-9_]+)+)(?=$|[=:\s])")


def _named_param(word: str) -> str | None:
    m = PARAM_KEY.match(word)
    if not m or m["key"].split(".")[0] not in params():
        return None
    if m["key"].rsplit(".", 1)[-1] in FILE_EXTENSIONS:  # gate.json, dataset.py
        return None
    return m["key"]


def _yaml_keys(node, prefix: str = "") -> list[str]:
    if not isinstance(node, dict):
        return [prefix] if prefix else []
    keys = []
    for k, v in node.items():
        keys += _yaml_keys(v, f"{prefix}.{k}" if prefix else str(k))
    return keys


def param_problems(text: str) -> list[str]:
    """params.yaml keys a page names (in backticks, in -S/--set overrides, in YAML blocks of
    params) that params.yaml does not have."""
    blocks, prose = split_markdown(text)
    named: list[tuple[int, str]] = []
    for n, span in code_spans(prose):
        key = _named_param(span)
        if key:
            named.append((n, key))
    for n, argv in commands(text):
        for flag, value in zip(argv, argv[1:], strict=False):
            key = _named_param(value.strip("[]"))
            if flag.strip("[]") in ("-S", "--set") and key:
                named.append((n, key))
    for block in blocks:
        if block.lang in ("yaml", "yml"):
            with contextlib.suppress(yaml.YAMLError):
                data = yaml.safe_load(block.body)
                if isinstance(data, dict) and set(data) <= set(params()):
                    named += [(block.line, key) for key in _yaml_keys(data)]
    return [f"line {n}: {p}" for n, key in named if (p := param_problem(key))]


def yaml_problems(text: str) -> list[str]:
    problems = []
    for block in split_markdown(text)[0]:
        if block.lang in ("yaml", "yml"):
            try:
                yaml.safe_load(block.body)
            except yaml.YAMLError as e:
                problems.append(f"line {block.line}: YAML block does not parse: {e}")
    return problems


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text, lower case, punctuation dropped (but - and
    _), spaces as hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(text: str) -> set[str]:
    found: set[str] = set()
    for line in split_markdown(text)[1].splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            base = slug(m[1])
            name, k = base, 0
            while name in found:
                k += 1
                name = f"{base}-{k}"
            found.add(name)
    return found


LINK = re.compile(r"(?<!!)\[[^\]]*\]\((?P<target>[^)\s]+)(?:\s+\"[^\"]*\")?\)")


def link_problems(text: str, source: Path) -> list[str]:
    """Relative links of `text` (a page at `source`) whose file or anchor does not exist."""
    problems = []
    prose = split_markdown(text)[1]
    prose = CODE_SPAN.sub("", prose)
    for n, line in enumerate(prose.splitlines(), 1):
        for m in LINK.finditer(line):
            target = m["target"]
            if re.match(r"^[a-z][a-z0-9+.\-]*:", target):  # https:, mailto:
                continue
            file, _, anchor = target.partition("#")
            path = (source.parent / file).resolve() if file else source
            if not path.is_relative_to(ROOT):
                problems.append(f"line {n}: link to {target}: outside the repository")
            elif not path.exists():
                problems.append(f"line {n}: link to {target}: no such file")
            elif anchor and path.suffix == ".md" and anchor not in anchors(path.read_text()):
                problems.append(f"line {n}: link to {target}: no such heading in {path.name}")
    return problems


TREE_ROOT = re.compile(r"^[\w.\-]+/(\s|$)")


def tree_paths(body: str) -> list[str]:
    """The paths a layout tree names: a name per line (or a comma-separated list of names)
    before its description, two spaces of indentation a level. A folder ends with /."""
    paths: list[str] = []
    folders: list[str] = []
    for line in body.splitlines():
        level = (len(line) - len(line.lstrip())) // 2
        names = [n.strip() for n in re.split(r"\s{2,}", line.strip())[0].split(",")]
        names = [n for n in names if re.fullmatch(r"[\w.\-]+/|[\w\-]+(\.[\w\-]+)+", n)]
        if not names or level > len(folders):
            continue  # a description's continuation line
        del folders[level:]
        for name in names:
            paths.append("/".join([*folders, name]))
        if len(names) == 1 and names[0].endswith("/"):
            folders.append(names[0].rstrip("/"))
    return paths


def layout_trees(text: str) -> list[Block]:
    """The text blocks that draw the repository's layout (they open with a folder)."""
    return [
        b for b in split_markdown(text)[0] if b.lang in ("", "text") and TREE_ROOT.match(b.body)
    ]


def tree_problems(text: str) -> list[str]:
    """Paths a layout tree names that the repository (or a run) does not have."""
    return [
        f"line {block.line}: layout: {problem}"
        for block in layout_trees(text)
        for path in tree_paths(block.body)
        if (problem := path_problem(path))
    ]


def opening_problems(text: str) -> list[str]:
    """A manual page opens with its title and one sentence saying what it covers."""
    paragraphs = [p.strip() for p in text.split("\n\n")]
    if not paragraphs[0].startswith("# "):
        return ["the page does not open with a title"]
    if len(paragraphs) < 2 or not paragraphs[1].startswith("This page covers"):
        return ["the title is not followed by 'This page covers ...'"]
    return []


def readme_problems(text: str) -> list[str]:
    problems = []
    lines = len(text.splitlines())
    if lines > README_MAX_LINES:
        problems.append(f"README.md has {lines} lines, more than {README_MAX_LINES}")
    linked = {
        (README.parent / m["target"].partition("#")[0]).resolve() for m in LINK.finditer(text)
    }
    for page in sorted(DOCS_DIR.glob("*.md")):
        if page.resolve() not in linked:
            problems.append(f"README.md does not link to docs/{page.name}")
    return problems


# ---- the manual, checked ------------------------------------------------------------------


def _ids(pages: list[Path]) -> list[str]:
    return [p.relative_to(ROOT).as_posix() for p in pages]


def test_the_manual_has_its_pages():
    assert DOCS_DIR.is_dir() and len(PAGES) > 1


@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_paths_exist(page: Path):
    assert path_problems(page.read_text()) == []


@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_commands_are_real(page: Path):
    assert command_problems(page.read_text()) == []


@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_params_keys_exist(page: Path):
    assert param_problems(page.read_text()) == []


@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_yaml_blocks_parse(page: Path):
    assert yaml_problems(page.read_text()) == []


@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_links_resolve(page: Path):
    assert link_problems(page.read_text(), page) == []


@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_layout_trees_name_real_paths(page: Path):
    assert tree_problems(page.read_text()) == []


def _library_files() -> set[str]:
    return {
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "qlora").rglob("*.py")
        if p.name != "__init__.py" and "__pycache__" not in p.parts
    }


def test_the_readme_layout_names_every_subpackage():
    [tree] = layout_trees(README.read_text())
    named = set(tree_paths(tree.body))
    subpackages = {
        f"{p.parent.relative_to(ROOT).as_posix()}/" for p in ROOT.glob("qlora/*/__init__.py")
    }
    assert subpackages - named == set()


def test_the_development_layout_names_every_library_module():
    [tree] = layout_trees((DOCS_DIR / "development.md").read_text())
    assert _library_files() - set(tree_paths(tree.body)) == set()


@pytest.mark.parametrize("page", PAGES[1:], ids=_ids(PAGES[1:]))
def test_each_page_says_what_it_covers(page: Path):
    assert opening_problems(page.read_text()) == []


def test_readme_is_a_short_lobby_to_every_page():
    assert readme_problems(README.read_text()) == []


def test_the_checks_see_the_commands_and_paths():
    """The checks above pass because the pages are true, not because they found nothing."""
    text = README.read_text()
    programs = {_program(argv[0]) for _, argv in commands(text)}
    assert {"make", "qlora", "dvc"} <= programs
    assert any(path_token().search(code) for _, code in code_texts(text))
    assert any(LINK.search(line) for line in text.splitlines())


# ---- each check fails on a planted bad line ----------------------------------------------


def test_a_missing_path_is_caught():
    assert path_problems("The loader is `qlora/models/loading.py`.") == []
    assert path_problems("Written in `qlora/artifacts.py`.") == [
        "line 1: qlora/artifacts.py: no such file or folder"
    ]
    assert path_problems("```text\nqlora/nowhere/\n```") != []
    assert path_problems("see `tests/unit/docs/`") == []
    assert path_problems("see `tests/unit/docs/test_docs.py/`") != []  # a file, not a folder


def test_the_output_folders_come_from_dvc_yaml():
    assert {"reports/", "data/prepared/", "data/raw/"} <= set(output_prefixes())
    assert not any(p.startswith(output_prefixes()) for p in PROJECT_PREFIXES)


def test_an_output_dvc_yaml_does_not_declare_is_caught():
    assert path_problems("`reports/train/plots/metrics/{train,eval}/*.tsv`") == []
    assert path_problems("`data/prepared/splits/test.jsonl`, `reports/`") == []
    assert path_problems("`registry/v1/` and `registry/.orphaned/`") == []
    assert path_problems("`reports/train/metrics.json`") == []
    assert path_problems("`reports/finetune.json`") == [
        "line 1: reports/finetune.json: not an output dvc.yaml declares"
    ]
    assert path_problems("`data/prepared/{splits,tokens}`") != []


def test_a_missing_qlora_subcommand_or_option_is_caught():
    ok = "```bash\nqlora registry list\n.venv/bin/qlora flow run --set a=1 --pull\n```"
    assert command_problems(ok) == []
    assert command_problems("```bash\nqlora registry lst\n```") == [
        "line 2: `qlora registry lst`: no such subcommand"
    ]
    assert command_problems("```bash\nqlora train\n```") != []
    assert command_problems("```bash\nqlora registry\n```") != []  # a group alone
    assert command_problems("Run `qlora promote --force`.") == [
        "line 1: `qlora promote` has no option --force"
    ]
    assert command_problems("```text\n$ qlora chat --base\n$ qlora talk\n```") == [
        "line 3: `qlora talk`: no such subcommand"
    ]


def test_a_missing_make_target_is_caught():
    assert command_problems("```bash\nmake run    # the pipeline\n```") == []
    assert command_problems("```bash\nmake deploy\n```") == [
        "line 2: `make deploy`: no such Makefile target"
    ]


def test_a_missing_python_module_is_caught():
    assert command_problems("```bash\npython -m tools.code_deps --write\n```") == []
    assert command_problems("`python -m stages.<name>`, `.venv/bin/python -m pytest -q`") == []
    assert command_problems("```bash\npython -m tools.lockfiles\n```") == [
        "line 2: `python -m tools.lockfiles`: no file tools/lockfiles.py in the repository"
    ]
    assert command_problems("`accelerate launch -m stages.train`") != []
    assert command_problems("`python -m qlora`") != []  # a package without __main__.py
    assert command_problems("`python -m no_such_module_anywhere`") != []


def test_a_bad_dvc_command_is_caught():
    ok = "```bash\ndvc exp run -S finetune.lora.r=32\ndvc plots diff HEAD exp-name\n```"
    assert command_problems(ok) == []
    [problem] = command_problems("```bash\ndvc reproduce\n```")
    assert problem.startswith("line 2: `dvc reproduce`: argument command: invalid choice")
    assert command_problems("```bash\ndvc exp shwo\n```") != []
    assert command_problems("```bash\ndvc repro --bogus-flag\n```") != []
    assert command_problems("```bash\ndvc\n```") != []


def test_an_unparsable_command_is_caught():
    assert command_problems("```bash\nqlora run 'finetune\n```") != []


def test_a_missing_params_key_is_caught():
    assert param_problems("`finetune.lora.r: -3`, `gate.json`, `train.loss`") == []
    assert param_problems("Set `finetune.lora.rank`.") == [
        "line 1: finetune.lora.rank: not a key of params.yaml"
    ]
    assert param_problems("```bash\ndvc exp run -S finetune.lora.rnk=32\n```") != []
    assert param_problems("```yaml\nfinetune:\n  processes: 4\n```") == []
    assert param_problems("```yaml\nfinetune:\n  process_count: 4\n```") != []


def test_a_broken_yaml_block_is_caught():
    assert yaml_problems("```yaml\nfinetune:\n  processes: 4\n```") == []
    assert yaml_problems("```yaml\nfinetune:\n  processes: [4\n```") != []


def test_a_broken_link_is_caught():
    source = README
    assert link_problems("[p](docs/pipeline.md#what-reruns-when)", source) == []
    assert link_problems("[d](https://dvc.org/doc/dvclive) `[x](nowhere.md)`", source) == []
    assert link_problems("[p](docs/pipelines.md)", source) == [
        "line 1: link to docs/pipelines.md: no such file"
    ]
    assert link_problems("[p](docs/pipeline.md#no-such-heading)", source) != []
    assert link_problems("[a](#nowhere)", DOCS_DIR / "pipeline.md") != []


def test_slugs_are_githubs():
    assert slug("The method's claims, checked on every run") == (
        "the-methods-claims-checked-on-every-run"
    )
    assert slug("Share data and adapters through a DVC remote (S3)") == (
        "share-data-and-adapters-through-a-dvc-remote-s3"
    )
    assert slug("The training log: DVCLive") == "the-training-log-dvclive"
    assert anchors("# A\n## A\n") == {"a", "a-1"}


def test_a_stale_layout_tree_is_caught():
    tree = "qlora/   the library\n  core/   base\n    paths.py, io.py   paths; io\n  talk.py\n"
    assert tree_paths(tree) == [
        "qlora/",
        "qlora/core/",
        "qlora/core/paths.py",
        "qlora/core/io.py",
        "qlora/talk.py",
    ]
    assert tree_problems(f"```text\n{tree}```") == []
    stale = "qlora/   the library\n  artifacts.py   paths\n  core/\n    models.py\n"
    assert tree_problems(f"```text\n{stale}```") == [
        "line 2: layout: qlora/artifacts.py: no such file or folder",
        "line 2: layout: qlora/core/models.py: no such file or folder",
    ]
    wrapped = "stages/   one script per stage, and a description that\n          wraps.py on\n"
    assert tree_paths(wrapped) == ["stages/"]  # a continuation line names nothing


def test_a_link_out_of_the_repository_is_caught():
    assert link_problems("[s](../../elsewhere/NOTES.md)", DOCS_DIR / "pipeline.md") != []


def test_a_page_without_its_opening_sentence_is_caught():
    assert opening_problems("# Data\n\nThis page covers the data.\n") == []
    assert opening_problems("# Data\n\nThe data.\n") != []
    assert opening_problems("Data\n\nThis page covers the data.\n") != []


def test_a_long_readme_or_a_missing_page_link_is_caught():
    links = " ".join(f"[{p.stem}](docs/{p.name})" for p in DOCS_DIR.glob("*.md"))
    assert readme_problems(f"# qlora\n{links}\n") == []
    assert readme_problems(f"# qlora\n{links}\n" + "line\n" * README_MAX_LINES) != []
    assert any("does not link to docs/" in p for p in readme_problems("# qlora\n"))
