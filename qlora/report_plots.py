"""Small inline SVG charts for the report: a line chart and a histogram, nothing else.

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
        return _frame(
            width,
            height,
            title,
            [
                f'<text class="empty" x="{width / 2}" y="{height / 2}" text-anchor="middle">'
                "no data logged</text>"
            ],
        )
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x_ticks = nice_ticks(min(xs), max(xs))
    y_ticks = nice_ticks(min(ys), max(ys), count=4)
    sx = _scale(x_ticks[0], x_ticks[-1], LEFT, width - RIGHT)
    sy = _scale(y_ticks[0], y_ticks[-1], height - BOTTOM, TOP)
    body = _axes(x_ticks, y_ticks, sx, sy, width, height, x_label, y_label)
    for i, s in enumerate(series):
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in s.points)
        if len(s.points) > 1:
            body.append(f'<polyline class="line {s.css_class}" points="{coords}"/>')
        if s.markers or len(s.points) == 1:
            body.extend(
                f'<circle class="dot {s.css_class}" cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3.5"/>'
                for x, y in s.points
            )
        if len(series) == 1:
            continue  # the y-axis label already names a lone series
        # Legend entries right-aligned, one per series, above the plot area.
        lx = width - RIGHT - 130 * (len(series) - i)
        body.append(
            f'<line class="line {s.css_class}" x1="{lx}" x2="{lx + 18}" '
            f'y1="{TOP - 16}" y2="{TOP - 16}"/>'
        )
        body.append(f'<text class="legend" x="{lx + 24}" y="{TOP - 12}">{escape(s.name)}</text>')
    return _frame(width, height, title, body)


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
        return _frame(
            width,
            height,
            title,
            [
                f'<text class="empty" x="{width / 2}" y="{height / 2}" text-anchor="middle">'
                "no rows</text>"
            ],
        )
    edge = float(upper if upper is not None else max(values))
    x_ticks = [t for t in nice_ticks(0, edge, count=4) if t <= edge]
    size = edge / bins
    counts = [0] * bins
    for v in values:
        counts[min(int(v / size), bins - 1)] += 1
    y_ticks = [t for t in nice_ticks(0, max(counts), count=4) if t == int(t)]
    sx = _scale(0, edge, LEFT, width - RIGHT)
    sy = _scale(0, y_ticks[-1], height - BOTTOM, TOP)
    body = _axes(x_ticks, y_ticks, sx, sy, width, height, x_label, "rows")
    for i, n in enumerate(counts):
        if n:
            x0, x1 = sx(i * size) + 0.5, sx((i + 1) * size) - 0.5
            body.append(
                f'<rect class="bar {css_class}" x="{x0:.1f}" y="{sy(n):.1f}" '
                f'width="{x1 - x0:.1f}" height="{sy(0) - sy(n):.1f}"/>'
            )
    if upper is not None:
        px = sx(upper)
        body.append(
            f'<line class="limit" x1="{px:.1f}" x2="{px:.1f}" y1="{TOP}" y2="{height - BOTTOM}"/>'
        )
        body.append(
            f'<text class="legend" x="{px - 4:.1f}" y="{TOP - 12}" '
            f'text-anchor="end">max_length {_label(upper)}</text>'
        )
    return _frame(width, height, title, body)
