"""Stage `report`: the run on one page, for a reviewer deciding whether to trust the adapter.

Renders what the other stages wrote under reports/ with qlora/report/build.py and its
templates. `python -m stages.report --compare REV` adds a column with the adapter's
metrics at git revision REV.
Outputs: reports/report.html (self-contained), reports/report.md
"""

from __future__ import annotations

import argparse

from qlora.core.io import run_stage
from qlora.report.build import main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Render reports/report.html and report.md.")
    parser.add_argument("--compare", metavar="REV", help="add the adapter's metrics at git REV")
    args = parser.parse_args()
    run_stage("report", lambda: main(args.compare))
