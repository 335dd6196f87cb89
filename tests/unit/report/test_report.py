"""The report stage, rendered from fixture JSON (tests/fixtures/report/) into tmp_path.

The fixtures follow the schemas the other stages write; base, dataset, quantize and
quantize_layers are real outputs of the embedded SmolLM2 model (its weight analysis and its
LoftQ errors, every 4th layer at rank 16), the rest realistic values of a CPU run;
claims.json is what qlora.evaluation.claims makes of the fixture's quantize.json and
metrics.json (a test checks it; `PYTHONPATH=tests python tests/unit/report/test_report.py`
rewrites it). One test opens the HTML in headless Chromium, checks that the headline, the
table and the charts render, and saves the screenshot under tests/artifacts/ for a human to
look at.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import struct
import subprocess
import sys
import zlib
from html import escape as html_escape
from html import unescape as html_unescape
from pathlib import Path

import pytest
import yaml
from markupsafe import escape as markup_escape

from helpers.markdown import (
    HOSTILE,
    RENDERERS,
    STRUCTURE,
    flat,
    rendered,
    table_rows,
    tags,
    visible,
)
from helpers.repo import ARTIFACTS_DIR, FIXTURES_DIR, REPO
from helpers.repo import git as run_git
from helpers.tiny import gate_params
from qlora.core.io import StageError
from qlora.core.lineage import git_state
from qlora.evaluation.claims import claims_report
from qlora.evaluation.gate import decide
from qlora.report.build import render_report
from qlora.report.lineage import load_compare
from qlora.report.plots import nice_ticks
from qlora.report.text import fmt, fmt_bytes, fmt_duration, fmt_pct, md_text
from qlora.train import log_layout

FIXTURES = FIXTURES_DIR / "report"
ARTIFACTS = ARTIFACTS_DIR


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A project root as the stage sees it: reports/, dvc.lock, params.yaml (no git)."""
    shutil.copytree(FIXTURES / "reports", tmp_path / "reports")
    shutil.copy(FIXTURES / "dvc_lock.yaml", tmp_path / "dvc.lock")
    shutil.copy(FIXTURES / "params.yaml", tmp_path / "params.yaml")
    return tmp_path


def render(root: Path, **kwargs) -> tuple[str, str]:
    html, md = root / "reports" / "report.html", root / "reports" / "report.md"
    render_report(root / "reports", html, md, **kwargs)
    return html.read_text(encoding="utf-8"), md.read_text(encoding="utf-8")


def write_curve(root: Path, name: str, rows: list[list]) -> None:
    """A per-step series in DVCLive's layout (plots/metrics/<name>.tsv: step, value)."""
    path = root / "reports" / "train" / "plots" / "metrics" / f"{name}.tsv"
    column = name.rsplit("/", 1)[-1]
    path.write_text(f"step\t{column}\n" + "".join(f"{s}\t{v}\n" for s, v in rows))


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    path.write_text(json.dumps(change(data) or data))


def load(root: Path, rel: str):
    return json.loads((root / "reports" / rel).read_text())


def regate(root: Path) -> dict:
    """Run the gate again on the (edited) metrics.json, as `dvc repro` would."""
    params = gate_params(**yaml.safe_load((root / "params.yaml").read_text())["gate"])
    decision = decide(load(root, "eval/metrics.json"), params)
    (root / "reports" / "gate.json").write_text(json.dumps(decision))
    return decision


def metric_table_rows(html: str) -> dict[tuple[str, str], list[str]]:
    """(task, metric) -> the value cells (with their class) of the benchmark table."""
    table = re.search(r'<table id="metric-table">(.*?)</table>', html, re.S).group(1)
    rows = {}
    for tr in re.findall(r"<tr>(.*?)</tr>", table, re.S):
        tds = re.findall(r'<td class="([^"]*)">(.*?)</td>', tr, re.S)
        names = re.findall(r"<td>([^<]*)</td>", tr)
        if len(names) >= 2:
            rows[(names[0], names[1])] = tds[1:]  # first classed cell is the arrow
    return rows


# ---------------------------------------------------------------- formatting


def test_number_formatting():
    assert fmt(134515008) == "134,515,008"
    assert fmt(0.123456) == "0.1235"
    assert fmt(-0.2469) == "\u22120.2469"
    assert fmt(None) == "n/a"
    assert fmt("N/A") == "N/A"
    assert fmt_bytes(111677744) == "111.7 MB"
    assert fmt_bytes(2318204928) == "2.318 GB"
    assert fmt_duration(412.7) == "6 min 53 s"
    assert fmt_duration(4000) == "1 h 06 min"
    assert fmt_pct(0.97003) == "97.0%"
    assert fmt_pct(float("nan")) == "n/a"
    assert nice_ticks(0, 320, count=4) == [0, 100, 200, 300, 400]
    assert nice_ticks(1.28, 2.21, count=4) == [1.25, 1.5, 1.75, 2.0, 2.25]


# ---------------------------------------------------------------- content


def test_headline_shows_decision_and_primary_metric(root: Path):
    html, md = render(root)
    gate = load(root, "gate.json")
    p = gate["primary"]
    headline = re.search(
        r'<section class="verdict (\w+)" id="headline">(.*?)</section>', html, re.S
    )
    assert headline.group(1) == "promoted"
    text = headline.group(2)
    assert "PROMOTED" in text
    assert f"{fmt(p['base'])} &rarr; {fmt(p['adapter'])}" in text
    gain = (p["base"] - p["adapter"]) / p["base"]  # bits_per_byte: lower is better
    assert f"{fmt(p['change'])} &middot; {fmt_pct(gain)} better" in text
    # bits_per_byte has no stderr in lm-eval: the interval is n/a, not invented.
    assert "95% CI of the change: n/a" in text
    assert "## Decision: **PROMOTED**" in md
    # The headline comes before every section.
    assert (
        html.index('id="headline"') < html.index('id="quantization"') < html.index('id="lineage"')
    )


def test_rejected_decision_is_red(root: Path):
    def reject(gate):
        gate.update(decision="rejected", passed=False)

    edit_json(root / "reports" / "gate.json", reject)
    html, _ = render(root)
    assert '<section class="verdict rejected" id="headline">' in html
    assert "REJECTED" in html


@pytest.mark.parametrize(("se", "expected"), [(0.03, "excludes 0"), (0.2, "includes 0")])
def test_confidence_interval_from_stderr(root: Path, se: float, expected: str):
    def with_stderr(m):
        for v in ("base_4bit", "adapter_4bit"):
            m["variants"][v]["metrics"]["docstring_loss"]["bits_per_byte"]["stderr"] = se

    edit_json(root / "reports" / "eval" / "metrics.json", with_stderr)
    regate(root)
    html, md = render(root)
    change = load(root, "gate.json")["primary"]["change"]
    half = 1.96 * math.sqrt(2 * se**2)
    interval = f"[{fmt(change - half)}, {fmt(change + half)}]"
    assert f"95% CI of the change: {interval}, {expected}" in html
    assert interval in md


def test_the_headline_shows_the_gain_and_interval_of_gate_json_not_its_own(root: Path):
    def doctored(gate):  # numbers no formula gives from metrics.json: only a copy shows them
        gate["primary"].update(relative_change=0.3141, ci95=[-0.5, -0.125], beyond_noise=True)

    edit_json(root / "reports" / "gate.json", doctored)
    html, md = render(root)
    assert "31.4% better" in html and "[\u22120.5, \u22120.125], excludes 0" in html
    assert "31.4% better" in md


