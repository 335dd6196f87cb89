"""Small inline SVG charts for the report: a line chart, histograms (of raw values or of
counts already binned, with optional vertical marker lines) and a bar chart of a ranked
series with its top bars labelled; nothing else.

The report must be one self-contained file with no scripts, so charts are static SVG.
Colors come from CSS classes (`.s-train`, `.s-eval`, ...) the report's stylesheet defines,
so the charts follow the page's palette and print the same way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

# Plot area margins inside the viewBox: left leaves room for y tick labels.
LEFT, RIGHT, TOP, BOTTOM = 56, 16, 30, 42


@dataclass(frozen=True)
class Series:
    name: str
    points: Sequence[tuple[float, float]]
    css_class: str
    markers: bool = False  # sparse series (validation loss) read better as dots on a line


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2, 2.5, 5 x 10^k steps) covering [lo, hi]."""
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / count
    step = 10 ** math.floor(math.log10(raw))
    for mult in (1, 2, 2.5, 5, 10):
        if raw <= step * mult:
            step *= mult
            break
    first = math.floor(lo / step + 1e-9) * step
    ticks = []
    value = first
    while value < hi + step * 0.999:
        ticks.append(round(value, 12))
        value += step
    return ticks


def _label(value: float) -> str:
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.4g}".replace("e-0", "e-")  # learning rates: "5e-5", not "5e-05"


def _frame(width: int, height: int, title: str, body: list[str]) -> str:
    return (
        f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" style="max-width: {width}px" role="img" '
        f'aria-label="{escape(title)}">'
        f"<title>{escape(title)}</title>" + "".join(body) + "</svg>"
    )


def _axes(
    x_ticks: list[float],
    y_ticks: list[float],
    sx,
    sy,
    width: int,
    height: int,
    x_label: str,
    y_label: str,
) -> list[str]:
    out = []
    for y in y_ticks:
        py = sy(y)
        out.append(
            f'<line class="grid" x1="{LEFT}" x2="{width - RIGHT}" y1="{py:.1f}" y2="{py:.1f}"/>'
        )
        out.append(
            f'<text class="tick" x="{LEFT - 6}" y="{py + 4:.1f}" '
            f'text-anchor="end">{_label(y)}</text>'
        )
    for x in x_ticks:
        px = sx(x)
        out.append(
            f'<text class="tick" x="{px:.1f}" y="{height - BOTTOM + 16}" '
            f'text-anchor="middle">{_label(x)}</text>'
        )
    out.append(
        f'<line class="axis" x1="{LEFT}" x2="{width - RIGHT}" y1="{height - BOTTOM}" '
        f'y2="{height - BOTTOM}"/>'
    )
    out.append(
        f'<text class="axis-label" x="{(LEFT + width - RIGHT) / 2:.1f}" '
        f'y="{height - 6}" text-anchor="middle">{escape(x_label)}</text>'
    )
    out.append(
        f'<text class="axis-label" x="{LEFT}" y="{TOP - 12}" '
        f'text-anchor="start">{escape(y_label)}</text>'
    )
    return out


def _scale(lo: float, hi: float, out_lo: float, out_hi: float):
    span = (hi - lo) or 1.0
    return lambda v: out_lo + (v - lo) / span * (out_hi - out_lo)


def _empty(width: int, height: int, title: str, text: str) -> str:
    return _frame(
        width,
        height,
        title,
        [
            f'<text class="empty" x="{width / 2}" y="{height / 2}" text-anchor="middle">'
            f"{escape(text)}</text>"
        ],
    )


