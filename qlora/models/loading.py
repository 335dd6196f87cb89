"""The one place models are loaded: the base in full precision, the base in 4 bits, and
the 4-bit base with an adapter.

Training (finetune), the quantization report (quantize) and the benchmark (evaluate) all
load through here, so the benchmark measures exactly the model that was trained.
"""

from __future__ import annotations

import logging
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

from qlora.core.io import StageError, read_json, weights_identity
from qlora.core.params import QuantizeParams
from qlora.core.paths import BASE_IDENTITY, BASE_MODEL_DIR


def _not_an_int8_cast_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("MatMul8bitLt: inputs will be cast")


# LLM.int8()'s matmul logs on every call that fp32 inputs are cast to fp16 (a CPU computes
# in fp32): hundreds of identical lines per training step. The cast is by design.
logging.getLogger("bitsandbytes.autograd._functions").addFilter(_not_an_int8_cast_notice)

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


# The CPU units that run bf16 matmuls natively, by torch's checks for them (private names in
# torch 2.13, looked up by name: a check this torch lacks leaves its unit unknown, and auto
# keeps float32, saying so, unless another check finds a unit).
# AMX: every CPU with AMX tiles so far (Xeon since Sapphire Rapids) has AMX-BF16 too.
CPU_BF16_UNITS = {"AVX512-BF16": "_is_avx512_bf16_supported", "AMX": "_is_amx_tile_supported"}


def cpu_bf16_units() -> tuple[list[str], list[str]]:
    """(the bf16 units this CPU has, the torch checks this torch lacks) of CPU_BF16_UNITS."""
    present, missing = [], []
    for unit, check in CPU_BF16_UNITS.items():
        supported = getattr(torch.cpu, check, None)
        if supported is None:
            missing.append(f"torch.cpu.{check}")
        elif supported():
            present.append(unit)
    return present, missing


def cpu_compute_dtype() -> tuple[torch.dtype, str]:
    """auto on a CPU: bf16 only where the CPU has bf16 units. Measured with torch 2.13 on a
    2-core AMD EPYC with AVX512-BF16: a 2048x2048 matmul at 393 GFLOP/s in bf16 against 153
    in fp32, QLoRA training (benchmarks.train, 10 layers) at 536 tokens/s in 2.14 GiB against
    352 in 2.65 GiB. A CPU without them has no bf16 arithmetic and converts: on an AVX2-only
    CPU a forward pass took 9.0 s in bf16 against 1.3 s in fp32 (~7x)."""
    present, missing = cpu_bf16_units()
    if present:
        return torch.bfloat16, (
            f"auto: this CPU has {' and '.join(present)} (bf16 matmuls run at native speed)"
        )
    if missing:
        return torch.float32, (
            f"auto: this torch cannot tell whether the CPU has bf16 units (no "
            f"{', '.join(missing)}); float32, which every CPU runs at full speed"
        )
    return torch.float32, (
        "auto: this CPU has no bf16 units (AVX512-BF16/AMX); bf16 would run ~7x slower than float32"
    )


def resolve_compute_dtype(name: str = "auto") -> tuple[torch.dtype, str]:
    """The dtype matmuls run in, and why (run.json records both). auto: bf16 on GPUs that
    have it, fp16 on older GPUs; on a CPU bf16 where it has bf16 units, else fp32."""
    if name != "auto":
        return DTYPES[name], "set in params.yaml"
    if torch.cuda.is_available():
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "auto: this GPU supports bf16"
        return torch.float16, "auto: this GPU has no bf16; float16"
    return cpu_compute_dtype()


def compute_dtype(name: str = "auto") -> torch.dtype:
    """resolve_compute_dtype's dtype alone."""
    return resolve_compute_dtype(name)[0]


STORAGE_DTYPES = {
    "uint8": torch.uint8,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}


def bnb_config(
    q: QuantizeParams, quant_type: str | None = None, keep_16bit: list[str] | None = None
) -> BitsAndBytesConfig:
    """bitsandbytes' settings for `quant_type` (default: q.quant_type). `keep_16bit` is the
    whole list of modules not to quantize: giving one replaces transformers' defaults
    (lm_head), so `skip_list` adds those back; None keeps the defaults."""
    quant_type = quant_type or q.quant_type
    if quant_type == "int8":
        # LLM.int8(): row-wise absmax int8 weights; outlier features of the activations
        # are multiplied in 16 bits (threshold 6, the paper's value and bitsandbytes').
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=keep_16bit)
    # BitsAndBytesConfig's own defaults are fp4 without double quant: spell out every field.
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=compute_dtype(q.compute_dtype),
        # uint8 by default. FSDP shards every tensor of a wrapped module as one flat
        # buffer of one dtype, so FSDP + QLoRA stores the packed 4-bit weights in the
        # 16-bit dtype of the other parameters (quantize.quant_storage: bfloat16).
        bnb_4bit_quant_storage=STORAGE_DTYPES[q.quant_storage],
        llm_int8_skip_modules=keep_16bit,  # transformers reads this name for 4 bits too
    )