def test_metric_table_has_every_value_and_marks_the_best(root: Path):
    html, md = render(root)
    variants = load(root, "eval/metrics.json")["variants"]
    rows = metric_table_rows(html)
    names = ("base_full", "base_4bit", "adapter_4bit")
    expected_keys = {(t, m) for t, ms in variants["base_full"]["metrics"].items() for m in ms}
    assert set(rows) == expected_keys
    for (task, metric), cells in rows.items():
        entries = [variants[n]["metrics"][task][metric] for n in names]
        values = [e["value"] for e in entries]
        pick = max if entries[0]["higher_is_better"] else min
        for (css, text), entry, value in zip(cells, entries, values, strict=True):
            assert text.startswith(fmt(value)), (task, metric, text)
            assert ("best" in css) == (value == pick(values)), (task, metric, css)
            if entry["stderr"] is not None:
                assert f"&plusmn; {fmt(entry['stderr'], 2)}" in text
    adapter_bpb = variants["adapter_4bit"]["metrics"]["docstring_loss"]["bits_per_byte"]["value"]
    assert f"**{fmt(adapter_bpb)}**" in md


def test_quantization_keeps_share_is_direction_aware(root: Path):
    html, _ = render(root)
    full = load(root, "eval/metrics.json")["variants"]["base_full"]["metrics"]
    nf4 = load(root, "eval/metrics.json")["variants"]["base_4bit"]["metrics"]
    quant = html[html.index('id="quantization"') : html.index('id="training"')]
    loss_kept = (
        full["docstring_loss"]["bits_per_byte"]["value"]
        / nf4["docstring_loss"]["bits_per_byte"]["value"]
    )  # lower is better: full / nf4
    acc_kept = nf4["docstring_choice"]["acc"]["value"] / full["docstring_choice"]["acc"]["value"]
    assert loss_kept < 1 and acc_kept < 1
    assert f">{fmt_pct(loss_kept)}</td>" in quant
    assert f">{fmt_pct(acc_kept)}</td>" in quant
    q = load(root, "quantize.json")
    assert fmt_bytes(q["bytes"]["nf4"]) in quant and fmt_bytes(q["bytes"]["full"]) in quant
    for kind in ("nf4", "fp4"):
        assert fmt(q["quant_error"][kind]["mean_relative_error"]) in quant


def test_loss_chart_is_inline_svg_with_every_point(root: Path):
    html, _ = render(root)
    train_dir = root / "reports" / "train"
    train, evals = log_layout.train_curve(train_dir), log_layout.eval_curve(train_dir)
    assert len(train) == 16 and len(evals) == 5  # the fixture, as DVCLive wrote it
    chart = re.search(
        r'<svg class="chart"[^>]*aria-label="Training and validation loss.*?</svg>', html, re.S
    ).group(0)
    train_line = re.search(r'<polyline class="line s-train" points="([^"]*)"', chart).group(1)
    assert len(train_line.split()) == len(train)
    assert chart.count('<circle class="dot s-eval"') == len(evals)
    # loss, learning rate, 3 token histograms, code point histogram, per-layer errors
    assert html.count('<svg class="chart"') == 7


def test_report_is_self_contained(root: Path):
    html, _ = render(root)
    lowered = html.lower()
    for external in ("<script", "<link", "<img", "<iframe", "src=", "@import", "url("):
        assert external not in lowered, external
    hrefs = re.findall(r'href="([^"]+)"', html)
    assert hrefs and all(h.startswith("#") or not re.match(r"[a-z]+:", h) for h in hrefs), hrefs


def test_no_overfitting_warning_when_validation_loss_keeps_falling(root: Path):
    html, md = render(root)
    assert 'id="overfit-warning"' not in html
    assert "overfitting" not in md.lower()


def test_overfitting_warning_when_validation_rises_and_train_falls(root: Path):
    rising = [[0, 2.21], [20, 1.74], [40, 1.62], [60, 1.69], [80, 1.81]]
    write_curve(root, log_layout.EVAL_LOSS, rising)
    html, md = render(root)
    warning = re.search(r'<div class="callout warn" id="overfit-warning">(.*?)</div>', html, re.S)
    assert warning, "overfitting warning missing"
    assert "1.62 (step 40)" in warning.group(1) and "1.81 (step 80" in warning.group(1)
    assert "Warning: overfitting" in md


def test_no_overfitting_warning_when_train_loss_rises_too(root: Path):
    write_curve(root, log_layout.EVAL_LOSS, [[0, 2.0], [40, 1.6], [80, 1.9]])
    write_curve(root, log_layout.TRAIN_LOSS, [[s, 1.3 + s / 100] for s in range(5, 85, 5)])
    html, _ = render(root)
    assert 'id="overfit-warning"' not in html  # diverging, not overfitting


def test_model_output_is_escaped(root: Path):
    html, md = render(root)
    outputs = [o for ex in load(root, "eval/examples.json") for o in ex["outputs"].values()]
    assert any("<script>alert(1)</script>" in o for o in outputs)  # the fixture carries it
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<script" not in html.lower()  # the report has no scripts of its own either
    # Markdown: outputs sit in fenced blocks, one longer than any backtick run inside.
    assert "````text\n```python\ndef escape(s):\n```\n````" in md
    for output in outputs:
        if "<script>" in output:
            assert f"```text\n{output}\n```" in md


# What report.md may hold: its own headings, tables, emphasis, code and the Data Docs link.
REPORT_TAGS = STRUCTURE | {"h1", "h2", "em", "strong", "code", "pre", "blockquote", "a", "hr"}


def assert_data_stays_text(md: str) -> None:
    """Rendered, `md` has no element but the report's own, no link but its Data Docs one,
    and nothing of the hostile values in any tag."""
    for renderer in RENDERERS:
        page = rendered(md, renderer)
        assert tags(page) <= REPORT_TAGS, (renderer, tags(page) - REPORT_TAGS)
        assert re.findall(r'<a href="([^"]*)"', page) == ["validation/data_docs/index.html"]
        assert "evil.example" not in "".join(re.findall(r"<[^>]*>", page)), renderer


def swap(value, old: str, new: str):
    """`value` (parsed JSON or YAML) with every string `old` replaced by `new`."""
    if isinstance(value, dict):
        return {swap(k, old, new): swap(v, old, new) for k, v in value.items()}
    if isinstance(value, list):
        return [swap(v, old, new) for v in value]
    return new if value == old else value


def test_text_from_the_data_stays_text_in_the_markdown(root: Path):
    reports = root / "reports"
    edit_json(reports / "dataset.json", lambda d: d.update(groups_in_two_splits=HOSTILE))
    edit_json(reports / "base.json", lambda b: b.update(source=HOSTILE[0]))

    def hostile_reasons(gate: dict) -> None:
        for check, value in zip(gate["checks"], HOSTILE, strict=False):
            check["reason"] = value

    def hostile_ids(examples: list) -> None:
        for example, value in zip(examples, HOSTILE[1:], strict=False):
            example["id"] = value

    edit_json(reports / "gate.json", hostile_reasons)
    edit_json(reports / "eval" / "examples.json", hostile_ids)
    _, md = render(root)
    assert_data_stays_text(md)
    text = visible(md)
    assert "groups in two splits: " + ", ".join(flat(h) for h in HOSTILE) in text
    assert f"QLoRA report: {HOSTILE[0]}" in text
    checks = load(root, "gate.json")["checks"]
    for check in checks:
        assert flat(check["reason"]).strip() in text


