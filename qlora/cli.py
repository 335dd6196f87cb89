"""`qlora`: the project's one command-line program.

qlora run                 run the pipeline (`dvc repro`) and print each stage's time
qlora restore             put back the last good outputs after a failed `dvc repro`
qlora sweep -S k=a,b [-S k2=x,y] [--jobs N] [--promote]   a grid of experiments, ranked
qlora validate PATH       check a dataset file before training on it
qlora flow run [--set k=v]  run the pipeline as a Prefect flow
qlora flow sweep -S k=a,b   a sweep as Prefect flow runs on a work pool (several machines)
qlora promote             register the adapter; make it champion if it passes its gates
qlora registry list|show VERSION|rollback [VERSION]|verify
qlora export VERSION --merged DIR   a merged 16-bit model that plain transformers loads
qlora export VERSION --gguf DIR     GGUF files for llama.cpp, parity-checked against the adapter
qlora chat [VERSION]      talk to an adapter (default: the one just trained; champion, v3)
qlora generate FILE.jsonl [VERSION]   answer a file of prompts, written as JSONL
qlora serve [VERSION] [--gguf FILE]   an OpenAI-compatible HTTP API (llama.cpp, transformers, vLLM)
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import time
from pathlib import Path

import typer

from qlora.core import dvc, paths
from qlora.core.io import pipeline_env
from qlora.serve.cli import serve

app = typer.Typer(help=__doc__, no_args_is_help=True, add_completion=False)
flow_app = typer.Typer(help="Prefect flows that drive the DVC pipeline.", no_args_is_help=True)
app.add_typer(flow_app, name="flow")
registry_app = typer.Typer(
    help="The adapter registry: versions, their decisions, the champion.", no_args_is_help=True
)
app.add_typer(registry_app, name="registry")
app.command()(serve)

# Exit status of `qlora promote` when the adapter was registered but did not become champion.
EXIT_REJECTED = 3
REGISTRY_OPTION = typer.Option(
    None, "--registry", help="registry folder (default: $QLORA_REGISTRY, else registry/)"
)

# Searched, not matched: a progress bar that ends without a newline can precede it.
_DONE = re.compile(r"\[(?P<stage>[\w-]+)\] done in (?P<seconds>[\d.]+) s\s*$")


def repro(args: list[str]) -> tuple[int, dict[str, float]]:
    """Run `dvc repro`, streaming its output, and collect each stage's reported time."""
    timings: dict[str, float] = {}
    with subprocess.Popen(
        dvc.command("repro", *args),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=pipeline_env(),
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            if m := _DONE.search(line):
                timings[m["stage"]] = float(m["seconds"])
    return proc.returncode, timings


@app.command()
def run(
    force: bool = typer.Option(False, "--force", "-f", help="rerun every stage"),
    stage: list[str] = typer.Argument(None, help="run only up to these stages"),
) -> None:
    """Run the pipeline with `dvc repro` (only stale stages run) and print stage times."""
    start = time.perf_counter()
    code, timings = repro((["--force"] if force else []) + list(stage or []))
    total = time.perf_counter() - start
    width = max(map(len, [*timings, "total"]))
    if timings:
        typer.echo("\nstage times:")
        for name, seconds in timings.items():
            typer.echo(f"  {name:<{width}} {seconds:8.1f} s")
    typer.echo(f"  {'total':<{width}} {total:8.1f} s (wall, including DVC)")
    if code != 0:
        _restore_after_failure()
    if code == 0 and set(timings) <= {"sources"}:  # sources re-fingerprints on every run
        typer.echo("nothing to run: every stage is up to date")
    if code == 0:
        typer.echo("reports: reports/report.html, reports/report.md, reports/gate.json")
    raise typer.Exit(code)


def _restore_after_failure() -> None:
    """DVC deleted the failed stage's outputs before running it: put back the last good
    ones (dvc.lock, untouched by the failure, says which), so a failure costs nothing."""
    from qlora.core.io import StageError

    try:
        restored = dvc.restore_outputs(Path("."))
    except StageError as e:
        typer.echo(f"could not restore the last good outputs: {e}", err=True)
        return
    if restored:
        typer.echo(f"restored the last good outputs: {', '.join(restored)}", err=True)


@app.command()
def restore() -> None:
    """Put back every stage output that is missing or differs from dvc.lock, from the DVC
    cache: the last good results after a stage failed under a plain `dvc repro`."""
    from qlora.core.io import StageError

    try:
        restored = dvc.restore_outputs(Path("."))
    except StageError as e:
        _fail(e)
    nothing = "nothing to restore: every output is what dvc.lock records"
    typer.echo(f"restored: {', '.join(restored)}" if restored else nothing)


@app.command()
def sweep(
    set_: list[str] = typer.Option(
        ...,
        "--set",
        "-S",
        help="a params.yaml key and its values: key=v1,v2 (or range(1,4)); repeat for a grid",
    ),
    name: str = typer.Option(None, "--name", "-n", help="sweep name (default: sweep-<time>)"),
    jobs: int = typer.Option(1, "--jobs", "-j", min=1, help="experiments run at once"),
    promote_: bool = typer.Option(
        False, "--promote", help="register the best experiment's adapter (champion check)"
    ),
    registry: Path = REGISTRY_OPTION,
) -> None:
    """Run every combination of the values as a DVC experiment, rank them by the gate and
    the primary metric, apply the best one the gate promoted (and register it).

    Exit 0: a best experiment was applied; 3: the gate promoted none; 1: the sweep failed.
    """
    from flows import dvc_workspace as ws
    from flows.sweep import run_sweep
    from qlora.core.io import StageError
    from qlora.report.sweep import text_table

    try:
        board = run_sweep(
            Path("."),
            set_,
            name=name,
            jobs=jobs,
            promote=promote_,
            registry_dir=str(registry) if registry else None,
            logger=_echo_logger("qlora.sweep"),
        )
    except (StageError, ws.DvcCommandFailed, ws.WorkspaceBusy, ValueError) as e:
        _fail(e)
    typer.echo("\n" + text_table(board))
    typer.echo(f"leaderboard: {paths.SWEEP_DIR}/leaderboard.html (.md, .json)")
    typer.echo(f"sweep time: {board['seconds']:.0f} s")
    if board["applied"]:
        typer.echo(f"applied {board['applied']} to the workspace (`dvc exp apply`)")
    if board["promotion"]:
        typer.echo(f"promotion: {board['promotion']['summary']}")
    raise typer.Exit(0 if board["applied"] else EXIT_REJECTED)


@app.command()
def validate(
    path: str = typer.Argument(..., help="dataset file: .jsonl, .json, .csv or .parquet"),
    fmt: str = typer.Option("auto", "--format", help="auto|alpaca|chat|prompt_completion"),
    tokenizer: str = typer.Option(None, "--tokenizer", help="tokenizer dir for length checks"),
    max_length: int = typer.Option(None, "--max-length", help="max tokens (default: params)"),
) -> None:
    """Check a dataset file; exit 0 if it passes, 1 with every failed check if not."""
    from qlora.data.validation import cli_validate

    raise typer.Exit(cli_validate(path, fmt, tokenizer, max_length))


@app.command()
def report(
    compare: str = typer.Option(None, "--compare", help="git revision to compare against"),
) -> None:
    """Render reports/report.html and report.md again, optionally beside an older revision."""
    from qlora.core.io import run_stage
    from qlora.report.build import main as report_main

    run_stage("report", lambda: report_main(compare_rev=compare))


@flow_app.command("run")
def flow_run(
    set_: list[str] = typer.Option(
        None,
        "--set",
        "-S",
        help="override a params.yaml key: key=value (checked by the params schema; this "
        "machine's own user may also change sources and base.trust_remote_code)",
    ),
    only_if_changed: bool = typer.Option(
        False, "--only-if-changed", help="end at once when `dvc status` finds nothing stale"
    ),
    promote_: bool = typer.Option(
        False, "--promote", help="register the adapter after a passing gate"
    ),
    pull: bool = typer.Option(
        False, "--pull", help="fetch unchanged stages' outputs from the DVC remote"
    ),
    push: bool = typer.Option(False, "--push", help="dvc push the results at the end"),
) -> None:
    """Run the pipeline as a Prefect flow; overrides run as a recorded DVC experiment."""
    from flows.pipeline import main as flow_main

    argv = [f"--set={kv}" for kv in set_ or []]
    flags = {
        "--only-if-changed": only_if_changed,
        "--promote": promote_,
        "--pull": pull,
        "--push": push,
    }
    raise typer.Exit(flow_main(argv + [flag for flag, on in flags.items() if on]))


@flow_app.command("sweep")
def flow_sweep(
    set_: list[str] = typer.Option(
        ..., "--set", "-S", help="a params.yaml key and its values: key=v1,v2; repeat for a grid"
    ),
    name: str = typer.Option(None, "--name", "-n", help="sweep name (default: sweep-<time>)"),
    promote_: bool = typer.Option(False, "--promote", help="register the best adapter"),
    registry: Path = REGISTRY_OPTION,
    deployment: str = typer.Option(
        "qlora-pipeline/qlora-sweep-member", "--deployment", help="the deployment each runs"
    ),
    timeout: float = typer.Option(86400.0, "--timeout", help="seconds to wait for the members"),
) -> None:
    """Run a sweep as one Prefect flow run per experiment on the work pool's workers, then
    collect, rank and apply the best here. Exit codes as `qlora sweep`."""
    from flows.sweep_fanout import main as sweep_main

    argv = [f"--set={spec}" for spec in set_]
    argv += ["--deployment", deployment, "--timeout", str(timeout)]
    argv += ["--name", name] if name else []
    argv += ["--registry", str(registry)] if registry else []
    argv += ["--promote"] if promote_ else []
    raise typer.Exit(sweep_main(argv))


def _fail(e: Exception) -> None:
    typer.echo(f"FAILED: {e}", err=True)
    raise typer.Exit(1)


def _registry(path: Path | None):
    from qlora.registry.store import Registry

    return Registry(path)


def _echo_recovery(reg) -> None:
    """Say what the registry's recovery did before this command wrote (it deletes nothing)."""
    for action in reg.recovered:
        typer.echo(f"registry recovery: {action}", err=True)


class _EchoHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        typer.echo(self.format(record), err=True)


def _echo_logger(name: str) -> logging.Logger:
    """A logger whose messages reach the terminal, for helpers that report by logging."""
    logger = logging.getLogger(name)
    if not logger.handlers:
        logger.addHandler(_EchoHandler())
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


@app.command()
def promote(
    registry: Path = REGISTRY_OPTION,
    ignore_champion: bool = typer.Option(
        False, "--ignore-champion", help="decide on the base gate alone (recorded as such)"
    ),
    wait: float = typer.Option(
        600.0, "--wait", min=0, help="seconds to wait for a pipeline run that holds the workspace"
    ),
) -> None:
    """Register the last run's adapter; it becomes champion if it passes both gates.

    It must pass the gate against its base and be no worse than the champion (gate.champion).
    Exit 0: promoted; 3: registered but rejected, the champion stays; 1: nothing registered.
    """
    from flows import dvc_workspace as ws
    from qlora.core.io import StageError
    from qlora.registry.promotion import promote as register

    reg = _registry(registry)
    try:
        root = ws.find_repo_root(Path("."))
    except ValueError as e:
        _fail(e)
    try:
        # The lock a flow run holds from its first stage to its promotion: without it a
        # finetune finishing meanwhile could be registered with the last run's metrics.
        with ws.workspace_lock(root, wait, _echo_logger("qlora.promote"), owner="qlora promote"):
            event = register(root, reg, ignore_champion)
    except ws.WorkspaceBusy as e:
        _fail(ws.WorkspaceBusy(f"{e}: nothing registered; promote when it ends, or --wait longer"))
    except StageError as e:  # ParamsError is one too
        _echo_recovery(reg)
        _fail(e)
    _echo_recovery(reg)
    where = reg.path(event["version"])
    typer.echo(event["summary"])
    for reason in event["reasons"]:
        typer.echo(f"  - {reason}")
    typer.echo(f"files: {where} (model card: {where / 'README.md'})")
    raise typer.Exit(0 if event["champion"] else EXIT_REJECTED)


@registry_app.command("list")
def registry_list(registry: Path = REGISTRY_OPTION) -> None:
    """Every registered version, oldest first, and where the champion alias points."""
    from qlora.core.io import StageError

    reg = _registry(registry)
    try:
        versions, history = reg.versions(), reg.champion_history()
    except StageError as e:
        _fail(e)
    if not versions:
        typer.echo(f"{reg.root}: no versions registered yet (`qlora promote`)")
        return
    champion = history[-1] if history else None
    typer.echo(
        f"{'version':<8} {'created':<26} {'decision':<9} {'primary':<26} {'vs base':>8}  git"
    )
    for v, r in versions.items():
        p = r["primary"]
        git = (r.get("git_commit") or "-")[:8] + ("+dirty" if r.get("git_dirty") else "")
        typer.echo(
            f"{v:<8} {r['created']:<26} {r['decision']:<9} "
            f"{p['metric'] + '=' + format(p['value'], '.4g'):<26} "
            f"{p['gain_over_base']:>+8.1%}  {git}" + ("   <- champion" if v == champion else "")
        )
    rollbacks = [e for e in reg.events() if e.get("event") == "alias"]
    for e in rollbacks:
        typer.echo(
            f"{e['created']}: champion {e['previous']} -> {e['version']} ({e['action']}"
            + (f": {e['reason']}" if e.get("reason") else "")
            + ")"
        )
    typer.echo(f"champion: {champion or 'none'} (history: {' -> '.join(history) or '-'})")


@registry_app.command("show")
def registry_show(
    version: str = typer.Argument(..., help="a version (v3) or champion"),
    registry: Path = REGISTRY_OPTION,
    as_json: bool = typer.Option(False, "--json", help="print the whole lineage.json"),
) -> None:
    """A version's decision with its reasons, metrics and lineage."""
    from qlora.core.io import StageError

    reg = _registry(registry)
    try:
        version = reg.resolve(version)
        record, lineage = reg.record(version), reg.lineage(version)
    except StageError as e:
        _fail(e)
    if as_json:
        typer.echo(json.dumps(lineage, indent=2, ensure_ascii=False))
        return
    git = lineage["git"]
    lock = lineage["dvc_lock"]
    data = [
        f"{o['path']} md5 {o.get('md5')}"
        for stage in ("base", "extract", "dataset")
        for o in (lock.get(stage, {}).get("outs") or [])
        if not o["path"].startswith("reports/")
    ]
    decision = lineage["decision"]
    lines = [
        f"version:   {version}" + ("  (champion)" if reg.champion() == version else ""),
        f"created:   {record['created']} by {record['by']}",
        f"decision:  {decision['summary']}",
        *[f"  - {r}" for r in decision["reasons"]],
        f"base gate: {decision['gate']['summary']}",
        f"vs champion ({decision['champion_before'] or 'none'}): "
        f"{decision['vs_champion']['summary']}",
        f"git:       {git.get('commit') or git.get('note')}"
        + (" (uncommitted changes)" if git.get("dirty") else ""),
        f"adapter:   {lineage['adapter']['path']} md5 {lineage['adapter']['dvc_md5']}",
        f"base weights sha256: {lineage['base_weights_sha256']}",
        "data:",
        *[f"  {d}" for d in data],
        f"evaluation inputs: {lineage['evaluation']['fingerprint']}",
        f"params:    {json.dumps(lineage['params'].get('finetune', {}))}",
        f"files:     {reg.path(version)} ({', '.join(sorted(record['files']))}, lineage.json)",
    ]
    typer.echo("\n".join(lines))


@registry_app.command("rollback")
def registry_rollback(
    version: str = typer.Argument(None, help="version to serve (default: the champion before)"),
    reason: str = typer.Option("", "--reason", help="why, recorded in the index"),
    registry: Path = REGISTRY_OPTION,
) -> None:
    """Move the champion alias back; the versions and their records stay as they are."""
    from qlora.core.io import StageError
    from qlora.registry.promotion import rollback

    reg = _registry(registry)
    try:
        event = rollback(reg, version, reason)
    except StageError as e:
        _echo_recovery(reg)
        _fail(e)
    _echo_recovery(reg)
    typer.echo(f"champion: {event['previous']} -> {event['version']} (rollback)")


@registry_app.command("verify")
def registry_verify(registry: Path = REGISTRY_OPTION) -> None:
    """Check every registered file against the hash recorded for it; list what recovery set
    aside (or will), which no version owns."""
    from qlora.core.io import StageError

    reg = _registry(registry)
    try:
        problems, leftovers = reg.verify(), reg.leftovers()
    except StageError as e:
        _fail(e)
    for p in problems:
        typer.echo(f"  - {p}")
    if leftovers:
        typer.echo("not part of any version (kept, never served; inspect, then delete by hand):")
        for note in leftovers:
            typer.echo(f"  * {note}")
    n = len(reg.versions())
    typer.echo(
        f"{reg.root}: {n} version(s), "
        + (f"{len(problems)} problem(s)" if problems else "all files intact")
    )
    raise typer.Exit(1 if problems else 0)


@app.command()
def export(
    version: str = typer.Argument(..., help="a version (v3) or champion"),
    merged: Path = typer.Option(None, "--merged", help="write the merged 16-bit model here"),
    adapter: Path = typer.Option(None, "--adapter", help="copy the adapter folder here"),
    gguf: Path = typer.Option(
        None, "--gguf", help="write GGUF files here (export.* params), with their parity check"
    ),
    dtype: str = typer.Option(
        None, "--dtype", help="bfloat16 | float16 | float32 (default: base.save_dtype)"
    ),
    base: Path = typer.Option(
        paths.BASE_MODEL_DIR, "--base", help="the base the adapter was trained on"
    ),
    registry: Path = REGISTRY_OPTION,
    replace: bool = typer.Option(
        False, "--replace", help="replace a previous export of the same kind in DIR (only one)"
    ),
) -> None:
    """Export a registered version: the adapter as is, or merged into its base.

    A folder with files in it is refused; --replace replaces it only when it holds nothing
    but a previous export's own files, unchanged (as the registry's index, or the merged
    export's export_check.json, lists them).
    """
    from qlora.core.io import StageError
    from qlora.registry.store import export_adapter

    if merged is None and adapter is None and gguf is None:
        _fail(ValueError("say what to export: --merged DIR, --adapter DIR and/or --gguf DIR"))
    reg = _registry(registry)
    try:
        version = reg.resolve(version)
        if gguf is not None:
            from qlora.export.registered import export_gguf

            outcome = export_gguf(reg, version, gguf, base, replace, (merged, adapter))
            for line in outcome["lines"]:
                typer.echo(line)
        # Each export checks its own folder before it writes; with both, the merged one is
        # checked before the adapter is written too.
        if merged is not None and adapter is not None:
            from qlora.models.merge import check_target

            check_target(merged, replace, (reg.root, base, adapter))
        if adapter is not None:
            export_adapter(reg, version, adapter, replace)
            typer.echo(f"{version}: adapter, model card and lineage in {adapter}")
        if merged is not None:
            from qlora.models.merge import export_merged

            broken = reg.check_version(version)
            if broken:
                raise StageError("; ".join(broken))
            base_params = reg.lineage(version)["params"]["base"]
            result = export_merged(
                reg.path(version),
                merged,
                base,
                dtype or base_params.get("save_dtype", "bfloat16"),
                bool(base_params.get("trust_remote_code", False)),
                replace,
                (reg.root, *([adapter] if adapter else [])),
            )
            e2e, limits = result["end_to_end"], result["limits"]
            typer.echo(
                f"{version}: merged {result['dtype']} model in {merged}; against base + adapter "
                f"on {result['prompts']} prompts: max KL {e2e['max_kl']:.3g} (limit "
                f"{limits['kl']:.3g}, {limits['kl_fraction_of_adapter']:g} of the adapter's "
                f"own KL of {result['adapter_effect']['max_kl']:.3g}), max |Δlogit| "
                f"{e2e['max_abs_logit_diff']:.3g}, top-1 agreement {e2e['top1_agreement']:.1%}"
            )
    except StageError as e:
        _fail(e)


VERSION_ARG = typer.Argument(
    None, help="champion or a registered version (v3); default: the adapter just trained"
)
BASE_OPTION = typer.Option(False, "--base", help="the 4-bit base alone, without an adapter")


@app.command()
def chat(
    version: str = VERSION_ARG,
    base: bool = BASE_OPTION,
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", help="longest answer, tokens"),
    registry: Path = REGISTRY_OPTION,
) -> None:
    """Talk to an adapter: a message per line, answers streamed as they are generated."""
    from qlora.core.io import StageError
    from qlora.core.params import load_params
    from qlora.talk import chat as chat_loop
    from qlora.talk import load_speaker

    try:
        speaker = load_speaker(load_params(), version, base, registry)
        chat_loop(speaker, sys.stdin, sys.stdout, max_new_tokens)
    except StageError as e:
        _fail(e)


@app.command()
def generate(
    prompts: Path = typer.Argument(
        ...,
        help='JSONL, a row per prompt: {"prompt": ..}, {"instruction": ..} or {"messages": [..]}',
    ),
    version: str = VERSION_ARG,
    base: bool = BASE_OPTION,
    output: Path = typer.Option(
        None, "--output", "-o", help="where the answers go (default: FILE.answers.jsonl)"
    ),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", help="longest answer, tokens"),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="prompts generated at once"),
    registry: Path = REGISTRY_OPTION,
) -> None:
    """Answer every prompt of a JSONL file; each row is written back with its "answer".

    Answers are appended a batch at a time; rerun the same command after an interruption and
    it resumes after the prompts already answered."""
    from qlora.core.io import StageError
    from qlora.core.params import load_params
    from qlora.talk import generate_file, load_speaker, read_prompts

    output = output or prompts.with_name(prompts.name.removesuffix(".jsonl") + ".answers.jsonl")
    try:
        rows = read_prompts(prompts)  # every row checked before a model is loaded
        speaker = load_speaker(load_params(), version, base, registry)
        resumed, generated = generate_file(speaker, rows, output, max_new_tokens, batch_size)
    except StageError as e:
        _fail(e)
    typer.echo(
        f"{resumed + generated} answers from {speaker.label} in {output}: "
        f"{resumed} resumed from an earlier run, {generated} generated"
    )


if __name__ == "__main__":
    app()
