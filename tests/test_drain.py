"""The drain queue and the drainer (dispatcher/drain.py), with a fake pool: which users are
queued, which are drained, how many at once, and what happens while the ETL is down."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from conventions.config import to_env
from conventions.users import InvalidUserName, unshipped_marker
from dispatcher.drain import Drainer, DrainQueue
from dispatcher.errors import WorkerUnavailable
from tests.conftest import RunningStack, wait_for


def mark(data_dir: Path, user: str) -> Path:
    marker = unshipped_marker(data_dir, user)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    return marker


def test_queue_is_durable_ordered_and_idempotent(tmp_path: Path) -> None:
    queue = DrainQueue(tmp_path)
    for user in ["b", "a", "b", "c"]:
        queue.add(user)
    assert queue.users() == ["b", "a", "c"]
    assert sorted(p.name for p in (tmp_path / "drain").iterdir()) == ["a", "b", "c"]
    queue.remove("a")
    queue.remove("a")
    queue.requeue("b")
    assert queue.users() == ["c", "b"]
    # A restarted dispatcher reads the queue back.
    assert set(DrainQueue(tmp_path).users()) == {"b", "c"}


@pytest.mark.parametrize("name", ["Koduki", "../etc", "", "a/b", "-x", "x" * 64])
def test_queue_refuses_bad_names(tmp_path: Path, name: str) -> None:
    queue = DrainQueue(tmp_path)
    with pytest.raises(InvalidUserName):
        queue.add(name)
    with pytest.raises(InvalidUserName):
        queue.remove(name)
    assert list((tmp_path / "drain").iterdir()) == []


def test_queue_ignores_files_that_are_not_user_names(tmp_path: Path) -> None:
    (tmp_path / "drain").mkdir()
    (tmp_path / "drain" / "Not-A-User").touch()
    (tmp_path / "drain" / "nanoha").touch()
    assert DrainQueue(tmp_path).users() == ["nanoha"]


def test_a_stopped_worker_leaves_its_user_queued_only_with_a_marker(tmp_path: Path) -> None:
    queue = DrainQueue(tmp_path)
    queue.worker_starting("shipped")
    queue.worker_starting("pending")
    mark(tmp_path, "pending")
    queue.worker_stopped("shipped")
    queue.worker_stopped("pending")
    assert queue.users() == ["pending"]
    assert DrainQueue(tmp_path).users() == ["pending"]


class FakePool:
    """Leases "start" a worker that removes the user's marker after `ship_after` seconds,
    as long as `etl_up` is set."""

    def __init__(self, data_dir: Path, *, max_workers: int = 8, ship_after: float = 0.05) -> None:
        self.data_dir = data_dir
        self.max_workers = max_workers
        self.ship_after = ship_after
        self.etl_up = True
        self.live: set[str] = set()
        self.leased: list[str] = []
        self.peak = 0
        self.fail: set[str] = set()
        self.attempts = 0

    @property
    def live_workers(self) -> int:
        return len(self.live)

    def has_worker(self, user: str) -> bool:
        return user in self.live

    @contextlib.asynccontextmanager
    async def lease(self, user: str) -> AsyncIterator[None]:
        self.attempts += 1
        if user in self.fail:
            raise WorkerUnavailable(f"the worker of {user!r} could not start")
        self.live.add(user)
        self.leased.append(user)
        self.peak = max(self.peak, len(self.live))

        async def ship() -> None:
            await asyncio.sleep(self.ship_after)
            await until(lambda: self.etl_up, within=60)
            unshipped_marker(self.data_dir, user).unlink(missing_ok=True)

        shipper = asyncio.ensure_future(ship())
        try:
            yield None
        finally:
            shipper.cancel()
            self.live.discard(user)


def run_drainer(
    tmp_path: Path, pool: FakePool, scenario: Callable[[Drainer, DrainQueue], Awaitable[None]],
    **options: Any,
) -> None:
    async def main() -> None:
        queue = DrainQueue(tmp_path)

        async def etl_ready() -> bool:
            return pool.etl_up

        drainer = Drainer(pool, queue, etl_ready=etl_ready, poll=0.02,
                          backoff_initial=0.05, backoff_max=0.2, **options)
        drainer.start()
        try:
            await scenario(drainer, queue)
        finally:
            await drainer.stop()

    asyncio.run(main())


async def until(condition: Callable[[], bool], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"not true within {within:g}s")


def test_drains_marked_users_two_at_a_time_and_drops_the_rest(tmp_path: Path) -> None:
    users = [f"user{i}" for i in range(6)]
    for user in users:
        DrainQueue(tmp_path).add(user)
        mark(tmp_path, user)
    DrainQueue(tmp_path).add("clean")  # queued, but its worker shipped everything
    pool = FakePool(tmp_path)

    async def scenario(drainer: Drainer, queue: DrainQueue) -> None:
        await until(lambda: drainer.finished == len(users))
        await until(lambda: "clean" not in queue)
        for user in users:  # the idle stop of each drained worker drops its entry
            queue.worker_stopped(user)
        assert queue.users() == []

    run_drainer(tmp_path, pool, scenario)
    assert sorted(pool.leased) == users
    assert pool.peak == 2


def test_no_drain_while_the_etl_is_down_nor_for_a_user_with_a_worker(tmp_path: Path) -> None:
    for user in ["busy", "idle"]:
        DrainQueue(tmp_path).add(user)
        mark(tmp_path, user)
    pool = FakePool(tmp_path)
    pool.etl_up = False
    pool.live.add("busy")

    async def scenario(drainer: Drainer, queue: DrainQueue) -> None:
        await asyncio.sleep(0.3)
        assert pool.leased == []
        pool.etl_up = True
        await until(lambda: drainer.finished == 1)
        assert pool.leased == ["idle"]

    run_drainer(tmp_path, pool, scenario)


def test_drains_leave_the_last_free_slots_to_customers(tmp_path: Path) -> None:
    DrainQueue(tmp_path).add("late")
    mark(tmp_path, "late")
    pool = FakePool(tmp_path, max_workers=3)
    pool.live.update({"c1", "c2"})  # one free slot: the reserve

    async def scenario(drainer: Drainer, queue: DrainQueue) -> None:
        await asyncio.sleep(0.3)
        assert pool.leased == []
        pool.live.discard("c1")
        await until(lambda: drainer.finished == 1)

    run_drainer(tmp_path, pool, scenario)


def test_a_failed_drain_is_retried_with_backoff(tmp_path: Path) -> None:
    DrainQueue(tmp_path).add("stuck")
    marker = mark(tmp_path, "stuck")
    pool = FakePool(tmp_path)
    pool.fail.add("stuck")

    async def scenario(drainer: Drainer, queue: DrainQueue) -> None:
        await asyncio.sleep(0.6)
        assert marker.exists() and "stuck" in queue
        # Backoff from 50 ms doubling to 200 ms: a handful of attempts, not one per 20 ms poll.
        assert 2 <= pool.attempts <= 10
        pool.fail.clear()
        await until(lambda: drainer.finished == 1)

    run_drainer(tmp_path, pool, scenario, drain_timeout=0.2)
    assert pool.leased == ["stuck"]


def test_a_drain_that_times_out_releases_the_worker_and_retries(tmp_path: Path) -> None:
    DrainQueue(tmp_path).add("slow")
    mark(tmp_path, "slow")
    pool = FakePool(tmp_path, ship_after=10.0)

    async def scenario(drainer: Drainer, queue: DrainQueue) -> None:
        await until(lambda: len(pool.leased) >= 2)
        assert pool.live == set() or pool.live == {"slow"}
        pool.ship_after = 0.0
        await until(lambda: drainer.finished == 1)

    run_drainer(tmp_path, pool, scenario, drain_timeout=0.1)


# Real stacks: the process runtime, a real ETL that is SIGKILLed, no customer traffic once the
# ETL is back. The bound is counted from the moment the restarted ETL answers.
CATCH_UP_BOUND = 20.0
STACK_USERS = ["hayate", "signum", "vita", "shamal"]


def deposit_while_the_etl_is_down(stack: RunningStack) -> None:
    stack.stack.etl.kill()
    for i, user in enumerate(STACK_USERS):
        for path in [f"/{user}/create", f"/{user}/deposit/{10 + i}", f"/{user}/deposit/5"]:
            response = stack.http.get(path)
            assert response.status == 200, response.text


def logged(stack: RunningStack, line: str) -> bool:
    return line in stack.dispatcher_log()


def no_worker(stack: RunningStack, user: str) -> bool:
    return not stack.worker_pids(user)


def assert_catches_up_without_traffic(stack: RunningStack) -> float:
    starts = {user: stack.worker_starts(user) for user in STACK_USERS}
    stack.stack.etl.start()
    begun = time.monotonic()
    for user in STACK_USERS:
        remaining = CATCH_UP_BOUND - (time.monotonic() - begun)
        assert len(stack.wait_for_postgres(user, timeout=max(remaining, 0.1))) == 3
    elapsed = time.monotonic() - begun
    print(f"PostgreSQL caught up on {len(STACK_USERS)} users in {elapsed:.1f}s")
    for user in STACK_USERS:
        finished = f"drain of {user!r}: finished"
        wait_for(functools.partial(logged, stack, finished), timeout=5, what=finished)
        assert not unshipped_marker(stack.data_dir, user).exists()
        assert stack.worker_starts(user) == starts[user] + 1  # the drain's worker, no other
    return elapsed


def upw_status(stack: RunningStack) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "launcher", "status"],
                          env={**os.environ, **to_env(stack.settings)},
                          capture_output=True, text=True, timeout=30, check=False)


def test_idle_stopped_workers_are_drained_once_the_etl_is_back(
    make_stack: Callable[..., RunningStack],
) -> None:
    stack = make_stack(idle_ttl=1.0)
    deposit_while_the_etl_is_down(stack)
    for user in STACK_USERS:  # idle 1 s; the flush gives up at once, the ETL being down
        wait_for(functools.partial(no_worker, stack, user), timeout=15,
                 what=f"the worker of {user} to stop")
        assert unshipped_marker(stack.data_dir, user).exists()
    status = upw_status(stack)
    assert status.returncode == 2, status.stdout + status.stderr  # the ETL does not answer
    assert f"{len(STACK_USERS)} user(s) with unshipped rows" in status.stdout
    assert "the ETL at unix:" in status.stderr
    assert_catches_up_without_traffic(stack)
    status = upw_status(stack)
    assert status.returncode == 0, status.stdout + status.stderr
    assert "0 user(s) with unshipped rows" in status.stdout
    assert "users whose last report names rows PostgreSQL lacks: 0" in status.stdout


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGKILL"])
def test_unshipped_changes_are_drained_after_a_dispatcher_restart(
    make_stack: Callable[..., RunningStack], signal_name: str,
) -> None:
    stack = make_stack()
    deposit_while_the_etl_is_down(stack)
    stack.stack.dispatcher.stop(getattr(signal, signal_name))
    if signal_name == "SIGTERM":  # the dispatcher stopped its workers; they left markers
        for user in STACK_USERS:
            assert not stack.worker_pids(user)
            assert unshipped_marker(stack.data_dir, user).exists()
    assert sorted(p.name for p in (stack.data_dir / "drain").iterdir()) == sorted(STACK_USERS)
    # The new dispatcher stops whatever workers were left, then drains from its queue.
    stack.stack.dispatcher.start()
    assert_catches_up_without_traffic(stack)