def test_names_and_paths_from_the_data_cannot_break_out_of_code(root: Path):
    """Inline code and code blocks that hold a layer's name, a path of dvc.lock, the primary
    metric's task or a param: backticks in them do not end the code early."""
    reports = root / "reports"
    layer, hostile = "model.layers.0.self_attn.o_proj", "o_proj`![x](https://evil.example/p.png)`"
    for name in ("quantize.json", "quantize_layers.json"):
        edit_json(reports / name, lambda d: swap(d, layer, hostile))
    edit_json(reports / "gate.json", lambda g: g["primary"].update(task=f"t`{HOSTILE[1]}`"))
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    lock = swap(lock, "data/prepared/adapter", f"data/`{HOSTILE[2]}`|x")
    lock["stages"]["base"]["params"]["params.yaml"]["base"]["source"] = f"```\n{HOSTILE[0]}"
    (root / "dvc.lock").write_text(yaml.safe_dump(lock))
    _, md = render(root)
    assert_data_stays_text(md)
    codes = [html_unescape(c) for c in re.findall(r"<code>(.*?)</code>", rendered(md), re.S)]
    assert hostile in codes and f"t`{HOSTILE[1]}` / bits_per_byte" in codes
    assert f"data/`{HOSTILE[2]}`|x" in codes


def test_gate_checks_and_validation_tables(root: Path):
    html, _ = render(root)
    gate = load(root, "gate.json")
    section = html[html.index('id="gate"') : html.index('id="examples"')]
    for check in gate["checks"]:
        assert html_escape(check["reason"]) in section
    assert section.count('<span class="badge good">pass</span>') == len(gate["checks"])
    data = html[html.index('id="data"') : html.index('id="lineage"')]
    assert 'href="validation/data_docs/index.html"' in data
    assert "row 41: Return the number of bytes." in data
    assert '<span class="badge warn">fail</span>' in data  # a failed warning, not an error


def test_lineage_from_dvc_lock_without_git(root: Path):
    (root / "dvc.yaml").write_text("stages:\n  base: {cmd: x}\n  gate: {cmd: y}\n  report: {}\n")
    html, md = render(root)
    lineage = html[html.index('id="lineage"') :]
    assert "0f3a9c2e71b84d5f96a1c3e8d7b20f41.dir" in lineage  # model directory hash
    assert "7a8b9c0d1e2f3a4b5c6d7e8f9a0b1c2d" in lineage  # raw data hash
    assert "not inside a git repository" in lineage
    assert "dvc.lock has no entry for gate" in lineage  # report itself is never expected
    # Dotted params ("base.trust_remote_code") are nested back under their section.
    assert "From dvc.lock" in lineage and "  max_length: 320" in lineage
    assert re.search(r"<th>torch</th><td class=\"mono\">\d", lineage)
    assert '<span class="badge good">off</span>' in lineage  # trust_remote_code
    assert "| finetune | `data/prepared/adapter` |" in md


def test_lineage_degrades_without_dvc_lock(root: Path):
    (root / "dvc.lock").unlink()
    html, _ = render(root)
    assert "dvc.lock not found" in html
    assert "From params.yaml (no dvc.lock" in html
    assert "group_field: module" in html  # the full params.yaml


def commit_all(root: Path, message: str) -> str:
    """`git init` (once), commit every file; returns the commit."""

    def git(*args: str) -> str:
        return run_git(root, *args).strip()

    if not (root / ".git").exists():
        git("init", "-q")
    git("add", "-A")
    git("commit", "-qm", message)
    return git("rev-parse", "HEAD")


@pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")
def test_git_revision_dirty_state_and_compare_column(root: Path):
    head = commit_all(root, "previous run")
    metrics = root / "reports" / "eval" / "metrics.json"
    previous = load(root, "eval/metrics.json")["variants"]["adapter_4bit"]["metrics"]
    edit_json(
        metrics,
        lambda m: m["variants"]["adapter_4bit"]["metrics"]["docstring_choice"]["acc"].update(
            value=0.6042
        ),
    )
    # A changed result alone (reports/) leaves the code version known: not dirty.
    assert git_state(root)["dirty"] is False
    with (root / "params.yaml").open("a") as f:
        f.write("# an uncommitted edit\n")
    html, _ = render(root, compare=load_compare("HEAD", root))
    assert head in html
    assert "dirty: 1 uncommitted change(s)" in html
    assert '<th class="n v">adapter @ HEAD</th>' in html
    row = metric_table_rows(html)[("docstring_choice", "acc")]
    assert len(row) == 4 and row[3][1].startswith(fmt(previous["docstring_choice"]["acc"]["value"]))
    assert row[2][1].startswith(fmt(0.6042))
    with pytest.raises(StageError, match="no-such-rev"):
        load_compare("no-such-rev", root)


def quantized_with_fp4(q: dict) -> None:
    """quantize.json as the stage writes it with `quantize.quant_type: fp4`."""
    q["quant_type"] = "fp4"
    for table in ("bytes", "bytes_as_loaded", "bits_per_parameter"):
        q[table] = {k.replace("nf4", "fp4"): v for k, v in q[table].items()}


def test_a_report_of_an_fp4_run_shows_fp4_sizes(root: Path):
    edit_json(root / "reports" / "quantize.json", quantized_with_fp4)
    html, md = render(root)
    q = load(root, "quantize.json")
    quant = html[html.index('id="quantization"') : html.index('id="training"')]
    assert f'<td>FP4 (double quant)</td><td class="n">{fmt_bytes(q["bytes"]["fp4"])}</td>' in quant
    assert "FP4 keeps" in quant and "NF4 keeps" not in quant
    assert "FP4 memory" in html and f"FP4 {fmt_bytes(q['bytes']['fp4'])}" in md


def test_a_quantize_report_without_its_own_type_names_the_file(root: Path):
    edit_json(root / "reports" / "quantize.json", lambda q: q.update(quant_type="fp4"))
    with pytest.raises(StageError, match=r"(?s)quantize\.json.*bytes lacks \['fp4'\]"):
        render(root)


def test_a_metric_without_a_direction_is_shown_as_such_not_guessed(root: Path):
    def no_direction(m):
        for variant in m["variants"].values():
            variant["metrics"]["docstring_choice"]["acc"]["higher_is_better"] = None

    edit_json(root / "reports" / "eval" / "metrics.json", no_direction)
    regate(root)
    html, md = render(root)
    cells = metric_table_rows(html)[("docstring_choice", "acc")]
    assert not any("best" in css for css, _ in cells)  # no best without a direction
    assert '? <span class="se">direction unknown</span>' in html
    quant = html[html.index('id="quantization"') : html.index('id="training"')]
    assert re.search(r"<td>acc</td>.*?n/a</td></tr>", quant, re.S)  # 4-bit share: not computed
    gate = html[html.index('id="gate"') : html.index('id="examples"')]
    assert '<span class="badge plain">not judged</span>' in gate
    assert "(1 not judged: lm-eval gave no direction)" in gate
    assert "| acc | ? direction unknown |" in md and "| not judged |" in md


def environment(**changes) -> dict:
    return {
        "cpu_model": "Intel(R) Xeon(R) Platinum 8480+",
        "isa_flags": ["avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"],
        "torch": "2.13.0+cpu",
        "torch_cuda": None,
        "mkldnn": True,
        "threads": 2,
        "gpu": None,
        "python": "3.11.7",
        "platform": "Linux x86_64",
    } | changes


