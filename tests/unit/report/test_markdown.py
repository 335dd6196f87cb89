"""Text from the data stays text in every Markdown the project writes.

Ground truth is a real renderer: markdown-it-py (CommonMark, with GFM tables and
strikethrough), mistune (with its bare-URL autolinks, as GFM has them) and Python-Markdown.
The HTML they make of an escaped value holds no link, image or HTML element, and reads as
the value itself. report.md end to end: tests/unit/report/test_report.py.
"""

from __future__ import annotations

import ast
import html
import json
import re
from urllib.parse import unquote

import pytest
from markdown_it import MarkdownIt

from flows import report_artifacts as ra
from helpers.markdown import (
    HOSTILE,
    LINE_BREAK,
    READS_AS_TEXT,
    RENDERERS,
    STRUCTURE,
    flat,
    rendered,
    table_rows,
    tags,
    text_of,
    visible,
)
from helpers.repo import FIXTURES_DIR
from qlora.registry.model_card import render_card
from qlora.report.text import md_code, md_fence, md_link, md_text

FIXTURES = FIXTURES_DIR / "report"


def contexts(value: str) -> dict[str, str]:
    """An escaped value where report.md, the gate artifact and model cards put one."""
    cell = md_text(value)
    return {
        "paragraph": f"Reason: {cell}\n",
        "list": f"- {cell}\n- next\n",
        "heading": f"### {cell}\n",
        "table": f"| a | b |\n|---|---|\n| {cell} | x |\n",
    }


@pytest.mark.parametrize("value", HOSTILE)
@pytest.mark.parametrize("renderer", sorted(RENDERERS))
def test_escaped_text_renders_no_link_image_or_html(value, renderer):
    for where, md in contexts(value).items():
        page = rendered(md, renderer)
        assert tags(page) <= STRUCTURE, (where, md, page)
        assert "evil.example" not in re.sub(r">[^<]*<", "><", page), (where, page)


@pytest.mark.parametrize("value", HOSTILE)
@pytest.mark.parametrize("renderer", READS_AS_TEXT)
def test_escaped_text_reads_as_the_value(value, renderer):
    md = contexts(value)
    cells = re.findall(r"<td>(.*?)</td>", rendered(md["table"], renderer), re.S)
    assert text_of(cells[0]) == flat(value).strip()  # the table is one row, two cells
    page = rendered(md["heading"], renderer)
    assert text_of(page).strip() == flat(value).strip()


@pytest.mark.parametrize("value", HOSTILE)
def test_a_code_span_holds_the_value_and_nothing_breaks_out(value):
    for md, expected_tags in (
        (f"Metric {md_code(value)} here\n", {"p", "code"}),
        (f"| a | b |\n|---|---|\n| {md_code(value, cell=True)} | x |\n", STRUCTURE | {"code"}),
    ):
        page = rendered(md)
        assert tags(page) <= expected_tags, page
        codes = re.findall(r"<code>(.*?)</code>", page, re.S)
        assert [html.unescape(c) for c in codes] == [flat(value)], page
        assert page.count("<td>") in (0, 2)  # a "|" inside did not add a column


@pytest.mark.parametrize("value", [*HOSTILE, "````\n```\n~~~", "`" * 7])
def test_a_fence_holds_the_value_whatever_backticks_it_holds(value):
    md = f"Output:\n\n{md_fence(value)}\n\nafter\n"
    page = rendered(md)
    blocks = re.findall(r"<pre><code[^>]*>(.*?)</code></pre>", page, re.S)
    assert [html.unescape(b) for b in blocks] == [LINE_BREAK.sub("\n", value) + "\n"]
    assert page.endswith("<p>after</p>\n")


@pytest.mark.parametrize(
    "url",
    [
        "javascript:alert(1)",
        " JaVaScRiPt:alert(1)",
        "java\tscript:alert(1)",
        "data:text/html;base64,PHNjcmlwdD4=",
        "vbscript:msgbox(1)",
    ],
)
def test_a_link_is_made_only_to_the_web_a_file_or_a_relative_path(url):
    for renderer in RENDERERS:
        page = rendered(f"Full report: {md_link(url)}\n", renderer)
        assert tags(page) == {"p"}, page
    assert visible(md_link(url)).strip() == url.strip()


