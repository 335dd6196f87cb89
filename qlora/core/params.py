"""The one typed schema of params.yaml, and params.yaml the one source of values.

No field has a default here: a default in code beside a value in params.yaml is two
sources that drift apart. Code that needs values outside a project (`qlora validate` in
another folder, the benchmarks) reads the project's own params.yaml: `shipped_params()`.

Every stage calls `load_params()` first, so a bad value fails in a second with the key,
the value and what is allowed, before any model is loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from qlora.core.io import StageError
from qlora.core.paths import PARAMS_FILE

# bitsandbytes' storage formats the quantize stage loads, in the order tables show them: the
# QLoRA default (NF4), its 4-bit alternative (FP4), and LLM.int8()'s 8 bits for comparison.
QuantFormat = Literal["nf4", "fp4", "int8"]
QUANT_FORMATS: tuple[str, ...] = get_args(QuantFormat)
# The dataset record layouts dataset.format names (qlora.data.records reads each).
RecordFormat = Literal["alpaca", "chat", "prompt_completion"]
RECORD_FORMATS: tuple[str, ...] = get_args(RecordFormat)
# llama.cpp's quantization types the export stage offers (qlora/export/gguf.py maps them to
# llama.cpp's own numbers); the 16-bit merged model is always written, as their source.
GgufType = Literal[
    "q8_0", "q6_k", "q5_k_m", "q5_k_s", "q5_0", "q5_1", "q4_k_m", "q4_k_s", "q4_0", "q4_1",
    "q3_k_m", "q2_k",
]  # fmt: skip


class _Section(BaseModel):
    # Unknown keys are typos more often than not: reject them rather than ignore them.
    model_config = ConfigDict(extra="forbid")


class BaseParams(_Section):
    source: str = Field(min_length=1)
    revision: str | None
    trust_remote_code: bool
    # A Jinja chat template for a base that has none (a pretrained, non-chat model).
    chat_template: str | None
    save_dtype: Literal["bfloat16", "float16", "float32"]


class CorpusParams(_Section):
    min_summary_chars: int = Field(ge=1)
    max_summary_chars: int = Field(ge=1)
    max_source_chars: int = Field(ge=50)


class SplitRows(_Section):
    train: int | None = Field(ge=1)
    validation: int | None = Field(ge=1)
    test: int | None = Field(ge=1)


class DatasetParams(_Section):
    source: str = Field(min_length=1)
    format: Literal["auto"] | RecordFormat
    group_field: str | None
    validation_fraction: float = Field(gt=0, lt=0.5)
    test_fraction: float = Field(gt=0, lt=0.5)
    max_rows: SplitRows
    max_length: int = Field(ge=16, le=131072)
    system_prompt: str | None
    choice_candidates: int = Field(ge=2, le=26)
    guard_documents: int = Field(ge=1)
    guard_chars: int = Field(ge=100)
    seed: int


class MinRows(_Section):
    train: int = Field(ge=1)
    validation: int = Field(ge=1)
    test: int = Field(ge=1)


def _off_is_a_word(value: object) -> object:
    """`off` unquoted is the boolean false to a YAML 1.1 reader (PyYAML, which loads
    params.yaml), while DVC writes it so when an override sets it: read it as the word."""
    return "off" if value is False else value


Severity = Annotated[Literal["error", "warning", "off"], BeforeValidator(_off_is_a_word)]


class CheckSeverities(_Section):
    """What each data check does when it fails: error stops the pipeline, warning is
    reported, off skips it. The field order is the order of the report."""

    # "schema" would shadow a pydantic attribute, hence the alias.
    schema_: Severity = Field(alias="schema")
    missing_values: Severity
    empty_prompt: Severity
    empty_response: Severity
    exact_duplicates: Severity
    near_duplicates: Severity
    leakage: Severity
    over_max_length: Severity
    no_trained_tokens: Severity
    chat_roles: Severity
    chat_order: Severity
    chat_last_turn: Severity
    encoding: Severity
    # The tokenizer's special tokens in the data's text: tokenized as the real markers, a
    # row can hold a whole fake system turn. An error unless the data means them.
    control_tokens: Severity
    min_rows: Severity
    length_outliers: Severity
    pii: Severity
    blank_fields: Severity


class NgramOverlap(_Section):
    n: int = Field(ge=2, le=64)
    max_fraction: float = Field(gt=0, le=1)
    common_fraction: float = Field(gt=0, le=1)


class ValidateParams(_Section):
    min_rows: MinRows
    checks: CheckSeverities
    ngram_overlap: NgramOverlap
    length_outlier_zscore: float = Field(gt=0)
    max_dropped_fraction: float = Field(ge=0, le=1)


DtypeName = Literal["auto", "float32", "bfloat16", "float16"]


class AnalysisParams(_Section):
    # Layers named most sensitive, and suggested for skip_modules.
    top_k: int = Field(ge=1)
    # LoftQ's weight error is measured on every N-th quantized layer (an SVD per layer).
    loftq_every: int = Field(ge=1)


class QuantizeParams(_Section):
    # nf4 / fp4: 4 bits (QLoRA); int8: bitsandbytes' LLM.int8(), 8 bits with row scales.
    quant_type: QuantFormat
    double_quant: bool  # of the 4-bit scales; int8 has none
    compute_dtype: DtypeName
    # The dtype the packed 4-bit weights are stored in: uint8, or the model's 16-bit dtype
    # for FSDP, which shards each module's tensors as one buffer of one dtype.
    quant_storage: Literal["uint8", "bfloat16", "float16", "float32"]
    # Linear layers kept in 16 bits, by their full module name (the quantize report names
    # the most sensitive ones); the model's own (lm_head) stay 16-bit as well.
    skip_modules: list[str]
    analysis: AnalysisParams

    @model_validator(mode="after")
    def _named_skips(self) -> QuantizeParams:
        blank = [name for name in self.skip_modules if not name.strip()]
        if blank:
            raise ValueError("skip_modules: a module name is empty")
        return self


class LoraParams(_Section):
    r: int = Field(ge=1, le=1024)
    alpha: float = Field(gt=0)
    dropout: float = Field(ge=0, lt=1)
    target_modules: Literal["all-linear"] | list[str]
    # default: peft's (A random, B zero: the adapter starts as a no-op). loftq: A and B start
    # as the best rank-r correction of the quantization error (qlora/quant/calibration.py).
    init: Literal["default", "loftq"]

    @model_validator(mode="after")
    def _non_empty_targets(self) -> LoraParams:
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ValueError("target_modules: give 'all-linear' or a non-empty list")
        return self


class FinetuneParams(_Section):
    lora: LoraParams
    learning_rate: float = Field(gt=0, le=1)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"]
    warmup_ratio: float = Field(ge=0, lt=1)
    epochs: float = Field(gt=0)
    max_steps: int = Field(ge=-1)
    # The batch of one forward pass over all processes together (qlora/train/distributed.py).
    batch_size: int = Field(ge=1)
    gradient_accumulation_steps: int = Field(ge=1)
    # Data-parallel training processes; auto: one per CUDA GPU (one on a CPU).
    processes: Annotated[int, Field(ge=1)] | Literal["auto"]
    # An accelerate config file (FSDP, DeepSpeed, ...) for the launcher; null: plain DDP.
    accelerate_config: str | None
    # true: every decoder layer recomputes its activations in backward; N: every N-th one;
    # auto: as few as keep a batch's activations within the weights' size
    # (qlora/train/recipe.py).
    gradient_checkpointing: bool | Annotated[int, Field(ge=1)] | Literal["auto"]
    # auto: the chunked loss (qlora/train/loss.py) where the model allows it, else the model's own.
    loss: Literal["auto", "chunked", "liger", "standard"]
    batching: Literal["packed", "group_by_length", "padded"]
    optimizer: Literal["auto", "adamw_torch", "paged_adamw_32bit", "paged_adamw_8bit"]
    weight_decay: float = Field(ge=0)
    max_grad_norm: float = Field(gt=0)
    eval_steps: int = Field(ge=1)
    logging_steps: int = Field(ge=1)
    checkpoint_steps: int = Field(ge=1)
    deterministic: bool
    seed: int
    # Experiment trackers the Trainer also logs to (DVCLive always does: qlora/train/log_writer.py).
    report_to: list[
        Literal[
            "tensorboard",
            "mlflow",
            "wandb",
            "comet_ml",
            "neptune",
            "clearml",
            "trackio",
            "azure_ml",
            "swanlab",
            "codecarbon",
        ]
    ]


class EvaluateParams(_Section):
    tasks: list[str] = Field(min_length=1)
    num_fewshot: int = Field(ge=0)
    limit: int | None = Field(ge=1)
    batch_size: int = Field(ge=1)
    examples: int = Field(ge=0)
    max_new_tokens: int = Field(ge=1)
    # Generation speed, 4-bit vs full precision: this many test prompts, one at a time,
    # exactly speed_new_tokens greedy tokens each. 0 prompts: not measured.
    speed_prompts: int = Field(ge=0)
    speed_new_tokens: int = Field(ge=1)


class PrimaryMetric(_Section):
    task: str
    metric: str


class ChampionRules(_Section):
    """How a candidate must compare with the adapter in service (the registry's champion)."""

    min_gain: float = Field(ge=0)
    max_regression: float = Field(ge=0)
    significance: bool


class GateParams(_Section):
    primary: PrimaryMetric
    min_gain: float = Field(ge=0)
    max_regression: float = Field(ge=0)
    # "task/metric" -> its own allowed regression, instead of max_regression.
    max_regression_per_metric: dict[str, float]
    significance: bool
    champion: ChampionRules

    @model_validator(mode="after")
    def _per_metric_keys(self) -> GateParams:
        for key, value in self.max_regression_per_metric.items():
            task, _, metric = key.partition("/")
            if not task or not metric:
                raise ValueError(f"max_regression_per_metric: {key!r} is not 'task/metric'")
            if value < 0:
                raise ValueError(f"max_regression_per_metric.{key}: {value} is negative")
        return self


class ParityRules(_Section):
    """How far an exported artifact may fall behind the NF4 + adapter it came from."""

    max_loss: float = Field(ge=0)
    significance: bool


class ExportParams(_Section):
    gguf_types: list[GgufType]
    lora: bool
    pre_tokenizer: str | None = Field(min_length=1)
    n_ctx: int = Field(ge=64)
    threads: int | None = Field(ge=1)
    speed_repeats: int = Field(ge=1)
    parity: ParityRules

    @model_validator(mode="after")
    def _distinct_types(self) -> ExportParams:
        repeated = sorted({t for t in self.gguf_types if self.gguf_types.count(t) > 1})
        if repeated:
            raise ValueError(f"gguf_types: {repeated} listed more than once")
        return self


class Params(_Section):
    base: BaseParams
    corpus: CorpusParams
    dataset: DatasetParams
    validate_: ValidateParams = Field(alias="validate")
    quantize: QuantizeParams
    finetune: FinetuneParams
    evaluate: EvaluateParams
    gate: GateParams
    export: ExportParams

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @model_validator(mode="after")
    def _gate_task_is_evaluated(self) -> Params:
        if self.gate.primary.task not in self.evaluate.tasks:
            raise ValueError(
                f"gate.primary.task: {self.gate.primary.task!r} is not in evaluate.tasks "
                f"{self.evaluate.tasks}"
            )
        return self


class ParamsError(StageError, ValueError):
    """params.yaml is missing, unreadable or has a bad value; the message names the key."""


def _describe(err: ValidationError, path: Path) -> str:
    lines = [f"{path}: {err.error_count()} invalid value(s)"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        value = e.get("input")
        shown = "" if isinstance(value, dict) else f" = {value!r}"
        lines.append(f"  - {key}{shown}: {e['msg']}")
    return "\n".join(lines)


# The params.yaml that ships with this code (the repository root; installs are editable).
SHIPPED_PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"


def shipped_params() -> Params:
    """The values of the params.yaml that ships with the code: the defaults, where a
    command runs outside a project."""
    return load_params(SHIPPED_PARAMS)


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
