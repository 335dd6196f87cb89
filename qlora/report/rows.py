"""The report's row browser: every test row of a generation task, each variant's answer and
scores, and the change the adapter made against the 4-bit base it was trained on.

A row is "worse" when the adapter's ROUGE-L is below the 4-bit base's (chrF breaks a tie),
"better" the other way round, else "same". The page orders and filters the rows with CSS
alone (a `:target` view per link, `order` from each row's rank), so it stays a file with no
scripts: a reviewer clicks "worse first" or "only worse" and sees the rows the adapter made
worse. Very large test sets are cut to ROW_CAP rows (the worst first) with a note; every
row stays in reports/eval/generations.json.
"""

from __future__ import annotations

from qlora.core.paths import BASELINE, CANDIDATE, VARIANTS
from qlora.evaluation.generation import METRICS
from qlora.schemas.metrics import EvalGenerations, VariantResult

# 40 rows make ~60 KB of HTML; a few hundred stay a page a browser opens at once.
ROW_CAP = 500
METRIC_LABELS = {"rouge_l": "ROUGE-L", "chrf": "chrF"}


def _change(row, metric: str) -> float:
    return row.scores[CANDIDATE][metric] - row.scores[BASELINE][metric]


def _status(changes: tuple[float, ...]) -> str:
    # Lexicographic: the first metric decides, the next breaks its ties.
    for change in changes:
        if change < 0:
            return "worse"
        if change > 0:
            return "better"
    return "same"


def rows_section(
    generations: EvalGenerations | None, variants: dict[str, VariantResult]
) -> dict | None:
    """The first generation task's rows as the template shows them (None without one)."""
    if generations is None or not generations.tasks:
        return None
    task, rows = next(iter(generations.tasks.items()))
    views = []
    for i, row in enumerate(rows):
        changes = tuple(_change(row, m) for m in METRICS)
        views.append(
            {
                "position": i,
                "id": row.id,
                "prompt": row.prompt,
                "reference": row.reference or "",
                "answers": [
                    {
                        "variant": name,
                        "label": variants[name].label or name,
                        "output": row.outputs[name],
                        "scores": row.scores[name],
                        "compared": name in (BASELINE, CANDIDATE),  # the gate's pair
                    }
                    for name in VARIANTS
                ],
                "changes": dict(zip(METRICS, changes, strict=True)),
                "status": _status(changes),
            }
        )
    ranked = sorted(views, key=lambda v: (tuple(v["changes"].values()), v["position"]))
    for rank, view in enumerate(ranked):
        view["rank"] = rank
    counts = {s: sum(v["status"] == s for v in views) for s in ("worse", "better", "same")}
    shown = (
        views if len(views) <= ROW_CAP else sorted(ranked[:ROW_CAP], key=lambda v: v["position"])
    )
    return {
        "task": task,
        "metrics": [(m, METRIC_LABELS.get(m, m)) for m in METRICS],
        "rows": shown,
        "total": len(views),
        "hidden": len(views) - len(shown),
        "counts": counts,
        "worst": [v for v in ranked if v["status"] == "worse"][:5],
        "baseline_label": variants[BASELINE].label or BASELINE,
        "adapter_label": variants[CANDIDATE].label or CANDIDATE,
    }
