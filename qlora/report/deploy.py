"""The report's deployment section: each exported GGUF artifact (size, memory, decode
speed under llama.cpp, parity verdict) and every metric of every artifact beside the
NF4 + adapter it came from and the 16-bit merged model."""

from __future__ import annotations

from qlora.core import paths
from qlora.schemas.export import GgufEval, ParityReport

# Column order of the parity table: what was trained, then the in-engine reference, then
# the quantized types and the LoRA route as the export wrote them.
REFERENCE_LABELS = {
    paths.REFERENCE: "PyTorch base (full precision)",
    paths.CANDIDATE: "PyTorch NF4 + adapter",
}


# The measured columns of an artifact's row: n/a for one the export could not build.
UNMEASURED = (
    "file_bytes", "weights_bytes", "vs_f16_bytes", "tokens_per_s", "vs_f16_speed", "spread",
    "note",
)  # fmt: skip


def deploy_section(gguf_eval: GgufEval | None, parity: ParityReport | None) -> dict | None:
    """None where the run has no export (older revisions)."""
    if gguf_eval is None or parity is None:
        return None
    f16 = gguf_eval.artifacts.get(paths.MERGED_F16)
    artifacts = []
    for name, a in gguf_eval.artifacts.items():
        verdict = parity.artifacts.get(name)
        speed = a.speed
        artifacts.append(
            {
                "name": name,
                "files": [a.model, *([a.lora] if a.lora else [])],
                "file_bytes": a.file_bytes,
                "weights_bytes": a.weights_bytes,
                "vs_f16_bytes": None if f16 is None else a.weights_bytes / f16.weights_bytes,
                "tokens_per_s": None if speed is None else speed.tokens_per_s,
                "vs_f16_speed": None
                if speed is None or f16 is None or f16.speed is None
                else speed.tokens_per_s / f16.speed.tokens_per_s,
                "spread": None if speed is None else speed.spread,
                "note": None if speed is None else speed.note,
                "passed": None if verdict is None else verdict.passed,
                "reason": None if verdict is None else verdict.reason,
                "deployable": name in parity.deployable,
            }
        )
    for name in gguf_eval.failed:
        # Not built (its merge failed the check): listed, with the reason, but unmeasured.
        verdict = parity.artifacts.get(name)
        artifacts.append(
            dict.fromkeys(UNMEASURED)
            | {
                "name": name,
                "files": [],
                "passed": False,
                "reason": verdict.reason if verdict else gguf_eval.failed[name],
                "deployable": False,
            }
        )
    columns = [n for n in REFERENCE_LABELS if any(n in r["values"] for r in parity.table)]
    columns += list(gguf_eval.artifacts)
    rows = [
        {
            "task": r["task"],
            "metric": r["metric"],
            "hib": r.get("higher_is_better"),
            "primary": (r["task"], r["metric"])
            == (parity.primary["task"], parity.primary["metric"]),
            "cells": [r["values"].get(c, {}) for c in columns],
        }
        for r in parity.table
    ]
    speed = next((a.speed for a in gguf_eval.artifacts.values() if a.speed), None)
    return {
        "artifacts": artifacts,
        "columns": [REFERENCE_LABELS.get(c, c) for c in columns],
        "rows": rows,
        "rules": parity.rules,
        "primary": parity.primary,
        "deployable": parity.deployable,
        "engine": gguf_eval.settings.get("engine"),
        "threads": next((a.threads for a in gguf_eval.artifacts.values()), None),
        "speed": speed,
    }
