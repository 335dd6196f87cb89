"""Stage `export`: the adapter's deployable GGUF files for llama.cpp.

The adapter merged into the base (checked against base + adapter), converted to GGUF f16 by
llama.cpp's converter and quantized by llama.cpp to each export.gguf_types type; with
export.lora, the base as GGUF f16 and the adapter as a GGUF LoRA (qlora/export/build.py).
Inputs: data/prepared/adapter, data/prepared/base_model
Output: data/prepared/gguf (the .gguf files and manifest.json)
"""

from __future__ import annotations

from qlora.core import paths
from qlora.core.io import StageError, run_stage
from qlora.core.params import load_params
from qlora.export.build import build_gguf


def main() -> None:
    params = load_params()
    if not (paths.ADAPTER_DIR / "adapter_config.json").is_file():
        raise StageError(f"{paths.ADAPTER_DIR}: no adapter_config.json (run the finetune stage)")
    manifest = build_gguf(
        params.export,
        paths.ADAPTER_DIR,
        paths.BASE_MODEL_DIR,
        paths.GGUF_DIR,
        params.base.trust_remote_code,
    )
    for name, entry in manifest["files"].items():
        print(f"  {name}: {entry['bytes'] / 2**20:.1f} MiB  ({entry['what']})")
    print("  " + ", ".join(f"{k} {v:.1f} s" for k, v in manifest["seconds"].items()))


if __name__ == "__main__":
    run_stage("export", main)
