"""The adapter registry: every promotion, why it was decided, and the "champion" alias.

A directory in the Hugging Face layout, not a service (README, "Promotion and the adapter
registry", says why):

    registry/
      index.jsonl   append-only events, one JSON object a line: "register" (a version, its
                    decision, whether it became champion) and "alias" (a rollback)
      v1/           the adapter as trained (adapter_config.json, adapter_model.safetensors,
                    base_identity.json), README.md (model card), lineage.json (git,
                    dvc.lock, params, metrics, decision): a hub model repository as it is
      .lock         held by whoever writes; the kernel frees it when its holder dies
      .orphaned/    what recovery set aside: folders no index line registers, a torn line

A version is staged in a hidden directory, renamed into place, and only then does the one
line that registers it (and moves the alias) reach the index, in a single write. A promotion
killed at any point leaves either that line, and so a complete version, or no line: the next
writer moves the unregistered files into .orphaned/ (never deletes them: a folder the index
does not name may be a version whose line a hand edit lost), and the champion never moved.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

from qlora.core.io import (
    StageError,
    check_output_dir,
    read_json,
    sha256_of,
    some_names,
)

REGISTRY_ENV = "QLORA_REGISTRY"


DEFAULT_DIR = Path("registry")


INDEX, LOCK, LINEAGE, CARD = "index.jsonl", ".lock", "lineage.json", "README.md"


# A champion's deployable GGUF files (the ones that passed the parity check), in its folder.
DEPLOY_DIR = "gguf"


ORPHANED = ".orphaned"


ALIAS = "champion"


# From the torch-free core, so the registry starts without loading torch.


# A promotion holds the lock for seconds (copying ~20 MB); ten minutes means a stuck peer.
LOCK_TIMEOUT_S = 600.0


_VERSION = re.compile(r"v(\d+)")


log = logging.getLogger(__name__)


def default_dir() -> Path:
    return Path(os.environ.get(REGISTRY_ENV) or DEFAULT_DIR)


def now_utc() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def current_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container user without a passwd entry
        return str(os.getuid())


def _whole_event(line: bytes) -> dict | None:
    """The event a line holds, or None when it is no complete JSON object."""
    try:
        event = json.loads(line)
    except ValueError:  # not JSON, or bytes cut inside a UTF-8 character
        return None
    return event if isinstance(event, dict) else None


def parse_index(path: Path, data: bytes) -> tuple[list[dict], bytes]:
    """The events of an index, and its torn tail (b"" when there is none).

    Every line but the last must be an event. The last one, when no newline ends it, is an
    event all the same if it parses as one (a hand edit drops the final newline; a proper
    prefix of a JSON object is never a JSON object); otherwise it is a write cut short.
    """
    *lines, tail = data.split(b"\n")
    events = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        event = _whole_event(line)
        if event is None:
            raise StageError(f"{path}: line {n} is not a JSON object (edited by hand?)")
        events.append(event)
    if not tail.strip():
        return events, b""
    last = _whole_event(tail)
    return (events, tail) if last is None else ([*events, last], b"")


class Registry:
    def __init__(self, root: Path | str | None = None) -> None:
        self.root = Path(root) if root is not None else default_dir()
        # What recovery did in this process, one sentence each, for the caller to show.
        self.recovered: list[str] = []

    # ------------------------------------------------------------------ reading

    def _check_is_registry(self) -> None:
        """Refuse a folder that holds files but no index: recovery would take every vN/ in
        it for a leftover, and readers would call it an empty registry."""
        if self.root.exists() and not self.root.is_dir():
            raise StageError(f"{self.root}: not a folder, so not a registry")
        if not self.root.is_dir() or (self.root / INDEX).is_file():
            return
        others = sorted(p.name for p in self.root.iterdir() if p.name != LOCK)
        if others:
            raise StageError(
                f"{self.root}: not a registry, or its index was lost: it holds "
                f"{some_names(others)} but "
                f"no {INDEX}. Nothing was changed: point --registry (or ${REGISTRY_ENV}) at "
                f"a registry folder, or restore {self.root / INDEX} from a backup"
            )

    def _index(self) -> tuple[list[dict], bytes]:
        path = self.root / INDEX
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            self._check_is_registry()
            return [], b""
        return parse_index(path, data)

    def events(self) -> list[dict]:
        return self._index()[0]

    def versions(self) -> dict[str, dict]:
        """Version -> its register event, oldest first."""
        return {e["version"]: e for e in self.events() if e.get("event") == "register"}

    def champion_history(self) -> list[str]:
        """The champions in order of appointment; a rollback to the one before pops."""
        stack: list[str] = []
        for e in self.events():
            if e.get("event") == "register" and e.get("champion"):
                stack.append(e["version"])
            elif e.get("event") == "alias" and e.get("alias") == ALIAS:
                if len(stack) >= 2 and stack[-2] == e["version"]:
                    stack.pop()
                else:
                    stack.append(e["version"])
        return stack

    def champion(self) -> str | None:
        history = self.champion_history()
        return history[-1] if history else None

    def record(self, version: str) -> dict:
        versions = self.versions()
        if version not in versions:
            known = ", ".join(versions) or "none"
            raise StageError(f"{self.root}: no version {version!r} (registered: {known})")
        return versions[version]

    def resolve(self, name: str) -> str:
        """A version, or the alias "champion" turned into one."""
        if name == ALIAS:
            champion = self.champion()
            if champion is None:
                raise StageError(f"{self.root}: no champion yet (`qlora promote` makes one)")
            return champion
        self.record(name)
        return name

    def path(self, version: str) -> Path:
        return self.root / version

    def lineage(self, version: str) -> dict:
        record = self.record(version)
        path = self.path(version) / LINEAGE
        if not path.is_file() or sha256_of(path) != record["lineage_sha256"]:
            raise StageError(f"{path}: missing or changed since {version} was registered")
        return read_json(path)

    def check_version(self, version: str) -> list[str]:
        """What is wrong with a version's files: missing, or changed since registration."""
        record = self.record(version)
        folder = self.path(version)
        problems = []
        for name, digest in {**record["files"], LINEAGE: record["lineage_sha256"]}.items():
            f = folder / name
            if not f.is_file():
                problems.append(f"{version}: {name} is missing")
            elif sha256_of(f) != digest:
                problems.append(f"{version}: {name} changed since it was registered")
        return problems

    def verify(self) -> list[str]:
        """Every problem of the registry: a version's files, a champion that cannot serve."""
        versions = self.versions()
        problems = [p for v in versions for p in self.check_version(v)]
        champion = self.champion()
        if champion is not None and versions.get(champion, {}).get("decision") != "promoted":
            problems.append(f"champion {champion} is not a promoted version")
        return problems

    def _unregistered(self) -> list[Path]:
        """Folders no index line registers: a promotion's staging folder, or a vN/ whose
        line never reached the index (or was lost from it)."""
        registered = set(self.versions())
        return [
            child
            for child in sorted(self.root.iterdir())
            if child.is_dir()
            and (
                child.name.startswith(".stage-")
                or (bool(_VERSION.fullmatch(child.name)) and child.name not in registered)
            )
        ]

    def leftovers(self) -> list[str]:
        """What no version owns: kept in .orphaned/ by recovery, or waiting for the next
        writer to set it aside there. Nothing of it is served; look before deleting it."""
        if not self.root.is_dir():
            return []
        torn = self._index()[1]
        pending = [f"{p.name}/ is registered by no index line" for p in self._unregistered()]
        if torn:
            pending.append(f"{INDEX} ends in an incomplete line ({len(torn)} bytes)")
        aside = self.root / ORPHANED
        kept = sorted(aside.iterdir()) if aside.is_dir() else []
        return [
            *(f"{note}: the next write sets it aside in {aside}" for note in pending),
            *(f"{p}: set aside by an earlier recovery" for p in kept),
        ]

    # ------------------------------------------------------------------ writing

    @contextlib.contextmanager
    def writing(self) -> Iterator[Registry]:
        """Hold the registry's lock, after clearing what an interrupted writer left."""
        from filelock import FileLock, Timeout

        self._check_is_registry()  # before the lock file: a foreign folder gets no writes
        self.root.mkdir(parents=True, exist_ok=True)
        # No soft-lock fallback: a lock file left by a killed process would block forever.
        lock = FileLock(self.root / LOCK, timeout=LOCK_TIMEOUT_S, fallback_to_soft=False)
        try:
            with lock:
                self._check_is_registry()  # again: the index may have gone while we waited
                self._recover()
                yield self
        except Timeout:
            raise StageError(
                f"{self.root / LOCK}: another promotion held the registry for "
                f"{LOCK_TIMEOUT_S:.0f} s; is one stuck?"
            ) from None

    def _recover(self) -> list[str]:
        """Finish what an interrupted writer left, deleting nothing; say what was done."""
        done = self._repair_index() + self._set_aside_unregistered()
        for action in done:
            log.info("%s: %s", self.root, action)
        self.recovered += done
        return done

    def _aside(self, name: str) -> Path:
        """A new path in .orphaned/ for something recovery keeps out of the registry."""
        folder = self.root / ORPHANED
        folder.mkdir(exist_ok=True)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        path, n = folder / f"{name.lstrip('.')}-{stamp}", 1
        while path.exists():
            path, n = folder / f"{name.lstrip('.')}-{stamp}-{n}", n + 1
        return path

    def _repair_index(self) -> list[str]:
        index = self.root / INDEX
        data = index.read_bytes() if index.is_file() else b""
        if not data or data.endswith(b"\n"):
            return []
        torn = parse_index(index, data)[1]
        if not torn:  # a whole event without its newline: the next append would join it
            self._append_bytes(b"\n")
            return [f"{INDEX}: its last line had no final newline (edited by hand?): added one"]
        kept = self._aside(f"{INDEX}.torn")
        with kept.open("xb") as f:  # durable before the index loses the bytes
            f.write(torn)
            os.fsync(f.fileno())
        with index.open("r+b") as f:
            f.truncate(len(data) - len(torn))
            os.fsync(f.fileno())
        return [
            f"{INDEX}: cut its incomplete last line ({len(torn)} bytes, a write cut short) "
            f"and kept it in {kept}"
        ]

    def _set_aside_unregistered(self) -> list[str]:
        done = []
        for child in self._unregistered():
            kept = self._aside(child.name)
            child.rename(kept)
            done.append(f"{child.name}/ was registered by no index line: moved to {kept}")
        if done:
            _fsync_dir(self.root)
        return done

    def _append(self, event: dict) -> None:
        self._append_bytes((json.dumps(event, ensure_ascii=False, default=str) + "\n").encode())

    def _append_bytes(self, data: bytes) -> None:
        fd = os.open(self.root / INDEX, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)

    def move_alias(self, version: str, previous: str | None, action: str, reason: str) -> dict:
        """Point the champion alias at `version` (registered), away from `previous`, and
        record why. Call inside `writing()`."""
        self.record(version)
        event = {
            "event": "alias",
            "alias": ALIAS,
            "version": version,
            "previous": previous,
            "action": action,
            "reason": reason,
            "created": now_utc(),
            "by": current_user(),
        }
        self._append(event)
        return event

    def next_version(self) -> str:
        numbers = [int(m[1]) for v in self.versions() if (m := _VERSION.fullmatch(v))]
        return f"v{max(numbers, default=0) + 1}"

    def add(
        self,
        version: str,
        adapter_dir: Path,
        texts: dict[str, str],
        event: dict,
        expected_md5: dict[str, str],
        artifacts: dict[str, tuple[Path, str]] | None = None,
    ) -> dict:
        """Copy the adapter and write `texts` (name -> content) as `version`, then append
        `event` (completed with the files' hashes). The copies must be exactly the files of
        `expected_md5` (DVC's record of the adapter), with those md5s. `artifacts`: more
        files, {name under the version folder: (source, its sha256)}, each checked after
        it is copied (the deployable GGUF files). Call inside `writing()`."""
        target = self.path(version)
        if target.exists():
            raise StageError(f"{target} exists but is registered: refusing to overwrite it")
        # Before any version folder can exist: a registry folder always holds its index.
        (self.root / INDEX).touch()
        stage = self.root / f".stage-{version}-{os.getpid()}"
        stage.mkdir()
        try:
            for f in sorted(adapter_dir.iterdir()):
                if f.is_file() and f.name not in texts:
                    shutil.copy2(f, stage / f.name)
                    (stage / f.name).chmod(0o644)  # finetune writes private files
            _check_copies(adapter_dir, stage, expected_md5, texts)
            for name, (source, digest) in (artifacts or {}).items():
                (stage / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, stage / name)
                (stage / name).chmod(0o644)
                if sha256_of(stage / name) != digest:
                    raise StageError(
                        f"{source}: not the file its manifest records (sha256): nothing "
                        "registered; run `qlora run` to rebuild the export"
                    )
            for name, text in texts.items():
                (stage / name).write_text(text, encoding="utf-8")
            every = sorted(f for f in stage.rglob("*") if f.is_file())
            files = {
                f.relative_to(stage).as_posix(): sha256_of(f) for f in every if f.name != LINEAGE
            }
            for f in every:
                with f.open("rb") as fh:
                    os.fsync(fh.fileno())
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        stage.rename(target)
        _fsync_dir(self.root)
        event = {**event, "files": files, "lineage_sha256": sha256_of(target / LINEAGE)}
        self._append(event)
        return event


