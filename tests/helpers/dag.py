"""The real DAG in a copy of the repository: copy it without the developer's outputs, run
`dvc repro` there (with a planted token in the environment), read its files back."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from helpers.repo import REPO, git
from qlora.core.io import pipeline_env

# Outputs of the developer's own runs: the copy must build them itself.
GENERATED = ("data/prepared/", "data/raw/", "reports/", "dvc.lock")


# A token planted in the environment must not reach any output, log or report.
SECRET = "hf_PlantedTokenThatMustNeverLeak0123"


def dvc(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dvc", *args],
        cwd=cwd,
        env={**pipeline_env(), "HF_TOKEN": SECRET, "HUGGING_FACE_HUB_TOKEN": SECRET},
        capture_output=True,
        text=True,
    )


def copy_repo(work: Path) -> None:
    """The repository's source files, without the developer's own generated outputs."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split("\0")
    for rel in filter(None, files):
        src = REPO / rel
        # Generated files and stage outputs of the developer's own runs must not leak in.
        if not src.is_file() or rel.startswith(GENERATED):
            continue
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, work / rel)


def repro_in_copy(work: Path, params: dict) -> subprocess.CompletedProcess:
    """A fresh copy of the repository with `params` as params.yaml, then `dvc repro`."""
    copy_repo(work)
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    git(work, "init", "-q")
    git(work, "add", "-A")
    git(work, "commit", "-qm", "tiny")
    return dvc(work, "repro")


def files_under(root: Path, *paths: str) -> dict[str, bytes]:
    found = {}
    for rel in paths:
        target = root / rel
        for f in [target] if target.is_file() else sorted(target.rglob("*")):
            if f.is_file():
                found[f.relative_to(root).as_posix()] = f.read_bytes()
    return found