def skipped_by_default(model: torch.nn.Module) -> list[str]:
    """Module names transformers' bitsandbytes quantizer leaves in 16 bits when no
    `llm_int8_skip_modules` is given: the output embeddings (lm_head), tied weights, the last
    module, and the model's `_keep_in_fp32_modules`. A plain nn.Module: just lm_head."""
    from transformers.quantizers.base import get_keys_to_not_convert

    if not isinstance(model, PreTrainedModel):
        return ["lm_head"]
    return sorted(set(get_keys_to_not_convert(model)) | set(model._keep_in_fp32_modules or ()))


def skip_list(
    q: QuantizeParams, path: Path | str = BASE_MODEL_DIR, trust_remote_code: bool = False
) -> list[str] | None:
    """`llm_int8_skip_modules` for q.skip_modules: those names plus the model's own 16-bit
    modules, or None (transformers' defaults) when none is named. A name that catches no
    linear layer is a typo: refused, naming it. Reads the architecture on the meta device
    (no weights), so it costs milliseconds whatever the model's size."""
    if not q.skip_modules:
        return None
    from transformers import AutoConfig
    from transformers.quantizers.quantizers_utils import should_convert_module

    config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    linears = [n for n, m in skeleton.named_modules() if isinstance(m, torch.nn.Linear)]
    for key in q.skip_modules:
        if all(should_convert_module(name, [key]) for name in linears):
            raise StageError(
                f"params.yaml quantize.skip_modules: {key!r} names no linear layer of "
                f"{path} (e.g. {linears[0]!r}; reports/quantize_layers.json lists them all)"
            )
    defaults = skipped_by_default(skeleton)
    return list(q.skip_modules) + [k for k in defaults if k not in q.skip_modules]


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


class UnsupportedFormat(StageError):
    """A quantization format bitsandbytes cannot run on this device; `reason` is
    format_unsupported's line."""

    def __init__(self, quant_type: str, reason: str):
        super().__init__(
            f"params.yaml quantize.quant_type {quant_type}: {reason}. "
            "Choose another format (nf4, fp4, int8) for this device."
        )
        self.reason = reason


def format_unsupported(quant_type: str, where: str | None = None) -> str | None:
    """None when bitsandbytes can quantize, run and backpropagate through a `quant_type`
    layer on `where` (default: this process's device); else one line saying what failed.
    A 64x64 layer is tried for real: bitsandbytes' backends differ per device and format
    (LLM.int8() has no kernels on some), and only running one tells."""
    import bitsandbytes as bnb

    where = where or device()
    try:
        if quant_type == "int8":
            layer = bnb.nn.Linear8bitLt(64, 64, bias=False, has_fp16_weights=False)
        else:
            layer = bnb.nn.Linear4bit(64, 64, bias=False, quant_type=quant_type)
        layer = layer.to(where)
        x = torch.randn(2, 64, device=where, requires_grad=True)
        layer(x).sum().backward()
    except Exception as e:  # each backend fails its own way (RuntimeError, NotImplemented...)
        first_line = (str(e).splitlines() or [""])[0]
        return (
            f"bitsandbytes {bnb.__version__} cannot run {quant_type} on {where}: "
            f"{type(e).__name__}: {first_line}"
        )
    return None


def load_quantized(
    q: QuantizeParams,
    path: Path | str = BASE_MODEL_DIR,
    trust_remote_code: bool = False,
    quant_type: str | None = None,
) -> PreTrainedModel:
    """The base quantized on load: q.quant_type (NF4 + double quantization by default), or
    `quant_type`, with q.skip_modules kept in 16 bits. A format bitsandbytes cannot run on
    this device is refused before loading (UnsupportedFormat), naming the format and why."""
    quant_type = quant_type or q.quant_type
    reason = format_unsupported(quant_type)
    if reason is not None:
        raise UnsupportedFormat(quant_type, reason)
    config = bnb_config(q, quant_type, skip_list(q, path, trust_remote_code))
    dtype = compute_dtype(q.compute_dtype)
    return _load(path, dtype, trust_remote_code, quantization_config=config)


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
    base = load_quantized(q, path, trust_remote_code)
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
