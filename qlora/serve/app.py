"""The HTTP app: OpenAI's /v1/chat/completions, /v1/completions and /v1/models, and /health.

Every request is checked before it takes a slot: the body against schemas.py, the model
name, the prompt against the context (the engine renders and counts it), max_tokens against
the server's limit. Refusals are 4xx in OpenAI's error shape, so OpenAI's clients raise
their usual exceptions. Engine calls run in worker threads; a stream holds its slot until
its generation has stopped, also when the client leaves early.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from qlora.serve.admission import Admission
from qlora.serve.engine import Cancel, Engine, Piece, Prompt, RequestError, Sampling
from qlora.serve.schemas import (
    ChatRequest,
    CompletionRequest,
    chat_chunk,
    chat_response,
    completion_response,
    error_body,
    new_id,
    usage,
)

log = logging.getLogger("qlora.serve")
_END = object()  # the producer thread's last item


def _error(e: RequestError) -> JSONResponse:
    return JSONResponse(
        error_body(e.message, e.type, e.param, e.code), status_code=e.status, headers=e.headers
    )


def _validation_error(e: RequestValidationError) -> JSONResponse:
    problems, param = [], None
    for err in e.errors():
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        param = param or where or None
        problems.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
    return _error(RequestError("; ".join(problems) or "invalid request", param=param))


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


class _Server:
    def __init__(self, engine: Engine, admission: Admission, max_tokens_limit: int):
        self.engine, self.admission, self.limit = engine, admission, max_tokens_limit

    def check_model(self, name: str) -> None:
        if name != self.engine.model_id:
            raise RequestError(
                f"The model {name!r} does not exist; this server serves {self.engine.model_id!r}",
                status=404,
                param="model",
                code="model_not_found",
            )

    def sampling(self, req: ChatRequest | CompletionRequest, prompt: Prompt, what: str) -> Sampling:
        context = self.engine.context_length
        room = context - prompt.length
        if room < 1:
            raise RequestError(
                f"This model's maximum context length is {context} tokens; the {what} is "
                f"{prompt.length} tokens, which leaves no room for an answer",
                param=what,
                code="context_length_exceeded",
            )
        asked = req.answer_limit()
        if asked is not None and asked > self.limit:
            raise RequestError(
                f"max_tokens is {asked}; this server allows at most {self.limit}",
                param="max_tokens",
            )
        return Sampling(
            max_tokens=min(asked or self.limit, room),
            temperature=req.temperature,
            top_p=req.top_p,
            stop=req.stop_list(),
            seed=req.seed,
        )

    async def answer(
        self,
        req: ChatRequest | CompletionRequest,
        make_prompt: Callable[[], Prompt],
        what: str,
        respond: Callable[[str, str, str, dict], dict],  # (id, text, finish, usage) -> body
        stream_body: Callable[[str, AsyncIterator[Piece]], AsyncIterator[str]],
        prefix: str,
    ):
        self.check_model(req.model)
        prompt = await asyncio.to_thread(make_prompt)
        sampling = self.sampling(req, prompt, what)
        rid = new_id(prefix)
        if req.stream:
            return await self.stream(rid, prompt, sampling, stream_body)
        async with self.admission.slot():
            start = time.perf_counter()
            done = await asyncio.to_thread(self.engine.complete, prompt, sampling)
        log.info(
            "%s: %d prompt + %d answer tokens in %.2f s (%s)",
            rid,
            done.prompt_tokens,
            done.completion_tokens,
            time.perf_counter() - start,
            done.finish_reason,
        )
        use = usage(done.prompt_tokens, done.completion_tokens)
        return JSONResponse(respond(rid, done.text, done.finish_reason, use))

    async def stream(
        self,
        rid: str,
        prompt: Prompt,
        sampling: Sampling,
        stream_body: Callable[[str, AsyncIterator[Piece]], AsyncIterator[str]],
    ) -> StreamingResponse:
        """Take a slot, start generating in a thread, and return the SSE response once the
        first piece is there: a failure before it is still an HTTP error, not a stream."""
        stack = contextlib.AsyncExitStack()
        await stack.enter_async_context(self.admission.slot())
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = Cancel()

        def put(item: object) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody is reading
                loop.call_soon_threadsafe(queue.put_nowait, item)

        def produce() -> None:
            try:
                for piece in self.engine.stream(prompt, sampling, cancel):
                    put(piece)
                    if cancel():
                        break
            except Exception as e:  # handed to the event loop, which reports it
                put(e)
            finally:
                put(_END)

        start = time.perf_counter()
        producer = loop.run_in_executor(None, produce)
        stopped = False

        async def stop() -> None:
            nonlocal stopped
            if stopped:
                return
            stopped = True
            cancel.set()
            await producer  # the slot is free only once the engine is
            log.info("%s: streamed in %.2f s", rid, time.perf_counter() - start)
            await stack.aclose()

        first = await queue.get()
        if isinstance(first, Exception):
            await stop()
            raise first

        async def pieces() -> AsyncIterator[Piece]:
            item = first
            while item is not _END:
                if isinstance(item, Exception):
                    raise item
                yield item
                item = await queue.get()

        async def body() -> AsyncIterator[str]:
            end = "data: [DONE]\n\n"
            try:
                async for line in stream_body(rid, pieces()):
                    yield line
            except RequestError as e:
                end = _sse(error_body(e.message, e.type, e.param, e.code))
            except Exception:
                log.exception("%s: the stream failed", rid)
                end = _sse(error_body("the engine failed mid-stream", "server_error", None, None))
            finally:
                await stop()
            # After the slot is free: a client that saw the end can send its next request.
            yield end

        return StreamingResponse(
            body(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )


def create_app(engine: Engine, admission: Admission, max_tokens_limit: int) -> FastAPI:
    """The app serving `engine`, `admission.running` requests at a time."""
    server = _Server(engine, admission, max_tokens_limit)
    # No interactive docs: the API is OpenAI's, documented there; less to expose.
    app = FastAPI(title="qlora serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.admission = admission  # /health reads it; so can a test

    @app.exception_handler(RequestError)
    async def _refused(request: Request, e: RequestError) -> JSONResponse:
        return _error(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        return _validation_error(e)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, e: HTTPException) -> JSONResponse:
        code = "not_found" if e.status_code == 404 else None
        return _error(RequestError(str(e.detail), status=e.status_code, code=code))

    # Starlette re-raises the exception after this answer, and uvicorn logs its traceback.
    @app.exception_handler(Exception)
    async def _crashed(request: Request, e: Exception) -> JSONResponse:
        return _error(RequestError("internal error", status=500, type_="server_error"))

    model_card = {
        "id": engine.model_id,
        "object": "model",
        "created": int(time.time()),
        "owned_by": "qlora",
    }

    @app.get("/health")
    async def health() -> dict:
        return {
            "status": "ok",
            "model": engine.model_id,
            "running": admission.active,
            "waiting": admission.waiting,
        }

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_card]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict:
        server.check_model(name)
        return model_card

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest):
        messages = [m.as_template_input() for m in req.messages]

        def respond(rid, text, finish, use):
            return chat_response(rid, req.model, text, finish, use)

        async def stream_body(rid, pieces):
            yield _sse(chat_chunk(rid, req.model, {"role": "assistant", "content": ""}, None))
            async for p in pieces:
                if p.text:
                    yield _sse(chat_chunk(rid, req.model, {"content": p.text}, None))
                if p.finish_reason:
                    yield _sse(chat_chunk(rid, req.model, {}, p.finish_reason))

        return await server.answer(
            req, lambda: engine.chat_prompt(messages), "messages", respond, stream_body, "chatcmpl"
        )

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        def respond(rid, text, finish, use):
            return completion_response(rid, req.model, text, finish, use)

        async def stream_body(rid, pieces):
            async for p in pieces:
                if p.text or p.finish_reason:
                    yield _sse(completion_response(rid, req.model, p.text, p.finish_reason))

        return await server.answer(
            req, lambda: engine.text_prompt(req.prompt), "prompt", respond, stream_body, "cmpl"
        )

    return app
