"""The schemas of the quantize stage's outputs: reports/quantize.json and
reports/quantize_layers.json.

quantize writes both through these models, and the claims stage, the report and the
registry read them through the same ones, so a field renamed on one side fails at once,
naming the file and the field.
"""

from __future__ import annotations

from pydantic import model_validator

from qlora.schemas.base import OpenSchema


class ErrorSummary(OpenSchema):
    mean_relative_error: float
    max_relative_error: float
    overall_relative_error: float | None = None
    layers: int | None = None


class FormatResult(OpenSchema):
    """One format loaded for real; a format this device cannot load says why instead."""

    supported: bool
    reason: str | None = None
    bytes: int | None = None
    bits_per_parameter: float | None = None
    linear_bits: float | None = None
    memory_ratio: float | None = None
    error: ErrorSummary | None = None

    @model_validator(mode="after")
    def _numbers_or_reason(self) -> FormatResult:
        if self.supported and (self.bytes is None or self.error is None):
            raise ValueError("a supported format needs bytes and error")
        if not self.supported and not self.reason:
            raise ValueError("an unsupported format needs a reason")
        return self


class Analysis(OpenSchema):
    layers: int
    weights: int
    errors: dict[str, ErrorSummary]
    max_excess_kurtosis: float
    max_block_absmax_ratio: float
    most_sensitive: list[str]


class SkipModules(OpenSchema):
    configured: list[str]
    configured_layers: list[str] | None = None  # the layers `configured` matched
    configured_extra_bytes: int
    suggested: list[str]
    suggested_extra_bytes: int
    suggested_error_share: float


class Loftq(OpenSchema):
    quant_type: str = "nf4"
    rank: int
    scaling: float
    every: int | None = None
    layers: int
    error_before: float
    error_after: float
    reduction: float
    seconds: float | None = None


class LayerRow(OpenSchema):
    rank: int
    name: str
    shape: list[int]
    excess_kurtosis: float
    block_absmax_ratio: float
    nf4_error: float
    fp4_error: float | None = None
    int8_error: float | None = None


class WeightHistogram(OpenSchema):
    layer: str
    bin_edges: list[float]
    counts: list[int]
    code_points: list[float]
    code_point_share: list[float] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> WeightHistogram:
        if len(self.bin_edges) != len(self.counts) + 1:
            raise ValueError(
                f"{len(self.bin_edges)} bin_edges for {len(self.counts)} counts "
                "(expected one edge more than counts)"
            )
        if self.code_point_share is not None and len(self.code_point_share) != len(
            self.code_points
        ):
            raise ValueError("code_point_share and code_points differ in length")
        return self


class QuantizeLayers(OpenSchema):
    """reports/quantize_layers.json."""

    layers: list[LayerRow]
    histogram: WeightHistogram


class QuantizeReport(OpenSchema):
    """reports/quantize.json; sizes are keyed "full" and by the 4-bit type it measured."""

    quant_type: str
    double_quant: bool
    full_dtype: str
    bytes: dict[str, int]
    bits_per_parameter: dict[str, float]
    quant_error: dict[str, dict[str, float]]
    # Absent from files of older runs (`qlora report --compare`, registry records): their
    # parts of the report are left out.
    formats: dict[str, FormatResult] | None = None
    analysis: Analysis | None = None
    skip_modules: SkipModules | None = None
    loftq: Loftq | None = None

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
