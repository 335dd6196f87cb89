"""What the HTTP app asks of an engine, and the errors a request can get.

An engine renders a conversation with the model's own chat template and tokenizes it
(`chat_prompt`, `text_prompt`), so the app can check the prompt against the context before
anything is generated; then it generates, whole (`complete`) or piece by piece (`stream`).
Engine calls block: the app runs them in worker threads, never on the event loop.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol


class RequestError(Exception):
    """A request the server refuses: an HTTP status and OpenAI's error fields."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        param: str | None = None,
        code: str | None = None,
        type_: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.message, self.status, self.param, self.code = message, status, param, code
        self.type, self.headers = type_, headers or {}


@dataclass(frozen=True)
class Prompt:
    length: int  # tokens, as the engine counts them: checked against the context
    content: object  # what the engine's own generate call takes (token ids, text, ...)


@dataclass(frozen=True)
class Sampling:
    max_tokens: int  # already checked against the limit and the room left in the context
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass(frozen=True)
class Piece:
    text: str
    finish_reason: str | None = None  # on the last piece only: "stop" or "length"


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Cancel:
    """Set when the client went away: a stream stops generating at its next piece."""

    event: threading.Event = field(default_factory=threading.Event)

    def __call__(self) -> bool:
        return self.event.is_set()

    def set(self) -> None:
        self.event.set()


class Engine(Protocol):
    model_id: str  # the name clients ask for ("model" in a request), /v1/models lists it
    context_length: int  # tokens of prompt + answer the model attends to

    def chat_prompt(self, messages: list[dict[str, str]]) -> Prompt:
        """The conversation in the model's chat template, ready to answer; a conversation
        the template refuses is a RequestError."""

    def text_prompt(self, text: str) -> Prompt:
        """A plain text to continue."""

    def complete(self, prompt: Prompt, sampling: Sampling) -> Completion:
        """The whole answer, with token counts."""

    def stream(self, prompt: Prompt, sampling: Sampling, cancel: Cancel) -> Iterator[Piece]:
        """The answer piece by piece as it is generated; the last piece has finish_reason."""
