"""Worker lifecycles as the dispatcher manages them, observed on real processes."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable

from tests.conftest import Response, RunningStack, stopped, wait_for


def test_idle_worker_stops_after_the_timeout(make_stack: Callable[..., RunningStack]) -> None:
    stack = make_stack(idle_ttl=1.0)
    assert stack.http.get("/teana/create").status == 200
    assert len(stack.worker_pids("teana")) == 1
    wait_for(lambda: not stack.worker_pids("teana"), timeout=10, what="the idle worker to stop")
    # The next request starts a new worker, and the data is still there.
    assert stack.http.get("/teana/deposit/5").status == 200
    assert stack.http.get("/teana/show").text == "teana's account is 5 yen.\n"
    assert stack.worker_starts("teana") == 2


def test_idle_ttl_zero_starts_a_worker_per_request(make_stack: Callable[..., RunningStack]) -> None:
    stack = make_stack(idle_ttl=0.0)
    for path in ["/subaru/create", "/subaru/deposit/3", "/subaru/deposit/4", "/subaru/show"]:
        assert stack.http.get(path).status == 200
    assert stack.http.get("/subaru/show").text == "subaru's account is 7 yen.\n"
    assert stack.worker_starts("subaru") == 5
    wait_for(lambda: not stack.worker_pids("subaru"), timeout=10, what="no worker left")


def test_cap_evicts_idle_workers_first(make_stack: Callable[..., RunningStack]) -> None:
    stack = make_stack(max_workers=2)
    for user in ["one", "two", "three"]:
        assert stack.http.get(f"/{user}/create").status == 200
    # "one" was the longest idle, so it made room for "three".
    assert not stack.worker_pids("one")
    assert len(stack.worker_pids("two")) == 1
    assert len(stack.worker_pids("three")) == 1


def test_cap_answers_resource_exhausted_when_every_worker_is_busy(
    make_stack: Callable[..., RunningStack],
) -> None:
    stack = make_stack(max_workers=1)
    assert stack.http.get("/busy/create").status == 200
    [pid] = stack.worker_pids("busy")
    with stopped(pid):
        # A request to the frozen worker keeps its slot busy.
        held: list[Response] = []
        holder = threading.Thread(target=lambda: held.append(stack.http.get("/busy/show")))
        holder.start()
        time.sleep(0.5)  # long enough for the held request to reach the dispatcher
        refused = stack.http.get("/other/create")
    holder.join()
    assert refused.status == 429, refused.text
    assert refused.json()["message"].startswith("all 1 workers are busy")
    assert held[0].status == 200
    # With the slot free again, the other user gets its worker.
    assert stack.http.get("/other/create").status == 200


def test_a_killed_worker_is_replaced_by_the_next_request(stack: RunningStack) -> None:
    assert stack.http.get("/nove/create").status == 200
    assert stack.http.get("/nove/deposit/10").status == 200
    [pid] = stack.worker_pids("nove")
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: pid not in stack.worker_pids("nove"), timeout=5, what="the worker to die")
    # The first request may find the dead worker (503); the next one gets a new worker.
    first = stack.http.get("/nove/show")
    assert first.status in (200, 503), first.text
    response = wait_for(lambda: (r := stack.http.get("/nove/show")).status == 200 and r, timeout=10)
    assert response.text == "nove's account is 10 yen.\n"


def test_dispatcher_restart_stops_leftover_workers(stack: RunningStack) -> None:
    assert stack.http.get("/einhart/create").status == 200
    [old] = stack.worker_pids("einhart")
    stack.stack.dispatcher.kill()  # SIGKILL: the workers are left behind
    assert stack.worker_pids("einhart") == [old]
    stack.stack.dispatcher.start()
    wait_for(lambda: old not in stack.worker_pids("einhart"), timeout=10,
             what="the leftover worker to be stopped")
    assert stack.http.get("/einhart/show").text == "einhart's account is 0 yen.\n"
