"""What a scenario measures, in a form the report can render.

Each scenario module (`bench/<scenario>.py`) exposes `run(profile: Profile) -> Section`.
Latencies are in milliseconds; a distribution is a list of (percentile 0-100, milliseconds)
points, as wrk's `latency:percentile()` or `statistics.quantiles` produce them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class Profile:
    """How long to measure. `quick` takes a couple of minutes in all; `full` much longer."""

    name: Literal["quick", "full"]
    # Seconds of load per throughput case (warm, one worker per request, docker run).
    duration: float
    # Count-based cases: cold activations, footprint of N user databases, summary accounts.
    cold_activations: int
    databases: int
    summary_accounts: int


QUICK = Profile("quick", duration=8.0, cold_activations=30, databases=10_000,
                summary_accounts=100_000)
FULL = Profile("full", duration=30.0, cold_activations=200, databases=100_000,
               summary_accounts=100_000)


@dataclass
class Distribution:
    label: str
    points: list[tuple[float, float]]  # (percentile, ms), ascending percentile


@dataclass
class Section:
    """One scenario's results: a table (header + rows of already formatted cells), latency
    distributions to plot, and notes (what was measured, how, and what bounds it)."""

    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    distributions: list[Distribution] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # Raw numbers by name (e.g. "docker 16 clients requests/s"), for ratios across sections
    # (`bench/__main__.py`) and for results.json; not rendered as they are.
    metrics: dict[str, float] = field(default_factory=dict)


# ---- numbers -------------------------------------------------------------------------------

def quantile(values: Sequence[float], p: float) -> float:
    """The `p`th percentile (0-100) of `values`, linearly interpolated; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def latency_cells(values: Sequence[float]) -> list[str]:
    """p50, p90, p99 and max of `values` (ms) as table cells, `-` when there are none."""
    return [*(ms(quantile(values, p)) for p in (50, 90, 99)),
            ms(max(values, default=float("nan")))]


def points(values: Sequence[float]) -> list[tuple[float, float]]:
    """A distribution to plot: (percentile, ms) at every rank, ascending."""
    ordered = sorted(values)
    if len(ordered) < 2:
        return [(100.0, v) for v in ordered]
    return [(100 * i / (len(ordered) - 1), v) for i, v in enumerate(ordered)]


def ms(value: float) -> str:
    """A table cell of milliseconds."""
    if value != value:
        return "-"
    return f"{value:.2f}" if value < 10 else f"{value:.1f}" if value < 100 else f"{value:,.0f}"
