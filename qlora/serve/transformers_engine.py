"""The NF4 base + adapter served through transformers, loaded as `qlora chat` loads it
(qlora/talk.py's load_speaker: the registry's version, the base's chat template, the
dataset's system prompt), on whatever device the loading code picks.

Streams come from transformers' TextIteratorStreamer fed by generate in a thread of its
own; a client that leaves stops the generation at its next token (a stopping criterion).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

from qlora.serve.engine import Cancel, Completion, Piece, Prompt, RequestError, Sampling
from qlora.serve.stop_text import StopText


class TransformersEngine:
    def __init__(self, speaker, model_id: str, context_length: int | None = None):
        self.speaker = speaker
        self.model_id = model_id
        self.model = speaker.load()
        self.tokenizer = speaker.tokenizer
        trained = getattr(self.model.config, "max_position_embeddings", None) or 2048
        self.context_length = min(context_length or trained, trained)
        # A first forward before any request: bitsandbytes repacks 4-bit weights on some
        # CPUs on their first forward, which must not happen under two requests at once.
        self.complete(self.text_prompt("Hello"), Sampling(max_tokens=1, temperature=0.0))

    def chat_prompt(self, messages: list[dict[str, str]]) -> Prompt:
        from jinja2 import TemplateError

        from qlora.talk import prompt_text

        try:
            text = prompt_text(self.speaker, messages)
        except (TemplateError, ValueError) as e:
            raise RequestError(f"the chat template refuses it: {e}", param="messages") from None
        # The template writes the special tokens itself, as in `qlora chat`.
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return Prompt(len(ids), ids)

    def text_prompt(self, text: str) -> Prompt:
        ids = self.tokenizer(text)["input_ids"]
        return Prompt(len(ids), ids)

    def _options(self, prompt: Prompt, sampling: Sampling, halt: Callable[[], bool] | None) -> dict:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        class Halted(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs) -> bool:
                return halt is not None and halt()

        ids = torch.tensor([prompt.content], device=self.model.device)
        options = {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "max_new_tokens": sampling.max_tokens,
            "pad_token_id": self.tokenizer.pad_token_id,
            "stopping_criteria": StoppingCriteriaList([Halted()]),
        }
        if sampling.stop:
            options.update(stop_strings=list(sampling.stop), tokenizer=self.tokenizer)
        if sampling.temperature > 0:
            # OpenAI's sampling is temperature and top_p alone: the model's top_k is off.
            options.update(
                do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0
            )
            if sampling.seed is not None:
                # torch's generator is the process's: reproducible while no other sampled
                # request runs at the same time.
                torch.manual_seed(sampling.seed)
        else:
            options.update(do_sample=False)
        return options

    def _finish(self, new_tokens: list[int], stop: StopText) -> str:
        ended = bool(new_tokens) and new_tokens[-1] == self.tokenizer.eos_token_id
        return "stop" if ended or stop.stopped else "length"

    def complete(self, prompt: Prompt, sampling: Sampling) -> Completion:
        import torch

        with torch.no_grad():
            out = self.model.generate(**self._options(prompt, sampling, None))
        new = out[0, prompt.length :].tolist()
        stop = StopText(sampling.stop)
        text = stop.feed(self.tokenizer.decode(new, skip_special_tokens=True)) + stop.flush()
        finish = self._finish(new, stop)
        # The end-of-turn token ends the answer; OpenAI does not count it as answer text.
        counted = len(new) - (finish == "stop" and new[-1:] == [self.tokenizer.eos_token_id])
        return Completion(text, finish, prompt.length, counted)

    def stream(self, prompt: Prompt, sampling: Sampling, cancel: Cancel) -> Iterator[Piece]:
        import torch
        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        left = threading.Event()  # this generator was closed: its reader is gone
        halt = lambda: left.is_set() or cancel()  # noqa: E731
        options = {**self._options(prompt, sampling, halt), "streamer": streamer}
        outcome: dict = {}

        def generate() -> None:
            try:
                with torch.no_grad():
                    outcome["out"] = self.model.generate(**options)
            except BaseException as e:
                outcome["error"] = e
                streamer.end()  # or the loop below would wait for text forever

        worker = threading.Thread(target=generate, name="generate", daemon=True)
        worker.start()
        stop = StopText(sampling.stop)
        try:
            # The streamer gives out whole words only (a word's text can change with the
            # next token), so the first text can be far off: this says at once that the
            # generation has started, and the response begins.
            yield Piece("")
            for text in streamer:
                piece = stop.feed(text)
                if piece:
                    yield Piece(piece)
                if stop.stopped or cancel():
                    break
        finally:
            left.set()  # a no-op once generate has returned
            worker.join()
        if "error" in outcome:
            raise outcome["error"]
        if cancel():
            return
        rest = stop.flush()
        new = outcome["out"][0, prompt.length :].tolist()
        yield Piece(rest, self._finish(new, stop))
