"""The report of a benchmark run: Markdown (`render`) and latency plots (`plot`).

A plot shows each latency distribution of a section as a curve: percentile on the x axis,
stretched towards the tail (the distance from 100 % on a log scale, so 90, 99, 99.9 and
99.99 are evenly spaced), and milliseconds on a log y axis, so a 1 ms warm call and a 1 s
container start fit in one picture.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from bench.model import Distribution, Section

if TYPE_CHECKING:
    from matplotlib.axes import Axes

# The tail the x axis reaches; wrk's max (percentile 100) is drawn here.
TAIL = 99.999


@dataclass(frozen=True)
class Machine:
    """What the numbers were measured on, as (label, value) rows."""

    rows: list[tuple[str, str]]


def cell(text: str) -> str:
    """A Markdown table cell: pipes escaped, newlines flattened."""
    return text.replace("|", "\\|").replace("\n", " ")


def table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(cell(c) for c in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        padded = list(row) + [""] * (len(columns) - len(row))
        lines.append("| " + " | ".join(cell(c) for c in padded) + " |")
    return "\n".join(lines)


def slug(title: str) -> str:
    """A file-name-safe form of a section title."""
    kept = "".join(c.lower() if c.isalnum() else "-" for c in title)
    return "-".join(part for part in kept.split("-") if part) or "section"


def render(
    sections: Sequence[Section],
    *,
    machine: Machine,
    heading: str,
    preamble: Sequence[str] = (),
    plots: dict[str, str] | None = None,
) -> str:
    """The whole report. `plots` maps a section title to the PNG file (relative to the report)
    that `plot` wrote for it."""
    plots = plots or {}
    parts = [f"# {heading}", ""]
    parts.extend(preamble)
    if preamble:
        parts.append("")
    parts += ["## Machine", "", table(["", ""], machine.rows), ""]
    for section in sections:
        parts += [f"## {section.title}", ""]
        if section.rows:
            parts += [table(section.columns, section.rows), ""]
        if section.title in plots:
            parts += [f"![latency distributions: {section.title}]({plots[section.title]})", ""]
        parts += [f"- {note}" for note in section.notes]
        if section.notes:
            parts.append("")
    return "\n".join(parts).rstrip() + "\n"


def _tail_x(percentile: float) -> float:
    """The x coordinate of `percentile`: -log10 of the part above it."""
    return -math.log10(1 - min(percentile, TAIL) / 100)


def plot(section: Section, path: Path) -> bool:
    """Writes the latency distributions of `section` as a PNG at `path`; False when it has
    none (nothing is written)."""
    curves = [d for d in section.distributions if d.points]
    if not curves:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator

    figure, axes = plt.subplots(figsize=(9, 5.5), dpi=110)
    try:
        for distribution in curves:
            _curve(axes, distribution)
        ticks = [0.0, 50.0, 90.0, 99.0, 99.9, 99.99, TAIL]
        axes.xaxis.set_major_locator(FixedLocator([_tail_x(p) for p in ticks]))
        axes.xaxis.set_major_formatter(FuncFormatter(
            lambda x, _: "max" if x >= _tail_x(TAIL) - 1e-9 else f"{100 - 100 / 10 ** x:g}"))
        axes.set_yscale("log")
        axes.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        axes.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:,g}"))
        axes.set_xlim(0, _tail_x(TAIL) * 1.02)
        axes.set_xlabel("percentile")
        axes.set_ylabel("latency (ms, log scale)")
        axes.set_title(section.title)
        axes.grid(True, which="major", alpha=0.4)
        axes.grid(True, which="minor", axis="y", alpha=0.15)
        axes.legend(fontsize="small", loc="lower right")
        figure.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path)
    finally:
        plt.close(figure)
    return True


def _curve(axes: Axes, distribution: Distribution) -> None:
    xs = [_tail_x(p) for p, _ in distribution.points]
    ys = [max(ms, 1e-3) for _, ms in distribution.points]
    axes.plot(xs, ys, label=distribution.label, linewidth=1.5)
