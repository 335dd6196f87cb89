"""`qlora serve` as users run it: a real server process on a free port, talked to by the
official `openai` client, for both CPU engines:

- llama.cpp: the tiny model converted to GGUF by llama.cpp's own converter, with the
  adapter as a GGUF LoRA;
- transformers: the NF4 base + adapter of a project folder, as `qlora chat` loads them.

The ground truth is each engine's library called directly on the same files (llama-cpp-
python's create_chat_completion / create_completion; transformers' generate, greedy, on the
chat template): the server's greedy answer must equal it, so the API adds nothing and loses
nothing. Each server runs with one slot and no queue, so a second request while one streams
is refused; the last test of each engine stops its server with SIGTERM mid-stream.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from helpers.repo import REPO
from helpers.tiny import make_adapter, tiny_params

openai = pytest.importorskip("openai")

SYSTEM = "Answer in one line."  # the dataset's system prompt: the transformers engine adds it
QUESTION = "Write the one-line docstring summary for this Python function.\n\ndef add(a, b):"
PROMPT = "def add(a, b):\n    return"
TOKENS = 24  # answer length in the ground-truth checks
# The longest answer a request may ask; one that long keeps the slot busy for the bound and
# the stop tests (llama.cpp: about 1 s; its context may exceed the tiny model's 512).
LIMIT = {"llama.cpp": 900, "transformers": 400}
CONTEXT = {"llama.cpp": 1024, "transformers": 512}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_free(port: int) -> bool:
    """Nothing listens there, and a new server can bind it (as uvicorn binds: with
    SO_REUSEADDR, which the closed connections' TIME_WAIT does not block)."""
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", port)) == 0:
            return False
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@dataclass
class Server:
    engine: str
    proc: subprocess.Popen
    port: int
    log: Path
    model: str

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self) -> openai.OpenAI:
        # No retries: a 503 must reach the test, not be retried away.
        return openai.OpenAI(
            base_url=self.base_url + "/v1", api_key="unused", max_retries=0, timeout=120
        )

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def start(engine: str, args: list[str], cwd: Path, log: Path) -> Server:
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    command = [
        sys.executable, "-m", "qlora.cli", "serve", *args,
        "--port", str(port),
        "--max-concurrent", "1", "--max-waiting", "0",
        "--max-tokens-limit", str(LIMIT[engine]),
        "--context-length", str(CONTEXT[engine]),
    ]  # fmt: skip
    with log.open("w") as out:
        proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"qlora serve exited with {proc.returncode}:\n{log.read_text()}")
        try:
            health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).json()
            return Server(engine, proc, port, log, health["model"])
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    pytest.fail(f"qlora serve did not answer within 180 s:\n{log.read_text()}")


def stop(server: Server) -> None:
    if server.proc.poll() is None:
        server.proc.kill()
        server.proc.wait(10)


@pytest.fixture(scope="session")
def adapter_dir(tiny_model_dir, tmp_path_factory) -> Path:
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("serve") / "adapter")


@pytest.fixture(scope="session")
def gguf_files(tiny_model_dir, adapter_dir, tmp_path_factory) -> tuple[Path, Path]:
    """The tiny model and its adapter in GGUF, by llama.cpp's own converters, once."""
    from qlora.export import gguf

    out = tmp_path_factory.mktemp("serve_gguf")
    # The tiny tokenizer is a byte-level BPE with GPT-2's split rule, which llama.cpp's
    # table of known tokenizers cannot recognise by its hash: named here.
    model = gguf.convert_model(tiny_model_dir, out / "tiny.gguf", "f16", pre_tokenizer="gpt-2")
    lora = gguf.convert_lora(adapter_dir, tiny_model_dir, out / "tiny-lora.gguf", "f16")
    return model, lora