def _legend(entries: Sequence[tuple[str, str, str]], width: int, step: int = 130) -> list[str]:
    """Entries (name, css class, "line" or "bar") right-aligned above the plot area, `step`
    pixels apart (less for short names, so the legend keeps clear of the y-axis label)."""
    out = []
    for i, (name, css_class, kind) in enumerate(entries):
        lx = width - RIGHT - step * (len(entries) - i)
        if kind == "bar":
            out.append(
                f'<rect class="bar key {css_class}" x="{lx}" y="{TOP - 21}" '
                'width="18" height="10"/>'
            )
        else:
            out.append(
                f'<line class="line {css_class}" x1="{lx}" x2="{lx + 18}" '
                f'y1="{TOP - 16}" y2="{TOP - 16}"/>'
            )
        out.append(f'<text class="legend" x="{lx + 24}" y="{TOP - 12}">{escape(name)}</text>')
    return out


def line_chart(
    series: Sequence[Series],
    *,
    title: str,
    x_label: str,
    y_label: str,
    width: int = 560,
    height: int = 260,
) -> str:
    """One SVG with every series on shared axes and a legend in the top-right corner."""
    points = [p for s in series for p in s.points]
    if not points:
        return _empty(width, height, title, "no data logged")
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x_ticks = nice_ticks(min(xs), max(xs))
    y_ticks = nice_ticks(min(ys), max(ys), count=4)
    sx = _scale(x_ticks[0], x_ticks[-1], LEFT, width - RIGHT)
    sy = _scale(y_ticks[0], y_ticks[-1], height - BOTTOM, TOP)
    body = _axes(x_ticks, y_ticks, sx, sy, width, height, x_label, y_label)
    for s in series:
        body.extend(_polyline(s, sx, sy))
    if len(series) > 1:  # the y-axis label already names a lone series
        body.extend(_legend([(s.name, s.css_class, "line") for s in series], width))
    return _frame(width, height, title, body)


def _polyline(s: Series, sx, sy) -> list[str]:
    out = []
    if len(s.points) > 1:
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in s.points)
        out.append(f'<polyline class="line {s.css_class}" points="{coords}"/>')
    if s.markers or len(s.points) == 1:
        out.extend(
            f'<circle class="dot {s.css_class}" cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3.5"/>'
            for x, y in s.points
        )
    return out


def histogram(
    values: Sequence[float],
    *,
    title: str,
    x_label: str,
    css_class: str,
    upper: float | None = None,
    bins: int = 16,
    width: int = 360,
    height: int = 200,
) -> str:
    """Counts of `values` in equal bins from 0 to `upper` (drawn as a dashed limit line)."""
    if not values:
        return _empty(width, height, title, "no rows")
    edge = float(upper if upper is not None else max(values))
    size = edge / bins
    counts = [0] * bins
    for v in values:
        counts[min(int(v / size), bins - 1)] += 1
    return binned_histogram(
        [i * size for i in range(bins + 1)],
        counts,
        title=title,
        x_label=x_label,
        y_label="rows",
        css_class=css_class,
        limit=None if upper is None else (upper, f"max_length {_label(upper)}"),
        width=width,
        height=height,
    )


