"""The HTTP app on a fake engine: OpenAI's shapes, the refusals (4xx in OpenAI's error
shape), streaming as server-sent events, the bound on requests at once, engine calls off
the event loop. The real engines behind a real server: tests/integration/test_serve.py.

The fake engine counts a word as a token and answers with the words of ANSWER, so each
expected body can be written out by hand.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator

import httpx
import pytest

from qlora.serve.admission import Admission
from qlora.serve.app import create_app
from qlora.serve.engine import Cancel, Completion, Piece, Prompt, RequestError, Sampling

ANSWER = "one two three four five six seven eight".split()
CONTEXT, LIMIT = 32, 6


class WordEngine:
    """A prompt is its words; the answer is ANSWER's first max_tokens words, or up to a
    stop word. `gate`, when given, holds every generation until it is set."""

    model_id = "words"
    context_length = CONTEXT

    def __init__(self, gate: threading.Event | None = None):
        self.gate = gate
        self.threads: list[str] = []
        self.seen: list[Sampling] = []

    def chat_prompt(self, messages):
        if messages[-1]["role"] != "user":
            raise RequestError("the chat template refuses it: no user turn", param="messages")
        words = [w for m in messages for w in (m["role"], *m["content"].split())]
        return Prompt(len(words), words)

    def text_prompt(self, text):
        return Prompt(len(text.split()), text.split())

    def _words(self, sampling: Sampling) -> tuple[list[str], str]:
        self.threads.append(threading.current_thread().name)
        self.seen.append(sampling)
        if self.gate is not None:
            assert self.gate.wait(10)
        words = ANSWER[: sampling.max_tokens]
        for k, w in enumerate(words):
            if w in sampling.stop:
                return words[:k], "stop"
        return words, "length"

    def complete(self, prompt, sampling):
        words, finish = self._words(sampling)
        return Completion(" ".join(words), finish, prompt.length, len(words))

    def stream(self, prompt, sampling, cancel: Cancel) -> Iterator[Piece]:
        words, finish = self._words(sampling)
        for k, w in enumerate(words):
            yield Piece(("" if k == 0 else " ") + w)
        yield Piece("", finish)


def run(coro):
    return asyncio.run(coro)


def client(app) -> httpx.AsyncClient:
    # An engine's crash is answered with a 500, then re-raised for the server to log: here
    # the 500 is what is tested.
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://test")


async def post(app, path: str, body) -> httpx.Response:
    async with client(app) as c:
        if isinstance(body, str | bytes):
            return await c.post(path, content=body, headers={"content-type": "application/json"})
        return await c.post(path, json=body)


def make_app(engine=None, running=1, waiting=4, timeout=5.0):
    engine = engine or WordEngine()
    return create_app(engine, Admission(running, waiting, timeout), LIMIT), engine


CHAT = {"model": "words", "messages": [{"role": "user", "content": "say it"}]}


def test_a_chat_completion_in_openais_shape_with_usage():
    app, engine = make_app()
    r = run(post(app, "/v1/chat/completions", {**CHAT, "max_tokens": 3, "temperature": 0}))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == "words"
    assert body["id"].startswith("chatcmpl-")
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "one two three"},
            "finish_reason": "length",
            "logprobs": None,
        }
    ]
    # "user say it": 3 words of prompt, 3 of answer
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    assert engine.seen[0].temperature == 0.0 and engine.seen[0].max_tokens == 3


def test_a_completion_and_the_stop_sequences_reach_the_engine():
    app, engine = make_app()
    body = {"model": "words", "prompt": "a b", "max_tokens": 5, "stop": ["four"]}
    r = run(post(app, "/v1/completions", body))
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == "one two three"
    assert r.json()["choices"][0]["finish_reason"] == "stop"
    assert engine.seen[0].stop == ("four",)


def test_max_tokens_defaults_to_the_limit_and_stops_at_the_end_of_the_context():
    app, engine = make_app()
    run(post(app, "/v1/completions", {"model": "words", "prompt": "a b"}))
    long_prompt = " ".join(["w"] * (CONTEXT - 2))  # room for two answer tokens
    run(post(app, "/v1/completions", {"model": "words", "prompt": long_prompt, "max_tokens": 5}))
    assert [s.max_tokens for s in engine.seen] == [LIMIT, 2]


def sse_events(text: str) -> list:
    """The data of each server-sent event, parsed ([DONE] kept as the string)."""
    events = []
    for block in text.split("\n\n"):
        if block.strip():
            assert block.startswith("data: "), block
            data = block.removeprefix("data: ")
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_a_streamed_chat_is_server_sent_events_ending_with_done():
    app, _ = make_app()
    r = run(post(app, "/v1/chat/completions", {**CHAT, "max_tokens": 3, "stream": True}))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1
    deltas = [c["choices"][0]["delta"] for c in chunks]
    finishes = [c["choices"][0]["finish_reason"] for c in chunks]
    assert deltas == [
        {"role": "assistant", "content": ""},
        {"content": "one"},
        {"content": " two"},
        {"content": " three"},
        {},
    ]
    assert finishes == [None, None, None, None, "length"]


def test_a_streamed_completion_joins_to_the_whole_answer():
    app, _ = make_app()
    body = {"model": "words", "prompt": "a", "max_tokens": 4, "stream": True}
    events = sse_events(run(post(app, "/v1/completions", body)).text)
    assert events[-1] == "[DONE]"
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == "one two three four"
    assert events[-2]["choices"][0]["finish_reason"] == "length"


def assert_refused(r: httpx.Response, status: int, param: str | None, *words: str) -> None:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param, error
    for w in words:
        assert w in error["message"], error


REFUSED = [
    ({**CHAT, "messages": []}, "messages", "at least 1"),
    ({**CHAT, "messages": [{"role": "robot", "content": "x"}]}, "messages.0.role", "'user'"),
    ({**CHAT, "messages": [{"role": "user"}]}, "messages.0.content", "Field required"),
    ({"messages": CHAT["messages"]}, "model", "Field required"),
    ({**CHAT, "n": 2}, "n", "less than or equal to 1"),
    ({**CHAT, "max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
    ({**CHAT, "temperature": 3}, "temperature", "less than or equal to 2"),
    ({**CHAT, "tools": [{"type": "function"}]}, "tools", "Extra inputs are not permitted"),
    ({**CHAT, "logprobs": True}, "logprobs", "Extra inputs are not permitted"),
    ({**CHAT, "stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
    ({**CHAT, "stream": True, "stream_options": {"include_usage": True}}, None, "usage"),
]


@pytest.mark.parametrize(("body", "param", "words"), REFUSED)
def test_a_request_outside_the_schema_is_a_400_naming_the_field(body, param, words):
    app, engine = make_app()
    r = run(post(app, "/v1/chat/completions", body))
    if param is None:  # nested: the whole location is named
        param = "stream_options.include_usage"
    assert_refused(r, 400, param, words)
    assert engine.seen == []  # nothing reached the engine


def test_a_body_that_is_not_json_is_a_400():
    app, _ = make_app()
    r = run(post(app, "/v1/chat/completions", '{"model": "words", '))
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]


def test_an_unknown_model_is_a_404_and_models_lists_the_one_served():
    app, engine = make_app()
    r = run(post(app, "/v1/chat/completions", {**CHAT, "model": "gpt-4o"}))
    assert_refused(r, 404, "model", "'gpt-4o' does not exist", "'words'")
    assert r.json()["error"]["code"] == "model_not_found"

    async def gets():
        async with client(app) as c:
            return [await c.get(p) for p in ("/v1/models", "/v1/models/words", "/v1/models/x")]

    listed, one, missing = run(gets())
    assert [m["id"] for m in listed.json()["data"]] == ["words"]
    assert one.json()["id"] == "words" and one.json()["object"] == "model"
    assert missing.status_code == 404
    assert engine.seen == []


def test_max_tokens_above_the_limit_and_a_prompt_beyond_the_context_are_400s():
    app, engine = make_app()
    r = run(post(app, "/v1/chat/completions", {**CHAT, "max_tokens": LIMIT + 1}))
    assert_refused(r, 400, "max_tokens", f"at most {LIMIT}")
    r = run(post(app, "/v1/chat/completions", {**CHAT, "max_completion_tokens": LIMIT + 1}))
    assert_refused(r, 400, "max_tokens", f"at most {LIMIT}")
    too_long = {"model": "words", "prompt": " ".join(["w"] * CONTEXT)}
    r = run(post(app, "/v1/completions", too_long))
    assert_refused(r, 400, "prompt", f"maximum context length is {CONTEXT}", f"is {CONTEXT}")
    assert r.json()["error"]["code"] == "context_length_exceeded"
    assert engine.seen == []


def test_a_conversation_the_template_refuses_is_a_400_also_when_streamed():
    app, _ = make_app()
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    for stream in (False, True):
        body = {**CHAT, "messages": messages, "stream": stream}
        assert_refused(run(post(app, "/v1/chat/completions", body)), 400, "messages", "no user")


def test_an_unknown_path_is_a_404_in_openais_shape():
    app, _ = make_app()
    r = run(post(app, "/v1/embeddings", {"model": "words", "input": "x"}))
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_engine_calls_run_in_worker_threads_not_on_the_event_loop():
    app, engine = make_app()
    loop_thread = threading.current_thread().name  # asyncio.run's loop runs here
    run(post(app, "/v1/chat/completions", CHAT))
    run(post(app, "/v1/chat/completions", {**CHAT, "stream": True}))
    assert len(engine.threads) == 2 and loop_thread not in engine.threads


async def _concurrently(app, gate: threading.Event, bodies: list[dict], path: str):
    """Send the requests at once; once every one but the first has its answer, open the
    gate so the first can finish."""
    async with client(app) as c:
        first = asyncio.create_task(c.post(path, json=bodies[0]))
        while not app_running(app):
            await asyncio.sleep(0.01)
        rest = await asyncio.gather(*(c.post(path, json=b) for b in bodies[1:]))
        gate.set()
        return [await first, *rest]


def app_running(app) -> int:
    return app.state.admission.active


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_beyond_the_bound_with_no_room_to_wait_is_a_503_with_retry_after(stream):
    gate = threading.Event()
    app, engine = make_app(WordEngine(gate), running=1, waiting=0)
    body = {**CHAT, "stream": stream}
    first, second = run(_concurrently(app, gate, [body, body], "/v1/chat/completions"))
    assert first.status_code == 200
    assert_refused(second, 503, None, "busy", "1 running")
    assert second.headers["Retry-After"] == "5"
    assert len(engine.seen) == 1  # the refused one never reached the engine


def test_a_request_that_waits_past_the_queue_timeout_is_a_503():
    gate = threading.Event()
    app, _ = make_app(WordEngine(gate), running=1, waiting=4, timeout=0.2)
    first, second = run(_concurrently(app, gate, [CHAT, CHAT], "/v1/chat/completions"))
    assert first.status_code == 200
    assert_refused(second, 503, None, "no slot within 0.2 s")


def test_requests_within_the_bound_all_run_and_the_slots_are_free_after():
    app, engine = make_app(running=2, waiting=8)

    async def many():
        async with client(app) as c:
            return await asyncio.gather(
                *(
                    c.post("/v1/chat/completions", json={**CHAT, "stream": k % 2 == 0})
                    for k in range(8)
                )
            )

    assert [r.status_code for r in run(many())] == [200] * 8
    admission = app.state.admission
    assert (admission.active, admission.waiting) == (0, 0)
    assert len(engine.seen) == 8


class FailingEngine(WordEngine):
    """Fails on its generation's first piece, or after `after` pieces."""

    def __init__(self, after: int | None = None):
        super().__init__()
        self.after = after

    def complete(self, prompt, sampling):
        raise RuntimeError("engine crashed")

    def stream(self, prompt, sampling, cancel):
        for k, piece in enumerate(super().stream(prompt, sampling, cancel)):
            if k == self.after:
                raise RuntimeError("engine crashed")
            yield piece
        if self.after is None:
            raise RuntimeError("engine crashed")


def test_an_engine_failure_is_a_500_before_the_stream_and_an_error_event_in_it():
    app, _ = make_app(FailingEngine())
    r = run(post(app, "/v1/chat/completions", CHAT))
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    app, _ = make_app(FailingEngine(after=2))
    events = sse_events(run(post(app, "/v1/chat/completions", {**CHAT, "stream": True})).text)
    assert "[DONE]" not in events and "error" in events[-1]
    assert app.state.admission.active == 0


def test_health_says_what_is_served_and_how_busy_it_is():
    app, _ = make_app()

    async def get():
        async with client(app) as c:
            return (await c.get("/health")).json()

    assert run(get()) == {"status": "ok", "model": "words", "running": 0, "waiting": 0}
