"""The one typed schema of params.yaml.

Every stage calls `load_params()` first, so a bad value fails in a second with the key,
the value and what is allowed, before any model is loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from qlora.artifacts import PARAMS_FILE


class _Section(BaseModel):
    # Unknown keys are typos more often than not: reject them rather than ignore them.
    model_config = ConfigDict(extra="forbid")


class BaseParams(_Section):
    source: str = Field(min_length=1)
    revision: str | None = None
    trust_remote_code: bool = False
    # A Jinja chat template for a base that has none (a pretrained, non-chat model).
    chat_template: str | None = None
    save_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"


class CorpusParams(_Section):
    min_summary_chars: int = Field(15, ge=1)
    max_summary_chars: int = Field(200, ge=1)
    max_source_chars: int = Field(1200, ge=50)


class SplitRows(_Section):
    train: int | None = Field(None, ge=1)
    validation: int | None = Field(None, ge=1)
    test: int | None = Field(None, ge=1)


class DatasetParams(_Section):
    source: str = Field(min_length=1)
    format: Literal["auto", "alpaca", "chat", "prompt_completion"] = "auto"
    group_field: str | None = None
    validation_fraction: float = Field(0.1, gt=0, lt=0.5)
    test_fraction: float = Field(0.1, gt=0, lt=0.5)
    max_rows: SplitRows = SplitRows()
    max_length: int = Field(512, ge=16, le=131072)
    system_prompt: str | None = None
    choice_candidates: int = Field(4, ge=2, le=26)
    guard_documents: int = Field(16, ge=1)
    guard_chars: int = Field(1200, ge=100)
    seed: int = 0


class MinRows(_Section):
    train: int = Field(1, ge=1)
    validation: int = Field(1, ge=1)
    test: int = Field(1, ge=1)


Severity = Literal["error", "warning", "off"]


class CheckSeverities(_Section):
    """What each data check does when it fails: error stops the pipeline, warning is
    reported, off skips it. The field order is the order of the report."""

    # "schema" would shadow a pydantic attribute, hence the alias.
    schema_: Severity = Field("error", alias="schema")
    missing_values: Severity = "error"
    empty_prompt: Severity = "error"
    empty_response: Severity = "error"
    exact_duplicates: Severity = "error"
    near_duplicates: Severity = "warning"
    leakage: Severity = "error"
    over_max_length: Severity = "warning"
    no_trained_tokens: Severity = "error"
    chat_roles: Severity = "error"
    chat_order: Severity = "error"
    chat_last_turn: Severity = "error"
    encoding: Severity = "error"
    min_rows: Severity = "error"
    length_outliers: Severity = "warning"
    pii: Severity = "warning"


class NgramOverlap(_Section):
    n: int = Field(8, ge=2, le=64)
    max_fraction: float = Field(0.5, gt=0, le=1)
    common_fraction: float = Field(0.1, gt=0, le=1)


class ValidateParams(_Section):
    min_rows: MinRows = MinRows()
    checks: CheckSeverities = CheckSeverities()
    ngram_overlap: NgramOverlap = NgramOverlap()
    length_outlier_zscore: float = Field(4.0, gt=0)


DtypeName = Literal["auto", "float32", "bfloat16", "float16"]


class QuantizeParams(_Section):
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: DtypeName = "auto"


class LoraParams(_Section):
    r: int = Field(16, ge=1, le=1024)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: Literal["all-linear"] | list[str] = "all-linear"

    @model_validator(mode="after")
    def _non_empty_targets(self) -> LoraParams:
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ValueError("target_modules: give 'all-linear' or a non-empty list")
        return self


class FinetuneParams(_Section):
    lora: LoraParams = LoraParams()
    learning_rate: float = Field(2e-4, gt=0, le=1)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    epochs: float = Field(1, gt=0)
    max_steps: int = Field(-1, ge=-1)
    batch_size: int = Field(4, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    gradient_checkpointing: bool = False
    optimizer: Literal["auto", "adamw_torch", "paged_adamw_32bit", "paged_adamw_8bit"] = "auto"
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(0.3, gt=0)
    eval_steps: int = Field(20, ge=1)
    logging_steps: int = Field(5, ge=1)
    checkpoint_steps: int = Field(20, ge=1)
    deterministic: bool = False
    seed: int = 42


class EvaluateParams(_Section):
    tasks: list[str] = Field(min_length=1)
    num_fewshot: int = Field(0, ge=0)
    limit: int | None = Field(None, ge=1)
    batch_size: int = Field(8, ge=1)
    examples: int = Field(4, ge=0)
    max_new_tokens: int = Field(40, ge=1)


class PrimaryMetric(_Section):
    task: str
    metric: str


class ChampionRules(_Section):
    """How a candidate must compare with the adapter in service (the registry's champion)."""

    min_gain: float = Field(0.0, ge=0)
    max_regression: float = Field(0.05, ge=0)
    significance: bool = False


class GateParams(_Section):
    primary: PrimaryMetric
    min_gain: float = Field(0.0, ge=0)
    max_regression: float = Field(0.05, ge=0)
    # "task/metric" -> its own allowed regression, instead of max_regression.
    max_regression_per_metric: dict[str, float] = {}
    significance: bool = True
    champion: ChampionRules = ChampionRules()

    @model_validator(mode="after")
    def _per_metric_keys(self) -> GateParams:
        for key, value in self.max_regression_per_metric.items():
            task, _, metric = key.partition("/")
            if not task or not metric:
                raise ValueError(f"max_regression_per_metric: {key!r} is not 'task/metric'")
            if value < 0:
                raise ValueError(f"max_regression_per_metric.{key}: {value} is negative")
        return self


class Params(_Section):
    base: BaseParams
    corpus: CorpusParams = CorpusParams()
    dataset: DatasetParams
    validate_: ValidateParams = Field(ValidateParams(), alias="validate")
    quantize: QuantizeParams = QuantizeParams()
    finetune: FinetuneParams = FinetuneParams()
    evaluate: EvaluateParams
    gate: GateParams

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @model_validator(mode="after")
    def _gate_task_is_evaluated(self) -> Params:
        if self.gate.primary.task not in self.evaluate.tasks:
            raise ValueError(
                f"gate.primary.task: {self.gate.primary.task!r} is not in evaluate.tasks "
                f"{self.evaluate.tasks}"
            )
        return self


class ParamsError(ValueError):
    """params.yaml is missing, unreadable or has a bad value; the message names the key."""


def _describe(err: ValidationError, path: Path) -> str:
    lines = [f"{path}: {err.error_count()} invalid value(s)"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        value = e.get("input")
        shown = "" if isinstance(value, dict) else f" = {value!r}"
        lines.append(f"  - {key}{shown}: {e['msg']}")
    return "\n".join(lines)


def load_params(path: Path | str = PARAMS_FILE) -> Params:
    """Read and check params.yaml; raise ParamsError naming every bad key."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError as e:
        raise ParamsError(f"{path}: not found (run from the repository root)") from e
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as e:
        raise ParamsError(_describe(e, path)) from None