def binned_histogram(
    edges: Sequence[float],
    counts: Sequence[int],
    *,
    title: str,
    x_label: str,
    y_label: str,
    css_class: str,
    markers: Sequence[float] = (),
    marker_class: str = "marker",
    marker_label: str = "",
    limit: tuple[float, str] | None = None,
    width: int = 360,
    height: int = 200,
) -> str:
    """Bars of `counts` between consecutive `edges` (len(edges) == len(counts) + 1), a thin
    vertical line at each of `markers` (class `marker_class`, named by `marker_label` in a
    legend) and a dashed `limit` line with its label."""
    if not counts or len(edges) != len(counts) + 1:
        return _empty(width, height, title, "no data")
    lo, hi = float(edges[0]), float(edges[-1])
    x_ticks = [t for t in nice_ticks(lo, hi, count=4) if lo - 1e-9 <= t <= hi + 1e-9]
    y_ticks = [t for t in nice_ticks(0, max(max(counts), 1), count=4) if t == int(t)]
    sx = _scale(lo, hi, LEFT, width - RIGHT)
    sy = _scale(0, y_ticks[-1], height - BOTTOM, TOP)
    body = _axes(x_ticks, y_ticks, sx, sy, width, height, x_label, y_label)
    for n, left, right in zip(counts, edges, edges[1:], strict=False):
        if n:
            x0, x1 = sx(left) + 0.5, sx(right) - 0.5
            body.append(
                f'<rect class="bar {css_class}" x="{x0:.1f}" y="{sy(n):.1f}" '
                f'width="{max(x1 - x0, 0.5):.1f}" height="{sy(0) - sy(n):.1f}"/>'
            )
    # Drawn over the bars: the markers say where the bars should sit.
    body.extend(
        f'<line class="{marker_class}" x1="{sx(m):.1f}" x2="{sx(m):.1f}" '
        f'y1="{TOP}" y2="{height - BOTTOM}"/>'
        for m in markers
    )
    if markers and marker_label:
        body.extend(_legend([(marker_label, marker_class, "line")], width))
    if limit is not None:
        px = sx(limit[0])
        body.append(
            f'<line class="limit" x1="{px:.1f}" x2="{px:.1f}" y1="{TOP}" y2="{height - BOTTOM}"/>'
        )
        body.append(
            f'<text class="legend" x="{px - 4:.1f}" y="{TOP - 12}" '
            f'text-anchor="end">{escape(limit[1])}</text>'
        )
    return _frame(width, height, title, body)


# A labelled bar's name, stacked above the bars: one text line each.
LABEL_LINE = 14


def ranked_bars(
    values: Sequence[float],
    *,
    title: str,
    x_label: str,
    y_label: str,
    name: str,
    css_class: str,
    overlays: Sequence[Series] = (),
    labels: Sequence[str] = (),
    width: int = 560,
    height: int = 280,
) -> str:
    """One bar per value at x = 1, 2, ... (a ranked series, largest first), from 0 up so
    bar heights compare honestly; `overlays` are lines on the same x (other measurements
    of the same items); the first len(labels) bars are highlighted (class `top`) and
    named in a column above the data, each joined to its bar by a leader line."""
    if not values:
        return _empty(width, height, title, "no data")
    peak = max([*values, *(y for s in overlays for _, y in s.points)])
    plot = height - TOP - BOTTOM
    # Headroom so the label column sits above every bar and overlay.
    band = LABEL_LINE * len(labels) + 6
    y_ticks = nice_ticks(0, peak * plot / max(plot - band, 1), count=4)
    x_ticks = [t for t in nice_ticks(1, len(values)) if 1 <= t <= len(values)]
    sx = _scale(0.5, len(values) + 0.5, LEFT, width - RIGHT)
    sy = _scale(0, y_ticks[-1], height - BOTTOM, TOP)
    body = _axes(x_ticks, y_ticks, sx, sy, width, height, x_label, y_label)
    half = (sx(1) - sx(0)) / 2
    for i, v in enumerate(values, start=1):
        top = " top" if i <= len(labels) else ""
        body.append(
            f'<rect class="bar {css_class}{top}" x="{sx(i) - half:.2f}" y="{sy(v):.1f}" '
            f'width="{max(2 * half - 0.4, 0.4):.2f}" height="{sy(0) - sy(v):.1f}"/>'
        )
    for s in overlays:
        body.extend(_polyline(s, sx, sy))
    label_x = sx(len(labels) + 0.5) + 12
    for i, (label, v) in enumerate(zip(labels, values, strict=False), start=1):
        ly = TOP + LABEL_LINE * i
        body.append(
            f'<polyline class="leader" points="{sx(i):.1f},{sy(v):.1f} {sx(i):.1f},{ly - 4} '
            f'{label_x - 3:.1f},{ly - 4}"/>'
        )
        body.append(f'<text class="label" x="{label_x:.1f}" y="{ly}">{escape(label)}</text>')
    if overlays:
        entries = [(name, css_class, "bar"), *((s.name, s.css_class, "line") for s in overlays)]
        body.extend(_legend(entries, width, step=24 + 8 * max(len(n) for n, _, _ in entries)))
    return _frame(width, height, title, body)