@pytest.mark.parametrize(
    "url",
    [
        "https://reports.example/run 1/report.html",
        "https://reports.example/a_(b)/report.html?x=1&y=2",
        "file:///srv/q lora/reports/report.html",
        "../gx/docs (v2)/index.html",
    ],
)
def test_a_web_link_points_where_it_says(url):
    # Where the Markdown points, before a renderer's own policy (markdown-it links no file:).
    any_link = MarkdownIt("commonmark")
    any_link.validateLink = lambda url: True
    page = any_link.render(f"See {md_link(url, 'the report')}.\n")
    links = re.findall(r'<a href="([^"]*)">(.*?)</a>', page)
    assert len(links) == 1 and links[0][1] == "the report", page
    assert unquote(html.unescape(links[0][0])) == url


def gate_with(value: str) -> dict:
    gate = json.loads((FIXTURES / "reports" / "gate.json").read_text())
    gate["summary"] = f"REJECTED: {value}"
    gate["primary"]["task"] = value
    for check in gate["checks"]:
        check["task"] = value
        check["reason"] = f"FAIL: {value}"
    gate["reasons"] = [f"FAIL: {value}"]
    return gate


@pytest.mark.parametrize("value", HOSTILE)
def test_the_gate_artifact_shows_names_and_reasons_as_text(value):
    gate = gate_with(value)
    md = ra.gate_markdown(gate)
    for renderer in RENDERERS:
        assert tags(rendered(md, renderer)) <= STRUCTURE | {"h1", "strong", "code"}
    text = visible(md)
    assert f"REJECTED: {flat(value)}".strip() in text
    assert f"FAIL: {flat(value)}".strip() in text
    assert [r[0] for r in table_rows(md)[1:]] == [flat(value).strip()] * len(gate["checks"])
    assert f"{flat(value)}/bits_per_byte" in re.findall(
        r"<code>(.*?)</code>", html.unescape(rendered(md))
    )


def test_the_report_artifact_links_only_to_a_web_or_file_address():
    md = ra.report_markdown("# report\n", "javascript:alert(document.cookie)")
    assert "<a" not in rendered(md) and "javascript:alert(document.cookie)" in visible(md)
    md = ra.report_markdown("# report\n", "https://ci.example/reports/report.html")
    assert re.findall(r'<a href="([^"]*)"', rendered(md)) == [
        "https://ci.example/reports/report.html"
    ]


def card_record(value: str, base: str) -> dict:
    """A registry version's lineage.json with `value` wherever the data puts text."""
    import yaml

    params = yaml.safe_load((FIXTURES / "params.yaml").read_text())
    params["base"]["source"] = base
    params["dataset"]["source"] = f"data/{value}.jsonl"
    return {
        "version": "v1",
        "created": "2026-01-01T00:00:00Z",
        "params": params,
        "metrics": json.loads((FIXTURES / "reports" / "eval" / "metrics.json").read_text()),
        "decision": {
            "decision": "promoted",
            "summary": f"PROMOTED: {value}",
            "reasons": [f"PASS: {value}"],
        },
        "git": {"commit": f"abc{value}", "dirty": False},
        "adapter": {"dvc_md5": "0123.dir"},
        "evaluation": {"fingerprint": "f00d"},
        "base_weights_sha256": {f"model{value}.safetensors": "7ef9"},
    }


@pytest.mark.parametrize("value", HOSTILE)
def test_the_model_card_shows_the_data_as_text(value):
    base = 'org/model")\nimport os; os.system("echo owned'
    card = render_card(card_record(value, base))
    # The front matter is YAML for the hub (yaml indents every line of a value), not Markdown.
    body = card[card.index("\n---\n\n# QLoRA adapter") + 5 :]
    for renderer in RENDERERS:
        assert tags(rendered(body, renderer)) <= STRUCTURE | {"h1", "h2", "strong", "code", "pre"}
    text = visible(body)
    assert f"PROMOTED: {flat(value)}".strip() in text and f"PASS: {flat(value)}".strip() in text
    blocks = re.findall(
        r'<pre><code class="language-(\w+)">(.*?)</code></pre>', rendered(body), re.S
    )
    assert [lang for lang, _ in blocks] == ["python", "yaml", "json"]
    # The snippet is Python whose only string passed to from_pretrained is the base's id.
    tree = ast.parse(html.unescape(blocks[0][1]))
    calls = [n for n in ast.walk(tree) if getattr(n, "func", None) is not None]
    loads = [
        a.value
        for c in calls
        if getattr(c.func, "attr", "") == "from_pretrained"
        for a in c.args
        if isinstance(a, ast.Constant)
    ]
    assert loads == [base, "path/to/this/folder", base]
    assert json.loads(html.unescape(blocks[2][1])) == {f"model{value}.safetensors": "7ef9"}
