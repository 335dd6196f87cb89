"""The schemas of metrics.json, gate.json and quantize.json, and the one rule for a metric's
direction that the gate, the report, the Prefect artifacts and the model card share."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from flows.report_artifacts import metrics_table
from helpers.repo import FIXTURES_DIR, REPO
from helpers.tiny import gate_params
from qlora.core import paths
from qlora.core.io import StageError
from qlora.evaluation.gate import decide
from qlora.registry.model_card import _metric_table
from qlora.report.sections import metric_rows
from qlora.report.text import ARROWS
from qlora.schemas.base import validated
from qlora.schemas.gate import GateDecision
from qlora.schemas.metrics import EvalMetrics, higher_is_better
from qlora.schemas.quantize import QuantizeReport

FIXTURES = FIXTURES_DIR / "report" / "reports"

RULES = gate_params(min_gain=0.02)


def fixture(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


def test_the_shipped_fixtures_match_the_schemas():
    assert EvalMetrics.model_validate(fixture("eval/metrics.json")).settings.tasks
    gate = GateDecision.model_validate(fixture("gate.json"))
    assert gate.primary.metric == "bits_per_byte"
    assert QuantizeReport.model_validate(fixture("quantize.json")).four_bit_bytes > 0


def test_a_bad_metrics_file_names_the_file_and_every_bad_field():
    metrics = fixture("eval/metrics.json")
    entry = metrics["variants"]["adapter_4bit"]["metrics"]["docstring_choice"]["acc"]
    entry["value"] = "N/A"
    entry["higher_is_btter"] = True  # a typo: metric entries are closed
    with pytest.raises(StageError) as err:
        validated(EvalMetrics, metrics, "reports/eval/metrics.json")
    message = str(err.value)
    assert message.startswith("reports/eval/metrics.json: does not match the EvalMetrics")
    assert "variants.adapter_4bit.metrics.docstring_choice.acc.value" in message
    assert "acc.higher_is_btter: Extra inputs are not permitted" in message


def test_every_variant_is_required_and_older_variant_names_still_read():
    metrics = fixture("eval/metrics.json")
    del metrics["variants"]["base_full"]
    with pytest.raises(StageError, match=r"variants lacks \['base_full'\]"):
        validated(EvalMetrics, metrics, "m.json")
    old = fixture("eval/metrics.json")
    old["variants"] = {
        {"base_4bit": "base_nf4", "adapter_4bit": "adapter_nf4"}.get(k, k): v
        for k, v in old["variants"].items()
    }
    assert set(EvalMetrics.model_validate(old).variants) == set(paths.VARIANTS)


def test_a_gate_file_missing_the_interval_is_refused():
    gate = fixture("gate.json")
    del gate["primary"]["ci95"]
    with pytest.raises(StageError, match=r"gate.json.*\n  - primary.ci95: Field required"):
        validated(GateDecision, gate, "reports/gate.json")


def test_the_direction_rule():
    first_known = higher_is_better({"higher_is_better": None}, {"higher_is_better": 0})
    assert first_known is False
    assert higher_is_better(None, {"higher_is_better": True}) is True
    assert higher_is_better({"higher_is_better": None}, {}) is None
    assert higher_is_better() is None


def test_gate_report_prefect_artifacts_and_model_card_agree_on_every_direction():
    metrics = fixture("eval/metrics.json")
    for variant in metrics["variants"].values():
        variant["metrics"]["docstring_choice"]["acc"]["higher_is_better"] = None
    gate = decide(metrics, RULES)
    checked = EvalMetrics.model_validate(metrics)
    report = {(r["task"], r["metric"]): r["hib"] for r in metric_rows(checked, None)}
    prefect = {(r["task"], r["metric"]): r["better"] for r in metrics_table(metrics)}
    card = {  # the card escapes names from the data: read the cell as its text
        re.sub(r"\\(.)", r"\1", line.split(" ")[1]): line.split(" ")[2]
        for line in _metric_table({"metrics": metrics})[2:]  # after the header rows
    }
    words = {True: "higher", False: "lower", None: "direction unknown"}
    assert len(gate["checks"]) == len(report) == len(prefect) == len(card) == 7
    for check in gate["checks"]:
        key = (check["task"], check["metric"])
        hib = check["higher_is_better"]
        assert report[key] is hib, key
        assert prefect[key] == words[hib], key
        assert card[f"{key[0]}/{key[1]}"] == ARROWS[hib], key
    unknown = [c for c in gate["checks"] if c["higher_is_better"] is None]
    assert [(c["metric"], c["passed"]) for c in unknown] == [("acc", None)]
    acc = next(r for r in metrics_table(metrics) if r["metric"] == "acc")
    assert acc["adapter vs NF4 base"] == ""  # no signed change without a direction


def test_the_schema_modules_stay_torch_free():
    code = (
        "import sys, qlora.core.paths, qlora.core.lineage, qlora.schemas.metrics,"
        " qlora.schemas.gate, qlora.schemas.quantize, qlora.schemas.claims,"
        " qlora.evaluation.gate, qlora.report.build, qlora.registry.model_card;"
        "sys.exit('torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr or "torch was imported"
