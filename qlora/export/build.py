"""The deployable GGUF files of one adapter, built in a temporary folder and moved into
place whole: the `export` stage's and `qlora export --gguf`'s one code path.

1. The adapter merged into the base in float16 (qlora/models/merge.py: the merge is checked
   against base + adapter before it is written), converted to GGUF f16 by llama.cpp's
   converter: the in-engine reference, and the source of every quantized type.
2. That file quantized by llama.cpp to each requested type (q8_0, q4_k_m, ...).
3. With `lora`: the base alone as GGUF f16 and the adapter as a GGUF LoRA, which llama.cpp
   applies at load time (`llama-cli -m base-f16.gguf --lora adapter-f16.gguf`): one base
   file shared by many adapters.
manifest.json lists every file with its size, sha256 and what it is, and each artifact
(what a user loads) with the files it needs; `qlora export --gguf` adds the parity check
it ran, and `--replace` replaces only a folder holding such a manifest's unchanged files.

A merge that fails its check is a result, not a crash: an adapter too weak for the check to
tell from the base (a learning rate that barely moved it) is one the gate rejects, and the
pipeline must still finish and report. The merged artifacts are then listed under `failed`
with the check's reason, not built; the LoRA route, which merges nothing, still is.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from qlora.core import paths
from qlora.core.io import atomic_dir, check_output_dir, read_json, sha256_of, write_json
from qlora.core.params import ExportParams
from qlora.export.gguf import convert_lora, convert_model, quantize
from qlora.schemas.base import validated
from qlora.schemas.export import GgufManifest

MANIFEST = paths.GGUF_MANIFEST.name
MERGE_DTYPE = "float16"  # the merged model the converter reads: llama.cpp's f16 is its copy


def _entry(path: Path, what: str) -> dict:
    return {
        "file": path.name,
        "bytes": path.stat().st_size,
        "sha256": sha256_of(path),
        "what": what,
    }


def previous_gguf_files(folder: Path) -> dict[str, str] | None:
    """{name: sha256} of what a previous GGUF export wrote in `folder`, or None."""
    try:
        files = read_json(folder / MANIFEST)["files"]
        listed = {name: entry["sha256"] for name, entry in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return {**listed, MANIFEST: sha256_of(folder / MANIFEST)}


def write_manifest(folder: Path, manifest: dict) -> None:
    validated(GgufManifest, manifest, folder / MANIFEST)
    write_json(folder / MANIFEST, manifest)


@contextlib.contextmanager
def gguf_folder(
    out_dir: Path | str, replace: bool, protected: Sequence[Path | str] = ()
) -> Iterator[Path]:
    """An empty temporary folder that takes `out_dir`'s place when the block succeeds.
    `out_dir` is checked first: not overlapping `protected`, empty, or (with `replace`)
    holding nothing but a previous GGUF export's unchanged files."""
    check_output_dir(out_dir, replace, previous_gguf_files, protected)
    with atomic_dir(out_dir, replace=replace) as tmp:
        yield tmp


def build_gguf(
    p: ExportParams,
    adapter_dir: Path | str,
    base_dir: Path | str,
    tmp: Path,
    trust_remote_code: bool = False,
) -> dict:
    """Write every artifact into the empty folder `tmp` (from gguf_folder) and return the
    manifest, also written there."""
    from qlora.models.merge import MergeCheckFailed, export_merged

    timings: dict[str, float] = {}
    files: dict[str, dict] = {}
    artifacts: dict[str, dict] = {}
    failed: dict[str, str] = {}
    start = time.perf_counter()
    merged_dir = tmp / ".merged-hf"
    try:
        check = export_merged(adapter_dir, merged_dir, base_dir, MERGE_DTYPE, trust_remote_code)
        merge_check = {k: check[k] for k in ("dtype", "end_to_end", "kl", "limits")}
        merge_check["passed"] = True
    except MergeCheckFailed as e:
        merge_check = {"dtype": MERGE_DTYPE, "passed": False, "reason": str(e)}
        merged = [paths.MERGED_F16, *map(paths.merged_artifact, p.gguf_types)]
        failed = dict.fromkeys(merged, f"not exported: {e}")
    timings["merge"] = time.perf_counter() - start

    if merge_check["passed"]:
        start = time.perf_counter()
        f16 = convert_model(merged_dir, tmp / paths.gguf_file(paths.MERGED_F16).name, "f16",
                            p.pre_tokenizer)  # fmt: skip
        timings["convert"] = time.perf_counter() - start
        files[f16.name] = _entry(f16, "base + adapter merged, 16-bit (llama.cpp f16)")
        artifacts[paths.MERGED_F16] = {"model": f16.name, "lora": None, "gguf_type": "f16"}
        for gguf_type in p.gguf_types:
            start = time.perf_counter()
            name = paths.merged_artifact(gguf_type)
            out = quantize(f16, tmp / paths.gguf_file(name).name, gguf_type)
            timings[f"quantize {gguf_type}"] = time.perf_counter() - start
            files[out.name] = _entry(out, f"base + adapter merged, llama.cpp {gguf_type}")
            artifacts[name] = {"model": out.name, "lora": None, "gguf_type": gguf_type}
        shutil.rmtree(merged_dir)  # the merged transformers folder was the converter's input
    if p.lora:
        start = time.perf_counter()
        base = convert_model(base_dir, tmp / paths.BASE_GGUF.name, "f16", p.pre_tokenizer)
        lora = convert_lora(adapter_dir, base_dir, tmp / paths.LORA_GGUF.name, "f16")
        timings["lora"] = time.perf_counter() - start
        files[base.name] = _entry(base, "the base alone, 16-bit (llama.cpp f16)")
        files[lora.name] = _entry(lora, "the adapter as a GGUF LoRA (f16), for the base")
        artifacts[paths.LORA_ARTIFACT] = {
            "model": base.name, "lora": lora.name, "gguf_type": "f16",
        }  # fmt: skip
    manifest = {
        "files": files,
        "artifacts": artifacts,
        "failed": failed,
        "merge_check": merge_check,
        "seconds": timings,
    }
    write_manifest(tmp, manifest)
    return manifest
