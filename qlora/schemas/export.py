"""The schemas of the export's files: data/prepared/gguf/manifest.json,
reports/export/gguf_eval.json and reports/export/parity.json."""

from __future__ import annotations

from qlora.schemas.base import OpenSchema
from qlora.schemas.metrics import TaskMetrics


class GgufFile(OpenSchema):
    file: str
    bytes: int
    sha256: str
    what: str


class GgufArtifact(OpenSchema):
    """What a user loads: a model file, and a LoRA file applied to it at load time."""

    model: str
    lora: str | None
    gguf_type: str


class GgufManifest(OpenSchema):
    files: dict[str, GgufFile]
    artifacts: dict[str, GgufArtifact]
    # Artifacts the export could not build, with why (a merge that failed its check).
    failed: dict[str, str] = {}


class DecodeSpeed(OpenSchema):
    prompts: int
    new_tokens: int
    repeats: int
    tokens_per_s: float  # the median of the repeats
    tokens_per_s_each: list[float]
    spread: float
    note: str | None


class MeasuredArtifact(GgufArtifact):
    file_bytes: int
    weights_bytes: int
    threads: int
    metrics: TaskMetrics
    speed: DecodeSpeed | None = None


class GgufEval(OpenSchema):
    """reports/export/gguf_eval.json."""

    settings: dict
    artifacts: dict[str, MeasuredArtifact]
    failed: dict[str, str] = {}  # the manifest's: not built, so not measured


class ParityVerdict(OpenSchema):
    # None for an artifact the export could not build: it has no score.
    value: float | None
    reference: float
    relative_loss: float | None
    ci95_relative_half_width: float | None
    beyond_noise: bool | None
    passed: bool
    reason: str


class ParitySummary(OpenSchema):
    passed: int
    failed: int


class ParityReport(OpenSchema):
    """reports/export/parity.json."""

    primary: dict[str, str]
    reference: str
    rules: dict
    artifacts: dict[str, ParityVerdict]
    deployable: list[str]
    summary: ParitySummary
    table: list[dict]
