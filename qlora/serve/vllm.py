"""The `vllm serve` command line for a GPU: the 16-bit base with the LoRA adapter on top,
served by vLLM's own OpenAI-compatible server.

The command is an argv list, never a shell string: no path or name is ever parsed by a
shell. It is checked before it is printed or run: the base and the adapter exist, and the
adapter is one vLLM can load (its rank within --max-lora-rank, no DoRA, no modules_to_save).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from qlora.core.io import StageError

# The values vLLM's --max-lora-rank accepts (vllm/config/lora.py, MaxLoRARanks).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
INSTALL = "vLLM is not installed here: on a machine with a CUDA GPU, `pip install vllm`"


def adapter_rank(adapter_dir: Path) -> int:
    """The largest LoRA rank in the adapter (r, or a larger one in its rank_pattern); an
    adapter vLLM refuses is an error saying why."""
    config_file = adapter_dir / "adapter_config.json"
    try:
        config = json.loads(config_file.read_text())
    except FileNotFoundError:
        raise StageError(f"{config_file}: not found: {adapter_dir} is not a peft adapter") from None
    except (OSError, json.JSONDecodeError) as e:
        raise StageError(f"{config_file}: cannot be read ({e})") from None
    if not isinstance(config, dict) or not isinstance(config.get("r"), int):
        raise StageError(f"{config_file}: no integer rank 'r'")
    if config.get("use_dora"):
        raise StageError(f"{config_file}: a DoRA adapter, which vLLM does not serve")
    if config.get("modules_to_save"):
        raise StageError(
            f"{config_file}: modules_to_save {config['modules_to_save']} (fully trained "
            "layers beside the LoRA), which vLLM does not load"
        )
    pattern = config.get("rank_pattern") or {}
    return max([config["r"], *(v for v in pattern.values() if isinstance(v, int))])


def lora_rank_limit(rank: int, asked: int | None) -> int:
    """--max-lora-rank: the one asked for if the adapter fits in it, else the smallest
    value vLLM accepts that holds the adapter (a larger one reserves GPU memory for
    nothing)."""
    if asked is not None:
        if asked not in VLLM_LORA_RANKS:
            raise StageError(f"--max-lora-rank {asked}: vLLM accepts {VLLM_LORA_RANKS}")
        if asked < rank:
            raise StageError(f"--max-lora-rank {asked} is below the adapter's rank {rank}")
        return asked
    fitting = [r for r in VLLM_LORA_RANKS if r >= rank]
    if not fitting:
        raise StageError(
            f"the adapter's rank {rank} is above vLLM's largest, {VLLM_LORA_RANKS[-1]}"
        )
    return fitting[0]


def vllm_command(
    base_dir: Path,
    adapter_dir: Path,
    name: str,
    host: str,
    port: int,
    max_lora_rank: int | None = None,
    max_model_len: int | None = None,
    extra: list[str] | None = None,
) -> list[str]:
    """`vllm serve BASE --enable-lora --lora-modules NAME=ADAPTER ...`: requests for model
    NAME get the adapter."""
    if not (base_dir / "config.json").is_file():
        raise StageError(f"{base_dir}: no base model (config.json) here")
    if "=" in name or not name.strip():
        raise StageError(f"model name {name!r}: vLLM's --lora-modules needs a name without '='")
    rank = lora_rank_limit(adapter_rank(adapter_dir), max_lora_rank)
    argv = [
        "vllm", "serve", str(base_dir),
        "--host", host,
        "--port", str(port),
        "--enable-lora",
        "--lora-modules", f"{name}={adapter_dir}",
        "--max-loras", "1",
        "--max-lora-rank", str(rank),
    ]  # fmt: skip
    if max_model_len is not None:
        argv += ["--max-model-len", str(max_model_len)]
    return argv + list(extra or [])


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None
