"""One DVC workspace, driven from outside: its stages in DAG order, one DVC command at a
time, failures sorted into transient (worth a retry) and real (stop and say why), and the
repair a crashed run needs before the next one starts.

DVC stays the judge of what is stale: each stage runs as `dvc repro --single-item <stage>`
in the order `dvc repro` itself uses, so an unchanged stage is a no-op and `dvc.lock` records
exactly what ran. Nothing here knows the stage names: they come from dvc.yaml.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from filelock import FileLock, Timeout

from qlora.core import dvc, paths
from qlora.core.io import StageError, atomic_write_text, pipeline_env
from qlora.core.params import Params, ParamsError, load_params
from qlora.core.paths import EVAL_TASKS_DIR, PARAMS_FILE

# Every process a flow run starts carries this variable (inherited by the stage commands DVC
# starts), so the next run can find and stop what a crashed run left behind.
WORKSPACE_ENV = "QLORA_FLOW_WORKSPACE"
LOCK_FILE = "qlora-flow.lock"
OWNER_FILE = "qlora-flow.owner.json"

# A stage exits with 75 (EX_TEMPFAIL in sysexits.h) to say "temporary failure, try again";
# DVC reports it as "... exited with 75".
EX_TEMPFAIL = 75

# No telemetry, no progress-bar redraws in the logs, output as it happens.
# A progress bar redraws its line with "\r"; one redraw per interval reaches the log.
PROGRESS_LOG_INTERVAL_S = 30.0
# Seconds a stopped command gets to clean up (DVC releases its locks on SIGINT).
STOP_GRACE_S = 10.0
TAIL_LINES = 40

_STAGE_FAILED = re.compile(r"^\[(?P<stage>[^\]]+)\] FAILED: (?P<message>.*)$")
_EXIT_STATUS = re.compile(r"failed to run: .*, exited with (?P<code>-?\d+)")
# The last line of a Python traceback: "package.SomeError: message" (or the bare type).
_EXCEPTION_LINE = re.compile(
    r"^(?P<type>[A-Za-z_][\w.]*(?:Error|Exception|Timeout|timeout|Disconnected|IncompleteRead"
    r"|gaierror))(?::\s*(?P<message>.*))?$"
)
TRANSIENT_EXCEPTIONS = frozenset(
    {
        "ConnectionError",
        "ConnectionResetError",
        "ConnectionRefusedError",
        "ConnectionAbortedError",
        "BrokenPipeError",
        "TimeoutError",
        "timeout",
        "gaierror",
        "ReadTimeout",
        "ConnectTimeout",
        "ReadTimeoutError",
        "ConnectTimeoutError",
        "MaxRetryError",
        "NewConnectionError",
        "ProtocolError",
        "RemoteDisconnected",
        "IncompleteRead",
        "ChunkedEncodingError",
        "ServerDisconnectedError",
        "ClientConnectorError",
        "ClientOSError",
        "ServiceUnavailable",
        "TooManyRequests",
        # botocore (an S3 DVC remote): the endpoint is unreachable or did not answer.
        "EndpointConnectionError",
    }
)
# Network and lock trouble in the text of an exception or of a DVC "ERROR:" line. Only those
# lines are read: a stage's own output may quote data that happens to contain these words.
# An S3 remote's failures reach DVC's "ERROR:" line as botocore's text only (no exception
# type): "Could not connect to the endpoint URL: ..." (measured with dvc-s3 3.3.0 against a
# closed port; without this a `dvc push` to an unreachable remote was a real failure and never
# retried), and "An error occurred (SlowDown) when calling the PutObject operation", S3's codes
# for "retry later" once botocore's own retries are spent.
_TRANSIENT_TEXT = re.compile(
    r"connection (?:reset|refused|aborted|timed out|error)|cannot connect|could not connect|"
    r"temporary failure in name resolution|name or service not known|network is unreachable|"
    r"timed out|\b(?:429|500|502|503|504)\b[^\n]*error|too many requests|service unavailable|"
    r"bad gateway|gateway time-?out|unable to acquire lock|is busy, it is being blocked by|"
    r"an error occurred \((?:SlowDown|InternalError|ServiceUnavailable|RequestTimeout|"
    r"Throttling|ThrottlingException|RequestLimitExceeded)\)",
    re.IGNORECASE,
)


class DvcCommandFailed(RuntimeError):
    """A DVC command failed for a reason a retry will not fix (bad data, a diverged run, a
    bug): the message names the stage's own complaint, the tail shows the context."""

    def __init__(self, command: Sequence[str], returncode: int, reason: str, tail: str):
        self.command = list(command)
        self.returncode = returncode
        self.reason = reason
        self.tail = tail
        shown = " ".join(["dvc", *command])
        super().__init__(f"`{shown}` failed (exit {returncode}): {reason}\n{tail}")