@pytest.fixture(scope="session")
def project(tiny_model_dir, adapter_dir, tmp_path_factory) -> Path:
    """A project folder as `qlora serve VERSION` reads it: params, base, the adapter."""
    root = tmp_path_factory.mktemp("serve_project")
    params = tiny_params(tiny_model_dir)
    params["dataset"]["system_prompt"] = SYSTEM
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    shutil.copytree(tiny_model_dir, root / "data/prepared/base_model")
    shutil.copytree(adapter_dir, root / "data/prepared/adapter")
    return root


@pytest.fixture(scope="module", params=["llama.cpp", "transformers"])
def server(request, tmp_path_factory):
    engine = request.param
    log = tmp_path_factory.mktemp("serve_log") / "server.log"
    if engine == "llama.cpp":
        pytest.importorskip("llama_cpp")
        model, lora = request.getfixturevalue("gguf_files")
        args = ["--gguf", str(model), "--lora", str(lora), "--threads", "2"]
        proc = start(engine, args, tmp_path_factory.mktemp("cwd"), log)
    else:
        proc = start(engine, [], request.getfixturevalue("project"), log)
    yield proc
    stop(proc)


@pytest.fixture(scope="module")
def truth(server, request):
    """What the engine's own library answers, called directly on the same files."""
    if server.engine == "llama.cpp":
        return LlamaTruth(*request.getfixturevalue("gguf_files"))
    return TransformersTruth(request.getfixturevalue("project"))


class LlamaTruth:
    def __init__(self, model: Path, lora: Path):
        from qlora.export.llama_open import open_llama

        # The engine's load options (the AMX kernels off where built), the library's answer.
        self.llama = open_llama(model, lora, n_ctx=512, n_threads=2, verbose=False)

    def chat(self, messages: list[dict], max_tokens: int) -> tuple[str, int]:
        r = self.llama.create_chat_completion(messages, temperature=0, max_tokens=max_tokens)
        return r["choices"][0]["message"]["content"], r["usage"]["prompt_tokens"]

    def complete(self, prompt: str, max_tokens: int) -> tuple[str, int]:
        r = self.llama.create_completion(prompt, temperature=0, max_tokens=max_tokens)
        return r["choices"][0]["text"], r["usage"]["prompt_tokens"]


class TransformersTruth:
    """The project's 4-bit base + adapter (the loading code every stage shares), then the
    chat template, generate and decode by hand."""

    def __init__(self, root: Path):
        from qlora.core.params import load_params
        from qlora.models.loading import load_adapted, load_tokenizer

        params = load_params(root / "params.yaml")
        base = root / "data/prepared/base_model"
        self.model = load_adapted(params.quantize, root / "data/prepared/adapter", base)
        self.tok = load_tokenizer(base)

    def _generate(self, ids: list[int], max_tokens: int) -> str:
        import torch

        with torch.no_grad():
            out = self.model.generate(
                input_ids=torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=self.tok.pad_token_id,
            )
        return self.tok.decode(out[0, len(ids) :], skip_special_tokens=True)

    def chat(self, messages: list[dict], max_tokens: int) -> tuple[str, int]:
        text = self.tok.apply_chat_template(
            [{"role": "system", "content": SYSTEM}, *messages],
            tokenize=False,
            add_generation_prompt=True,
        )
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        return self._generate(ids, max_tokens), len(ids)

    def complete(self, prompt: str, max_tokens: int) -> tuple[str, int]:
        ids = self.tok(prompt)["input_ids"]
        return self._generate(ids, max_tokens), len(ids)


MESSAGES = [{"role": "user", "content": QUESTION}]


