"""Sweeps that end in a decision: a grid of params overrides run as DVC experiments, a
leaderboard of their gated results, and the best one applied and promoted.

    qlora sweep -S finetune.learning_rate=1e-4,2e-4 -S finetune.seed=1,2 --jobs 2 --promote

Each grid point is checked by the params schema first (a typo fails before anything is
queued), then queued as a named DVC experiment (`dvc exp run --queue -n <sweep>-<i> -S ...`)
and all of them run with `dvc exp run --run-all --jobs N`. DVC runs each one in its own
temporary copy of the repository, so the workspace is untouched meanwhile, and with the run
cache: an experiment reruns only the stages its params change (a finetune sweep trains and
evaluates the adapter; the bases' evaluations come from the cache).

Then `dvc exp show` gives every experiment's files; qlora/sweep/leaderboard.py ranks them
(the gate's decision first, then the primary metric) and reports/sweep/leaderboard.{json,md,
html} show the table. The best experiment the gate promoted is applied to the workspace
(`dvc exp apply`: its params, dvc.lock and outputs) and, with `promote`, registered through
the registry's champion/challenger check, as `qlora promote` does. A sweep in which the
gate promoted nothing changes nothing in the workspace.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flows import dvc_workspace as ws
from qlora.core import paths
from qlora.core.io import StageError
from qlora.report import sweep as sweep_report
from qlora.sweep import grid, leaderboard


def default_name() -> str:
    return time.strftime("sweep-%Y%m%d-%H%M%S")


def experiment_show(repo: Path, logger: logging.Logger | logging.LoggerAdapter) -> list[dict]:
    """`dvc exp show --json` of every baseline commit (a sweep's experiments may hang off an
    older one than HEAD once the workspace has moved on)."""
    done = ws.run_dvc(repo, ["exp", "show", "--json", "--all-commits"], logger, stream=False)
    text = "\n".join(done.lines)
    start = text.find("[")
    try:
        return json.loads(text[start:]) if start >= 0 else []
    except json.JSONDecodeError as e:
        raise StageError(f"`dvc exp show --json` printed no JSON ({e}): {text[:300]}") from None


def plan(
    repo: Path,
    specs: Sequence[str],
    name: str,
    logger: logging.Logger | logging.LoggerAdapter,
    allow_risky: bool = True,
) -> list[grid.Point]:
    """The sweep's experiments, every one checked before any is queued: each point's
    overrides pass the params schema (and the risky-change rule unless `allow_risky`), and no
    experiment of that name exists already."""
    points = grid.expand(list(specs), name)
    for point in points:
        try:
            ws.check_param_overrides(repo, point.overrides, allow_risky)
        except ws.OverrideRefused as e:
            where = f"sweep {name}: experiment {point.name} {list(point.overrides)}"
            raise StageError(f"{where}: {e}") from None
    taken = set(leaderboard.experiments_by_name(experiment_show(repo, logger)))
    clash = [p.name for p in points if p.name in taken]
    if clash:
        raise StageError(
            f"experiments named {', '.join(clash)} exist already: give the sweep another "
            "--name (or `dvc exp remove` them)"
        )
    return points


def run_local(
    repo: Path, points: list[grid.Point], jobs: int, logger: logging.Logger | logging.LoggerAdapter
) -> bool:
    """Queue every point, then run the queue with `jobs` workers. False when an experiment
    failed (the others still ran; the leaderboard names the failed ones)."""
    for point in points:
        sets = [f"--set-param={o}" for o in point.overrides]
        ws.run_dvc(repo, ["exp", "run", "--queue", "--name", point.name, *sets], logger)
    done = ws.run_dvc(repo, ["exp", "run", "--run-all", "--jobs", str(jobs)], logger, check=False)
    return done.returncode == 0


def collect(
    repo: Path,
    name: str,
    points: list[grid.Point],
    keys: list[str],
    logger: logging.Logger | logging.LoggerAdapter,
    hints: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The sweep's leaderboard from the experiments DVC holds, written under reports/sweep/
    (`hints`: per experiment, where to look when it failed)."""
    board = leaderboard.build(name, points, keys, experiment_show(repo, logger), hints)
    for path in sweep_report.write(board, repo / paths.SWEEP_DIR):
        logger.info("leaderboard: %s", path.relative_to(repo))
    return board


def apply_best(
    repo: Path, board: dict[str, Any], logger: logging.Logger | logging.LoggerAdapter
) -> str | None:
    """`dvc exp apply` the best promoted experiment: its params, dvc.lock and outputs become
    the workspace's. None (and nothing changed) when the gate promoted none."""
    best = board["best"]
    if best is None:
        logger.info("the gate promoted no experiment of the sweep: the workspace is unchanged")
        return None
    ws.run_dvc(repo, ["exp", "apply", best], logger)
    logger.info("applied %s to the workspace", best)
    return best


def run_sweep(
    repo_dir: Path | str,
    specs: Sequence[str],
    name: str | None = None,
    jobs: int = 1,
    promote: bool = False,
    registry_dir: str | None = None,
    wait_for_workspace_seconds: float = 600.0,
    logger: logging.Logger | logging.LoggerAdapter | None = None,
) -> dict[str, Any]:
    """The whole local sweep (module docstring); returns the leaderboard, with `applied`
    and `promotion` added. Holds the workspace throughout, as a pipeline run does."""
    logger = logger or logging.getLogger("qlora.sweep")
    repo = ws.find_repo_root(repo_dir)
    name = name or default_name()
    if jobs < 1:
        raise StageError(f"--jobs {jobs}: at least 1")
    with ws.workspace_lock(repo, wait_for_workspace_seconds, logger, owner=f"sweep {name}"):
        points = plan(repo, specs, name, logger)
        logger.info("sweep %s: %d experiment(s), %d at a time", name, len(points), jobs)
        start = time.perf_counter()
        all_ran = run_local(repo, points, jobs, logger)
        board = collect(repo, name, points, grid.swept_keys(list(specs)), logger)
        board["seconds"] = time.perf_counter() - start
        if not all_ran:
            logger.warning("experiments failed: %s", ", ".join(board["failed"]) or "see above")
        board["applied"] = apply_best(repo, board, logger)
        board["promotion"] = (
            ws.promote_if_passed(repo, registry_dir, logger)
            if promote and board["applied"]
            else None
        )
    return board