class TransientDvcFailure(DvcCommandFailed):
    """A DVC command failed for a reason that may pass (network, a busy lock): retry it."""


class WorkspaceBusy(RuntimeError):
    """Another pipeline run holds this workspace."""


@dataclass
class CommandResult:
    returncode: int
    lines: list[str] = field(default_factory=list)


def find_repo_root(path: Path | str | None) -> Path:
    """The DVC repository at `path`; by default the one around the working directory (as
    `dvc` finds it), else the checkout this package lives in."""
    if path is None:
        here = Path.cwd().resolve()
        around = (p for p in (here, *here.parents) if (p / ".dvc").is_dir())
        path = next(around, Path(__file__).resolve().parents[1])
    root = Path(path).expanduser().resolve()
    if not (root / ".dvc").is_dir():
        raise ValueError(f"{root} is not a DVC repository (no .dvc/ directory): run `dvc init`")
    if not (root / dvc.DAG).is_file():
        raise ValueError(f"{root}/dvc.yaml not found: there is no pipeline to run")
    return root


def pipeline_stages(repo_dir: Path) -> list[str]:
    """Stage names of dvc.yaml in the order `dvc repro` runs them (upstream first).

    Uses DVC's own graph and planner, so there is no second copy of the DAG: dvc.yaml
    (including foreach/matrix stages, nested dvc.yaml files, frozen stages) is read by DVC.
    """
    from dvc.exceptions import DvcException
    from dvc.repo import Repo
    from dvc.repo.reproduce import get_active_graph, plan_repro
    from dvc.stage import PipelineStage

    try:
        with Repo(os.fspath(repo_dir)) as repo:
            planned = plan_repro(get_active_graph(repo.index.graph))
            root = repo.root_dir
            names = []
            for stage in planned:
                # Stages of `.dvc` files track data, they run no command.
                if not isinstance(stage, PipelineStage):
                    continue
                dvcfile = os.path.relpath(stage.path, root)
                names.append(stage.name if dvcfile == "dvc.yaml" else f"{dvcfile}:{stage.name}")
    except DvcException as e:
        raise ValueError(f"{repo_dir}: DVC cannot read the pipeline: {e}") from e
    return names


def classify_failure(lines: Sequence[str]) -> tuple[bool, str]:
    """(transient?, reason) for the output of a failed DVC command.

    A stage that reports "[stage] FAILED: ..." (a StageError) has judged its own failure:
    bad data or a bad run, not retried, unless it exited with EX_TEMPFAIL. An uncaught network
    exception, or a DVC error about the network or a busy lock, is transient. Anything else is
    treated as real: retrying a crash that was not recognised as passing only delays the
    report.
    """
    stripped = [line.strip() for line in lines if line.strip()]
    stage_failed = next((m for m in map(_STAGE_FAILED.match, reversed(stripped)) if m), None)
    exit_codes = [int(m["code"]) for m in map(_EXIT_STATUS.search, stripped) if m]
    if exit_codes and exit_codes[-1] == EX_TEMPFAIL:
        reason = stage_failed.group(0) if stage_failed else "the stage reported a temporary error"
        return True, reason
    if stage_failed:
        return False, stage_failed.group(0)
    errors = [line for line in stripped if line.startswith("ERROR:") or _EXCEPTION_LINE.match(line)]
    for line in reversed(errors):
        m = _EXCEPTION_LINE.match(line)
        if m and m["type"].rsplit(".", 1)[-1] in TRANSIENT_EXCEPTIONS:
            return True, line
        if _TRANSIENT_TEXT.search(line):
            return True, line
    if errors:
        return False, errors[-1]
    return False, stripped[-1] if stripped else "no output"


