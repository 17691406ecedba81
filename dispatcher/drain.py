"""Drains: shipping the changes a stopped worker left unshipped, without waiting for its user.

A worker that stops (idle timeout, one worker per request, cap eviction, dispatcher shutdown)
or is killed while the ETL has not acknowledged all of its ledger keeps the user's unshipped
marker (`conventions.users.unshipped_marker`, kept by `worker.store`). This module makes sure
such a user gets a worker again, soon, with no customer request, until the marker is gone.

The queue (`DrainQueue`) is a directory, `<data dir>/drain/`, holding one empty file per user.
Rules:
- A user is queued before each of its workers is launched, and leaves the queue when a worker
  of it is gone and left no marker. So the queue holds every user whose worker may have stopped
  with unshipped rows, including workers killed with SIGKILL and workers a crashed dispatcher
  left behind, whatever the runtime can or cannot tell about them.
- The queue is durable (entries are fsynced when created) and read back when the dispatcher
  starts; `serve` builds it after the runtime removed leftover workers, so their last words
  (a flush, or the marker) are on disk before it looks.
- A file name is checked with `conventions.users.validate_user` before it is taken for a user;
  other names are logged and left alone.

The drainer (`Drainer`, one background task of the dispatcher) takes queued users that have no
worker in the pool. Rules:
- No marker: the entry is dropped (the worker shipped everything before it stopped).
- A marker: a drain. The drainer leases the user's worker from the pool with no customer call
  and holds the lease until the worker has removed the marker (its watermark reached its newest
  row) or `drain_timeout` passed, then releases it; the pool's idle timeout stops the worker as
  usual, and that stop drops the entry. A customer request during a drain shares the worker.
- At most `parallel` drains run at once, and a drain starts only while more than `reserve`
  worker slots are free, so drains never take the last free slots from customers (with
  `max_workers == 1` the reserve is 0: a drain may hold the one slot for up to `drain_timeout`).
- No drain starts while the ETL does not answer its health check; the drainer looks again every
  `poll` seconds. A drain that fails (timeout, worker unavailable, cap) makes every further
  drain wait a capped, jittered exponential backoff, and its user goes to the end of the queue.
- One log line per drain start, finish and retry, naming the user.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from conventions.users import InvalidUserName, unshipped_marker, validate_user
from dispatcher.errors import DispatcherError

log = logging.getLogger(__name__)


class DrainPool(Protocol):
    """What the drainer needs from `dispatcher.pool.WorkerPool`."""

    @property
    def live_workers(self) -> int: ...

    @property
    def max_workers(self) -> int: ...

    def has_worker(self, user: str) -> bool: ...

    def lease(self, user: str) -> contextlib.AbstractAsyncContextManager[Any]: ...


class DrainQueue:
    """The durable set of users to look at, in the order they were queued. It is the pool's
    `PoolListener`. Methods are synchronous, short file-system calls, made on the event loop."""

    def __init__(self, data_dir: Path) -> None:
        self._data_dir = data_dir
        self.directory = data_dir / "drain"
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.changed = asyncio.Event()
        self._users: dict[str, None] = {}  # insertion-ordered set
        for entry in sorted(self.directory.iterdir(), key=_mtime):
            try:
                self._users[validate_user(entry.name)] = None
            except InvalidUserName:
                log.warning("ignoring %s in the drain queue: not a user name", entry)

    def users(self) -> list[str]:
        """The queued users, oldest first."""
        return list(self._users)

    def __contains__(self, user: object) -> bool:
        return user in self._users

    def add(self, user: str) -> None:
        """Queues `user` (idempotent); the entry is on disk when this returns."""
        path = self.directory / validate_user(user)
        if user in self._users:
            return
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        os.close(fd)
        dir_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        self._users[user] = None
        self.changed.set()

    def remove(self, user: str) -> None:
        """Forgets `user` (idempotent)."""
        path = self.directory / validate_user(user)
        path.unlink(missing_ok=True)
        self._users.pop(user, None)

    def requeue(self, user: str) -> None:
        """Moves `user` to the end of the queue (the file stays as it is)."""
        if user in self._users:
            del self._users[user]
            self._users[user] = None

    def marked(self, user: str) -> bool:
        """Whether the user's unshipped marker exists."""
        return unshipped_marker(self._data_dir, user).exists()

    # PoolListener
    def worker_starting(self, user: str) -> None:
        self.add(user)

    def worker_stopped(self, user: str) -> None:
        if self.marked(user):
            log.info("worker of %r stopped with unshipped changes; queued for a drain", user)
            self.changed.set()
        else:
            self.remove(user)