def test_the_training_machine_is_shown_where_it_is_recorded(root: Path):
    html, _ = render(root)
    assert 'id="environment"' not in html  # older runs did not record it
    edit_json(
        root / "reports" / "train" / "run.json", lambda t: t.update(environment=environment())
    )
    html, md = render(root)
    lineage = html[html.index('id="lineage"') :]
    assert "<h3>Where it ran</h3>" in lineage
    assert (
        '<th>isa_flags</th><td class="mono">avx2 avx512f avx512_bf16 amx_tile amx_bf16</td>'
        in lineage
    )
    assert '<th>torch_cuda</th><td class="mono">n/a</td>' in lineage
    assert "where it ran (training): cpu_model Intel(R) Xeon(R) Platinum 8480+" in visible(md)


def test_the_batch_split_over_processes_is_shown(root: Path):
    html, md = render(root)
    assert "effective batch" not in html  # older runs did not record it
    batch = {"processes": 2, "per_process": 3, "accumulation_steps": 4, "effective": 24}
    edit_json(root / "reports" / "train" / "run.json", lambda t: t.update(batch=batch))
    html, md = render(root)
    assert (
        "<dt>effective batch</dt><dd>24 rows per optimizer step = 3 per process &times; "
        "2 processes &times; 4 accumulation steps</dd>"
    ) in html
    assert "Effective batch: 24 rows per optimizer step = 3 per process × 2 processes" in md


@pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")
def test_compare_names_what_differs_between_the_two_runs_machines_and_adapters(root: Path):
    train = root / "reports" / "train" / "run.json"
    edit_json(train, lambda t: t.update(environment=environment()))
    commit_all(root, "a run on a Sapphire Rapids machine")
    html, _ = render(root, compare=load_compare("HEAD", root))
    note = re.search(r'id="compare-differs">(.*?)</div>', html, re.S).group(1)
    assert note.startswith("No difference")

    # The same code and params again, on a machine without AVX512-BF16: another adapter.
    flags = ["avx2", "avx512f", "amx_tile", "amx_bf16"]
    other = environment(cpu_model="Xeon", isa_flags=flags)
    edit_json(train, lambda t: t.update(environment=other))
    lock = root / "dvc.lock"
    lock.write_text(lock.read_text().replace("b6c7d8e9f0a1b2c3d4e5f60718293a4b.dir", "0a1b.dir"))
    html, md = render(root, compare=load_compare("HEAD", root))
    expected = (
        "the runs differ in: cpu_model (Intel(R) Xeon(R) Platinum 8480+ → Xeon), "
        "isa_flags (avx512_bf16), adapter (b6c7d8e9f0a1b2c3d4e5f60718293a4b.dir → 0a1b.dir)."
    )
    assert expected in html and expected in visible(md)


def test_compare_says_when_the_other_run_recorded_no_machine(root: Path):
    compare = {"label": "adapter @ old", "metrics": {}, "environment": None, "adapter_md5": None}
    edit_json(
        root / "reports" / "train" / "run.json", lambda t: t.update(environment=environment())
    )
    html, _ = render(root, compare=compare)
    assert "the runs differ in: environment (recorded for this run only)" in html


# ---------------------------------------------------------------- quantization analysis


def section(html: str, start: str, end: str) -> str:
    return html[html.index(f'id="{start}"') : html.index(f'id="{end}"')]


def svg_in(html: str, figure_id: str) -> str:
    return re.search(rf'<figure id="{figure_id}">(<svg.*?</svg>)', html, re.S).group(1)


def test_formats_table_marks_the_configured_format_and_shows_int8(root: Path):
    html, md = render(root)
    formats = load(root, "quantize.json")["formats"]
    table = re.search(r'<table id="format-table">(.*?)</table>', html, re.S).group(1)
    rows = {
        re.match(r"\s*<td>(\w+)", tr).group(1): tr
        for tr in re.findall(r"<tr[^>]*>(.*?)</tr>", table, re.S)[1:]
    }
    assert list(rows) == ["bfloat16", "NF4", "FP4", "int8"]
    assert '<span class="badge good">configured</span>' in rows["NF4"]
    assert "configured" not in rows["FP4"] + rows["int8"]
    for name, key in (("NF4", "nf4"), ("FP4", "fp4"), ("int8", "int8")):
        f = formats[key]
        cells = re.findall(r'<td class="n">([^<]*)</td>', rows[name])
        assert cells == [
            fmt_bytes(f["bytes"]),
            fmt_pct(f["memory_ratio"]),
            fmt(f["bits_per_parameter"]),
            fmt(f["linear_bits"]),
            fmt(f["error"]["mean_relative_error"]),
            fmt(f["error"]["max_relative_error"]),
        ], name
    assert fmt(formats["int8"]["error"]["mean_relative_error"]) == "0.00851"
    # With the formats table, the older error-only table is not repeated.
    assert "mean rel. weight error" not in html
    assert "| **NF4** (configured) | 111.7 MB | 41.5% |" in md
    assert "| int8 | 163.5 MB | 60.8% | 9.723 | 8.047 | 0.00851 | 0.01163 |" in md


def test_a_format_this_device_cannot_load_shows_its_reason(root: Path):
    reason = "bitsandbytes has no int8 matmul on this CPU (needs CUDA)"

    def unsupported(q):
        q["formats"]["int8"] = {"supported": False, "reason": reason}

    edit_json(root / "reports" / "quantize.json", unsupported)
    html, md = render(root)
    table = re.search(r'<table id="format-table">(.*?)</table>', html, re.S).group(1)
    int8 = re.search(r"<td>int8</td>(.*?)</tr>", table, re.S).group(1)
    assert f'<span class="badge plain">not measured</span> {markup_escape(reason)}' in int8
    assert "MB" not in int8
    assert ["int8", f"not measured: {reason}"] in [row[:2] for row in table_rows(md)]


def test_which_layers_suffer_most(root: Path):
    html, md = render(root)
    analysis = load(root, "quantize.json")["analysis"]
    layers = load(root, "quantize_layers.json")["layers"]
    table = re.search(r'<table id="layer-table">(.*?)</table>', html, re.S).group(1)
    names = re.findall(r'<td class="mono">([^<]+)</td>', table)
    assert names == analysis["most_sensitive"] == [r["name"] for r in layers[:5]]
    worst = layers[0]
    assert worst["name"] == "model.layers.0.self_attn.o_proj"
    first = re.findall(r'<td class="n">([^<]*)</td>', re.findall(r"<tr>(.*?)</tr>", table)[1])
    assert first == [
        "1",
        "576 × 576",
        fmt(worst["nf4_error"]),
        fmt(worst["fp4_error"]),
        fmt(worst["int8_error"]),
        fmt(worst["excess_kurtosis"], 3),
        fmt(worst["block_absmax_ratio"], 3),
    ]
    summary = re.search(r'<p id="analysis-summary">(.*?)</p>', html, re.S).group(1)
    assert summary.startswith("210 quantized layers, 106,168,320 weights.")
    assert f"excess kurtosis {fmt(analysis['max_excess_kurtosis'], 3)}" in summary
    assert f"| 1 | `{worst['name']}` | 576 × 576 | {fmt(worst['nf4_error'])} |" in md


