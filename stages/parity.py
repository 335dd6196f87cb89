"""Stage `parity`: is each exported artifact as good as the NF4 + adapter it came from?

Each artifact's primary metric (gate.primary) against the NF4 + adapter's, within
export.parity.max_loss (and the noise, with export.parity.significance); only the ones
that pass are deployable (qlora/export/parity.py). A failing artifact is a result, not a
crash: the stage succeeds and parity.json says which failed and why.
Inputs: reports/export/gguf_eval.json, reports/eval/metrics.json
Output: reports/export/parity.json (a DVC metric)
"""

from __future__ import annotations

from qlora.core import paths
from qlora.core.io import read_json, run_stage, write_json
from qlora.core.params import load_params
from qlora.export.parity import parity_report
from qlora.schemas.base import validated
from qlora.schemas.export import GgufEval, ParityReport
from qlora.schemas.metrics import EvalMetrics


def main() -> None:
    params = load_params()
    metrics = read_json(paths.EVAL_METRICS)
    validated(EvalMetrics, metrics, paths.EVAL_METRICS)
    gguf_eval = read_json(paths.GGUF_EVAL)
    validated(GgufEval, gguf_eval, paths.GGUF_EVAL)
    report = parity_report(gguf_eval, metrics, params)
    validated(ParityReport, report, paths.PARITY_REPORT)
    write_json(paths.PARITY_REPORT, report)
    for name, verdict in report["artifacts"].items():
        print(f"  {name}: {verdict['reason']}")
    print(f"  deployable: {', '.join(report['deployable']) or 'none'}")


if __name__ == "__main__":
    run_stage("parity", main)
