"""The dispatcher reports where each worker activation's time went, one line per activation, and
the worker reports when its main() began: operators (and `bench/cold.py`) read these lines."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest

from tests.conftest import RunningStack

READY = re.compile(
    r"dispatcher\.pool: worker of '(?P<user>[a-z0-9_-]+)' ready \((?P<what>[^,]+), "
    r"(?P<runtime>\w+) runtime\) in (?P<total>\d+) ms \((?P<steps>[^)]*)\)$",
    re.MULTILINE,
)


def steps_of(log: str, user: str) -> tuple[str, int, dict[str, int]]:
    """(runtime, total ms, {step: ms}) of the one activation of `user` in the dispatcher log."""
    [found] = [m for m in READY.finditer(log) if m["user"] == user]
    steps = {}
    for part in found["steps"].split(", "):
        name, _, ms = part.rpartition(" ")
        steps[name] = int(ms)
    return found["runtime"], int(found["total"]), steps


@pytest.mark.parametrize(
    ("runtime", "launch_steps"),
    [
        ("process", ["spawn"]),
        pytest.param("docker", ["create", "start"], marks=pytest.mark.docker),
    ],
)
def test_an_activation_logs_its_steps(
    make_stack: Callable[..., RunningStack], runtime: str, launch_steps: list[str]
) -> None:
    stack = make_stack(runtime=runtime)
    assert stack.http.get("/hayate/create").status == 200
    found_runtime, total, steps = steps_of(stack.dispatcher_log(), "hayate")
    assert found_runtime == runtime
    assert list(steps) == ["queued", *launch_steps, "until serving"]
    assert all(ms >= 0 for ms in steps.values())
    # Each step is rounded on its own, so the sum may differ from the total by a few ms.
    assert abs(sum(steps.values()) - total) <= len(steps)


def test_the_worker_logs_when_its_main_began(make_stack: Callable[..., RunningStack]) -> None:
    stack = make_stack()
    assert stack.http.get("/vita/create").status == 200
    [pid] = stack.worker_pids("vita")
    # Process workers share the dispatcher's stderr.
    assert f"worker: user 'vita': worker process {pid} running main()" in stack.dispatcher_log()