def _check_copies(
    adapter_dir: Path, stage: Path, expected_md5: dict[str, str], texts: dict[str, str]
) -> None:
    """Refuse copies that are not the files DVC recorded: changed, missing or extra."""
    changed = [
        name
        for name, md5 in expected_md5.items()
        if name not in texts and file_md5(stage / name) != md5
    ]
    if changed:
        raise StageError(
            f"{adapter_dir}: {', '.join(changed)} changed while being registered "
            "(is a run writing it?): nothing registered"
        )
    extra = sorted(p.name for p in stage.iterdir() if p.name not in expected_md5)
    if extra:
        raise StageError(
            f"{adapter_dir}: {', '.join(extra)} not in dvc.lock's record of the adapter "
            "(written there by hand, or by a run?): nothing registered"
        )


def file_md5(path: Path) -> str | None:
    if not path.is_file():
        return None
    h = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def dvc_manifest(root: Path, dir_md5: str | None) -> dict[str, str] | None:
    """File name -> md5 of a DVC-tracked directory, from the cache's .dir object (None when
    the cache does not have it, e.g. a clone that only pulled other outputs)."""
    if not dir_md5 or not dir_md5.endswith(".dir"):
        return None
    path = root / ".dvc/cache/files/md5" / dir_md5[:2] / dir_md5[2:]
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return {e["relpath"]: e["md5"] for e in entries}


