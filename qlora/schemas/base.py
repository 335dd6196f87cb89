"""What every report schema shares: strict or open models, and one way to validate.

The JSON files the stages write are typed once, in this package, one module per file:
metrics.py (reports/eval/metrics.json), gate.py (reports/gate.json), quantize.py
(reports/quantize.json, reports/quantize_layers.json), claims.py (reports/claims.json).
The writer validates against its schema before writing, and every reader reads through
it, so a field renamed on one side fails at once with the file and the field. pydantic
only: the schemas stay importable without torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from qlora.core.io import StageError, read_json


class StrictSchema(BaseModel):
    """A file whose every field is known: an unknown key is an error."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class OpenSchema(BaseModel):
    """A file its writer may extend (timings, versions): readers see the typed fields."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)


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
