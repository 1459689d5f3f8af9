"""Inline SVG line charts for the HTML report: no script, no fonts, nothing fetched."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from html import escape

WIDTH, HEIGHT = 660, 280
LEFT, RIGHT, TOP, BOTTOM = 64, 150, 34, 46
NICE_STEPS = (1, 1.2, 1.6, 2, 2.4, 3.2, 4, 6, 8, 10)
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b")
Series = dict[str, Sequence[float | None]]
_X = Callable[[int], float]
_Y = Callable[[float], float]


def nice_ceiling(value: float) -> float:
    """The smallest step x 10^k at or above `value`, for an axis top whose quarters read
    well (100 stays 100, 105 becomes 120)."""
    if value <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    return next(step * power for step in NICE_STEPS if step * power >= value * (1 - 1e-9))


def line_chart(
    title: str,
    x_labels: Sequence[str],
    series: Series,
    y_label: str,
    *,
    threshold: float | None = None,
    marker: int | None = None,
) -> str:
    """Lines over categorical x positions (the stages); None values break a line. A dashed
    red line draws `threshold`, a shaded band the stage at index `marker`."""
    values = [v for points in series.values() for v in points if v is not None]
    top = nice_ceiling(max([*values, threshold or 0.0, 0.0]))
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    step = plot_w / max(1, len(x_labels) - 1) if len(x_labels) > 1 else 0.0

    def x(i: int) -> float:
        return LEFT + (i * step if len(x_labels) > 1 else plot_w / 2)

    def y(v: float) -> float:
        return TOP + plot_h - v / top * plot_h

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{escape(title)}" '
        'font-family="sans-serif" font-size="11">',
        f'<text x="{LEFT}" y="18" font-size="13" font-weight="bold">{escape(title)}</text>',
    ]
    if marker is not None and 0 <= marker < len(x_labels):
        half = max(step / 2, 12.0)
        left, right = max(LEFT, x(marker) - half), min(LEFT + plot_w, x(marker) + half)
        parts.append(
            f'<rect x="{left:.1f}" y="{TOP}" width="{right - left:.1f}" height="{plot_h}" '
            'fill="#d62728" opacity="0.08"><title>breaking point</title></rect>'
        )
    parts += _axes(x_labels, top, y_label, x, y)
    if threshold is not None:
        parts.append(
            f'<line x1="{LEFT}" x2="{LEFT + plot_w}" y1="{y(threshold):.1f}" '
            f'y2="{y(threshold):.1f}" stroke="#d62728" stroke-dasharray="5,4">'
            f"<title>threshold {threshold:g}</title></line>"
        )
    for n, (name, points) in enumerate(series.items()):
        parts += _line(name, points, COLOURS[n % len(COLOURS)], x, y)
        parts += _legend(n, name, COLOURS[n % len(COLOURS)])
    parts.append("</svg>")
    return "\n".join(parts)


def _axes(labels: Sequence[str], top: float, y_label: str, x: _X, y: _Y) -> list[str]:
    bottom, right, middle = HEIGHT - BOTTOM, WIDTH - RIGHT, (TOP + HEIGHT - BOTTOM) // 2
    parts = [
        f'<line x1="{LEFT}" x2="{LEFT}" y1="{TOP}" y2="{bottom}" stroke="#444"/>',
        f'<line x1="{LEFT}" x2="{right}" y1="{bottom}" y2="{bottom}" stroke="#444"/>',
        f'<text x="14" y="{middle}" text-anchor="middle" '
        f'transform="rotate(-90 14 {middle})">{escape(y_label)}</text>',
    ]
    for k in range(5):
        value = top * k / 4
        parts.append(
            f'<line x1="{LEFT}" x2="{right}" y1="{y(value):.1f}" y2="{y(value):.1f}" '
            f'stroke="#ddd"/><text x="{LEFT - 6}" y="{y(value) + 4:.1f}" '
            f'text-anchor="end">{value:g}</text>'
        )
    for i, label in enumerate(labels):
        parts.append(
            f'<text x="{x(i):.1f}" y="{bottom + 16}" text-anchor="middle">{escape(label)}</text>'
        )
    return parts


def _line(name: str, points: Sequence[float | None], colour: str, x: _X, y: _Y) -> list[str]:
    parts: list[str] = []
    run: list[str] = []
    for i, value in enumerate([*points, None]):
        if value is None:
            if len(run) > 1:
                parts.append(
                    f'<polyline fill="none" stroke="{colour}" stroke-width="2" '
                    f'points="{" ".join(run)}"/>'
                )
            run = []
            continue
        run.append(f"{x(i):.1f},{y(value):.1f}")
        parts.append(
            f'<circle cx="{x(i):.1f}" cy="{y(value):.1f}" r="3" fill="{colour}">'
            f"<title>{escape(name)}: {value:.4g}</title></circle>"
        )
    return parts


def _legend(n: int, name: str, colour: str) -> list[str]:
    left, top = WIDTH - RIGHT + 14, TOP + 4 + 18 * n
    return [
        f'<rect x="{left}" y="{top}" width="12" height="12" fill="{colour}"/>',
        f'<text x="{left + 18}" y="{top + 10}">{escape(name)}</text>',
    ]
