"""Talk to an adapter: `qlora chat [VERSION]` and `qlora generate FILE.jsonl [VERSION]`.

The model is loaded through qlora/models/loading.py, as training and evaluation load it: the base
in 4 bits with the adapter on top (or the base alone with --base). Prompts are rendered with
the base's chat template and the dataset's system prompt, as the training examples were.

`generate` checks every row, and the answers a run cut short left, before it loads the
model; it appends each batch of answers to the output as it is done, and a rerun resumes
after the rows already answered (`answered`). The n-th line of the output answers the n-th
row of the prompts file: a line is kept only if it is, byte for byte, what this run would
write for that row (the row, "answer", "model" and "max_new_tokens").
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TextIO

from jinja2 import TemplateError
from transformers import TextStreamer

from qlora.core import paths
from qlora.core.io import StageError, read_jsonl_numbered
from qlora.core.params import Params, QuantizeParams
from qlora.data.check_table import schema_problems
from qlora.data.records import to_messages

CURRENT = "current"  # the adapter the pipeline last trained (data/prepared/adapter)
# The keys `generate` adds to each row of the prompts file (a row's own are replaced): what
# answered it and how, so that a rerun resumes only the same model's, same settings' answers.
ANSWER_KEYS = ("answer", "model", "max_new_tokens")
# The key of each row format that holds what is asked, by precedence.
PROMPT_KEYS = {"chat": "messages", "prompt_completion": "prompt", "alpaca": "instruction"}


@dataclass
class Speaker:
    tokenizer: object
    label: str  # what answers: "adapter v3 (champion)", "base alone", ...
    system_prompt: str | None
    loader: Callable[[], object]  # loads the model: the slow part, left until it is needed
    _model: object | None = field(default=None, repr=False)

    def load(self) -> object:
        """The model, loaded on first use, so that input is checked before the slow part."""
        if self._model is None:
            model = self.loader()
            model.eval()
            self._model = model
        return self._model

    model = property(load)


@dataclass(frozen=True)
class Prompt:
    where: str  # "prompts.jsonl, line 7", for errors
    row: dict  # the row as read: written back with its answer
    messages: list[dict]  # the conversation it asks to answer


def resolve_adapter(
    version: str, registry: Path | None, params: Params
) -> tuple[Path, QuantizeParams, str]:
    """The adapter folder a VERSION names (current, champion, v3), the quantization it was
    trained under, and a label saying which it is."""
    if version == CURRENT:
        folder = paths.ADAPTER_DIR
        if not (folder / "adapter_config.json").is_file():
            raise StageError(f"{folder}: no adapter yet (run `make run` or `dvc repro`)")
        return folder, params.quantize, f"adapter in {folder}"
    from qlora.registry.store import Registry

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
    base_dir: Path = paths.BASE_MODEL_DIR,
) -> Speaker:
    """What answers: the adapter VERSION names (or the base alone) and the base's tokenizer.
    The model loads when it is first used (Speaker.load)."""
    from qlora.models.loading import load_adapted, load_quantized, load_tokenizer

    trust = params.base.trust_remote_code
    if not (base_dir / "config.json").is_file():
        raise StageError(f"{base_dir}: no base model yet (run `make run` or `dvc repro base`)")
    if base_only:
        if version is not None:
            raise StageError("give a VERSION or --base, not both")
        loader = partial(load_quantized, params.quantize, base_dir, trust)
        label = "base alone (4-bit)"
    else:
        folder, quantize, label = resolve_adapter(version or CURRENT, registry, params)
        loader = partial(load_adapted, quantize, folder, base_dir, trust)
    tokenizer = load_tokenizer(base_dir, trust)
    return Speaker(tokenizer, label, params.dataset.system_prompt, loader)


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
    speaker.load()  # before the first message: the wait, or a failure, comes before the talk
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
    the user's turn, {"prompt": ...}, or {"instruction": ..., "input": ...}. A row that is
    none of these, or whose text is missing, empty or not text, is an error naming it."""
    fmt = next((f for f, key in PROMPT_KEYS.items() if key in row), None)
    if fmt is None:
        raise StageError(
            f'{where}: expected "messages" (a list), "prompt" or "instruction" (text); got '
            f"keys {sorted(row)}"
        )
    # A prompt has no answer yet: an empty one stands in for the field the format requires.
    filled = row if fmt == "chat" else {**row, "completion": "", "output": ""}
    problem, missing = schema_problems(filled, fmt)
    if problem or missing:
        raise StageError(f"{where}: {problem or missing}")
    messages = to_messages(filled, fmt)
    if fmt != "chat":
        messages = messages[:-1]  # drop the empty answer
    elif messages[-1]["role"] != "user":
        raise StageError(
            f"{where}: the last message is the {messages[-1]['role']}'s; the model answers "
            "the user's last turn, and there is none after it"
        )
    for k, m in enumerate(messages):
        if not m["content"].strip():
            name = f"messages[{k}].content" if fmt == "chat" else repr(PROMPT_KEYS[fmt])
            raise StageError(f"{where}: {name} is empty")
    return messages


def read_prompts(source: Path) -> list[Prompt]:
    """Each row of a prompts file with the conversation it asks to answer; a bad row is an
    error naming the file and line."""
    numbered, _ = read_jsonl_numbered(source)
    if not numbered:
        raise StageError(f"{source}: no prompts")
    prompts = []
    for n, row in numbered:
        where = f"{source}, line {n}"
        prompts.append(Prompt(where, row, conversation(row, where)))
    return prompts


