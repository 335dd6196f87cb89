"""Where a result came from: the code version (git) and the machine it ran on.

Torch-free at import: the report and the registry read lineage without loading torch;
`environment()` imports torch only when called (finetune records it in
reports/train/metrics.json under "environment").

Two runs of the same code, data and params can still train different adapters when the
machines differ in what decides the floating-point order of operations: the CPU's vector
units (a bf16 matmul on AVX512-BF16/AMX takes another path than on AVX2), the torch build
and its oneDNN kernels, and the number of threads a reduction is split over. `environment()`
records those; `differences()` names the ones that differ between two runs.
"""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
from pathlib import Path
from typing import Any

# The pipeline's own results: a changed one does not make the code version unknown.
PIPELINE_RESULTS = ("reports/", "dvc.lock")

CPUINFO = Path("/proc/cpuinfo")
# CPU features that select different torch/oneDNN/bitsandbytes kernels (x86, then Arm).
ISA_FLAGS = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
    "asimd",
    "sve",
    "sve2",
    "bf16",
    "i8mm",
)


# The libraries whose versions the report and the registry record beside each result.
PACKAGES = (
    "torch",
    "transformers",
    "peft",
    "bitsandbytes",
    "lm-eval",
    "dvc",
    "great-expectations",
    "prefect",
)


def package_versions() -> list[tuple[str, str]]:
    versions = [("python", platform.python_version())]
    for name in PACKAGES:
        try:
            versions.append((name, importlib.metadata.version(name)))
        except importlib.metadata.PackageNotFoundError:
            versions.append((name, "not installed"))
    return versions


def git_state(root: Path) -> dict:
    """HEAD and whether the work tree has uncommitted changes; a note when there is no git."""

    def git(*args: str) -> subprocess.CompletedProcess | None:
        try:
            return subprocess.run(
                ["git", *args], cwd=root, capture_output=True, text=True, timeout=20
            )
        except (OSError, subprocess.TimeoutExpired):
            return None

    head = git("rev-parse", "HEAD")
    if head is None:
        return {"commit": None, "note": "git is not available: the code version is unknown"}
    if head.returncode != 0:
        return {
            "commit": None,
            "note": "not inside a git repository (or no commit yet): the code version is unknown",
        }
    status = git("status", "--porcelain")
    lines = status.stdout.splitlines() if status and status.returncode == 0 else []
    changed = [line for line in lines if not line[3:].startswith(PIPELINE_RESULTS)]
    return {"commit": head.stdout.strip(), "dirty": bool(changed), "changed": changed}


def cpu_info(cpuinfo: Path = CPUINFO) -> tuple[str | None, list[str]]:
    """The CPU model and which of ISA_FLAGS it has, from /proc/cpuinfo (Linux); elsewhere
    the platform's processor string and no flags."""
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return platform.processor() or None, []
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            if fields:
                break  # the first processor is enough: the others are the same chip
            continue
        fields.setdefault(key.strip(), value.strip())
    present = set((fields.get("flags") or fields.get("Features") or "").split())
    model = fields.get("model name") or fields.get("Model") or platform.processor() or None
    return model, [f for f in ISA_FLAGS if f in present]


def environment() -> dict[str, Any]:
    """What decides bit-reproducibility of training on this machine (JSON-ready):
    cpu_model, isa_flags, torch, torch_cuda, mkldnn, threads, gpu, python, platform."""
    import torch

    cpu_model, isa_flags = cpu_info()
    return {
        "cpu_model": cpu_model,
        "isa_flags": isa_flags,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,  # None for a CPU-only build
        "mkldnn": torch.backends.mkldnn.is_available(),
        "threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
    }


def differences(current: dict | None, previous: dict | None) -> list[str]:
    """The fields of two `environment()` records that differ, each with how: list fields
    name the items only one side has, other fields show "previous → current"."""
    if not current and not previous:
        return []
    if not current or not previous:
        return [f"environment (recorded for {'this run' if current else 'the other'} only)"]
    out = []
    for key in [*current, *(k for k in previous if k not in current)]:
        a, b = previous.get(key), current.get(key)
        if a == b:
            continue
        if isinstance(a, list) and isinstance(b, list):
            out.append(f"{key} ({', '.join(sorted(set(a) ^ set(b)))})")
        else:
            out.append(f"{key} ({a} → {b})")
    return out
