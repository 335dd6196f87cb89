"""A sweep's grid, its leaderboard and how the leaderboard reads (terminal, Markdown, HTML).

The leaderboard is built from `dvc exp show --json` shaped data made here, so every value
it shows is known: its ranking, its intervals and its noise summary are checked against
values computed independently in the test.
"""

from __future__ import annotations

import itertools
import math
import statistics

import pytest

from qlora.core.io import StageError
from qlora.report import sweep as sweep_report
from qlora.sweep import grid, leaderboard


# ---------------------------------------------------------------- the grid
def test_a_grid_is_every_combination_in_order_with_numbered_names():
    points = grid.expand(["finetune.learning_rate=1e-4,2e-4", "finetune.seed=range(1,4)"], "lr")
    expected = [
        (f"finetune.learning_rate={lr}", f"finetune.seed={seed}")
        for lr, seed in itertools.product(["0.0001", "0.0002"], [1, 2, 3])
    ]
    assert [p.overrides for p in points] == expected
    assert [p.name for p in points] == [f"lr-{i}" for i in range(1, 7)]
    assert points[4].value("finetune.seed") == "2"


def test_a_list_value_is_one_value_not_a_sweep():
    (point,) = grid.expand(["finetune.lora.target_modules=[q_proj,v_proj]"], "t")
    assert point.overrides == ("finetune.lora.target_modules=[q_proj,v_proj]",)


@pytest.mark.parametrize(
    ("specs", "name", "message"),
    [
        ([], "s", "at least one -S"),
        (["a=1,2", "a=3"], "s", "swept twice: a"),
        (["dvc.yaml:stages.x.cmd=evil,worse"], "s", "params.yaml keys"),
        (["novalue"], "s", "params.yaml keys"),
        (["a=1,2"], "../escape", "letters, digits"),
        (["a=range(0,300)"], "s", "at most 256"),
    ],
)
def test_a_bad_sweep_is_refused_naming_the_problem(specs, name, message):
    with pytest.raises(StageError, match=message):
        grid.expand(specs, name)


# ---------------------------------------------------------------- the leaderboard
def experiment(name, bpb, se, decision, lr, seed=1, seconds=60.0, memory=2_000_000_000):
    """One experiment as `dvc exp show --json` lists it."""
    metrics = {
        "reports/gate.json": {
            "data": {
                "decision": decision,
                "passed": decision == "promoted",
                "primary": {
                    "task": "docstring_loss",
                    "metric": "bits_per_byte",
                    "higher_is_better": False,
                    "base": 1.6,
                    "adapter": bpb,
                    "change": bpb - 1.6,
                    "relative_change": (1.6 - bpb) / 1.6,
                },
            }
        },
        "reports/eval/metrics.json": {
            "data": {
                "variants": {
                    "base_4bit": {
                        "metrics": {
                            "docstring_loss": {"bits_per_byte": {"value": 1.6, "stderr": 0.03}}
                        }
                    },
                    "adapter_4bit": {
                        "metrics": {
                            "docstring_loss": {"bits_per_byte": {"value": bpb, "stderr": se}}
                        }
                    },
                }
            }
        },
        "reports/train/metrics.json": {
            "data": {
                "train": {"runtime_s": seconds, "peak_memory_bytes": memory},
                "eval": {"loss": 3.0},
            }
        },
    }
    params = {"params.yaml": {"data": {"finetune": {"learning_rate": lr, "seed": seed}}}}
    return {
        "name": name,
        "revs": [
            {"rev": name + "-rev", "name": name, "data": {"metrics": metrics, "params": params}}
        ],
    }


def points(*rows):
    return [
        grid.Point(name, (f"finetune.learning_rate={lr}", f"finetune.seed={seed}"))
        for name, lr, seed in rows
    ]


KEYS = ["finetune.learning_rate", "finetune.seed"]