def answer_line(prompt: Prompt, answer: str, label: str, max_new_tokens: int) -> str:
    """A line of the output: the prompt's row as it was, plus what answered it and how."""
    added = dict(zip(ANSWER_KEYS, (answer, label, max_new_tokens), strict=True))
    return json.dumps({**prompt.row, **added}, ensure_ascii=False) + "\n"


def _mismatch(line: bytes, prompt: Prompt, label: str, max_new_tokens: int) -> str | None:
    """Why a line of an earlier output is not the answer to `prompt` this run would write,
    or None when it is."""
    try:
        row = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError):
        row = None
    if not isinstance(row, dict) or not isinstance(row.get("answer"), str):
        return "is not an answer row of `qlora generate`"
    if line + b"\n" == answer_line(prompt, row["answer"], label, max_new_tokens).encode():
        return None
    if row.get("model") != label:
        return f"was answered by {row.get('model')!r}, not {label!r}"
    if row.get("max_new_tokens") != max_new_tokens:
        return f"was generated with --max-new-tokens {row.get('max_new_tokens')}"
    return f"answers another prompt than {prompt.where}"


def _is_torn_answer(tail: bytes, prompt: Prompt, label: str, max_new_tokens: int) -> bool:
    """Whether `tail`, a last line without its newline, is the start of the answer line to
    `prompt` (up to the answer text, which is unknown): the write a kill cut short."""
    marker = "\x00"
    line = answer_line(prompt, marker, label, max_new_tokens)
    head = line[: line.index(json.dumps(marker))].encode()
    return tail.startswith(head) or head.startswith(tail)


def answered(prompts: list[Prompt], output: Path, label: str, max_new_tokens: int) -> int:
    """How many of `prompts` an earlier run already answered in `output`, whose lines answer
    the first prompts in order. Each line must be the answer this run would write to its
    prompt, by the same model with the same --max-new-tokens: anything else is an error
    naming the line, and the file is left as it is. A last line cut short by a kill is
    removed, to be answered again; one that is whole but for its newline is kept."""
    try:
        data = output.read_bytes()
    except FileNotFoundError:
        return 0
    except OSError as e:
        raise StageError(f"{output}: cannot be read ({e.strerror})") from None
    end = data.rfind(b"\n") + 1
    lines, tail = data[:end].split(b"\n")[:-1], data[end:]
    refuse = "; move it away or choose another --output"
    if len(lines) + bool(tail) > len(prompts):
        raise StageError(
            f"{output}: more lines than the {len(prompts)} prompts: not their answers{refuse}"
        )
    for n, (line, prompt) in enumerate(zip(lines, prompts[: len(lines)], strict=True), start=1):
        why = _mismatch(line, prompt, label, max_new_tokens)
        if why:
            raise StageError(f"{output}, line {n} {why}{refuse}")
    if tail and _mismatch(tail, prompts[len(lines)], label, max_new_tokens) is None:
        # A whole answer that lost only its newline (an editor, another tool): kept.
        _append(output, "\n")
        return len(lines) + 1
    if tail:
        if not _is_torn_answer(tail, prompts[len(lines)], label, max_new_tokens):
            raise StageError(
                f"{output}, line {len(lines) + 1} is cut short and is not the start of an "
                f"answer to {prompts[len(lines)].where}{refuse}"
            )
        os.truncate(output, end)
    return len(lines)


def prompt_texts(speaker: Speaker, prompts: list[Prompt]) -> list[str]:
    """Each conversation in the base's chat template, before the model loads: one the
    template refuses (an unknown role, turns out of order) is an error naming its line."""
    texts = []
    for p in prompts:
        try:
            texts.append(prompt_text(speaker, p.messages))
        except (TemplateError, ValueError) as e:
            raise StageError(f"{p.where}: the chat template refuses it ({e})") from None
    return texts


def _append(output: Path, text: str) -> None:
    """Add complete lines to `output`, on disk when this returns."""
    with output.open("a", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def generate_file(
    speaker: Speaker,
    prompts: list[Prompt],
    output: Path,
    max_new_tokens: int,
    batch_size: int,
) -> tuple[int, int]:
    """Answers to `prompts` (read_prompts), appended to `output` as JSONL a batch at a time
    (answer_line: each row as it was, plus "answer", "model" and "max_new_tokens"), so a run
    cut short keeps every batch it finished. Rows an earlier run answered are kept and
    skipped (answered). Returns (resumed, generated)."""
    from tqdm import tqdm

    from qlora.evaluation.benchmark import generate

    done = answered(prompts, output, speaker.label, max_new_tokens)
    todo = prompts[done:]
    texts = prompt_texts(speaker, todo)
    if todo:
        output.parent.mkdir(parents=True, exist_ok=True)
    with tqdm(
        total=len(prompts), initial=done, desc="answers", unit="prompt", file=sys.stderr
    ) as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            answers = generate(
                speaker.model, speaker.tokenizer, texts[start : start + batch_size], max_new_tokens
            )
            lines = (
                answer_line(p, a, speaker.label, max_new_tokens)
                for p, a in zip(batch, answers, strict=True)
            )
            _append(output, "".join(lines))
            bar.update(len(batch))
    return done, len(todo)