def test_the_histogram_draws_the_16_nf4_code_points_over_the_worst_layer(root: Path):
    html, md = render(root)
    hist = load(root, "quantize_layers.json")["histogram"]
    svg = svg_in(html, "code-point-histogram")
    assert hist["layer"] in re.search(r"<title>(.*?)</title>", svg).group(1)
    assert svg.count("<rect ") == sum(1 for n in hist["counts"] if n)
    xs = [float(x) for x in re.findall(r'<line class="code-point" x1="([\d.]+)"', svg)]
    assert len(xs) == 16
    # The plot spans -1..1 from x=56 to x=544: each line sits at its code point.
    expected = [56 + (c + 1) / 2 * (544 - 56) for c in hist["code_points"]]
    assert xs == pytest.approx(expected, abs=0.06)
    # The caption's crowding figure: the 4 code points nearest 0, from code_point_share.
    nearest = sorted(range(16), key=lambda i: abs(hist["code_points"][i]))[:4]
    share = sum(hist["code_point_share"][i] for i in nearest)
    assert fmt_pct(share) == "43.1%"
    caption = re.search(
        r'<figure id="code-point-histogram">.*?<figcaption>(.*?)</figcaption>', html, re.S
    ).group(1)
    assert "the 4 codes nearest 0 receive 43.1% of the weights (25.0% if all 16" in caption
    assert "receive 43.1% of the weights" in md


def test_the_per_layer_chart_has_a_bar_a_layer_and_names_the_top_three(root: Path):
    html, _ = render(root)
    layers = load(root, "quantize_layers.json")["layers"]
    svg = svg_in(html, "layer-profile")
    bars = re.findall(r'<rect class="bar s-nf4( top)?" x="[\d.]+" y="([\d.]+)"', svg)
    assert len(bars) == len(layers) == 210
    assert [top for top, _ in bars[:4]] == [" top"] * 3 + [""]
    tops = [float(y) for _, y in bars]
    assert tops == sorted(tops)  # most damaged (tallest: smallest y) first
    labels = re.findall(r'<text class="label"[^>]*>([^<]*)</text>', svg)
    assert labels == [f"{r['rank']}. {r['name']}" for r in layers[:3]]
    # FP4 and int8 over the same layers: one point each.
    for css in ("s-fp4", "s-int8"):
        points = re.search(rf'<polyline class="line {css}" points="([^"]*)"', svg).group(1)
        assert len(points.split()) == 210


def test_skip_modules_suggestion_with_its_cost_and_how_to_set_it(root: Path):
    html, md = render(root)
    q = load(root, "quantize.json")
    skip = q["skip_modules"]
    part = section(html, "skip-modules", "loftq")
    assert "none: every linear layer but the model's own (lm_head) is quantized" in part
    assert f"would cost {fmt_bytes(skip['suggested_extra_bytes'])} (+1.3% on the NF4 model)" in part
    assert f"remove {fmt_pct(skip['suggested_error_share'])} of the model's squared NF4" in part
    assert "while they hold 0.9% of the quantized weights" in part
    snippet = "quantize:\n  skip_modules:\n" + "".join(f"    - {n}\n" for n in skip["suggested"])
    assert f'<pre class="snippet">{snippet}</pre>' in part
    assert f"```yaml\n{snippet}```" in md

    def configured(q):
        q["skip_modules"].update(
            configured=skip["suggested"],
            configured_layers=skip["suggested"],
            configured_extra_bytes=skip["suggested_extra_bytes"],
        )

    edit_json(root / "reports" / "quantize.json", configured)
    html, _ = render(root)
    part = section(html, "skip-modules", "loftq")
    assert f"(5 layers), measured cost {fmt_bytes(skip['suggested_extra_bytes'])}" in part
    assert "snippet" not in part  # already configured: nothing to paste


def test_loftq_errors_and_how_this_run_was_initialised(root: Path):
    html, md = render(root)
    loftq = load(root, "quantize.json")["loftq"]
    part = html[html.index('id="loftq"') : html.index('id="training"')]
    stats = re.findall(r"<dd>([^<]*)</dd>", part)
    assert stats[:3] == [fmt(loftq["error_before"]), fmt(loftq["error_after"]), "6.3%"]
    assert "Measured on 53 layers (every 4th)" in part
    assert '<span class="badge plain">peft\'s default</span>' in part
    assert (
        "<code>dvc exp run -S finetune.lora.init=loftq</code>, then <code>dvc exp show</code>"
        in part
    )
    assert "`dvc exp run -S finetune.lora.init=loftq`, then `dvc exp show`" in md

    record = {"method": "loftq", "layers": 210, "error_before": 0.0936, "error_after": 0.0871}
    edit_json(root / "reports" / "train" / "run.json", lambda t: t.update(lora_init=record))
    html, md = render(root)
    init = re.search(r'<p id="lora-init">(.*?)</p>', html, re.S).group(1)
    assert "initialised with LoftQ</span> on 210 layers, weight error 0.0936 &rarr; 0.0871" in init
    assert "finetune.lora.init=default" in init and "**initialised with LoftQ**" in md

    edit_json(root / "reports" / "train" / "run.json", lambda t: t.pop("lora_init") and None)
    html, _ = render(root)
    assert "initialisation not recorded" in html


def test_an_int8_run_names_int8_and_marks_it_configured(root: Path):
    def quantized_with_int8(q):
        int8 = q["formats"]["int8"]
        q.update(quant_type="int8", bytes={"full": q["bytes"]["full"], "int8": int8["bytes"]})
        q["bits_per_parameter"] = {
            "full": q["bits_per_parameter"]["full"],
            "int8": int8["bits_per_parameter"],
            "int8_linear_layers": int8["linear_bits"],
        }

    edit_json(root / "reports" / "quantize.json", quantized_with_int8)
    html, md = render(root)
    quant = section(html, "quantization", "training")
    assert "int8 keeps" in quant and "NF4 keeps" not in quant
    assert '<tr><td>int8</td><td class="n">163.5 MB</td>' in quant  # no "(double quant)"
    assert re.search(r'<tr class="configured"><td>int8 <span class="badge good">configured', quant)
    assert "int8 memory" in html and "| **int8** (configured) | 163.5 MB |" in md


# ---------------------------------------------------------------- the method's claims


def fixture_claims(reports: Path) -> dict:
    """claims.json as the claims stage writes it from these quantize.json and metrics.json."""
    quantize = json.loads((reports / "quantize.json").read_text())
    metrics = json.loads((reports / "eval" / "metrics.json").read_text())
    return json.loads(json.dumps(claims_report(quantize, metrics)))


def test_the_fixture_claims_are_what_qlora_claims_makes():
    assert load_fixture("claims.json") == fixture_claims(FIXTURES / "reports"), (
        "qlora/evaluation/claims.py changed: "
        "`PYTHONPATH=tests python tests/unit/report/test_report.py` rewrites the fixture"
    )


def load_fixture(rel: str):
    return json.loads((FIXTURES / "reports" / rel).read_text())


def claims_table_rows(html: str) -> list[tuple[str, str, str, str]]:
    """(subject, measured, badge, why) of each claims table row."""
    table = re.search(r'<table id="claims-table">(.*?)</table>', html, re.S).group(1)
    return re.findall(
        r'<td class="nowrap">([^<]*)</td><td class="n">([^<]*)</td>\s*'
        r'<td><span class="badge \w+">(\w+)</span></td><td class="reason">([^<]*)</td>',
        table,
    )


