"""The requests the server accepts and the responses it writes, in OpenAI's shapes.

A field OpenAI defines that this server does not implement (tools, logprobs, n > 1, ...)
is refused with a 400 naming it, rather than ignored: a client that asked for it would
otherwise get an answer that quietly is not what it asked for.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# OpenAI allows up to four stop sequences.
MAX_STOP = 4


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def as_template_input(self) -> dict[str, str]:
        # "developer" is OpenAI's newer name for the system turn; chat templates know "system".
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": self.text()}


class StreamOptions(_Strict):
    include_usage: bool = False

    @field_validator("include_usage")
    @classmethod
    def _no_usage(cls, value: bool) -> bool:
        # llama.cpp's stream does not say how many tokens it generated; a count made by
        # tokenizing the text again can differ from it. Non-streamed answers carry usage.
        if value:
            raise ValueError("usage in a stream is not supported: ask without stream for it")
        return value


class _Generation(_Strict):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=1, description="one answer per request")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None  # accepted for clients that send it; not logged

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if any(s == "" for s in stops):
            raise ValueError("a stop sequence is empty")
        return value

    def stop_list(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class ChatRequest(_Generation):
    messages: list[Message] = Field(min_length=1)
    # The name newer clients use for max_tokens.
    max_completion_tokens: int | None = Field(None, ge=1)

    def answer_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Generation):
    prompt: str = Field(min_length=1)
    echo: bool = False

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value: bool) -> bool:
        if value:
            raise ValueError("echo is not supported")
        return value

    def answer_limit(self) -> int | None:
        return self.max_tokens


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def chat_response(rid: str, model: str, text: str, finish: str, use: dict) -> dict:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish,
                "logprobs": None,
            }
        ],
        "usage": use,
    }


def chat_chunk(rid: str, model: str, delta: dict, finish: str | None) -> dict:
    return {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
    }


def completion_response(
    rid: str, model: str, text: str, finish: str | None, use: dict | None = None
) -> dict:
    """A completion, or (no usage) one chunk of a streamed one: OpenAI gives both one shape."""
    body = {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}],
    }
    if use is not None:
        body["usage"] = use
    return body


def error_body(message: str, type_: str, param: str | None, code: str | None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
