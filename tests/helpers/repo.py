"""The repository these tests run in, and git with a committer identity."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FIXTURES_DIR = REPO / "tests" / "fixtures"  # recorded stage outputs the unit tests read
ARTIFACTS_DIR = REPO / "tests" / "artifacts"  # screenshots for a human to look at (not in git)


def git(cwd: Path, *args: str) -> str:
    """Run git in `cwd` (with a committer identity, which a CI machine may lack); stdout."""
    return subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
        cwd=cwd,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