def test_claims_table_shows_every_row_with_its_verdict_and_why(root: Path):
    html, md = render(root)
    claims = load(root, "claims.json")
    assert 'href="#claims"' in html and html.index('id="metrics"') < html.index('id="claims"')
    rows = claims_table_rows(html)
    assert [(s, d) for s, d, _, _ in rows] == [(r["subject"], r["display"]) for r in claims["rows"]]
    assert [b for _, _, b, _ in rows] == ["FAIL"] * 9
    memory = claims["rows"][0]
    assert memory["subject"] == "memory (nf4)" and memory["display"] == "58.5% saved"
    assert rows[0][3] == markup_escape(memory["why"])
    assert '<span class="badge bad">FAIL</span>' in html
    summary = re.search(r'<p id="claims-summary">(.*?)</p>', html, re.S).group(1)
    assert "0 of 9 checks held, 9 did not" in summary and "undecided" not in summary
    # The claim and its rule once per claim, not once per metric.
    table = re.search(r'<table id="claims-table">(.*?)</table>', html, re.S).group(1)
    assert table.count(markup_escape(claims["rows"][-1]["claim"])) == 1
    assert table.count('rowspan="7"') == 1
    assert ["memory (nf4)", "58.5% saved", "FAIL", memory["why"]] in [r[1:] for r in table_rows(md)]


def test_a_claim_that_holds_has_no_why_and_an_undecided_one_says_so(root: Path):
    def four_bit_as_good(m):
        variants = m["variants"]
        acc = variants["base_full"]["metrics"]["docstring_choice"]["acc"]["value"]
        variants["base_4bit"]["metrics"]["docstring_choice"]["acc"]["value"] = acc
        for v in variants.values():
            v["metrics"]["docstring_choice"]["acc_norm"]["higher_is_better"] = None

    reports = root / "reports"
    edit_json(reports / "eval" / "metrics.json", four_bit_as_good)
    (reports / "claims.json").write_text(json.dumps(fixture_claims(reports)))
    html, md = render(root)
    rows = {subject: (badge, why) for subject, _, badge, why in claims_table_rows(html)}
    assert rows["docstring_choice/acc"] == ("PASS", "")
    assert rows["docstring_choice/acc_norm"][0] == "undecided"
    assert "no direction" in rows["docstring_choice/acc_norm"][1]
    summary = re.search(r'<p id="claims-summary">(.*?)</p>', html, re.S).group(1)
    assert "1 of 9 checks held, 7 did not</strong>, 1 undecided" in summary
    assert ["docstring_choice/acc", "100.0% kept", "PASS", ""] in [r[1:] for r in table_rows(md)]


def test_generation_speed_of_each_variant(root: Path):
    html, md = render(root)
    variants = load(root, "eval/metrics.json")["variants"]
    table = re.search(r'<table id="speed-table">(.*?)</table>', html, re.S).group(1)
    full = variants["base_full"]["speed"]["tokens_per_s"]
    for name in ("base_full", "base_4bit", "adapter_4bit"):
        v = variants[name]
        s = v["speed"]
        row = (
            f"<tr><td>{markup_escape(v['label'])}</td>"
            f'<td class="n">{fmt(s["tokens_per_s"], 3)}</td>'
            f'<td class="n">{fmt(s["seconds_per_prompt"], 3)}</td>'
            f'<td class="n">{fmt(s["tokens_per_s"] / full, 3)}&times;</td></tr>'
        )
        assert row in table, name
    assert "4 test prompts &times; exactly 32 new tokens each" in html and "on cpu" in html
    assert ["base (nf4+double_quant)", "6.21", "5.15", "0.25×"] in table_rows(md)


# ---------------------------------------------------------------- older runs


def as_before_the_quantization_analysis(root: Path) -> None:
    """The reports of a run before the quantization analysis and the claims existed."""
    reports = root / "reports"
    (reports / "quantize_layers.json").unlink()
    (reports / "claims.json").unlink()

    def old_quantize(q):
        for key in ("formats", "analysis", "skip_modules", "loftq", "quantized_weights"):
            q.pop(key)
        q["quant_error"].pop("int8")

    def no_speed(m):
        for v in m["variants"].values():
            v.pop("speed")

    edit_json(reports / "quantize.json", old_quantize)
    edit_json(reports / "eval" / "metrics.json", no_speed)
    edit_json(reports / "train" / "run.json", lambda t: t.pop("lora_init") and None)


def test_a_run_before_the_quantization_analysis_still_renders(root: Path):
    as_before_the_quantization_analysis(root)
    html, md = render(root)
    for part in (
        "format-table",
        "sensitive-layers",
        "skip-modules",
        'id="loftq"',
        '<line class="code-point"',
    ):
        assert part not in html, part
    assert 'id="claims"' not in html and 'href="#claims"' not in html
    assert html.count('<svg class="chart"') == 5
    q = load(root, "quantize.json")
    quant = section(html, "quantization", "training")
    assert "mean rel. weight error" in quant  # the older table, as before
    assert fmt(q["quant_error"]["fp4"]["mean_relative_error"]) in quant
    assert "### Formats" not in md and "## The method's claims" not in md


def test_only_the_claims_file_missing_leaves_the_speed_table(root: Path):
    (root / "reports" / "claims.json").unlink()
    html, _ = render(root)
    claims = section(html, "claims", "gate")
    assert 'id="speed-table"' in claims and 'id="claims-table"' not in claims


def test_only_the_layer_file_missing_keeps_the_summary_and_skips_the_charts(root: Path):
    (root / "reports" / "quantize_layers.json").unlink()
    html, _ = render(root)
    assert 'id="analysis-summary"' in html and 'id="layer-table"' not in html
    assert html.count('<svg class="chart"') == 5
    assert "while they hold" not in html  # the weights' share needs the layer file


@pytest.mark.parametrize(
    ("rel", "change", "message"),
    [
        (
            "quantize_layers.json",
            lambda d: d["histogram"]["bin_edges"].pop(),
            r"quantize_layers\.json.*histogram.*128 bin_edges for 128 counts",
        ),
        (
            "claims.json",
            lambda d: d["rows"][0].pop("passed"),
            r"claims\.json.*rows\.0\.passed",
        ),
        (
            "quantize.json",
            lambda d: d["formats"]["int8"].pop("bytes"),
            r"quantize\.json.*formats\.int8.*a supported format needs bytes",
        ),
        (
            "eval/metrics.json",
            lambda d: d["variants"]["base_4bit"]["speed"].pop("tokens_per_s"),
            r"metrics\.json: does not match the EvalMetrics schema\n"
            r".*variants\.base_4bit\.speed\.tokens_per_s",
        ),
    ],
)
def test_a_malformed_new_input_names_the_file_and_field(root: Path, rel, change, message):
    edit_json(root / "reports" / rel, lambda d: change(d) and None)
    with pytest.raises(StageError, match=f"(?s){message}"):
        render(root)
    assert not (root / "reports" / "report.html").exists()


# ---------------------------------------------------------------- bad input


def test_missing_input_names_the_file_and_writes_nothing(root: Path):
    (root / "reports" / "gate.json").unlink()
    with pytest.raises(StageError, match=r"gate\.json"):
        render(root)
    assert not (root / "reports" / "report.html").exists()
    assert not (root / "reports" / "report.md").exists()


def test_missing_key_names_file_and_key(root: Path):
    summary = root / "reports" / "train" / "metrics.json"
    edit_json(summary, lambda m: m["train"].pop("tokens_per_s") and None)
    with pytest.raises(
        StageError, match=r"train/metrics\.json: missing metric\(s\) \['train/tokens_per_s'\]"
    ):
        render(root)


def test_a_bad_row_of_a_dvclive_curve_names_the_file_and_line(root: Path):
    write_curve(root, log_layout.EVAL_LOSS, [[0, 2.0], [40, "nan?"]])
    with pytest.raises(StageError, match=r"eval/loss\.tsv, line 3: expected a step and a number"):
        render(root)


