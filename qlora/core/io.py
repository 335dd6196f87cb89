"""Small I/O helpers every stage shares: atomic outputs, JSON/JSONL, stage entry points.

Outputs are written to a temporary sibling and renamed into place, so a killed stage never
leaves a file or directory that looks complete.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any


class StageError(RuntimeError):
    """A failure the user can act on: printed as one clear message, without a traceback."""


class TransientStageError(StageError):
    """A failure that may pass on its own (a download that errored): the stage exits with
    EX_TEMPFAIL (75), which the Prefect flow retries with backoff; other failures exit 1."""


EX_TEMPFAIL = 75


@contextlib.contextmanager
def atomic_dir(target: Path | str, *, replace: bool = True) -> Iterator[Path]:
    """Yield an empty temporary directory that replaces `target` only if the block succeeds.

    With `replace=False` it takes the place of a missing or empty folder only: the kernel's
    rename refuses a non-empty one (or a file) at that very moment, so nothing a user put
    there since the caller checked can be lost; the work is discarded with a StageError.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; outputs are meant to be shared
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not replace:
        try:
            tmp.rename(target)
        except OSError as e:  # ENOTEMPTY or EEXIST: files there; ENOTDIR: not a folder
            shutil.rmtree(tmp, ignore_errors=True)
            raise StageError(f"{target}: not replaced ({e.strerror}): nothing written") from None
        return
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def check_output_dir(
    target: Path | str,
    replace: bool,
    previous_files: Callable[[Path], dict[str, str] | None],
    protected: Iterable[Path | str] = (),
) -> None:
    """Refuse, before any work, an output folder whose contents are not ours to replace:
    one inside, around or equal to a `protected` folder; anything but a folder; a folder
    with files in it unless `replace`. Even with `replace`, every entry must be a file the
    previous output wrote, unchanged: `previous_files(target)` gives its {name: sha256}
    (None: no previous output of this kind is there). So a user's file, a `.git` folder or
    an edited model card is never deleted. A missing or empty folder is fine."""
    target = Path(target)
    here = target.resolve()
    for folder in map(Path, protected):
        there = folder.resolve()
        if here.is_relative_to(there) or there.is_relative_to(here):
            raise StageError(f"{target}: overlaps {folder}: choose a folder outside it")
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise StageError(f"{target}: exists and is not a folder: choose another output folder")
    entries = sorted(p.name for p in target.iterdir()) if target.is_dir() else []
    if not entries:
        return
    if not replace:
        raise StageError(
            f"{target}: folder is not empty ({some_names(entries)}): nothing written. Choose a new "
            "or empty folder, or pass --replace to replace a previous export there"
        )
    files = previous_files(target)
    if files is None:
        raise StageError(
            f"{target}: not replaced: it holds {some_names(entries)} but no record of a previous "
            "export of this kind (--replace replaces only one): move its files away or "
            "choose another folder"
        )
    not_ours = [name for name in entries if not _unchanged(target / name, files.get(name))]
    if not_ours:
        raise StageError(
            f"{target}: not replaced: {some_names(not_ours)} "
            f"{'is' if len(not_ours) == 1 else 'are'} "
            "not what the previous export wrote (added or changed since): move "
            f"{'it' if len(not_ours) == 1 else 'them'} away first"
        )


def some_names(names: Sequence[str], shown: int = 5) -> str:
    """The first `shown` names, for a message about a folder's contents."""
    return ", ".join(names[:shown]) + (", ..." if len(names) > shown else "")


def _unchanged(path: Path, sha256: str | None) -> bool:
    return (
        sha256 is not None
        and path.is_file()
        and not path.is_symlink()
        and sha256_of(path) == sha256
    )


def atomic_write_text(path: Path | str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    """`data` at `path`, whole or not at all: written beside it, then renamed over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        # mkstemp makes it private: a file being replaced keeps its own mode (params.yaml
        # may be the user's), a new output is shared.
        try:
            mode = path.stat().st_mode & 0o7777
        except FileNotFoundError:
            mode = 0o644
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: Path | str, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def read_json(path: Path | str) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise StageError(f"{path}: not found (has the stage that writes it run?)") from e
    except json.JSONDecodeError as e:
        raise StageError(f"{path}: not valid JSON at line {e.lineno}: {e.msg}") from e


def write_jsonl(path: Path | str, rows: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_jsonl_numbered(
    path: Path | str, lenient_utf8: bool = False
) -> tuple[list[tuple[int, dict]], list[int]]:
    """(line number, row) pairs of a JSON Lines file, and the lines that were not UTF-8.

    A broken line is a StageError naming it, never a traceback. With `lenient_utf8` bad bytes
    become U+FFFD and the line is reported instead (validation names such rows as a check).
    """
    path = Path(path)
    try:
        lines = path.read_bytes().splitlines()
    except FileNotFoundError:
        raise StageError(f"{path}: not found") from None
    if lines:  # a byte order mark (editors, spreadsheet exports) is no part of line 1
        lines[0] = lines[0].removeprefix(codecs.BOM_UTF8)
    rows, bad_utf8 = [], []
    for lineno, raw in enumerate(lines, start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            if not lenient_utf8:
                raise StageError(f"{path}: line {lineno} is not valid UTF-8 ({e.reason})") from None
            bad_utf8.append(lineno)
            line = raw.decode("utf-8", errors="replace")
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise StageError(f"{path}: line {lineno} is not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise StageError(f"{path}: line {lineno} is not a JSON object")
        rows.append((lineno, row))
    return rows, bad_utf8


def read_jsonl(path: Path | str) -> list[dict]:
    """Rows of a JSON Lines file (strict UTF-8)."""
    return [row for _, row in read_jsonl_numbered(path)[0]]


def sha256_of(path: Path | str) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def weights_identity(model_dir: Path | str) -> dict[str, str]:
    """sha256 of every safetensors file of a model directory: what makes a base this base."""
    return {w.name: sha256_of(w) for w in sorted(Path(model_dir).glob("*.safetensors"))}


# No telemetry from any library, in any stage DVC starts.
QUIET_ENV = {
    "DVC_NO_ANALYTICS": "1",
    "GX_ANALYTICS_ENABLED": "false",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONUNBUFFERED": "1",  # stage output reaches logs line by line
}


def pipeline_env() -> dict[str, str]:
    """Environment for `dvc` and the stages it starts: this interpreter's bin directory first
    on PATH (dvc.yaml says `python -m stages.x`, which must be the project's venv Python even
    when the venv is not activated), telemetry off unless the user chose otherwise."""
    env = {**os.environ, **{k: v for k, v in QUIET_ENV.items() if k not in os.environ}}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def run_stage(name: str, main: Callable[[], None]) -> None:
    """Entry point of `python -m stages.<name>`: time it, turn known errors into messages."""
    start = time.perf_counter()
    print(f"[{name}] started", flush=True)
    try:
        main()
    except TransientStageError as e:
        print(f"[{name}] FAILED (transient, may be retried): {e}", file=sys.stderr, flush=True)
        sys.exit(EX_TEMPFAIL)
    except StageError as e:  # ParamsError is one too
        print(f"[{name}] FAILED: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    print(f"[{name}] done in {time.perf_counter() - start:.1f} s", flush=True)
