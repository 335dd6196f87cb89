"""The one place models are loaded: the base in full precision, the base in 4 bits, and
the 4-bit base with an adapter.

Training (finetune), the quantization report (quantize) and the benchmark (evaluate) all
load through here, so the benchmark measures exactly the model that was trained.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from qlora.artifacts import BASE_IDENTITY, BASE_MODEL_DIR
from qlora.io import StageError, read_json, weights_identity
from qlora.params import QuantizeParams

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def device() -> str:
    """Where this process computes. One of several training processes (finetune.processes)
    on a GPU machine takes its own GPU, the one its launcher numbered LOCAL_RANK."""
    if not torch.cuda.is_available():
        return "cpu"
    local_rank = os.environ.get("LOCAL_RANK")
    return f"cuda:{local_rank}" if local_rank is not None else "cuda"


def device_map() -> str | None:
    """Where from_pretrained puts the weights. None under FSDP: each process then loads on
    the CPU (the first one only, with fsdp_cpu_ram_efficient_loading) and FSDP moves its
    shard to its GPU, as the peft and bitsandbytes FSDP-QLoRA guides load. Needs GPUs: not
    run on this project's CPU machines."""
    return None if uses_fsdp() else device()


def uses_fsdp() -> bool:
    """True in a process that accelerate launched with an FSDP config."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("true", "1")


def compute_dtype(name: str = "auto") -> torch.dtype:
    """The dtype matmuls run in. auto: bf16 on GPUs that have it, fp16 on older GPUs, fp32 on
    a CPU (CPUs without bf16 units run bf16 ~7x slower than fp32: FINDINGS)."""
    if name != "auto":
        return DTYPES[name]
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


STORAGE_DTYPES = {
    "uint8": torch.uint8,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}


def bnb_config(q: QuantizeParams, quant_type: str | None = None) -> BitsAndBytesConfig:
    # BitsAndBytesConfig's own defaults are fp4 without double quant: spell out every field.
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type or q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=compute_dtype(q.compute_dtype),
        # uint8 by default. FSDP shards every tensor of a wrapped module as one flat
        # buffer of one dtype, so FSDP + QLoRA stores the packed 4-bit weights in the
        # 16-bit dtype of the other parameters (quantize.quant_storage: bfloat16).
        bnb_4bit_quant_storage=STORAGE_DTYPES[q.quant_storage],
    )


def load_tokenizer(
    path: Path | str = BASE_MODEL_DIR, trust_remote_code: bool = False
) -> PreTrainedTokenizerBase:
    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        # Padding positions are masked out of the loss, so reusing EOS is safe.
        tok.pad_token = tok.eos_token
    return tok


def _load(path: Path | str, dtype: torch.dtype, trust_remote_code: bool, **extra):
    model = AutoModelForCausalLM.from_pretrained(
        str(path),
        dtype=dtype,
        device_map=device_map(),
        trust_remote_code=trust_remote_code,
        use_safetensors=True,  # never a pickle: loading one can run arbitrary code
        **extra,
    )
    model.eval()
    return model


def load_full(
    path: Path | str = BASE_MODEL_DIR,
    dtype_name: str = "auto",
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """The base in full precision: bf16 on a GPU, fp32 on a CPU (the 16-bit reference)."""
    return _load(path, compute_dtype(dtype_name), trust_remote_code)


def load_4bit(
    q: QuantizeParams,
    path: Path | str = BASE_MODEL_DIR,
    trust_remote_code: bool = False,
    quant_type: str | None = None,
) -> PreTrainedModel:
    """The base quantized on load to 4 bits (NF4 + double quantization by default)."""
    return _load(
        path,
        compute_dtype(q.compute_dtype),
        trust_remote_code,
        quantization_config=bnb_config(q, quant_type),
    )


def keep_4bit_layout_trainable(model: torch.nn.Module) -> int:
    """Pin every 4-bit layer of a model that is about to be trained to the trainable layout;
    returns how many layers it pinned. Call it on the training model before any forward pass.

    Why this guard exists: bitsandbytes 0.50's `Linear4bit.forward` repacks its weights into
    an AVX512-BF16 inference layout the first time it runs on a CPU that has those units, in
    eval mode and without grad (the Trainer's validation loss at step 0 does exactly that),
    and never packs them back until the state dict is saved. From then on every forward,
    training included, goes through `gemv_4bit`, which has no autograd kernel: the gradient
    through the frozen 4-bit layers is silently dropped (LoRA gradients off by up to 66 %),
    and a biased projection (Qwen2's q/k/v) fails with an in-place error on a leaf. The
    repack also rounds the scales to bf16, so unpacking does not restore the weights exactly.
    A model that only infers (evaluate) keeps the fast path; a trained one never enters it.
    Other bitsandbytes paths need no guard: on a GPU the no-grad kernels leave no state
    behind, and 8-bit layers (Linear8bitLt) have an autograd function in both modes.
    """
    import bitsandbytes as bnb

    pinned = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            if getattr(module.weight.quant_state, "packing_format_for_cpu", False):
                raise StageError(
                    f"{type(module).__name__} weights were already repacked for CPU inference "
                    "before training: pin the layout right after loading the model"
                )
            module.support_avx512bf16_for_cpu = False
            pinned += 1
    return pinned


def load_adapted(
    q: QuantizeParams,
    adapter_dir: Path | str,
    path: Path | str = BASE_MODEL_DIR,
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """The 4-bit base with a trained LoRA adapter on top, ready for inference."""
    from peft import PeftModel

    check_adapter_base(adapter_dir, path)
    base = load_4bit(q, path, trust_remote_code)
    model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False)
    model.eval()
    return model


def check_adapter_base(adapter_dir: Path | str, base_dir: Path | str) -> None:
    """Refuse an adapter trained on other base weights: LoRA deltas are meaningless on a
    different base, and peft would load them silently."""
    identity_file = Path(adapter_dir) / BASE_IDENTITY
    if not identity_file.exists():
        return  # an adapter made elsewhere: nothing recorded to check against
    expected = read_json(identity_file).get("weights_sha256")
    actual = weights_identity(base_dir)
    if expected != actual:
        raise StageError(
            f"adapter {adapter_dir} was trained on a base with weights {expected}, but "
            f"{base_dir} has {actual}: load it onto the base it was trained on"
        )


def footprint_bytes(model: torch.nn.Module) -> int:
    """Bytes held by parameters and buffers (4-bit weights count as their packed bytes)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)
