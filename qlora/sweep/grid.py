"""A sweep's grid: `key=v1,v2` overrides expanded into one override list per experiment.

The grammar is `dvc exp run -S`'s (Hydra's): `finetune.learning_rate=1e-4,2e-4` sweeps two
values, `finetune.seed=range(1,4)` three seeds, a list value keeps its brackets
(`finetune.lora.target_modules=[q_proj,v_proj]` is one value). DVC's own expansion is used,
so a grid means what it would mean to `dvc exp run --queue`. Torch-free.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from qlora.core.io import StageError
from qlora.core.paths import PARAMS_FILE

# DVC experiment names are git ref names: keep them to a safe alphabet.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,60}")
MAX_POINTS = 256  # a typo such as range(1,10000) should not queue ten thousand trainings


@dataclass(frozen=True)
class Point:
    """One experiment of the sweep: its DVC experiment name and its overrides."""

    name: str
    overrides: tuple[str, ...]

    def value(self, key: str) -> str | None:
        """The value this point sets for `key`, as written in its override."""
        for item in self.overrides:
            k, _, v = item.partition("=")
            if k == key:
                return v
        return None


def swept_keys(specs: list[str]) -> list[str]:
    """The params keys a sweep sets, in the order given."""
    return [spec.partition("=")[0].strip() for spec in specs]


def expand(specs: list[str], prefix: str) -> list[Point]:
    """Every combination of the sweep's values, named `<prefix>-1`, `<prefix>-2`, ..."""
    from dvc.exceptions import DvcException
    from dvc.utils.hydra import get_hydra_sweeps
    from hydra.errors import HydraException

    if not NAME.fullmatch(prefix):
        raise StageError(f"sweep name {prefix!r}: letters, digits, - and _ only (61 at most)")
    if not specs:
        raise StageError("a sweep needs at least one -S key=value1,value2")
    keys = swept_keys(specs)
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise StageError(f"swept twice: {', '.join(repeated)} (give all its values in one -S)")
    for spec in specs:
        if "=" not in spec or ":" in spec.partition("=")[0]:
            raise StageError(f"{spec!r}: a sweep sets params.yaml keys as key=value1,value2")
    try:
        grid = get_hydra_sweeps({str(PARAMS_FILE): list(specs)})
    except (DvcException, HydraException, ValueError) as e:
        raise StageError(f"cannot read the sweep {specs}: {e}") from None
    if len(grid) > MAX_POINTS:
        raise StageError(f"the sweep has {len(grid)} experiments; at most {MAX_POINTS}")
    return [
        Point(f"{prefix}-{i}", tuple(point[str(PARAMS_FILE)]))
        for i, point in enumerate(grid, start=1)
    ]
