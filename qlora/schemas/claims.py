"""The schema of reports/claims.json: the 4-bit method's claims, each checked against this run."""

from __future__ import annotations

from qlora.schemas.base import OpenSchema


class ClaimRow(OpenSchema):
    claim: str
    subject: str
    measured: float | None
    display: str
    rule: str
    passed: bool | None
    why: str | None


class ClaimsSummary(OpenSchema):
    passed: int
    failed: int
    undecided: int


class ClaimsReport(OpenSchema):
    """reports/claims.json."""

    rows: list[ClaimRow]
    summary: ClaimsSummary
