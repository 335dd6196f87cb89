"""Stage `report`: the run on one page, for a reviewer deciding whether to trust the adapter.

Reads what the other stages wrote under reports/ and renders two templates from
qlora/templates/:
- reports/report.html: one self-contained file (inline CSS and SVG, no scripts, no network)
  that prints well: the gate decision first, then what quantization costs, how training
  went, every metric for the three variants, the gate's checks, example outputs, the data,
  and the lineage (git revision, params, hashes from dvc.lock, package versions);
- reports/report.md: the same story in Markdown (for Prefect artifacts and pull requests).
This module derives the numbers (confidence interval, share of the score NF4 keeps,
overfitting, lineage); the templates only lay them out and format them with the filters
below. Model outputs are untrusted text: the HTML template autoescapes everything.

`python -m stages.report --compare REV` adds a column with the adapter's metrics at git
revision REV (read with `git show REV:reports/eval/metrics.json`) and names what differs
between the two runs' training machines and adapters.
"""

from __future__ import annotations

import argparse

from qlora.io import run_stage
from qlora.report import main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Render reports/report.html and report.md.")
    parser.add_argument("--compare", metavar="REV", help="add the adapter's metrics at git REV")
    args = parser.parse_args()
    run_stage("report", lambda: main(args.compare))
