"""The schema of reports/eval/metrics.json, and the one rule for a metric's direction.

evaluate writes every variant's lm-eval results through EvalMetrics; the gate, the claims,
the report, the Prefect artifacts and the model card read through it. Variant entries and
settings may carry more keys (timings, versions) than the readers need.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, model_validator

from qlora.core.paths import LEGACY_VARIANTS, VARIANTS
from qlora.schemas.base import OpenSchema, StrictSchema


class Speed(OpenSchema):
    """variants[name]["speed"] of reports/eval/metrics.json: greedy generation, batch 1."""

    prompts: int
    new_tokens: int
    seconds: float
    tokens_per_s: float
    seconds_per_prompt: float


class MetricResult(StrictSchema):
    """One metric of one variant, as lm-eval reported it."""

    value: float
    stderr: float | None = None  # None where lm-eval has none and no bootstrap was possible
    # None: lm-eval gave no direction for this metric (see `higher_is_better` below).
    higher_is_better: bool | None = None
    stderr_method: str | None = None  # set when the stderr is our bootstrap, not lm-eval's


TaskMetrics = dict[str, dict[str, MetricResult]]  # {task: {metric: result}}


class EvalSettings(OpenSchema):
    tasks: list[str] = []


class VariantResult(OpenSchema):
    label: str | None = None
    quantization: str | None = None  # "nf4+double_quant"; None for the full-precision base
    memory_bytes: int | None = None
    seconds: float | None = None
    metrics: TaskMetrics
    speed: Speed | None = None  # greedy generation, where evaluate measured it


class VariantExample(OpenSchema):
    id: int | str
    prompt: str
    reference: str | None = None
    output: str


class GeneratedRow(VariantExample):
    """One test row of a generation task: the variant's greedy answer and its scores."""

    scores: dict[str, float]


class VariantFile(BaseModel):
    """reports/eval/variants/<variant>.json: one variant's benchmark, written by its own
    stage and merged with the others' by the evaluate stage."""

    settings: EvalSettings
    variant: VariantResult
    examples: list[VariantExample] = []
    # {generation task: every test row answered}; absent in files of older revisions.
    generations: dict[str, list[GeneratedRow]] = {}


class MergedRow(OpenSchema):
    """One row of reports/eval/generations.json: every variant's answer and scores."""

    id: int | str
    prompt: str
    reference: str | None = None
    outputs: dict[str, str]
    scores: dict[str, dict[str, float]]  # {variant: {metric: value}}


class EvalGenerations(BaseModel):
    """reports/eval/generations.json: {generation task: its rows, in test-split order}."""

    tasks: dict[str, list[MergedRow]] = {}


class EvalMetrics(BaseModel):
    """reports/eval/metrics.json: every variant's lm-eval results on the same settings."""

    settings: EvalSettings = EvalSettings()
    variants: dict[str, VariantResult]

    @model_validator(mode="before")
    @classmethod
    def _every_variant(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("variants"), dict):
            variants = {LEGACY_VARIANTS.get(k, k): v for k, v in data["variants"].items()}
            absent = [v for v in VARIANTS if v not in variants]
            if absent:
                raise ValueError(f"variants lacks {absent} (has {list(variants)})")
            data = {**data, "variants": variants}
        return data


# ---------------------------------------------------------------- metric direction
# lm-eval says per metric whether higher is better; for some metrics it says nothing. Every
# reader uses this one rule: the direction is the flag of the first entry that has one, and
# without one it is unknown, never guessed. The gate refuses a primary metric of unknown
# direction and shows (but does not judge) such a guard metric; the report, the Prefect
# artifacts and the model card say "direction unknown".
DIRECTION_UNKNOWN = "direction unknown"
DIRECTIONS = {True: "higher is better", False: "lower is better", None: DIRECTION_UNKNOWN}


def higher_is_better(*entries: MetricResult | dict | None) -> bool | None:
    """The metric's direction from its entries (one per variant), None when none has one."""
    for entry in entries:
        if isinstance(entry, MetricResult):
            flag = entry.higher_is_better
        else:
            flag = (entry or {}).get("higher_is_better")
        if flag is not None:
            return bool(flag)
    return None
