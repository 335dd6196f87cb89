"""Talk to an adapter: `qlora chat [VERSION]` and `qlora generate FILE.jsonl [VERSION]`.

The model is loaded through qlora/models.py, as training and evaluation load it: the base
in 4 bits with the adapter on top (or the base alone with --base). Prompts are rendered with
the base's chat template and the dataset's system prompt, as the training examples were.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from transformers import TextStreamer

from qlora import artifacts
from qlora.formats import to_messages
from qlora.io import StageError, read_jsonl_numbered
from qlora.params import Params, QuantizeParams

CURRENT = "current"  # the adapter the pipeline last trained (data/prepared/adapter)


@dataclass
class Speaker:
    model: object
    tokenizer: object
    label: str  # what answers: "adapter v3 (champion)", "base alone", ...
    system_prompt: str | None


def _adapter(
    version: str, registry: Path | None, params: Params
) -> tuple[Path, QuantizeParams, str]:
    """The adapter folder a VERSION names, and the quantization it was trained under."""
    if version == CURRENT:
        folder = artifacts.ADAPTER_DIR
        if not (folder / "adapter_config.json").is_file():
            raise StageError(f"{folder}: no adapter yet (run `make run` or `dvc repro`)")
        return folder, params.quantize, f"adapter in {folder}"
    from qlora.registry import Registry

    reg = Registry(registry)
    resolved = reg.resolve(version)
    broken = reg.check_version(resolved)
    if broken:
        raise StageError("; ".join(broken))
    recorded = reg.lineage(resolved).get("params", {}).get("quantize")
    quantize = QuantizeParams.model_validate(recorded) if recorded else params.quantize
    named = f" ({version})" if version != resolved else ""
    return reg.path(resolved), quantize, f"adapter {resolved}{named}"


def load_speaker(
    params: Params,
    version: str | None = None,
    base_only: bool = False,
    registry: Path | None = None,
    base_dir: Path = artifacts.BASE_MODEL_DIR,
) -> Speaker:
    from qlora.models import load_adapted, load_quantized, load_tokenizer

    trust = params.base.trust_remote_code
    if not (base_dir / "config.json").is_file():
        raise StageError(f"{base_dir}: no base model yet (run `make run` or `dvc repro base`)")
    tokenizer = load_tokenizer(base_dir, trust)
    if base_only:
        if version is not None:
            raise StageError("give a VERSION or --base, not both")
        model, label = load_quantized(params.quantize, base_dir, trust), "base alone (4-bit)"
    else:
        folder, quantize, label = _adapter(version or CURRENT, registry, params)
        model = load_adapted(quantize, folder, base_dir, trust)
    model.eval()
    return Speaker(model, tokenizer, label, params.dataset.system_prompt)


def prompt_text(speaker: Speaker, messages: list[dict]) -> str:
    if speaker.system_prompt and messages[0].get("role") != "system":
        messages = [{"role": "system", "content": speaker.system_prompt}, *messages]
    return speaker.tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )


class StreamTo(TextStreamer):
    """transformers' streamer, writing each finished piece of text to `out` (it prints)."""

    def __init__(self, tokenizer, out: TextIO):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.out = out

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.out.write(text + ("\n" if stream_end else ""))
        self.out.flush()


def reply(speaker: Speaker, messages: list[dict], max_new_tokens: int, stream: TextIO | None):
    """One answer to the conversation, greedy; printed to `stream` token by token as it
    is generated when one is given."""
    import torch

    tok = speaker.tokenizer
    enc = tok(prompt_text(speaker, messages), return_tensors="pt", add_special_tokens=False)
    enc = enc.to(speaker.model.device)
    streamer = None if stream is None else StreamTo(tok, stream)
    with torch.no_grad():
        out = speaker.model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            streamer=streamer,
        )
    return tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


CHAT_HELP = "Type a message; /reset starts a new conversation, /exit (or end of input) leaves."


def chat(
    speaker: Speaker,
    lines: TextIO = sys.stdin,
    out: TextIO = sys.stdout,
    max_new_tokens: int = 256,
) -> int:
    """The conversation loop, a message per line of `lines` (standard input) until /exit or
    the end of input; returns the number of answers given."""
    out.write(f"Talking to {speaker.label}. {CHAT_HELP}\n")
    messages: list[dict] = []
    turns = 0
    for line in _prompted(lines, out):
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            break
        if text == "/reset":
            messages = []
            out.write("(new conversation)\n")
            continue
        messages.append({"role": "user", "content": text})
        out.write("assistant> ")
        out.flush()
        answer = reply(speaker, messages, max_new_tokens, stream=out)
        messages.append({"role": "assistant", "content": answer})
        turns += 1
    return turns


def _prompted(lines: TextIO, out: TextIO) -> Iterator[str]:
    while True:
        out.write("you> ")
        out.flush()
        line = lines.readline()
        if not line:  # end of input (Ctrl-D, or the end of a piped file)
            out.write("\n")
            return
        yield line


def conversation(row: dict, where: str) -> list[dict]:
    """The messages a row of a prompts file asks to answer: {"messages": [...]} ending with
    the user's turn, {"prompt": ...}, or {"instruction": ..., "input": ...}."""
    if isinstance(row.get("messages"), list) and row["messages"]:
        messages = [dict(m) for m in row["messages"]]
        if messages[-1].get("role") == "assistant":
            raise StageError(f"{where}: the last message is the assistant's; nothing to answer")
        return messages
    for fmt, key in (("prompt_completion", "prompt"), ("alpaca", "instruction")):
        if isinstance(row.get(key), str) and row[key].strip():
            filled = {"completion": "", "output": "", **row}
            return to_messages(filled, fmt)[:-1]  # drop the empty answer
    raise StageError(
        f'{where}: expected "messages" (a list), "prompt" or "instruction" (text); got keys '
        f"{sorted(row)}"
    )


def read_prompts(source: Path) -> list[tuple[dict, list[dict]]]:
    """Each row of a prompts file with the conversation it asks to answer; a bad row is an
    error naming the file and line."""
    numbered, _ = read_jsonl_numbered(source)
    if not numbered:
        raise StageError(f"{source}: no prompts")
    return [(row, conversation(row, f"{source}, line {n}")) for n, row in numbered]


def generate_file(
    speaker: Speaker,
    rows: list[tuple[dict, list[dict]]],
    output: Path,
    max_new_tokens: int,
    batch_size: int,
) -> int:
    """Answers to every conversation of `rows` (read_prompts), written to `output` as JSONL:
    each row as it was, plus "answer" and "model". The file appears only when all are
    answered."""
    from tqdm import tqdm

    from qlora.evaluation import generate
    from qlora.io import write_jsonl

    prompts = [prompt_text(speaker, messages) for _, messages in rows]
    answers: list[str] = []
    with tqdm(total=len(prompts), desc="answers", unit="prompt", file=sys.stderr) as bar:
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start : start + batch_size]
            answers += generate(speaker.model, speaker.tokenizer, batch, max_new_tokens)
            bar.update(len(batch))
    write_jsonl(
        output,
        (
            {**row, "answer": a, "model": speaker.label}
            for (row, _), a in zip(rows, answers, strict=True)
        ),
    )
    return len(answers)
