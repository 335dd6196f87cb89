"""Stage `claims`: the 4-bit method's published claims checked against this run.

Memory saved (claim 70-80 %), generation speed of the 4-bit base against the full-precision
one (claim up to 2.5x) and the share of each benchmark metric the 4-bit base keeps (claim
98 %), each with the measured value, pass or fail, and why where it fails; the same three
for each deployed 4-bit GGUF file against the 16-bit one under llama.cpp
(qlora/evaluation/claims.py).
Inputs: reports/quantize.json, reports/eval/metrics.json, reports/export/gguf_eval.json
Output: reports/claims.json (a DVC metric)
"""

from __future__ import annotations

from qlora.core import paths
from qlora.core.io import read_json, run_stage, write_json
from qlora.evaluation.claims import claims_report
from qlora.schemas.base import validated
from qlora.schemas.claims import ClaimsReport
from qlora.schemas.export import GgufEval
from qlora.schemas.metrics import EvalMetrics
from qlora.schemas.quantize import QuantizeReport


def main() -> None:
    inputs = {
        paths.QUANTIZE_REPORT: QuantizeReport,
        paths.EVAL_METRICS: EvalMetrics,
        paths.GGUF_EVAL: GgufEval,
    }
    quantize, metrics, gguf_eval = (read_json(path) for path in inputs)
    for (path, schema), data in zip(inputs.items(), (quantize, metrics, gguf_eval), strict=True):
        validated(schema, data, path)  # a malformed file is named, field by field
    report = claims_report(quantize, metrics, gguf_eval)
    # Checked against the schema the report reads it with, before anything is written.
    validated(ClaimsReport, report, paths.CLAIMS_REPORT)
    write_json(paths.CLAIMS_REPORT, report)
    for row in report["rows"]:
        verdict = {True: "PASS", False: "FAIL", None: "n/a"}[row["passed"]]
        print(f"  {verdict:4} {row['subject']}: {row['display']}")
        if row["why"]:
            print(f"       why: {row['why']}")


if __name__ == "__main__":
    run_stage("claims", main)
