"""Stage `claims`: the 4-bit method's published claims checked against this run.

Memory saved (claim 70-80 %), generation speed of the 4-bit base against the full-precision
one (claim up to 2.5x) and the share of each benchmark metric the 4-bit base keeps (claim
98 %), each with the measured value, pass or fail, and why where it fails (qlora/claims.py).
Inputs: reports/quantize.json, reports/eval/metrics.json
Output: reports/claims.json (a DVC metric)
"""

from __future__ import annotations

from qlora import artifacts
from qlora.claims import claims_report
from qlora.io import read_json, run_stage, write_json


def main() -> None:
    inputs = {
        artifacts.QUANTIZE_REPORT: artifacts.QuantizeReport,
        artifacts.EVAL_METRICS: artifacts.EvalMetrics,
    }
    quantize, metrics = (read_json(path) for path in inputs)
    for (path, schema), data in zip(inputs.items(), (quantize, metrics), strict=True):
        artifacts.validated(schema, data, path)  # a malformed file is named, field by field
    report = claims_report(quantize, metrics)
    write_json(artifacts.CLAIMS_REPORT, report)
    for row in report["rows"]:
        verdict = {True: "PASS", False: "FAIL", None: "n/a"}[row["passed"]]
        print(f"  {verdict:4} {row['subject']}: {row['display']}")
        if row["why"]:
            print(f"       why: {row['why']}")


if __name__ == "__main__":
    run_stage("claims", main)
