"""A worker killed in the middle of traffic: the next request gets a new worker, and every
acknowledged deposit is in the user's ledger and, after catch-up, in PostgreSQL."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable

import pytest

from tests.conftest import RunningStack, amounts_in, wait_for


@pytest.mark.parametrize("runtime", ["process", "docker"])
def test_killing_a_worker_mid_traffic_loses_no_acknowledged_deposit(
    make_stack: Callable[..., RunningStack], runtime: str
) -> None:
    stack = make_stack(runtime=runtime)
    user = "reinforce"
    assert stack.http.get(f"/{user}/create").status == 200
    acknowledged: list[int] = []
    refused: list[int] = []
    unexpected: list[str] = []
    next_amount = iter(range(1000, 100_000))  # every amount unique, so the ledger tells them apart
    lock = threading.Lock()
    done = threading.Event()

    def deposit_until_done() -> None:
        while not done.is_set():
            with lock:
                amount = next(next_amount)
            response = stack.http.get(f"/{user}/deposit/{amount}")
            (acknowledged if response.status == 200 else refused).append(amount)
            if response.status not in (200, 503):
                unexpected.append(f"{response.status} {response.text}")

    clients = [threading.Thread(target=deposit_until_done) for _ in range(4)]
    for client in clients:
        client.start()
    try:
        for _ in range(2):
            wait_for(lambda: len(acknowledged) >= 30, what="deposits before the kill")
            if stack.engine is not None:
                [container] = [c for c in stack.containers(user) if c["State"] == "running"]
                stack.engine.kill(container["Id"])
            else:
                [pid] = stack.worker_pids(user)
                os.kill(pid, signal.SIGKILL)
            wanted = len(acknowledged) + 30
            wait_for(lambda: len(acknowledged) >= wanted,  # noqa: B023 (called at once)
                     what="deposits on a new worker")
    finally:
        done.set()
        for client in clients:
            client.join()

    assert unexpected == []
    assert stack.worker_starts(user) == 3
    ledger = stack.sqlite_ledger(user)
    applied = amounts_in(ledger)
    assert set(acknowledged) <= set(applied)  # nothing acknowledged is lost
    assert set(applied) <= set(acknowledged) | set(refused)  # nothing invented
    assert len(applied) == len(set(applied))  # nothing applied twice
    stack.wait_for_postgres(user)
