"""The benchmark report: a Section becomes a Markdown table, notes and a latency plot."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import report
from bench.load import COLUMNS, LoadResult
from bench.model import Distribution, Section


def result(*, requests: int = 1000, non200: int = 0) -> LoadResult:
    return LoadResult(
        requests=requests, duration_s=2.0, non200=non200, socket_errors=0,
        statuses={"503": non200} if non200 else {}, first_error="503 busy" if non200 else "",
        max_ms=9.0, percentiles=[(1.0, 0.5), (50.0, 1.0), (90.0, 2.0), (99.0, 4.0),
                                 (99.99, 8.0), (100.0, 9.0)],
        cpu_percent=12.0, connections=16, threads=1,
    )


@pytest.fixture
def section() -> Section:
    fine, failing = result(), result(non200=3)
    return Section(
        title="1. Warm | workers",
        columns=COLUMNS,
        rows=[fine.row("200 users"), failing.row("hot user")],
        distributions=[fine.distribution("200 users, 16 clients"),
                       failing.distribution("hot user, 16 clients")],
        notes=["measured through Envoy", *failing.problems("hot user")],
    )


def machine() -> report.Machine:
    return report.Machine([("CPU", "test CPU"), ("cores", "2")])


def test_a_section_renders_as_a_table_with_its_errors_visible(section: Section) -> None:
    text = report.render([section], machine=machine(), heading="Benchmark report",
                         plots={section.title: "warm.png"})

    lines = text.splitlines()
    assert "## 1. Warm | workers" in lines
    assert "| case | clients | requests/s | p50 (ms) | p90 (ms) | p99 (ms) | max (ms) | errors " \
        "| wrk CPU % |" in lines
    assert "| 200 users | 16 | 500 | 1.00 | 2.00 | 4.00 | 9.00 | 0 | 12 |" in lines
    assert "| hot user | 16 | 500 | 1.00 | 2.00 | 4.00 | 9.00 | **3** (3 x 503) | 12 |" in lines
    assert "| CPU | test CPU |" in lines
    assert "![latency distributions: 1. Warm | workers](warm.png)" in lines
    assert "- measured through Envoy" in lines
    assert any(line.startswith("- hot user, 16 clients: 3 errors") for line in lines)


def test_a_run_without_answers_shows_no_latency() -> None:
    silent = result(requests=0)

    assert silent.row("docker")[2:7] == ["0", "-", "-", "-", "-"]
    assert silent.distribution("docker").points == []
    assert "no answer at all" in silent.problems("docker")[0]


def test_percentiles_are_interpolated_between_points() -> None:
    assert result().percentile(50) == 1.0
    assert result().percentile(70) == pytest.approx(1.5)
    assert result().percentile(100) == 9.0


def test_the_distributions_are_plotted_as_a_png(section: Section, tmp_path: Path) -> None:
    path = tmp_path / "plots" / f"{report.slug(section.title)}.png"

    assert report.plot(section, path)

    assert path.name == "1-warm-workers.png"
    assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_a_section_without_distributions_has_no_plot(tmp_path: Path) -> None:
    empty = Section(title="footprint", columns=["what", "value"],
                    distributions=[Distribution("none", [])])

    assert not report.plot(empty, tmp_path / "footprint.png")
    assert not (tmp_path / "footprint.png").exists()
