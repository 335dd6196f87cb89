"""How the report, the Prefect artifacts and the model card write values: numbers,
percentages, sizes and durations (one formatter for all of them), the direction arrows,
and text made safe for Markdown (names, code, fences, links from untrusted input)."""

from __future__ import annotations

import math
import re
import string
from typing import Any
from urllib.parse import quote, urlsplit

ARROWS = {True: "↑", False: "↓", None: "?"}


MINUS = "\u2212"


def num(x: Any) -> float | None:
    """A finite number, or None for anything else (lm-eval writes stderr as "N/A")."""
    if isinstance(x, bool) or not isinstance(x, int | float):
        return None
    return float(x) if math.isfinite(x) else None


def fmt(x: Any, digits: int = 4) -> str:
    """4 significant digits, thousands separators for big numbers, a real minus sign."""
    if isinstance(x, int) and not isinstance(x, bool):
        text = f"{x:,}"
    elif (v := num(x)) is None:
        return "n/a" if x is None or isinstance(x, int | float) else str(x)
    elif abs(v) >= 10**digits:
        text = f"{v:,.0f}"
    else:
        text = f"{v:.{digits}g}"
    return text.replace("-", MINUS)


def fmt_signed(x: Any, digits: int = 4) -> str:
    v = num(x)
    return "n/a" if v is None else ("+" if v > 0 else "") + fmt(v, digits)


def fmt_pct(ratio: Any, signed: bool = False) -> str:
    v = num(ratio)
    if v is None:
        return "n/a"
    # One decimal: "97.0%" next to "97.8%" reads as a column, 3 significant digits would not.
    text = (f"{v * 100:.1f}" if abs(v) >= 0.001 else f"{v * 100:.2g}").replace("-", MINUS)
    return ("+" if signed and v > 0 else "") + text + "%"


def fmt_bytes(n: Any) -> str:
    v = num(n)
    if v is None:
        return "n/a"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if v >= size:
            return f"{fmt(v / size)} {unit}"
    return f"{v:.0f} B"


def fmt_duration(seconds: Any) -> str:
    s = num(seconds)
    if s is None:
        return "n/a"
    if s < 60:
        return f"{fmt(s, 3)} s"
    minutes, sec = divmod(round(s), 60)
    if minutes < 60:
        return f"{minutes} min {sec:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def fmt_gain(gain: Any) -> str:
    """A direction-aware relative change: "23.0% better" reads right for a loss and for an
    accuracy alike, where "-23%" would need the reader to know which way is good."""
    v = num(gain)
    if v is None:
        return "n/a"
    if v == 0:
        return "no change"
    return f"{fmt_pct(abs(v))} {'better' if v > 0 else 'worse'}"


def fmt_env(value: Any) -> str:
    """A field of qlora.core.lineage.environment(): a list as its items, None as n/a."""
    if value is None:
        return "n/a"
    if isinstance(value, list):
        return " ".join(map(str, value)) or "none"
    return str(value)


# CommonMark lets a backslash escape any ASCII punctuation character, and some dialect
# gives each of them a meaning (links, emphasis, tables, headings, lists, "~~", "$" math,
# ":emoji:", GFM's bare-URL autolinks on "://", "www." and "@"): escaped, all of them read
# as themselves. & < > become entities instead, which every renderer shows as the
# character, where a backslash before them is literal to some.
_MD_ESCAPES = str.maketrans(
    {c: "\\" + c for c in string.punctuation if c not in "&<>"}
    | {"&": "&amp;", "<": "&lt;", ">": "&gt;"}
)


# CommonMark's line endings: in a table cell or a list item a line break ends the construct.
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


# A link is made only to the web, a file, or a relative path; a flow parameter or a path
# from the data must not become a javascript: or data: link.
LINK_SCHEMES = frozenset({"http", "https", "file"})


# Characters a URL keeps as they are in a link destination; the rest are percent-encoded,
# so no space, quote, parenthesis or angle bracket can end the destination early.
_URL_SAFE = "/:?#[]@!$&*+,;=%~"


_ESCAPED_AMP = "\\&"


def md_text(text: Any) -> str:
    """Untrusted text as literal Markdown on one line (a table cell, a list item, a heading):
    every punctuation character escaped, line breaks turned into spaces."""
    return _LINE_BREAK.sub(" ", str(text)).translate(_MD_ESCAPES)


def _longest_backtick_run(text: str) -> int:
    return max((len(run) for run in re.findall(r"`+", text)), default=0)


def md_code(text: Any, cell: bool = False) -> str:
    """Untrusted text as an inline code span, delimited by a backtick run longer than any
    inside it. In a table `cell`, "|" is escaped: GFM splits a row on it even inside code
    (and drops the backslash), where elsewhere the backslash would show."""
    flat = _LINE_BREAK.sub(" ", str(text))
    if cell:
        flat = flat.replace("|", "\\|")
    ticks = "`" * (_longest_backtick_run(flat) + 1)
    # CommonMark strips one space from each end of a span: a space there is kept by a pad,
    # and a pad keeps a backtick at either end from joining the delimiter.
    pad = " " if flat[:1] in ("`", " ") or flat[-1:] in ("`", " ") else ""
    return f"{ticks}{pad}{flat}{pad}{ticks}"


def md_fence(text: Any, lang: str = "text") -> str:
    """A fenced block longer than any backtick run inside, so output cannot break out."""
    text = str(text)
    fence = "`" * max(3, 1 + _longest_backtick_run(text))
    return f"{fence}{lang}\n{text}\n{fence}"


def md_link(url: str, label: str | None = None) -> str:
    """A link to `url` (its own text unless `label`), or plain text when `url` is not a web
    or file address or a relative path."""
    text = md_text(url if label is None else label)
    if urlsplit(url).scheme.lower() not in LINK_SCHEMES | {""}:
        return text if label is None else f"{text} ({md_text(url)})"
    # "&" kept for query strings, escaped so no renderer reads an entity (&colon;) in it.
    return f"[{text}]({quote(url, safe=_URL_SAFE).replace('&', _ESCAPED_AMP)})"
