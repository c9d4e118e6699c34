"""Two tiny chart helpers for the reports: a line chart and a grouped bar chart, as standalone
inline SVG strings (no plotting library, nothing fetched by the browser)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from html import escape

WIDTH, HEIGHT = 560, 300
LEFT, RIGHT, TOP, BOTTOM = 56, 150, 30, 44
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b")


def _nice_max(value: float) -> float:
    """A round upper bound for the y axis (1, 2, 2.5 or 5 times a power of ten)."""
    if value <= 0:
        return 1.0
    power = 10.0 ** math.floor(math.log10(value))
    return next(step * power for step in (1, 2, 2.5, 5, 10) if step * power >= value * (1 - 1e-9))


def _frame(title: str, x_label: str, y_label: str, y_max: float) -> list[str]:
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="11">',
        f"<title>{escape(title)}</title>",
        f'<text x="{LEFT}" y="16" font-size="13" font-weight="bold">{escape(title)}</text>',
        f'<line x1="{LEFT}" y1="{TOP + plot_h}" x2="{LEFT + plot_w}" y2="{TOP + plot_h}" stroke="#333"/>',
        f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{TOP + plot_h}" stroke="#333"/>',
        f'<text x="{LEFT + plot_w / 2}" y="{HEIGHT - 6}" text-anchor="middle">{escape(x_label)}</text>',
        f'<text transform="translate(14 {TOP + plot_h / 2}) rotate(-90)" text-anchor="middle">'
        f"{escape(y_label)}</text>",
    ]
    for i in range(5):
        value = y_max * i / 4
        y = TOP + plot_h - plot_h * i / 4
        parts.append(f'<line x1="{LEFT - 4}" y1="{y:.1f}" x2="{LEFT + plot_w}" y2="{y:.1f}" stroke="#ddd"/>')
        parts.append(f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{value:.3g}</text>')
    return parts


def _legend(names: Sequence[str]) -> list[str]:
    x = WIDTH - RIGHT + 12
    parts = []
    for i, name in enumerate(names):
        y = TOP + 8 + 16 * i
        color = COLORS[i % len(COLORS)]
        parts.append(f'<rect x="{x}" y="{y - 8}" width="10" height="10" fill="{color}"/>')
        parts.append(f'<text x="{x + 14}" y="{y + 1}">{escape(name)}</text>')
    return parts


def line_chart(
    series: Mapping[str, Sequence[tuple[float, float]]],
    *,
    title: str,
    x_label: str,
    y_label: str,
    x_ticks: Sequence[tuple[float, str]] | None = None,
) -> str:
    """One polyline with markers per named series of (x, y) points."""
    points = [p for s in series.values() for p in s]
    if not points:
        return ""
    xs = [p[0] for p in points]
    x_min, x_max = min(xs), max(xs)
    x_span = (x_max - x_min) or 1.0
    y_max = _nice_max(max(p[1] for p in points))
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def at(x: float, y: float) -> tuple[float, float]:
        return LEFT + plot_w * (x - x_min) / x_span, TOP + plot_h - plot_h * y / y_max

    parts = _frame(title, x_label, y_label, y_max)
    ticks = x_ticks if x_ticks is not None else [(x, f"{x:g}") for x in sorted(set(xs))]
    for x, label in ticks:
        px, _ = at(x, 0)
        parts.append(
            f'<text x="{px:.1f}" y="{TOP + plot_h + 14}" text-anchor="middle">{escape(label)}</text>'
        )
    for i, data in enumerate(series.values()):
        color = COLORS[i % len(COLORS)]
        coords = [at(x, y) for x, y in sorted(data)]
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in coords)
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{path}"/>')
        parts += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{color}"/>' for x, y in coords]
    parts += _legend(list(series))
    parts.append("</svg>")
    return "\n".join(parts)


def bar_chart(
    groups: Sequence[str],
    series: Mapping[str, Sequence[float]],
    *,
    title: str,
    x_label: str,
    y_label: str,
) -> str:
    """Grouped bars: one group per entry of `groups`, one bar per named series in each."""
    values = [v for s in series.values() for v in s]
    if not groups or not values:
        return ""
    y_max = _nice_max(max(values))
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    group_w = plot_w / len(groups)
    bar_w = group_w * 0.8 / max(1, len(series))
    parts = _frame(title, x_label, y_label, y_max)
    for g, group in enumerate(groups):
        gx = LEFT + g * group_w
        label_x, label_y = gx + group_w / 2, TOP + plot_h + 14
        parts.append(f'<text x="{label_x:.1f}" y="{label_y}" text-anchor="middle">{escape(group)}</text>')
        for s, data in enumerate(series.values()):
            h = plot_h * data[g] / y_max
            x = gx + group_w * 0.1 + s * bar_w
            parts.append(
                f'<rect x="{x:.1f}" y="{TOP + plot_h - h:.1f}" width="{bar_w:.1f}" height="{h:.1f}" '
                f'fill="{COLORS[s % len(COLORS)]}"><title>{data[g]:.4f}</title></rect>'
            )
    parts += _legend(list(series))
    parts.append("</svg>")
    return "\n".join(parts)