def test_promoted_experiments_rank_first_then_by_the_primary_metrics_direction():
    shown = [
        {
            "rev": "abc",
            "experiments": [
                experiment("s-1", 1.20, 0.05, "promoted", 1e-4),
                experiment("s-2", 1.05, 0.05, "rejected", 2e-4),  # best score, gate said no
                experiment("s-3", 1.10, 0.04, "promoted", 3e-4),
            ],
        }
    ]
    plan = points(("s-1", 1e-4, 1), ("s-2", 2e-4, 1), ("s-3", 3e-4, 1), ("s-4", 4e-4, 1))
    board = leaderboard.build("s", plan, KEYS, shown)
    assert [r["name"] for r in board["rows"]] == ["s-3", "s-1", "s-2", "s-4"]
    assert [r["rank"] for r in board["rows"]] == [1, 2, 3, 4]
    assert board["best"] == "s-3"
    assert board["failed"] == ["s-4"] and board["rows"][-1]["status"] == "failed"
    assert "failed (dvc queue logs s-4)" in sweep_report.text_table(board)
    hinted = leaderboard.build("s", plan, KEYS, shown, {"s-4": "flow run s-4 Crashed"})
    assert hinted["rows"][-1]["hint"] == "flow run s-4 Crashed"
    top = board["rows"][0]["primary"]
    assert top["interval"] == pytest.approx([1.10 - 1.96 * 0.04, 1.10 + 1.96 * 0.04])
    assert top["relative_change"] == pytest.approx((1.6 - 1.10) / 1.6)
    # The gate's interval of the change, from both standard errors (0.03 and 0.04: 0.05).
    assert top["change_ci95"] == pytest.approx([-0.5 - 1.96 * 0.05, -0.5 + 1.96 * 0.05])
    assert board["rows"][0]["params"] == {"finetune.learning_rate": "0.0003", "finetune.seed": "1"}
    assert board["primary"] == "docstring_loss/bits_per_byte"


def test_no_promoted_experiment_means_no_best():
    shown = [{"experiments": [experiment("s-1", 1.0, 0.1, "rejected", 1e-4)]}]
    board = leaderboard.build("s", points(("s-1", 1e-4, 1)), KEYS, shown)
    assert board["best"] is None
    assert "none promoted" in sweep_report.headline(board)


def test_repeats_over_the_seed_give_the_training_noise():
    values = {("a", 1): 1.10, ("a", 2): 1.16, ("a", 3): 1.07, ("b", 1): 1.30}
    lrs = {"a": 1e-4, "b": 2e-4}
    rows = [(f"s-{i}", lrs[k], seed) for i, (k, seed) in enumerate(values, start=1)]
    shown = [
        {
            "experiments": [
                experiment(n, values[(k, seed)], 0.05, "promoted", lrs[k], seed)
                for (n, _, _), (k, seed) in zip(rows, values, strict=True)
            ]
        }
    ]
    board = leaderboard.build("s", points(*rows), KEYS, shown)
    (group,) = board["noise"]  # "b" has one seed only: no spread to show
    a = [1.10, 1.16, 1.07]
    assert group["params"] == {"finetune.learning_rate": "0.0001"}
    assert sorted(group["seeds"]) == ["1", "2", "3"]
    assert group["mean"] == pytest.approx(sum(a) / 3)
    assert group["stdev"] == pytest.approx(math.sqrt(sum((x - sum(a) / 3) ** 2 for x in a) / 2))
    assert (group["min"], group["max"]) == (1.07, 1.16)
    assert statistics.fmean(a) == pytest.approx(group["mean"])


def test_the_leaderboard_escapes_what_users_named():
    evil = "<script>alert(1)</script>|**x**"
    shown = [{"experiments": [experiment("s-1", 1.1, 0.05, "promoted", 1e-4)]}]
    plan = [grid.Point("s-1", (f"finetune.run_name={evil}",))]
    board = leaderboard.build("s", plan, ["finetune.run_name"], shown)
    html = sweep_report.html(board)
    assert "<script>" not in html and "&lt;script&gt;" in html
    md = sweep_report.markdown(board)
    assert "<script>" not in md and "\\|" in md and "\\*\\*x" in md
    text = sweep_report.text_table(board)
    assert text.splitlines()[0].split() == [
        "rank",
        "experiment",
        "params",
        "primary",
        "(95%",
        "CI)",
        "vs",
        "base",
        "gate",
        "train",
        "memory",
    ]
    assert "1.1 [1.002, 1.198]" in text


def test_write_puts_three_whole_files_side_by_side(tmp_path):
    shown = [{"experiments": [experiment("s-1", 1.1, 0.05, "promoted", 1e-4)]}]
    board = leaderboard.build("s", points(("s-1", 1e-4, 1)), KEYS, shown)
    written = sweep_report.write(board, tmp_path / "sweep")
    assert [p.name for p in written] == ["leaderboard.json", "leaderboard.md", "leaderboard.html"]
    assert (tmp_path / "sweep/leaderboard.md").read_text().startswith("# Sweep s")
