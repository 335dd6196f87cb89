"""Real Markdown renderers as ground truth for what the project writes (markdown-it-py,
mistune, Python-Markdown), and hostile values that must stay text."""

from __future__ import annotations

import html
import re

import markdown
import mistune
from markdown_it import MarkdownIt

HOSTILE = [
    "![x](https://evil.example/p.png)",
    "[click](javascript:alert(1))",
    "<img src=x onerror=alert(1)>",
    "<https://evil.example>",
    "see https://evil.example/a?b=1 now",
    "www.evil.example and mail@evil.example",
    "<script>alert(1)</script><!-- c -->",
    "&lt;b&gt; &amp; &#60;i&#62; &colon;",
    "*em* _u_ **b** `code` ~~s~~ $x$ :smile: | pipe \\ back\\",
    "# heading",
    "1. ordered",
    "- item\n---\n===",
    "line one\n\n    indented\r\n> quote\rnext",
    "[ref]: https://evil.example",
    "a\\|b and a\\`b",
    "```python\nfence```",
]


LINE_BREAK = re.compile(r"\r\n|\r|\n")


TAG = re.compile(r"<\s*/?\s*([a-zA-Z][a-zA-Z0-9-]*)")


# What the surrounding Markdown makes, never the data: paragraphs, lists, headings, tables.
STRUCTURE = {"p", "ul", "li", "h3", "table", "thead", "tbody", "tr", "th", "td"}


_MARKDOWN_IT = MarkdownIt("commonmark").enable(["table", "strikethrough"])


RENDERERS = {
    "markdown-it": _MARKDOWN_IT.render,
    # escape=False: raw HTML from the data would come through, so the check would see it.
    "mistune": mistune.create_markdown(escape=False, plugins=["url", "table", "strikethrough"]),
    "python-markdown": lambda text: markdown.markdown(text, extensions=["tables"]),
}


# Python-Markdown is no CommonMark: it keeps the backslash of an escape it does not know
# (\: \/ \@), so it judges only that nothing becomes a link, an image or HTML.
READS_AS_TEXT = ("markdown-it", "mistune")


def rendered(md: str, renderer: str = "markdown-it") -> str:
    return RENDERERS[renderer](md)


def text_of(fragment: str) -> str:
    return html.unescape(re.sub(r"<[^>]*>", "", fragment))


def visible(md: str) -> str:
    """The text a reader sees of `md` (markdown-it's rendering, tags dropped)."""
    return text_of(rendered(md))


def table_rows(md: str) -> list[list[str]]:
    """Every row of every table in `md`, as the visible text of its cells."""
    rows = re.findall(r"<tr>(.*?)</tr>", rendered(md), re.S)
    return [[text_of(c) for c in re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", r, re.S)] for r in rows]


def tags(page: str) -> set[str]:
    return {t.lower() for t in TAG.findall(page)}


def flat(text: str) -> str:
    return LINE_BREAK.sub(" ", text)
