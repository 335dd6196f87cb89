"""Stage `gate`: does the adapter beat its base enough, without breaking anything else?

Compares the NF4 base + adapter against the NF4 base (same quantization, same evaluation
settings: the only difference is the adapter). The primary metric must gain at least
`gate.min_gain` (relative); every other metric may lose at most `gate.max_regression`
(or its own `gate.max_regression_per_metric`). A rejection is a result, not a crash: the
stage succeeds and the decision file says "rejected" with every reason in plain words.
Output: reports/gate.json

The champion/challenger half (`decide_vs_champion`, thresholds under `gate.champion`) runs
at promotion time, under the registry's lock (qlora/registry/store.py), not in this stage: the
champion is not a DVC dependency, and checking it here would let `dvc repro` keep a
decision made against a champion that has since changed.
"""

from __future__ import annotations

from qlora.core import paths
from qlora.core.io import read_json, run_stage, write_json
from qlora.core.params import load_params
from qlora.evaluation.gate import decide


def main() -> None:
    decision = decide(read_json(paths.EVAL_METRICS), load_params().gate)
    write_json(paths.GATE_REPORT, decision)
    print(decision["summary"])
    for reason in decision["reasons"]:
        print(f"  - {reason}")


if __name__ == "__main__":
    run_stage("gate", main)
