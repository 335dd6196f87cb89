"""A sweep's leaderboard for people: a terminal table, Markdown and a self-contained HTML page
in the report's style (reports/sweep/leaderboard.{md,html}, beside the .json).

Values come from the experiments' own files; the names and params are the user's and are
escaped like any other untrusted text. Torch-free.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qlora.core import paths
from qlora.core.io import atomic_write_text, write_json
from qlora.report.text import fmt, fmt_bytes, fmt_duration, fmt_gain, md_text

COLUMNS = ("rank", "experiment", "params", "primary (95% CI)", "vs base", "gate", "train", "memory")


def interval(primary: dict) -> str:
    lo_hi = primary.get("interval")
    shown = fmt(primary.get("value"))
    return f"{shown} [{fmt(lo_hi[0])}, {fmt(lo_hi[1])}]" if lo_hi else shown


def change(primary: dict) -> str:
    ci = primary.get("change_ci95")
    text = fmt_gain(primary.get("relative_change"))
    return f"{text} (CI of the change [{fmt(ci[0])}, {fmt(ci[1])}])" if ci else text


def cells(row: dict) -> dict[str, str]:
    """One leaderboard row as text, column by column."""
    params = ", ".join(f"{k}={v}" for k, v in row["params"].items())
    if row["status"] != "done":
        return dict.fromkeys(COLUMNS, "") | {
            "rank": str(row["rank"]),
            "experiment": row["name"],
            "params": params,
            "gate": f"failed ({row.get('hint') or 'no results'})",
        }
    p = row["primary"]
    return {
        "rank": str(row["rank"]),
        "experiment": row["name"],
        "params": params,
        "primary (95% CI)": interval(p),
        "vs base": change(p),
        "gate": str(row["decision"]),
        "train": fmt_duration(row.get("train_seconds")),
        "memory": fmt_bytes(row.get("peak_memory_bytes")),
    }


def headline(board: dict) -> str:
    best = board["best"]
    n = board["experiments"]
    if best is None:
        return f"{n} experiments, none promoted by the gate: nothing to apply"
    return f"{n} experiments; best promoted by the gate: {best}"


def noise_lines(board: dict) -> list[str]:
    return [
        f"{', '.join(f'{k}={v}' for k, v in g['params'].items()) or 'the base settings'}: "
        f"{len(g['seeds'])} seeds, {board['primary']} mean {fmt(g['mean'])} "
        f"(sd {fmt(g['stdev'])}, {fmt(g['min'])} to {fmt(g['max'])}), "
        f"{g['passed']} of {len(g['seeds'])} passed the gate"
        for g in board["noise"]
    ]


def text_table(board: dict) -> str:
    """The leaderboard for a terminal: aligned columns, best first."""
    rows = [dict(zip(COLUMNS, COLUMNS, strict=True))] + [cells(r) for r in board["rows"]]
    widths = {c: max(len(r[c]) for r in rows) for c in COLUMNS}
    lines = ["  ".join(r[c].ljust(widths[c]) for c in COLUMNS).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * widths[c] for c in COLUMNS))
    extra = [f"primary metric: {board['primary']}", headline(board), *noise_lines(board)]
    return "\n".join(lines + [""] + extra) + "\n"


def markdown(board: dict) -> str:
    head = "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n"
    body = "".join(
        "| " + " | ".join(md_text(c[k]) for k in COLUMNS) + " |\n"
        for c in (cells(r) for r in board["rows"])
    )
    noise = "".join(f"- {md_text(line)}\n" for line in noise_lines(board))
    return (
        f"# Sweep {md_text(board['sweep'])}\n\n{md_text(headline(board))}. Primary metric: "
        f"{md_text(board['primary'])}; ranked by the gate's decision, then by it.\n\n"
        + head
        + body
        + (f"\n## Training noise (repeats over finetune.seed)\n\n{noise}" if noise else "")
    )


def html(board: dict) -> str:
    from qlora.report.build import template_environment

    template = template_environment(autoescape=True).get_template("sweep.html.j2")
    return template.render(
        board=board,
        columns=COLUMNS,
        rows=[(r, cells(r)) for r in board["rows"]],
        headline=headline(board),
        noise=noise_lines(board),
    )


def write(board: dict[str, Any], out_dir: Path = paths.SWEEP_DIR) -> list[Path]:
    """leaderboard.json, .md and .html under `out_dir`, each written whole."""
    out_dir = Path(out_dir)
    json_path = out_dir / paths.SWEEP_LEADERBOARD.name
    write_json(json_path, board)
    atomic_write_text(json_path.with_suffix(".md"), markdown(board))
    atomic_write_text(json_path.with_suffix(".html"), html(board))
    return [json_path, json_path.with_suffix(".md"), json_path.with_suffix(".html")]