def unshipped_on_disk(data_dir: Path) -> tuple[int, list[str]]:
    """(users in the drain queue, the queued users whose unshipped marker exists), read
    without changing anything. Every user with unshipped rows is queued (see the rules above),
    so the second list is every user whose database holds rows the ETL has not acknowledged,
    whether its worker runs or not."""
    directory = data_dir / "drain"
    if not directory.is_dir():
        return 0, []
    queued = []
    for entry in directory.iterdir():
        with contextlib.suppress(InvalidUserName):
            queued.append(validate_user(entry.name))
    return len(queued), sorted(u for u in queued if unshipped_marker(data_dir, u).exists())


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


class Drainer:
    """Runs the drains of the users in `queue` through `pool` (see the module docstring)."""

    def __init__(
        self,
        pool: DrainPool,
        queue: DrainQueue,
        *,
        etl_ready: Callable[[], Awaitable[bool]],
        parallel: int = 2,
        reserve: int | None = None,
        drain_timeout: float = 30.0,
        poll: float = 0.5,
        backoff_initial: float = 1.0,
        backoff_max: float = 30.0,
    ) -> None:
        self._pool = pool
        self._queue = queue
        self._etl_ready = etl_ready
        self._parallel = parallel
        self._reserve = (
            reserve if reserve is not None
            else 0 if pool.max_workers <= 1 else max(1, pool.max_workers // 8)
        )
        self._drain_timeout = drain_timeout
        self._poll = poll
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._active: dict[str, asyncio.Task[None]] = {}
        self._failures = 0
        self._not_before = 0.0
        self._etl_up: bool | None = None  # for logging changes only
        self._task: asyncio.Task[None] | None = None
        self.finished = 0  # drains that shipped everything, for tests and logs

    def start(self) -> None:
        """Starts the background task on the running event loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="drainer")

    async def stop(self) -> None:
        """Stops the drainer and every drain; queued users stay queued for the next run."""
        tasks = [t for t in (self._task, *self._active.values()) if t is not None]
        self._task = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            self._queue.changed.clear()
            try:
                await self._round()
            except Exception:
                log.exception("the drainer failed; carrying on")
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation
            # that races with the event, and stop() would then wait for ever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._poll):
                    await self._queue.changed.wait()

    async def _round(self) -> None:
        loop = asyncio.get_running_loop()
        if loop.time() < self._not_before:
            return
        etl_checked = False
        for user in self._queue.users():
            if len(self._active) >= self._parallel:
                return
            if user in self._active or self._pool.has_worker(user):
                continue
            if not self._queue.marked(user):
                self._queue.remove(user)
                continue
            if self._pool.max_workers - self._pool.live_workers <= self._reserve:
                return
            if not etl_checked:
                if not await self._etl_answers():
                    return
                etl_checked = True
                if self._pool.has_worker(user) or user not in self._queue:
                    continue  # things moved while the health check ran
            self._active[user] = loop.create_task(self._drain(user), name=f"drain-{user}")

    async def _etl_answers(self) -> bool:
        try:
            up = await self._etl_ready()
        except Exception:
            log.exception("the ETL health check failed")
            up = False
        if up != self._etl_up:
            self._etl_up = up
            if up:
                log.info("the ETL answers; drains may start")
            else:
                log.info("the ETL does not answer; drains wait for it")
        return up

    async def _drain(self, user: str) -> None:
        loop = asyncio.get_running_loop()
        begun = loop.time()
        log.info("drain of %r: starting its worker to ship the changes left unshipped", user)
        try:
            async with self._pool.lease(user):
                while self._queue.marked(user):
                    if loop.time() - begun > self._drain_timeout:
                        raise TimeoutError(
                            f"the ETL did not acknowledge everything within "
                            f"{self._drain_timeout:g}s")
                    await asyncio.sleep(0.05)
        except (DispatcherError, TimeoutError) as exc:
            self._failed(user, begun, str(exc))
        except Exception as exc:
            log.exception("drain of %r failed", user)
            self._failed(user, begun, repr(exc))
        else:
            self._failures = 0
            self.finished += 1
            log.info("drain of %r: finished, everything shipped, in %.0f ms",
                     user, (loop.time() - begun) * 1000)
        finally:
            self._active.pop(user, None)
            self._queue.changed.set()

    def _failed(self, user: str, begun: float, why: str) -> None:
        loop = asyncio.get_running_loop()
        self._failures += 1
        ceiling = min(self._backoff_max, self._backoff_initial * 2 ** (self._failures - 1))
        delay = random.uniform(ceiling / 2, ceiling)
        self._not_before = max(self._not_before, loop.time() + delay)
        self._queue.requeue(user)
        log.info("drain of %r: not finished after %.1fs (%s); retrying in %.1fs",
                 user, loop.time() - begun, why, delay)
