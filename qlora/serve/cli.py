"""`qlora serve [VERSION]`: the typer command (registered in qlora/cli.py).

Engines: llama.cpp serves a GGUF (--gguf, with --lora for a GGUF LoRA); transformers serves
the NF4 base + the adapter VERSION names, as `qlora chat` loads it; vllm prints (and with
vLLM installed, runs) vLLM's own server command for the base + adapter on a GPU.
The model loads before the port opens, so a bad file fails the command, not a request.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import shlex
import signal
import sys
from pathlib import Path

import typer

ENGINES = ("llama.cpp", "transformers", "vllm")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _fail(e: Exception) -> None:
    typer.echo(f"FAILED: {e}", err=True)
    raise typer.Exit(1)


def _engine(
    engine: str,
    version,
    gguf,
    lora,
    model_name,
    context_length,
    threads,
    contexts,
    registry,
    artifact=None,
):
    if engine == "llama.cpp":
        from qlora.serve.llama_engine import LlamaCppEngine

        if gguf is None:
            # A deployable artifact (one the parity check passed): a registered version's,
            # or with no VERSION the last run's (data/prepared/gguf).
            from qlora.export.registered import deployable_gguf
            from qlora.registry.store import Registry

            reg = Registry(registry) if version is not None else None
            name, gguf, lora = deployable_gguf(version, artifact, reg)
            typer.echo(f"serving {name}: {gguf}" + (f" + {lora}" if lora else ""), err=True)
        elif version is not None or artifact is not None:
            raise ValueError("--gguf FILE names the file itself: give no VERSION or --artifact")
        return LlamaCppEngine(gguf, lora, model_name, context_length, threads, contexts)
    from qlora.core.params import load_params
    from qlora.serve.transformers_engine import TransformersEngine
    from qlora.talk import CURRENT, load_speaker

    if gguf is not None or lora is not None:
        raise ValueError("--gguf and --lora are the llama.cpp engine's files")
    speaker = load_speaker(load_params(), version, False, registry)
    typer.echo(f"loading {speaker.label} ...", err=True)
    return TransformersEngine(speaker, model_name or f"qlora-{version or CURRENT}", context_length)


def _vllm(
    version, registry, model_name, host, port, max_lora_rank, context_length, extra, print_only
) -> None:
    from qlora.core import paths
    from qlora.core.params import load_params
    from qlora.serve.vllm import INSTALL, vllm_available, vllm_command
    from qlora.talk import CURRENT, resolve_adapter

    folder, _, label = resolve_adapter(version or CURRENT, registry, load_params())
    argv = vllm_command(
        paths.BASE_MODEL_DIR.resolve(),
        folder.resolve(),
        model_name or f"qlora-{version or CURRENT}",
        host,
        port,
        max_lora_rank,
        context_length,
        extra,
    )
    typer.echo(shlex.join(argv))
    if print_only:
        return
    if not vllm_available():
        raise ValueError(INSTALL)
    typer.echo(f"running vLLM for {label} (the base in 16 bits, the adapter on top)", err=True)
    sys.stdout.flush()
    os.execvp(argv[0], argv)  # vLLM's own server takes over this process and its signals


def serve(
    version: str = typer.Argument(
        None, help="champion or a version (v3); default: the adapter just trained"
    ),
    engine: str = typer.Option(
        None, "--engine", help="llama.cpp | transformers | vllm (default: llama.cpp with --gguf)"
    ),
    gguf: Path = typer.Option(None, "--gguf", help="llama.cpp: the GGUF model file"),
    lora: Path = typer.Option(None, "--lora", help="llama.cpp: a GGUF LoRA applied on load"),
    artifact: str = typer.Option(
        None,
        "--artifact",
        help="llama.cpp without --gguf: the deployable artifact of VERSION (or of the last "
        "run) to serve, e.g. merged-q8_0 (default: the smallest that passed parity)",
    ),
    host: str = typer.Option("127.0.0.1", "--host", help="address to listen on (no auth!)"),
    port: int = typer.Option(8000, "--port", min=1, max=65535),
    model_name: str = typer.Option(
        None,
        "--model-name",
        help="the name clients ask for (default: qlora-VERSION; the GGUF stem)",
    ),
    max_concurrent: int = typer.Option(
        1, "--max-concurrent", min=1, help="requests generating at once"
    ),
    max_waiting: int = typer.Option(
        16, "--max-waiting", min=0, help="requests that may wait for a turn"
    ),
    queue_timeout: float = typer.Option(
        30.0, "--queue-timeout", min=0, help="longest wait for a turn, s"
    ),
    max_tokens_limit: int = typer.Option(
        512, "--max-tokens-limit", min=1, help="largest max_tokens a request may ask"
    ),
    context_length: int = typer.Option(
        None, "--context-length", min=16, help="prompt + answer tokens (default: the model's)"
    ),
    threads: int = typer.Option(
        None, "--threads", min=1, help="llama.cpp: CPU threads per request"
    ),
    shutdown_timeout: float = typer.Option(
        60.0, "--shutdown-timeout", min=0, help="on SIGTERM, wait for requests in flight, s"
    ),
    registry: Path = typer.Option(
        None, "--registry", help="registry folder (default: $QLORA_REGISTRY, else registry/)"
    ),
    print_command: bool = typer.Option(
        False, "--print-command", help="vllm: print the command, do not run it"
    ),
    max_lora_rank: int = typer.Option(
        None, "--max-lora-rank", help="vllm: default the smallest that holds the adapter"
    ),
    vllm_arg: list[str] = typer.Option(
        None, "--vllm-arg", help="vllm: one more argument for `vllm serve` (repeat)"
    ),
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API (chat completions, completions,
    streaming); Ctrl-C or SIGTERM stops it once the requests in flight are answered."""
    import uvicorn

    from qlora.core.io import StageError
    from qlora.serve.admission import Admission
    from qlora.serve.app import create_app

    engine = engine or ("llama.cpp" if gguf is not None else "transformers")
    if engine not in ENGINES:
        _fail(ValueError(f"--engine {engine!r}: one of {', '.join(ENGINES)}"))
    if not _is_loopback(host):
        typer.echo(
            f"WARNING: listening on {host}: the API has no authentication; anyone who can "
            "reach this address can use the model",
            err=True,
        )
    try:
        if engine == "vllm":
            _vllm(
                version,
                registry,
                model_name,
                host,
                port,
                max_lora_rank,
                context_length,
                vllm_arg,
                print_command,
            )
            return
        served = _engine(
            engine,
            version,
            gguf,
            lora,
            model_name,
            context_length,
            threads,
            max_concurrent,
            registry,
            artifact,
        )
    except (StageError, ValueError, OSError) as e:
        _fail(e)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(name)s: %(message)s")
    app = create_app(
        served, Admission(max_concurrent, max_waiting, queue_timeout), max_tokens_limit
    )
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level="info",
            timeout_graceful_shutdown=shutdown_timeout,
        )
    )
    # uvicorn re-raises SIGINT/SIGTERM after its graceful shutdown; a stop that was asked
    # for is a success: these handlers take the re-raised signal, and the command exits 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    typer.echo(
        f"serving {served.model_id} ({engine}, {served.context_length}-token context) at "
        f"http://{host}:{port}/v1",
        err=True,
    )
    server.run()
    if not server.started:
        _fail(OSError(f"could not listen on {host}:{port} (see above)"))