def child_env(repo_dir: Path) -> dict[str, str]:
    env = pipeline_env()
    env[WORKSPACE_ENV] = str(repo_dir)
    return env


def run_dvc(
    repo_dir: Path,
    args: Sequence[str],
    logger: logging.Logger | logging.LoggerAdapter,
    *,
    check: bool = True,
    stream: bool = True,
) -> CommandResult:
    """Run `dvc <args>` in the workspace, log its output line by line, raise on failure.

    stdout and stderr are merged so the log reads in order; with `stream=False` the output
    is collected without logging (for JSON). If this thread is interrupted (Ctrl-C, Prefect
    cancelling the run), the command and everything it started are stopped before the
    exception goes on, so no stage keeps writing into the workspace behind the next run.
    """
    cmd = dvc.command(*args)
    result = CommandResult(returncode=-1)
    last_progress = 0.0
    proc = subprocess.Popen(
        cmd,
        cwd=repo_dir,
        env=child_env(repo_dir),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if stream else subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        if not stream:
            out, err = proc.communicate()
            result.lines = (out + err).decode("utf-8", "replace").splitlines()
        else:
            # newline="" keeps "\r", so a progress bar's redraws can be told from lines.
            reader = io.TextIOWrapper(proc.stdout, encoding="utf-8", errors="replace", newline="")
            for raw in reader:
                line = raw.rstrip("\r\n")
                if raw.endswith("\r") and not raw.endswith("\r\n"):
                    now = time.monotonic()
                    if now - last_progress < PROGRESS_LOG_INTERVAL_S:
                        continue
                    last_progress = now
                if line.strip():
                    logger.info(line)
                    result.lines.append(line)
            proc.wait()
    except BaseException:
        stop_process_tree([proc.pid], logger, reason="the flow run was interrupted")
        raise
    finally:
        if proc.stdout:
            proc.stdout.close()
        if proc.stderr:
            proc.stderr.close()
    result.returncode = proc.returncode
    if check and result.returncode != 0:
        transient, reason = classify_failure(result.lines)
        tail = "\n".join(result.lines[-TAIL_LINES:])
        error = TransientDvcFailure if transient else DvcCommandFailed
        raise error(list(args), result.returncode, reason, tail)
    return result


def dvc_status(repo_dir: Path, logger: logging.Logger | logging.LoggerAdapter) -> dict:
    """`dvc status --json`: {} when every stage is up to date, else what changed per stage."""
    done = run_dvc(repo_dir, ["status", "--json"], logger, stream=False)
    text = "\n".join(done.lines)
    try:
        return dvc.parse_status(text)
    except StageError as e:
        raise DvcCommandFailed(["status", "--json"], 0, str(e), text) from e


# What `dvc status` says of data that is merely absent here (a fresh clone), not changed.
_ABSENT = frozenset({"deleted", "not in cache"})


def ignore_absent_data(status: dict) -> dict:
    """`dvc status` without entries that only say an output (or the dependency it feeds) is
    not in this workspace: with a DVC remote, `dvc repro --pull` fetches such data rather
    than rebuilding it, so a fresh clone is not a change. Edited params, code or data stay."""
    kept: dict = {}
    for stage, changes in status.items():
        real = []
        for change in changes:
            if not isinstance(change, dict):
                real.append(change)
                continue
            entry = {}
            for kind, what in change.items():
                if kind in ("changed outs", "changed deps") and isinstance(what, dict):
                    what = {
                        path: how
                        for path, how in what.items()
                        if not (isinstance(how, str) and how in _ABSENT)
                    }
                    if not what:
                        continue
                entry[kind] = what
            if entry:
                real.append(entry)
        if real:
            kept[stage] = real
    return kept


def describe_status(status: dict) -> list[str]:
    """One readable line per stale stage, e.g. "train: changed params.yaml (train.r)"."""
    out = []
    for stage, changes in status.items():
        parts = []
        for change in changes:
            if isinstance(change, str):
                parts.append(change)
                continue
            for kind, what in change.items():
                if isinstance(what, dict):
                    files = []
                    for path, detail in what.items():
                        keys = ", ".join(detail) if isinstance(detail, dict) else detail
                        files.append(f"{path} ({keys})")
                    parts.append(f"{kind}: {'; '.join(files)}")
                else:
                    parts.append(f"{kind}: {what}")
        out.append(f"{stage}: {' | '.join(parts) or 'changed'}")
    return out


# ---- param overrides: untrusted input -----------------------------------------------------

# Set to 1 where the worker starts, or in a deployment's job variables (prefect.yaml), to let
# runs change the keys of `risky_changes`: whoever may start a run must not get to run code
# on the worker. A flow parameter would not do: the run's starter sets those.
ALLOW_RISKY_ENV = "QLORA_ALLOW_RISKY_OVERRIDES"
# The accelerate launcher configs that ship with the project (finetune.accelerate_config).
ACCELERATE_CONFIGS = Path("configs/accelerate")
# Values naming an input: a path anywhere on the worker, or any id on the hub.
_SOURCE_KEYS = {
    "base.source": "names the base model: a folder anywhere on the worker or any hub id",
    "base.revision": "picks the hub commit the base model is downloaded at",
    "dataset.source": "names the raw data: a file anywhere on the worker or any hub id",
}


class OverrideRefused(ParamsError):
    """An override that is not allowed or not valid; params.yaml was left as it was."""


def apply_param_overrides(
    repo_dir: Path, overrides: Sequence[str], allow_risky: bool = False
) -> dict[str, list[str]]:
    """Apply `key=value` overrides of params.yaml with DVC's own code for `dvc exp run -S`.

    Same grammar as `-S` (Hydra override syntax), minus what an untrusted run must not do:
    only params.yaml (dvc.yaml and the rest are code), no added or deleted keys, no
    `${...}` interpolation (it would copy the worker's environment in). The result must
    pass the params schema (qlora/core/params.py), and a change of `risky_changes` needs
    `allow_risky`. Only then is params.yaml replaced, atomically; a refusal leaves it
    byte-identical. Returns the overrides grouped by params file, as `dvc exp run` does.
    """
    items, text = check_param_overrides(repo_dir, overrides, allow_risky)
    atomic_write_text(repo_dir / PARAMS_FILE, text)
    return {str(PARAMS_FILE): items}


def check_param_overrides(
    repo_dir: Path, overrides: Sequence[str], allow_risky: bool = False
) -> tuple[list[str], str]:
    """Every check of `apply_param_overrides`, with nothing written: the overrides without
    their file prefix, and the text params.yaml would have. Raises OverrideRefused."""
    items = _params_yaml_items(repo_dir, overrides)
    _check_grammar(items)
    path = repo_dir / PARAMS_FILE
    before = load_params(path)
    text, after = _overridden(path, items)
    risky = risky_changes(before, after, repo_dir)
    if risky and not allow_risky:
        raise OverrideRefused(
            f"{PARAMS_FILE} left unchanged: {'; '.join(risky)}. These keys run code or reach "
            f"outside the project: a deployment allows them with {ALLOW_RISKY_ENV}=1 where "
            f"its worker starts or in its job variables (prefect.yaml); `qlora flow run` "
            f"allows them"
        )
    return items, text


def _params_yaml_items(repo_dir: Path, overrides: Sequence[str]) -> list[str]:
    """The overrides without their file prefix; one naming any file but params.yaml is
    refused (`dvc.yaml:stages.x.cmd=...` would be a command run on the worker)."""
    from dvc.utils.cli_parse import to_path_overrides

    params_file = (repo_dir / PARAMS_FILE).resolve()
    items = []
    for rel, group in to_path_overrides(list(overrides)).items():
        if (repo_dir / rel).resolve() != params_file:
            raise OverrideRefused(
                f"{rel}: only {PARAMS_FILE} can be overridden, not {rel} ({group}); "
                f"{PARAMS_FILE} left unchanged"
            )
        items += group
    return items


def _check_grammar(items: list[str]) -> None:
    """Refuse what `-S` allows but a run must not do (checked before DVC edits anything)."""
    from dvc.utils.hydra import to_hydra_overrides
    from hydra.errors import OverrideParseException

    for item in items:
        try:
            (parsed,) = to_hydra_overrides([item])
        except OverrideParseException as e:
            raise OverrideRefused(f"{item!r} is not a `key=value` override: {e}") from None
        key = parsed.get_key_element()
        if parsed.is_add() or parsed.is_force_add() or parsed.is_delete():
            # Every key of the schema is required and none may be added: a new or missing
            # key is a typo or an attempt, and params.yaml is where keys are edited.
            raise OverrideRefused(
                f"{key}: {item!r} adds or deletes a key; an override only sets keys that "
                f"{PARAMS_FILE} has"
            )
        if parsed.is_sweep_override():
            raise OverrideRefused(
                f"{key}: {item!r} is a sweep; an override sets one value (queue a sweep with "
                f"`dvc exp run --queue`)"
            )
        # OmegaConf resolves `${...}` (`${oc.env:SECRET}` copies the worker's environment
        # into params.yaml, and so into the data and reports). Hydra's escapes turn `$\{`
        # into `${` after parsing, so checking for `${` is not enough; no escape of its
        # grammar makes a `$`, so refusing every `$` in the raw value refuses them all.
        if "$" in item.partition("=")[2]:
            raise OverrideRefused(
                f"{key}: {item!r} holds `$`, which OmegaConf reads as ${{...}} interpolation "
                f"(it would write the worker's environment or other values into "
                f"{PARAMS_FILE}); give the value itself, without `$`"
            )


def _overridden(path: Path, items: list[str]) -> tuple[str, Params]:
    """The text of params.yaml with the overrides applied, and its checked values: DVC edits
    a copy (it keeps the comments), the schema reads that copy."""
    from dvc.exceptions import DvcException
    from dvc.utils.hydra import apply_overrides

    with tempfile.TemporaryDirectory(prefix="qlora-overrides-") as tmp:
        copy = Path(tmp) / path.name
        shutil.copyfile(path, copy)
        try:
            apply_overrides(copy, items)
            return copy.read_text(encoding="utf-8"), load_params(copy)
        except DvcException as e:
            cause = f": {e.__cause__}" if e.__cause__ else ""
            raise OverrideRefused(
                f"{PARAMS_FILE}: cannot apply {items}: {e}{cause}; {PARAMS_FILE} left unchanged"
            ) from None
        except ParamsError as e:
            # The copy's name means nothing to the user: the file they override does.
            message = str(e).replace(str(copy), str(PARAMS_FILE))
            raise OverrideRefused(
                f"{message}\n(after the overrides {items}; {PARAMS_FILE} left unchanged)"
            ) from None


def risky_changes(before: Params, after: Params, repo_dir: Path) -> list[str]:
    """One "key: why" line per change that runs code, reads from or sends to outside the
    project, or decides promotion: a new source, remote code turned on, the gate's rules,
    trackers, a launcher config or lm-eval task from elsewhere.
    Values the project already had, or ships (data/eval_tasks, configs/accelerate), are no
    risk. Compared on the checked values, so a whole section given at once counts too."""
    found = [
        f"{key}: {why}"
        for key, why in _SOURCE_KEYS.items()
        if _value(before, key) != _value(after, key)
    ]
    if after.base.trust_remote_code and not before.base.trust_remote_code:
        found.append("base.trust_remote_code: runs Python code from the model repository")
    if after.gate != before.gate:
        found.append(
            "gate: its rules decide which adapter is promoted and served (a run could lift "
            "every regression limit or pick the metric that decides)"
        )
    if after.finetune.report_to != before.finetune.report_to:
        found.append(
            "finetune.report_to: sends the run's metrics to outside trackers with the "
            "worker's credentials"
        )
    config = after.finetune.accelerate_config
    if config != before.finetune.accelerate_config and config is not None:
        shipped = (repo_dir / ACCELERATE_CONFIGS).resolve()
        if not (repo_dir / config).resolve().is_relative_to(shipped):
            found.append(
                f"finetune.accelerate_config: {config!r} is not in {ACCELERATE_CONFIGS} "
                f"(a launcher config can send the training processes to other hosts)"
            )
    new_tasks = [t for t in after.evaluate.tasks if t not in before.evaluate.tasks]
    if new_tasks:
        local = _local_tasks(repo_dir)
        found += [
            f"evaluate.tasks: {task!r} is not a task of {EVAL_TASKS_DIR} (a task file "
            f"imports Python from beside it; a built-in task reads its data from the hub)"
            for task in new_tasks
            if task not in local
        ]
    return found


def _value(params: Params, key: str) -> Any:
    return functools.reduce(getattr, key.split("."), params)


def _local_tasks(repo_dir: Path) -> set[str]:
    """Names of the lm-eval tasks in data/eval_tasks, indexed by lm-eval itself (as the
    evaluate stage finds them); indexing reads the YAML files only, it imports nothing."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(repo_dir / EVAL_TASKS_DIR), include_defaults=False)
    return set(manager.all_tasks)


def stage_result(stage: str, lines: Sequence[str]) -> str:
    """What DVC did with one stage, from its own log lines."""
    text = "\n".join(lines)
    if f"Running stage '{stage}'" in text:
        return "ran"
    if f"Stage '{stage}' is cached" in text:
        return "restored from run cache"
    if f"Pulling data for stage: '{stage}'" in text:
        return "pulled from remote"
    return "up to date"


# ---- one flow run per workspace, and the repair after a crashed one --------------------


@contextlib.contextmanager
def workspace_lock(
    repo_dir: Path,
    wait_seconds: float,
    logger: logging.Logger | logging.LoggerAdapter,
    owner: str = "",
) -> Iterator[None]:
    """Hold the workspace for one flow run; wait up to `wait_seconds` for another to end.

    An OS file lock (released by the kernel when its process dies, however it dies), so a
    crashed run never leaves it behind.
    """
    tmp = repo_dir / ".dvc" / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    lock = FileLock(tmp / LOCK_FILE)
    owner_file = tmp / OWNER_FILE
    try:
        lock.acquire(timeout=0)
    except Timeout:
        holder = _read_owner(owner_file)
        logger.info("waiting up to %.0f s for the workspace, held by %s", wait_seconds, holder)
        try:
            lock.acquire(timeout=wait_seconds, poll_interval=1.0)
        except Timeout:
            raise WorkspaceBusy(
                f"{repo_dir}: another pipeline run still holds the workspace after "
                f"{wait_seconds:.0f} s ({holder}); runs of one workspace never overlap"
            ) from None
    try:
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "owner": owner,
        }
        owner_file.write_text(json.dumps(info))
        yield
    finally:
        with contextlib.suppress(OSError):
            owner_file.unlink()
        lock.release()


def _read_owner(path: Path) -> str:
    try:
        info = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return "an unknown process"
    return (
        f"pid {info.get('pid')} on {info.get('host')} since {info.get('since')} {info.get('owner')}"
    )


def stop_process_tree(
    pids: Sequence[int],
    logger: logging.Logger | logging.LoggerAdapter,
    reason: str,
    grace: float = STOP_GRACE_S,
) -> list[int]:
    """SIGINT the processes and their descendants (DVC cleans up on it), SIGKILL stragglers."""
    procs: list[psutil.Process] = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            procs += [proc, *proc.children(recursive=True)]
    if not procs:
        return []
    logger.warning("stopping %d process(es): %s", len(procs), reason)
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(2)  # SIGINT, as Ctrl-C would
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=grace)
    return [p.pid for p in procs]


def _leftover_processes(repo_dir: Path) -> list[psutil.Process]:
    """Processes started by an earlier run of this workspace that are still alive."""
    me = psutil.Process()
    mine = {me.pid, *(p.pid for p in me.parents())}
    found = []
    for proc in psutil.process_iter():
        if proc.pid in mine:
            continue
        try:
            if proc.environ().get(WORKSPACE_ENV) == str(repo_dir):
                found.append(proc)
        except (psutil.Error, OSError):
            continue  # gone, a zombie, or not ours to read
    return found


def _dvc_processes_in(repo_dir: Path) -> list[str]:
    """Live DVC commands (anyone's) whose working directory is this workspace."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if proc.pid == os.getpid():
            continue
        cmdline = proc.info.get("cmdline") or []
        if not any(Path(arg).name == "dvc" for arg in cmdline):
            continue
        try:
            cwd = Path(proc.cwd()).resolve()
        except (psutil.Error, OSError):
            found.append(f"pid {proc.pid} (working directory unreadable)")
            continue
        if cwd == repo_dir or cwd.is_relative_to(repo_dir):
            found.append(f"pid {proc.pid}: {' '.join(cmdline)}")
    return found


def _hardlink_lock_enabled(repo_dir: Path) -> bool:
    from dvc.config import Config

    return bool(Config(dvc_dir=os.fspath(repo_dir / ".dvc"))["core"].get("hardlink_lock", False))


def repair_workspace(repo_dir: Path, logger: logging.Logger | logging.LoggerAdapter) -> list[str]:
    """Make the workspace usable after a crashed or cancelled run. Call with the lock held.

    - Commands a dead run started (found by WORKSPACE_ENV) are stopped: they would otherwise
      write stage outputs while the new run rebuilds the same ones.
    - DVC's default locks need nothing: they are OS file locks (gone with their process) and
      DVC drops rwlock entries of dead PIDs itself. With `core.hardlink_lock` (network file
      systems) a killed DVC leaves `.dvc/tmp/lock` behind for good; it is removed here, but
      only when no DVC process is running in this workspace.
    - Half-run stages need nothing: DVC writes dvc.lock only after a stage succeeds, so the
      next `dvc repro` reruns exactly the stage that was cut off and what depends on it.
    """
    notes = []
    leftovers = _leftover_processes(repo_dir)
    if leftovers:
        stopped = stop_process_tree(
            [p.pid for p in leftovers], logger, reason="left running by a crashed earlier run"
        )
        notes.append(f"stopped {len(stopped)} process(es) left by an earlier run")
    if _hardlink_lock_enabled(repo_dir):
        tmp = repo_dir / ".dvc" / "tmp"
        stale = [tmp / "lock", tmp / "rwlock.lock"]
        # flufl claim files: an md5 hex name, hard-linked to the lock while it is held.
        stale += [p for p in tmp.glob("*.lock") if re.fullmatch(r"[0-9a-f]{32}\.lock", p.name)]
        stale = [p for p in stale if p.exists()]
        if stale:
            busy = _dvc_processes_in(repo_dir)
            if busy:
                logger.info("DVC lock files are held by a running DVC command: %s", busy)
            else:
                for path in stale:
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
                notes.append(f"removed stale DVC lock files: {[p.name for p in stale]}")
    for note in notes:
        logger.warning(note)
    return notes


def promote_if_passed(
    repo_dir: Path, registry_dir: str | None, logger: logging.Logger | logging.LoggerAdapter
) -> dict[str, Any]:
    """Register the workspace's adapter if its gate passed; it becomes champion only if it
    also holds up against the current champion (the registry decides, under its own lock).
    Called while the caller holds the workspace."""
    from qlora.core.io import read_json
    from qlora.registry.promotion import promote
    from qlora.registry.store import Registry, default_dir

    gate = read_json(repo_dir / paths.GATE_REPORT)
    if not gate.get("passed"):
        logger.info("not promoted, the gate rejected the adapter: %s", gate.get("summary"))
        return {"version": None, "champion": False, "summary": gate.get("summary")}
    registry = Registry(Path(registry_dir) if registry_dir else repo_dir / default_dir())
    event = promote(repo_dir, registry)
    for note in registry.recovered:  # what an interrupted writer left, set aside, not deleted
        logger.warning("registry recovery: %s", note)
    logger.info("%s (registry %s)", event["summary"], registry.root)
    for reason in event["reasons"]:
        logger.info("  %s", reason)
    return {k: event[k] for k in ("version", "champion", "summary")}