def test_stage_entry_point(root: Path):
    def run_stage() -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "stages.report"],
            cwd=root,
            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
            capture_output=True,
            text=True,
            timeout=60,
        )

    done = run_stage()
    assert done.returncode == 0, done.stderr
    assert (root / "reports" / "report.html").stat().st_size > 10_000
    (root / "reports" / "quantize.json").unlink()
    done = run_stage()
    assert done.returncode == 1
    assert "reports/quantize.json" in done.stderr and "Traceback" not in done.stderr


# ---------------------------------------------------------------- a real browser


def read_png(path: Path) -> tuple[int, int, list[bytes]]:
    """Decode an 8-bit RGB(A) non-interlaced PNG (what Chromium writes) into pixel rows."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat = 8, b""
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
    assert depth == 8 and color in (2, 6) and interlace == 0, "unexpected PNG format"
    bpp = 3 if color == 2 else 4
    raw, stride, prev, rows = zlib.decompress(idat), width * bpp, bytearray(width * bpp), []
    for y in range(height):
        start = y * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1 : start + 1 + stride])
        for x in range(stride):
            a = line[x - bpp] if x >= bpp else 0
            b, c = prev[x], prev[x - bpp] if x >= bpp else 0
            if kind == 1:
                line[x] = (line[x] + a) & 255
            elif kind == 2:
                line[x] = (line[x] + b) & 255
            elif kind == 3:
                line[x] = (line[x] + (a + b) // 2) & 255
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[x] = (line[x] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line) if bpp == 3 else bytes(line[i] for i in range(stride) if i % 4 < 3))
        prev = line
    return width, height, rows


def count_near(
    rows: list[bytes], rgb: tuple[int, int, int], y0: int, y1: int, tol: int = 40
) -> int:
    count = 0
    for row in rows[y0:y1]:
        for i in range(0, len(row), 3):
            if all(abs(row[i + k] - rgb[k]) <= tol for k in range(3)):
                count += 1
    return count


CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]


def test_report_renders_in_headless_chromium(root: Path, tmp_path: Path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium not installed: apt-get install chromium")
    render(root)
    url = (root / "reports" / "report.html").resolve().as_uri()
    base = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=60)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "PROMOTED" in dom.stdout and 'id="metric-table"' in dom.stdout
    assert dom.stdout.count("<svg") == 7 and "<polyline" in dom.stdout

    ARTIFACTS.mkdir(exist_ok=True)
    png = ARTIFACTS / "report.png"
    png.unlink(missing_ok=True)
    shot = subprocess.run(
        [*base, f"--screenshot={png}", "--window-size=1280,4400", url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shot.returncode == 0 and png.exists(), shot.stderr[-2000:]
    width, height, rows = read_png(png)
    assert (width, height) == (1280, 4400)
    # Not blank: many distinct row contents, and the page's colors where they belong.
    assert len(set(rows)) > 500
    green_headline = count_near(rows, (0x13, 0x7A, 0x3F), 0, 500)  # "PROMOTED", --good
    # The loss chart, below the quantization section (whose charts use other colors).
    train_line = count_near(rows, (0x2F, 0x5B, 0xD3), 2100, 3100)  # --train
    eval_line = count_near(rows, (0xD9, 0x48, 0x0F), 2100, 3100)  # --eval
    assert green_headline > 2000, green_headline
    assert train_line > 300 and eval_line > 300, (train_line, eval_line)


if __name__ == "__main__":
    # Rewrite the claims fixture after a change to qlora/evaluation/claims.py (or to its inputs).
    reports = FIXTURES / "reports"
    (reports / "claims.json").write_text(
        json.dumps(fixture_claims(reports), indent=2, ensure_ascii=False) + "\n"
    )
    print(f"wrote {reports / 'claims.json'}")


# ---------------------------------------------------------------- generated answers, row by row


def browser(html: str) -> str:
    return re.search(r'<section class="panel" id="rows">(.*?)</section>', html, re.S).group(1)


def browser_rows(html: str) -> list[tuple[str, str, str]]:
    """(status, rank, id) of each row, in page order."""
    return re.findall(
        r'<div class="gen-row (\w+)" style="--rank: (\d+)">\s*'
        r'<div class="gen-head"><span class="id">([^<]*)</span>',
        browser(html),
    )


def test_the_fixture_rows_carry_the_scores_the_task_gives():
    from qlora.evaluation.generation import score_answer

    rows = json.loads((FIXTURES / "reports/eval/generations.json").read_text())["tasks"]
    for row in rows["docstring_generate"]:
        for variant, output in row["outputs"].items():
            assert row["scores"][variant] == score_answer(output, row["reference"])


def test_every_test_row_is_in_the_row_browser_with_each_answer_and_score(root: Path):
    html, _ = render(root)
    rows = load(root, "eval/generations.json")["tasks"]["docstring_generate"]
    assert [r[2] for r in browser_rows(html)] == [r["id"] for r in rows]  # test order
    section = browser(html)
    for row in rows:
        for name, output in row["outputs"].items():
            assert f"<pre>{markup_escape(output)}</pre>" in section  # as Jinja escapes
            assert f"ROUGE-L {fmt(row['scores'][name]['rouge_l'])}" in section
            assert f"chrF {fmt(row['scores'][name]['chrf'])}" in section
    assert "1 worse, 3 better, 1 unchanged of 5" in section


def test_the_rows_the_adapter_made_worse_come_first_in_its_view(root: Path):
    html, md = render(root)
    rows = load(root, "eval/generations.json")["tasks"]["docstring_generate"]

    def change(row):  # adapter vs the 4-bit base it was trained on, ROUGE-L then chrF
        return tuple(
            row["scores"]["adapter_4bit"][m] - row["scores"]["base_4bit"][m]
            for m in ("rouge_l", "chrf")
        )

    worst_first = [r["id"] for r in sorted(rows, key=change)]
    ranks = {row_id: int(rank) for _, rank, row_id in browser_rows(html)}
    assert sorted(ranks, key=ranks.get) == worst_first
    status = {row_id: s for s, _, row_id in browser_rows(html)}
    assert status == {
        "posixpath.join": "worse",
        "operator.add": "same",
        "shutil.disk_usage": "better",
        "html.escape": "better",
        "textwrap.dedent": "better",
    }
    assert 'href="#rows-worse-first"' in html and 'href="#rows-worse"' in html
    # report.md names the worse rows with both answers.
    assert "### posixpath\\.join: ROUGE-L \u22120.75, chrF \u221254.42" in md
    assert "```text\nReturn the path.\n```" in md


def test_answers_in_the_row_browser_are_escaped(root: Path):
    html, _ = render(root)
    section = browser(html)
    assert section.count("&lt;script&gt;alert(1)&lt;/script&gt;") == 2
    assert "<script" not in html.lower()


def test_the_headline_shows_the_generation_guard_next_to_the_primary(root: Path):
    def with_generation(m):
        for name, (rouge, se) in {
            "base_full": (0.30, 0.04),
            "base_4bit": (0.25, 0.04),
            "adapter_4bit": (0.55, 0.05),
        }.items():
            m["variants"][name]["metrics"]["docstring_generate"] = {
                "rouge_l": {"value": rouge, "stderr": se, "higher_is_better": True},
                "chrf": {"value": 100 * rouge, "stderr": 100 * se, "higher_is_better": True},
            }

    edit_json(root / "reports" / "eval" / "metrics.json", with_generation)
    gate = regate(root)
    check = next(c for c in gate["checks"] if c["metric"] == "rouge_l")
    assert check["kind"] == "guard" and check["passed"] and check["beyond_noise"]
    html, md = render(root)
    headline = re.search(r'id="headline">(.*?)</section>', html, re.S).group(1)
    lo, hi = check["ci95"]
    assert (
        "<code>docstring_generate</code> &middot; <code>rouge_l</code> 0.25 &rarr; 0.55" in headline
    )
    assert f"95% CI of the change [{fmt(lo)}, {fmt(hi)}]; guard passed" in headline
    assert "Generated answers `docstring_generate / chrf` (↑ better): 25 → 55" in md


def test_a_run_without_generated_rows_has_no_row_browser(root: Path):
    (root / "reports" / "eval" / "generations.json").unlink()
    html, md = render(root)
    assert 'id="rows"' not in html and "row by row" not in md


def test_a_very_large_test_set_shows_the_worst_rows_and_says_so(root: Path, monkeypatch):
    from qlora.report import rows

    monkeypatch.setattr(rows, "ROW_CAP", 2)
    html, _ = render(root)
    # The two worst (posixpath.join, then operator.add), in test order.
    assert [r[2] for r in browser_rows(html)] == ["posixpath.join", "operator.add"]
    assert "5 rows: the 2 the adapter changed for the worse first are shown (3 left out" in html


def count_colour(png: Path, rgb: tuple[int, int, int]) -> tuple[int, int | None]:
    """(pixels near `rgb`, the first row that has one)."""
    _, _, rows = read_png(png)
    counts = [count_near([row], rgb, 0, 1, tol=12) for row in rows]
    first = next((y for y, n in enumerate(counts) if n), None)
    return sum(counts), first


def test_the_row_browser_views_sort_and_filter_in_headless_chromium(root: Path, tmp_path: Path):
    """The views are CSS alone: each link's fragment, loaded, must hide or reorder rows in a
    real browser. The browser section alone, with the report's style, on one short page:
    worse rows have a red edge (--bad), better rows a green one (--good)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium not installed: apt-get install chromium")
    html, _ = render(root)
    style = re.search(r"<style>.*?</style>", html, re.S).group(0)
    page = tmp_path / "rows.html"
    page.write_text(
        f'<!doctype html><html><head><meta charset="utf-8">{style}</head><body><main>'
        f'<section class="panel" id="rows">{browser(html)}</section></main></body></html>',
        encoding="utf-8",
    )
    base = [
        chromium,
        *CHROMIUM_FLAGS,
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1280,2400",
    ]
    red, green = (0xB4, 0x23, 0x18), (0x13, 0x7A, 0x3F)
    seen = {}
    for view in ("", "#rows-worse-first", "#rows-worse", "#rows-better"):
        png = tmp_path / f"view{view.replace('#', '-')}.png"
        shot = subprocess.run(
            [*base, f"--screenshot={png}", page.as_uri() + view],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert shot.returncode == 0 and png.exists(), shot.stderr[-2000:]
        seen[view] = (count_colour(png, red), count_colour(png, green))
    (red_all, red_top), (green_all, green_top) = seen[""]
    assert red_all > 200 and green_all > 200
    assert green_top < red_top  # test order: the worse row is 4th
    (_, red_top), (_, green_top) = seen["#rows-worse-first"]
    assert red_top < green_top  # worse first
    (red_n, _), (green_n, _) = seen["#rows-worse"]
    assert red_n > 200 and green_n == 0
    (red_n, _), (green_n, _) = seen["#rows-better"]
    assert red_n == 0 and green_n > 200


# ---------------------------------------------------------------- the deployment section


def with_export(root: Path, refused: str | None = None) -> None:
    """The default run's eval_gguf and parity files (tests/fixtures/report/export, from a
    `make run`) in `root`; with `refused`, that artifact as the export reports a merge its
    check refused: not built, so unmeasured and failed."""
    from qlora.export.parity import unbuilt

    out = root / "reports" / "export"
    shutil.copytree(FIXTURES / "export", out)
    if refused is None:
        return
    why = "not exported: merged export failed its check, nothing written: a KL of 1e-6"

    def not_built(e: dict) -> None:
        del e["artifacts"][refused]
        e["failed"] = {refused: why}

    edit_json(out / "gguf_eval.json", not_built)

    def judge_unbuilt(p: dict) -> None:
        p["artifacts"][refused] = unbuilt({"value": p["artifacts"][refused]["reference"]}, why)
        p["deployable"].remove(refused)
        p["summary"] = {"passed": len(p["deployable"]), "failed": 1}
        for row in p["table"]:
            row["values"].pop(refused, None)

    edit_json(out / "parity.json", judge_unbuilt)


def deploy_html(html: str) -> str:
    return re.search(r'<section class="panel" id="deploy">(.*?)</section>', html, re.S).group(1)


def test_the_deployment_section_shows_each_artifact_its_numbers_and_its_verdict(root: Path):
    with_export(root)
    html, md = render(root)
    section = deploy_html(html)
    measured = json.loads((FIXTURES / "export/gguf_eval.json").read_text())["artifacts"]
    parity = json.loads((FIXTURES / "export/parity.json").read_text())
    rows = re.findall(r"<tr><td class=\"nowrap\">([^<]+)</td>(.*?)</tr>", section, re.S)
    assert [name for name, _ in rows] == list(measured)
    for name, cells in rows:
        speed = measured[name]["speed"]["tokens_per_s"]
        assert f'<td class="n">{fmt(speed, 3)}' in cells, name
        assert "deployable" in cells and parity["artifacts"][name]["reason"] in html_unescape(cells)
    header = re.search(r'<table id="parity-table">.*?</thead>', section, re.S).group(0)
    assert [html_unescape(c) for c in re.findall(r'<th class="n v">([^<]+)</th>', header)] == [
        "PyTorch base (full precision)", "PyTorch NF4 + adapter", *measured,
    ]  # fmt: skip
    assert "## Deployable artifacts" in md and all(f"| {md_text(n)} |" in md for n in measured)


def test_an_artifact_the_export_refused_is_listed_failed_with_its_reason(root: Path):
    with_export(root, refused="merged-q8_0")
    html, md = render(root)
    section = deploy_html(html)
    (row,) = re.findall(r'<tr class="failed"><td class="nowrap">merged-q8_0</td>(.*?)</tr>',
                        section, re.S)  # fmt: skip
    assert ">FAIL<" in row and "not exported: merged export failed its check" in row
    assert row.count("n/a") >= 5  # sizes, ratios and speed: nothing was measured
    lede = re.search(r"only the ones that pass.*?</p>", section, re.S | re.I)[0]
    assert "merged-q8_0" not in lede and "merged-q4_k_m" in lede
    assert f"| {md_text('merged-q8_0')} | n/a |" in md and "**FAIL**" in md


def test_no_panel_of_the_report_is_wider_than_its_box_in_headless_chromium(root: Path, tmp_path):
    """The widest tables (the parity table: a column per model) must fit, or scroll inside
    their panel: measured by the browser on the rendered page."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium not installed: apt-get install chromium")
    with_export(root)
    html, _ = render(root)
    probe = (
        "<script>addEventListener('load', () => { document.body.dataset.overflow = "
        "[...document.querySelectorAll('section.panel')].filter(p => p.scrollWidth > "
        "p.clientWidth + 1).map(p => p.id).join(' ') || 'none'; });</script>"
    )
    page = tmp_path / "probe.html"
    page.write_text(html.replace("</body>", probe + "</body>"), encoding="utf-8")
    base = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(
        [*base, "--window-size=1280,2000", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert dom.returncode == 0, dom.stderr[-2000:]
    overflow = re.search(r'data-overflow="([^"]*)"', dom.stdout)
    assert overflow is not None, "the probe did not run"
    assert overflow.group(1) == "none"
