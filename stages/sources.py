"""Stage `sources`: check params.yaml, fingerprint the configured base model and dataset.

The first stage of every `dvc repro` (every other stage depends on it, directly or not):
a bad value in params.yaml fails here, before DVC deletes any stage's outputs to rerun it.
Fingerprints: qlora/core/sources.py.

Runs on every `dvc repro` (always_changed in dvc.yaml) and takes a second: it hashes the
local folder or file a source names (hashes of unchanged files are cached by size and
mtime), resolves a hub id's revision to a commit, or records an embedded model's pinned
requirement. base and dataset depend on these files, so an edited local model or dataset
reruns them, and an unchanged one reruns nothing.
Outputs: reports/sources/base.json, reports/sources/dataset.json
"""

from __future__ import annotations

from qlora.core.io import read_json, run_stage, write_json
from qlora.core.params import load_params
from qlora.core.sources import current, fingerprint_file


def main() -> None:
    for kind, fp in current(load_params()).items():
        out = fingerprint_file(kind)
        # Rewrite only on change: the same bytes keep DVC's view of the file, and its mtime.
        if not out.is_file() or read_json(out) != fp:
            write_json(out, fp)
        described = (
            fp.get("resolved_revision")
            or fp.get("requirement")
            or (f"{len(fp['sha256'])} file(s)" if "sha256" in fp else f"written by {fp['stage']}")
        )
        print(f"{kind}: {fp['source']} ({fp['kind']}: {described})")


if __name__ == "__main__":
    run_stage("sources", main)