def test_models_lists_the_one_model_served(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == [server.model]
    expected = "tiny" if server.engine == "llama.cpp" else "qlora-current"
    assert server.model == expected


def test_a_greedy_chat_answer_is_what_the_engine_library_answers(server, truth):
    r = server.client().chat.completions.create(
        model=server.model, messages=MESSAGES, temperature=0, max_tokens=TOKENS
    )
    answer, prompt_tokens = truth.chat(MESSAGES, TOKENS)
    assert answer.strip(), "the tiny model said nothing: a weak check"
    assert r.choices[0].message.content == answer
    assert r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == prompt_tokens
    assert r.usage.completion_tokens == TOKENS and r.choices[0].finish_reason == "length"


def test_a_streamed_chat_joins_to_the_non_streamed_answer(server):
    client = server.client()
    whole = client.chat.completions.create(
        model=server.model, messages=MESSAGES, temperature=0, max_tokens=TOKENS
    )
    chunks = list(
        client.chat.completions.create(
            model=server.model, messages=MESSAGES, temperature=0, max_tokens=TOKENS, stream=True
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"


def test_a_greedy_completion_is_what_the_engine_library_answers(server, truth):
    client = server.client()
    r = client.completions.create(
        model=server.model, prompt=PROMPT, temperature=0, max_tokens=TOKENS
    )
    answer, prompt_tokens = truth.complete(PROMPT, TOKENS)
    assert r.choices[0].text == answer and answer.strip()
    assert r.usage.prompt_tokens == prompt_tokens
    streamed = list(
        client.completions.create(
            model=server.model, prompt=PROMPT, temperature=0, max_tokens=TOKENS, stream=True
        )
    )
    # It came in pieces: transformers' streamer gives out whole words, llama.cpp tokens, so
    # an answer of several words comes in several chunks (the tiny model's answer can have
    # fewer words on another CPU: its greedy choice follows float rounding).
    pieces = [c.choices[0].text for c in streamed if c.choices[0].text]
    assert len(pieces) >= min(3, len(answer.split())), pieces
    assert "".join(c.choices[0].text for c in streamed) == answer


def test_bad_requests_are_refused_with_the_clients_own_errors(server):
    client = server.client()
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    too_many = LIMIT[server.engine] + 1
    with pytest.raises(openai.BadRequestError, match=f"at most {LIMIT[server.engine]}") as e:
        client.chat.completions.create(model=server.model, messages=MESSAGES, max_tokens=too_many)
    assert e.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError, match="maximum context length") as e:
        client.completions.create(model=server.model, prompt="word " * CONTEXT[server.engine])
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="role"):
        client.chat.completions.create(
            model=server.model, messages=[{"role": "robot", "content": "hi"}]
        )


def long_stream(server: Server):
    """A streamed answer as long as the server allows, its first chunk already read: from
    here until its last chunk, it holds the server's one slot."""
    stream = server.client().chat.completions.create(
        model=server.model, messages=MESSAGES, temperature=0, max_tokens=LIMIT[server.engine],
        stream=True,
    )  # fmt: skip
    chunks = [next(stream)]
    return stream, chunks


def test_a_request_beyond_the_bound_is_refused_while_one_streams(server):
    stream, chunks = long_stream(server)
    with pytest.raises(openai.InternalServerError, match="busy") as e:
        server.client().chat.completions.create(model=server.model, messages=MESSAGES, max_tokens=4)
    assert e.value.status_code == 503 and int(e.value.response.headers["Retry-After"]) >= 1
    chunks += list(stream)
    assert chunks[-1].choices[0].finish_reason == "length"  # it did run to its end meanwhile
    # The slot is free again once the stream has ended.
    r = server.client().chat.completions.create(model=server.model, messages=MESSAGES, max_tokens=4)
    assert r.usage.completion_tokens == 4


def test_sigterm_lets_the_stream_in_flight_finish_then_exits_0_and_frees_the_port(server):
    """The last test of each engine: it stops the module's server."""
    stream, chunks = long_stream(server)
    server.proc.send_signal(signal.SIGTERM)
    chunks += list(stream)
    assert chunks[-1].choices[0].finish_reason == "length"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert len(text) > 100
    assert server.proc.wait(60) == 0, server.output()
    assert port_is_free(server.port)
    assert "Finished server process" in server.output()
