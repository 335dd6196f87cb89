"""A GGUF (with an optional GGUF LoRA) served through llama.cpp (llama-cpp-python).

The conversation is rendered with the chat template stored in the GGUF's own metadata, by
llama-cpp-python's own Jinja formatter (a sandboxed Jinja environment: a template is data,
never code), and tokenized as its chat handler tokenizes it; the tokens then go to
`create_completion`, as the handler sends them. So the server answers what
`Llama.create_chat_completion` answers, and it knows the prompt's length before it
generates. The template is the model's own even where llama-cpp-python would guess a
built-in format from it: a guessed format can differ from the template in details.

One `Llama` holds one context, which serves one sequence at a time: the engine keeps a pool
of `contexts` of them. The weights are memory-mapped from the one file, so each extra
context costs its KV cache, not another copy of the model.
"""

from __future__ import annotations

import contextlib
import queue
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from qlora.core.io import StageError
from qlora.serve.engine import Cancel, Completion, Piece, Prompt, RequestError, Sampling

TEMPLATE_KEY = "tokenizer.chat_template"


@dataclass(frozen=True)
class _Rendered:
    tokens: list[int] | str  # token ids of a chat prompt; the text of a completion prompt
    stop: tuple[str, ...] = ()  # the template's end of turn
    criteria: object | None = None  # the template's stop tokens (llama_cpp criteria)


def _options(sampling: Sampling, rendered: _Rendered) -> dict:
    """create_completion's arguments for OpenAI's sampling: temperature and top_p only
    (llama.cpp's own top_k and min_p would narrow the choice further: off); no repeat
    penalty, as in create_chat_completion. Temperature 0 is llama.cpp's greedy sampler."""
    return {
        "max_tokens": sampling.max_tokens,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "top_k": 0,
        "min_p": 0.0,
        "repeat_penalty": 1.0,
        "stop": [*sampling.stop, *rendered.stop],
        "stopping_criteria": rendered.criteria,
        "seed": sampling.seed,
    }


class LlamaCppEngine:
    def __init__(
        self,
        gguf: Path,
        lora: Path | None = None,
        model_id: str | None = None,
        context_length: int | None = None,
        threads: int | None = None,
        contexts: int = 1,
    ):
        try:
            from llama_cpp import llama_chat_format

            from qlora.export.llama_open import open_llama
        except ImportError:
            raise StageError(
                "the llama.cpp engine needs llama-cpp-python: pip install llama-cpp-python "
                "(it builds from source, a few minutes)"
            ) from None
        for what, path in (("GGUF", gguf), ("GGUF LoRA", lora)):
            if path is not None and not Path(path).is_file():
                raise StageError(f"{path}: no such {what} file")
        self.model_id = model_id or Path(gguf).stem
        pool: queue.SimpleQueue = queue.SimpleQueue()
        first = None
        for _ in range(contexts):
            llama = open_llama(
                gguf,
                lora,
                n_ctx=context_length or 0,  # 0: the context the model was trained with
                n_threads=threads,
                verbose=False,
            )
            first = first or llama
            pool.put(llama)
        self._pool = pool
        self._tokenize = first.tokenize  # the vocabulary is the file's: any context's will do
        self.context_length = first.n_ctx()
        template = first.metadata.get(TEMPLATE_KEY)
        self._formatter = None
        if template:
            eos, bos = first.token_eos(), first.token_bos()
            self._formatter = llama_chat_format.Jinja2ChatFormatter(
                template=template,
                eos_token=_token_text(first, eos),
                bos_token=_token_text(first, bos),
                stop_token_ids=[eos],
            )

    def chat_prompt(self, messages: list[dict[str, str]]) -> Prompt:
        if self._formatter is None:
            raise RequestError(
                f"{self.model_id} has no chat template ({TEMPLATE_KEY} in the GGUF): use "
                "/v1/completions",
                param="messages",
            )
        try:
            result = self._formatter(messages=messages)
        except Exception as e:  # the template's raise_exception, a Jinja error: its message
            raise RequestError(f"the chat template refuses it: {e}", param="messages") from None
        tokens = self._tokenize(
            result.prompt.encode("utf-8"), add_bos=not result.added_special, special=True
        )
        stop = result.stop if isinstance(result.stop, list) else [result.stop or ""]
        rendered = _Rendered(tokens, tuple(s for s in stop if s), result.stopping_criteria)
        return Prompt(len(tokens), rendered)

    def text_prompt(self, text: str) -> Prompt:
        # create_completion tokenizes a text itself (with the model's BOS); counted alike.
        return Prompt(len(self._tokenize(text.encode("utf-8"), special=True)), _Rendered(text))

    @contextlib.contextmanager
    def _context(self) -> Iterator[object]:
        """A context of the pool to itself (waits for one when all are busy)."""
        llama = self._pool.get()
        try:
            yield llama
        finally:
            self._pool.put(llama)

    def complete(self, prompt: Prompt, sampling: Sampling) -> Completion:
        rendered: _Rendered = prompt.content
        with self._context() as llama:
            result = llama.create_completion(rendered.tokens, **_options(sampling, rendered))
        choice, use = result["choices"][0], result["usage"]
        return Completion(
            choice["text"],
            choice["finish_reason"] or "length",
            use["prompt_tokens"],
            use["completion_tokens"],
        )

    def stream(self, prompt: Prompt, sampling: Sampling, cancel: Cancel) -> Iterator[Piece]:
        rendered: _Rendered = prompt.content
        with self._context() as llama:
            chunks = llama.create_completion(
                rendered.tokens, stream=True, **_options(sampling, rendered)
            )
            try:
                for chunk in chunks:
                    choice = chunk["choices"][0]
                    yield Piece(choice["text"], choice["finish_reason"])
                    if cancel():
                        return
            finally:
                chunks.close()  # stops create_completion's generator before the context is free


def _token_text(llama, token: int) -> str:
    """A special token's text, as the Jinja template calls it (eos_token, bos_token)."""
    if token < 0:
        return ""
    return llama.detokenize([token], special=True).decode("utf-8", errors="ignore")
