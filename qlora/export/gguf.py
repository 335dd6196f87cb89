"""GGUF files, the format llama.cpp (and Ollama, LM Studio, ...) deploys on CPUs, made by
llama.cpp's own converter and quantizer.

- `convert_model`: a transformers folder to a GGUF in 16 or 32 bits (convert_hf_to_gguf.py);
- `quantize`: that file to a llama.cpp type such as q8_0 or q4_k_m
  (`llama_cpp.llama_model_quantize`, the library call behind llama-quantize);
- `convert_lora`: a peft adapter to a GGUF LoRA that llama.cpp applies to its base at load
  time (convert_lora_to_gguf.py).
Each writes to a temporary name beside its output and renames it into place, so a failed
conversion leaves no file that looks complete.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from qlora.core.io import StageError
from qlora.export.converters import HF_CONVERTER, LORA_CONVERTER, run_converter

# Full-precision GGUF types the converter writes itself; the rest come from the quantizer.
CONVERTER_TYPES = ("f32", "f16", "bf16")
# llama.cpp's quantization types by name (llama_ftype values, llama.h): the ones worth
# deploying from 16-bit sources. k-quants (q4_k_m ...) mix block sizes per tensor: q4_k_m
# keeps some attention and feed-forward tensors at 6 bits, and is llama.cpp's recommended
# 4-bit type; q8_0 is near-lossless at 8.5 bits a weight.
QUANT_TYPES = {
    "q4_0": 2,
    "q4_1": 3,
    "q8_0": 7,
    "q5_0": 8,
    "q5_1": 9,
    "q2_k": 10,
    "q3_k_m": 12,
    "q4_k_s": 14,
    "q4_k_m": 15,
    "q5_k_s": 16,
    "q5_k_m": 17,
    "q6_k": 18,
}
GGUF_TYPES = (*CONVERTER_TYPES, *QUANT_TYPES)


@contextlib.contextmanager
def _atomic_file(out: Path) -> Iterator[Path]:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        yield tmp
        if not tmp.is_file() or tmp.stat().st_size == 0:
            raise StageError(f"{out}: the converter wrote nothing")
        tmp.chmod(0o644)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)


def _convert(
    script: str, what: str, args: list[str], out: Path | str, outtype: str,
    pre_tokenizer: str | None,
) -> Path:  # fmt: skip
    """One of llama.cpp's converters, writing `out` whole or not at all."""
    if outtype not in CONVERTER_TYPES:
        raise StageError(f"{what} type {outtype!r}: the converter writes {CONVERTER_TYPES}")
    out = Path(out)
    with _atomic_file(out) as tmp:
        run_converter(script, [*args, "--outfile", str(tmp), "--outtype", outtype], pre_tokenizer)
    return out


def convert_model(
    model_dir: Path | str, out: Path | str, outtype: str = "f16", pre_tokenizer: str | None = None
) -> Path:
    """A transformers model folder (safetensors, config, tokenizer) as one GGUF file."""
    return _convert(HF_CONVERTER, "GGUF", [str(model_dir)], out, outtype, pre_tokenizer)


def quantize(source: Path | str, out: Path | str, gguf_type: str, threads: int = 0) -> Path:
    """`source` (a 16- or 32-bit GGUF) quantized to `gguf_type` by llama.cpp."""
    import llama_cpp

    if gguf_type not in QUANT_TYPES:
        raise StageError(f"GGUF type {gguf_type!r}: one of {', '.join(QUANT_TYPES)}")
    out = Path(out)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANT_TYPES[gguf_type]
    params.nthread = threads  # 0: all cores
    with _atomic_file(out) as tmp:
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), params)
        if status != 0:
            raise StageError(f"llama.cpp could not quantize {source} to {gguf_type} ({status})")
    return out


def convert_lora(
    adapter_dir: Path | str,
    base_dir: Path | str,
    out: Path | str,
    outtype: str = "f16",
    pre_tokenizer: str | None = None,
) -> Path:
    """A peft LoRA adapter as a GGUF adapter for llama.cpp, against its base's config."""
    args = [str(adapter_dir), "--base", str(base_dir)]
    return _convert(LORA_CONVERTER, "GGUF LoRA", args, out, outtype, pre_tokenizer)
