"""The schema of reports/gate.json: the gate's decision, the primary metric's gain, every check."""

from __future__ import annotations

from typing import Any, Literal

from qlora.schemas.base import StrictSchema


class GateCheck(StrictSchema):
    """One metric of the candidate judged against the baseline."""

    task: str
    metric: str
    kind: Literal["primary", "guard"]
    higher_is_better: bool | None
    base: float
    adapter: float
    base_stderr: float | None
    adapter_stderr: float | None
    change: float  # adapter - base
    relative_change: float | None  # positive when better; None when the direction is unknown
    threshold: float
    ci95_half_width: float | None  # None without both standard errors
    ci95: tuple[float, float] | None  # 95% interval of `change`
    beyond_noise: bool | None
    passed: bool | None  # None: shown, not judged (a guard metric of unknown direction)
    reason: str


class GatePrimary(StrictSchema):
    task: str
    metric: str
    higher_is_better: bool
    base: float
    adapter: float
    change: float
    relative_change: float
    ci95: tuple[float, float] | None
    beyond_noise: bool | None


class GateDecision(StrictSchema):
    """reports/gate.json: the decision, the primary metric's gain and every check."""

    decision: Literal["promoted", "rejected"]
    passed: bool
    summary: str
    baseline: str
    candidate: str
    primary: GatePrimary
    thresholds: dict[str, Any]
    checks: list[GateCheck]
    reasons: list[str]
