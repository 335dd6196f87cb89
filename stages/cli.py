"""`qlora`: the project's one command-line program.

qlora run                 run the pipeline (`dvc repro`) and print each stage's time
qlora validate PATH       check a dataset file before training on it
qlora flow run [--set k=v]  run the pipeline as a Prefect flow
"""

from __future__ import annotations

import re
import subprocess
import sys
import time

import typer

from stages.io import pipeline_env

app = typer.Typer(help=__doc__, no_args_is_help=True, add_completion=False)
flow_app = typer.Typer(help="Prefect flows that drive the DVC pipeline.", no_args_is_help=True)
app.add_typer(flow_app, name="flow")

# Searched, not matched: a progress bar that ends without a newline can precede it.
_DONE = re.compile(r"\[(?P<stage>[\w-]+)\] done in (?P<seconds>[\d.]+) s\s*$")


def repro(args: list[str]) -> tuple[int, dict[str, float]]:
    """Run `dvc repro`, streaming its output, and collect each stage's reported time."""
    timings: dict[str, float] = {}
    cmd = [sys.executable, "-m", "dvc", "repro", *args]
    with subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=pipeline_env()
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
    if timings:
        typer.echo("\nstage times:")
        for name, seconds in timings.items():
            typer.echo(f"  {name:<10} {seconds:8.1f} s")
    typer.echo(f"  {'total':<10} {total:8.1f} s (wall, including DVC)")
    if code == 0 and not timings:
        typer.echo("nothing to run: every stage is up to date")
    if code == 0:
        typer.echo("reports: reports/report.html, reports/report.md, reports/gate.json")
    raise typer.Exit(code)


@app.command()
def validate(
    path: str = typer.Argument(..., help="dataset file: .jsonl, .json, .csv or .parquet"),
    fmt: str = typer.Option("auto", "--format", help="auto|alpaca|chat|prompt_completion"),
    tokenizer: str = typer.Option(None, "--tokenizer", help="tokenizer dir for length checks"),
    max_length: int = typer.Option(None, "--max-length", help="max tokens (default: params)"),
) -> None:
    """Check a dataset file; exit 0 if it passes, 1 with every failed check if not."""
    from stages.validate import cli_validate

    raise typer.Exit(cli_validate(path, fmt, tokenizer, max_length))


@app.command()
def report(
    compare: str = typer.Option(None, "--compare", help="git revision to compare against"),
) -> None:
    """Render reports/report.html and report.md again, optionally beside an older revision."""
    from stages.io import run_stage
    from stages.report import main as report_main

    run_stage("report", lambda: report_main(compare_rev=compare))


@flow_app.command("run")
def flow_run(
    set_: list[str] = typer.Option(None, "--set", "-S", help="override a param: key=value"),
    only_if_changed: bool = typer.Option(
        False, "--only-if-changed", help="end at once when `dvc status` finds nothing stale"
    ),
) -> None:
    """Run the pipeline as a Prefect flow; overrides run as a recorded DVC experiment."""
    from flows.pipeline import main as flow_main

    argv = [f"--set={kv}" for kv in set_ or []]
    raise typer.Exit(flow_main(argv + (["--only-if-changed"] if only_if_changed else [])))


if __name__ == "__main__":
    app()
