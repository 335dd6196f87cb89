"""llama.cpp's own converters, from the source release of the pinned llama-cpp-python.

The llama-cpp-python wheel (the engine) carries no converter: its source archive does
(vendor/llama.cpp: convert_hf_to_gguf.py, convert_lora_to_gguf.py, the `conversion`
package they import, and gguf-py at the matching version). `install()` takes exactly those
entries from the archive of the installed version (pip downloads it, or takes it from its
cache) into <venv>/share/llama.cpp; `make install` runs it. The converters then run as
subprocesses with that gguf-py first on their path: the gguf release on PyPI, which
transformers uses to read GGUF files, is older than the one the converters are written for.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from qlora.core.io import StageError, atomic_dir, write_json

DIST = "llama_cpp_python"
ENV_DIR = "QLORA_LLAMA_CPP_DIR"  # another converter folder (a llama.cpp checkout)
VERSION_FILE = "qlora-installed.json"
HF_CONVERTER = "convert_hf_to_gguf.py"
LORA_CONVERTER = "convert_lora_to_gguf.py"
# What the two converters import: the archive holds the whole of llama.cpp (~75 MB), of
# which these ~2.5 MB are the conversion code and its license.
ENTRIES = (HF_CONVERTER, LORA_CONVERTER, "conversion", "gguf-py", "LICENSE")

# Run inside the converter's process: a tokenizer the converter's table does not know
# (it recognises a BPE pre-tokenizer by the hash of how it encodes a fixed text) may be
# named by the caller. The table is the only place llama.cpp keeps that knowledge.
_RUNNER = """
import runpy, sys
folder, script, pre = sys.argv[1:4]
sys.path[:0] = [folder, folder + "/gguf-py"]
if pre:
    import conversion.base
    conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
sys.argv = [script, *sys.argv[4:]]
runpy.run_path(folder + "/" + script, run_name="__main__")
"""


def installed_version() -> str:
    try:
        return importlib.metadata.version(DIST)
    except importlib.metadata.PackageNotFoundError:
        raise StageError(
            "llama-cpp-python is not installed: `make install` installs it (requirements.lock)"
        ) from None


def default_dir() -> Path:
    return Path(sys.prefix) / "share" / "llama.cpp"


def converter_dir() -> Path:
    """The folder holding the converters, checked to be complete and (when installed here)
    of the installed engine's version."""
    folder = Path(os.environ.get(ENV_DIR) or default_dir())
    missing = [e for e in ENTRIES[:4] if not (folder / e).exists()]
    if missing:
        raise StageError(
            f"{folder}: llama.cpp's converters are missing ({', '.join(missing)}): run "
            f"`make install` or `python -m qlora.export.converters install`"
            + (f" (or unset {ENV_DIR})" if os.environ.get(ENV_DIR) else "")
        )
    return folder


def _members(archive: tarfile.TarFile, prefix: str) -> list[tarfile.TarInfo]:
    wanted = tuple(f"{prefix}/{e}" for e in ENTRIES)
    return [
        m
        for m in archive.getmembers()
        if any(m.name == w or m.name.startswith(w + "/") for w in wanted)
    ]


def install(target: Path | None = None) -> Path:
    """Put the converters of the installed llama-cpp-python's source release in `target`
    (default <venv>/share/llama.cpp). Nothing to do when they are there at that version."""
    target = target or default_dir()
    version = installed_version()
    marker = target / VERSION_FILE
    if marker.is_file() and f'"{version}"' in marker.read_text(encoding="utf-8"):
        return target
    with tempfile.TemporaryDirectory() as tmp:
        # --no-binary: the source archive, which pip's cache keeps after the first build.
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary",
             ":all:", f"llama-cpp-python=={version}", "-d", tmp],
            check=True,
        )  # fmt: skip
        archive_path = next(Path(tmp).glob("*.tar.gz"))
        prefix = f"{archive_path.name.removesuffix('.tar.gz')}/vendor/llama.cpp"
        with tarfile.open(archive_path) as archive, atomic_dir(target) as out:
            members = _members(archive, prefix)
            for m in members:
                m.name = m.name.removeprefix(prefix + "/")
            # filter="data": no absolute paths, links out of the folder or device files.
            archive.extractall(out, members=members, filter="data")
            write_json(out / VERSION_FILE, {"llama_cpp_python": version, "entries": ENTRIES})
    return target


def run_converter(script: str, args: list[str], pre_tokenizer: str | None = None) -> None:
    """Run one of llama.cpp's converters on `args`; its output is the caller's to check.
    A failure raises StageError with the converter's last lines."""
    folder = converter_dir()
    env = {**os.environ, "NO_LOCAL_GGUF": "1"}  # the runner has put gguf-py first already
    proc = subprocess.run(
        [sys.executable, "-c", _RUNNER, str(folder), script, pre_tokenizer or "", *args],
        capture_output=True,
        text=True,
        env=env,
    )
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
        hint = (
            "; the converter does not know this tokenizer: set export.pre_tokenizer to the "
            "llama.cpp pre-tokenizer it uses (gpt-2, llama-bpe, qwen2, smollm, ...)"
            if "pre-tokenizer was not recognized" in tail
            else ""
        )
        raise StageError(f"llama.cpp's {script} failed (exit {proc.returncode}){hint}:\n{tail}")


if __name__ == "__main__":
    if sys.argv[1:] != ["install"]:
        sys.exit("usage: python -m qlora.export.converters install")
    print(f"llama.cpp converters in {install()}")
