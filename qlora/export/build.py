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
(what a user loads) with the files it needs.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Sequence
from pathlib import Path

from qlora.core import paths
from qlora.core.io import atomic_dir, sha256_of, write_json
from qlora.core.params import ExportParams
from qlora.export.gguf import convert_lora, convert_model, quantize
from qlora.schemas.base import validated
from qlora.schemas.export import GgufManifest

MANIFEST = paths.GGUF_MANIFEST.name


def _entry(path: Path, what: str) -> dict:
    return {
        "file": path.name,
        "bytes": path.stat().st_size,
        "sha256": sha256_of(path),
        "what": what,
    }


def build_gguf(
    p: ExportParams,
    adapter_dir: Path | str,
    base_dir: Path | str,
    out_dir: Path | str,
    trust_remote_code: bool = False,
    protected: Sequence[Path | str] = (),
) -> dict:
    """Write every artifact into `out_dir` (replaced whole, only when all succeeded) and
    return the manifest."""
    from qlora.models.merge import export_merged

    out_dir = Path(out_dir)
    timings: dict[str, float] = {}
    with atomic_dir(out_dir) as tmp:
        start = time.perf_counter()
        merged_dir = tmp / ".merged-hf"
        check = export_merged(
            adapter_dir, merged_dir, base_dir, "float16", trust_remote_code, protected=protected
        )
        timings["merge"] = time.perf_counter() - start
        files: dict[str, dict] = {}
        artifacts: dict[str, dict] = {}

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
        shutil.rmtree(merged_dir)  # the merged transformers folder was the converter's input
        manifest = {
            "files": files,
            "artifacts": artifacts,
            "merge_check": {k: check[k] for k in ("dtype", "end_to_end", "kl", "limits")},
            "seconds": timings,
        }
        validated(GgufManifest, manifest, paths.GGUF_MANIFEST)
        write_json(tmp / MANIFEST, manifest)
    return manifest