def dvc_dir_md5(manifest: dict[str, str]) -> str:
    """The md5 DVC gives a directory of these files (relative path -> md5): that of the
    JSON list of {"md5", "relpath"} entries sorted by path, as dvc-data's Tree hashes it."""
    entries = [{"md5": manifest[path], "relpath": path} for path in sorted(manifest)]
    data = json.dumps(entries, sort_keys=True).encode("utf-8")
    return hashlib.md5(data, usedforsecurity=False).hexdigest() + ".dir"


def _fsync_dir(path: Path) -> None:
    """Make a rename durable: without it a crash can forget the new directory entry."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_adapter_target(reg: Registry, out_dir: Path, replace: bool = False) -> None:
    """Refuse an `export --adapter` folder that is in the registry, or not empty (with
    `replace`: anything but the unchanged files of a version of this registry exported
    there before, as the registry's index lists them)."""

    def previous_export(folder: Path) -> dict[str, str] | None:
        try:
            version = read_json(folder / LINEAGE)["version"]
            record = reg.record(version)
        except (StageError, KeyError, TypeError, ValueError, OSError):
            return None
        return {**record["files"], LINEAGE: record["lineage_sha256"]}

    check_output_dir(out_dir, replace, previous_export, protected=(reg.root,))


def export_adapter(reg: Registry, version: str, out_dir: Path, replace: bool = False) -> Path:
    """Copy a registered version (adapter + card + lineage, not its GGUF files: `qlora export
    --gguf` writes those) to out_dir, checked first. A non-empty out_dir is refused unless
    `replace` and it holds a previous adapter export."""
    from qlora.core.io import atomic_dir

    check_adapter_target(reg, out_dir, replace)
    broken = reg.check_version(version)
    if broken:
        raise StageError(f"{reg.path(version)}: {'; '.join(broken)}")
    with atomic_dir(out_dir, replace=replace) as tmp:
        shutil.copytree(
            reg.path(version), tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns(DEPLOY_DIR)
        )
    return out_dir
