"""The worker pool: the whole life of every worker, from start to stop.

Rules it enforces (everything runs on the dispatcher's one event loop, so plain attributes
are the lock):
- At most one worker per user. Concurrent first requests share one start; a request that
  arrives while the user's worker is stopping waits until it is gone and starts a new one.
- A worker stops `idle_ttl` seconds after its last request ends; with `idle_ttl == 0` it
  stops as soon as no request uses it (a fresh worker for every request).
- At most `max_workers` workers live at once. A new user first evicts the longest-idle
  worker; when every worker is busy it waits up to `cap_wait` seconds for one to go idle,
  then fails with WorkerCapReached.
- A `PoolListener` hears of every worker of a user before it is launched and after it is gone
  (stopped for any reason, or failed to start); the drain queue (`dispatcher/drain.py`) uses
  it to remember which users may have left unshipped changes behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dispatcher.errors import WorkerCapReached, WorkerUnavailable
from dispatcher.runtimes.base import RunningWorker, Runtime
from upw.account.v1 import account_pb2_grpc

if TYPE_CHECKING:
    from upw.account.v1.account_pb2_grpc import AccountServiceAsyncStub

log = logging.getLogger(__name__)

ACCOUNT_SERVICE = "upw.account.v1.AccountService"
# gRPC waits a whole second before its first reconnect by default; a worker that is starting
# becomes reachable within milliseconds.
# The longest a call to a worker may take (the dispatcher's per-call deadline).
CALL_GRACE = 10.0
FAST_RECONNECT = [
    ("grpc.initial_reconnect_backoff_ms", 20),
    ("grpc.min_reconnect_backoff_ms", 20),
    ("grpc.max_reconnect_backoff_ms", 200),
]


class PoolListener(Protocol):
    """Told about worker lifecycles. Called on the event loop; must be quick and not raise
    (an exception is logged and ignored)."""

    def worker_starting(self, user: str) -> None:
        """A worker of `user` is about to be launched."""
        ...

    def worker_stopped(self, user: str) -> None:
        """The worker of `user` is gone (stopped, or failed to start); none is live now."""
        ...


@dataclass
class Worker:
    """A ready worker and the channel to it."""

    running: RunningWorker
    channel: grpc.aio.Channel
    stub: AccountServiceAsyncStub


@dataclass(eq=False)
class _Slot:
    user: str
    started: asyncio.Future[Worker]
    in_flight: int = 0
    idle_since: float = 0.0
    idle_timer: asyncio.TimerHandle | None = None
    stopped: asyncio.Event = field(default_factory=asyncio.Event)
    stopping: bool = False


class WorkerPool:
    def __init__(
        self,
        runtime: Runtime,
        *,
        idle_ttl: float,
        max_workers: int,
        ready_timeout: float = 15.0,
        cap_wait: float = 2.0,
        listener: PoolListener | None = None,
    ) -> None:
        self.runtime = runtime
        self._listener = listener
        self._idle_ttl = idle_ttl
        self._max_workers = max_workers
        self._ready_timeout = ready_timeout
        self._cap_wait = cap_wait
        self._slots: dict[str, _Slot] = {}
        self._freed = asyncio.Condition()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self.starts = 0

    @property
    def live_workers(self) -> int:
        return len(self._slots)

    @property
    def max_workers(self) -> int:
        return self._max_workers

    def has_worker(self, user: str) -> bool:
        """Whether `user` has a worker starting, live or stopping."""
        return user in self._slots

    @contextlib.asynccontextmanager
    async def lease(self, user: str) -> AsyncIterator[Worker]:
        """The ready worker of `user`, kept from idling out until the block ends."""
        slot = await self._acquire(user)
        try:
            worker = await asyncio.shield(slot.started)
        except BaseException:
            self._release(slot)
            raise
        try:
            yield worker
        finally:
            self._release(slot)

    def discard(self, user: str, worker: Worker) -> None:
        """Stops a worker that stopped answering, so the next request starts a new one."""
        slot = self._slots.get(user)
        if slot is not None and slot.started.done() and not slot.started.cancelled() \
                and slot.started.exception() is None and slot.started.result() is worker:
            log.warning("worker of %r (%s) stopped answering; replacing it",
                        user, worker.running.describe())
            self._begin_stop(slot)

    async def _acquire(self, user: str) -> _Slot:
        deadline = asyncio.get_running_loop().time() + self._cap_wait
        while True:
            if self._closed:
                raise WorkerUnavailable("the dispatcher is shutting down")
            slot = self._slots.get(user)
            if slot is not None and slot.stopping:
                await slot.stopped.wait()
                continue
            if slot is not None:
                slot.in_flight += 1
                if slot.idle_timer is not None:
                    slot.idle_timer.cancel()
                    slot.idle_timer = None
                return slot
            if len(self._slots) < self._max_workers:
                return self._new_slot(user)
            victim = self._longest_idle()
            if victim is not None:
                log.info("worker cap %d reached; stopping idle worker of %r for %r",
                         self._max_workers, victim.user, user)
                self._begin_stop(victim)
                await victim.stopped.wait()
                continue
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise WorkerCapReached(
                    f"all {self._max_workers} workers are busy; no worker for {user!r} could be "
                    f"started within {self._cap_wait:g}s, try again shortly"
                )
            async with self._freed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._freed.wait(), remaining)

    def _new_slot(self, user: str) -> _Slot:
        slot = _Slot(user=user, started=asyncio.get_running_loop().create_future(), in_flight=1)
        self._slots[user] = slot
        self._tell(user, stopped=False)
        self._spawn(self._start(slot))
        return slot

    def _longest_idle(self) -> _Slot | None:
        idle = [s for s in self._slots.values()
                if s.in_flight == 0 and not s.stopping and s.started.done()]
        return min(idle, key=lambda s: s.idle_since, default=None)

    async def _start(self, slot: _Slot) -> None:
        self.starts += 1
        loop = asyncio.get_running_loop()
        begun = loop.time()
        running: RunningWorker | None = None
        try:
            running = await self.runtime.start(slot.user)
            launched = loop.time()
            worker = await self._wait_ready(running)
        except BaseException as exc:
            if running is not None:
                with contextlib.suppress(Exception):
                    await self.runtime.stop(running)
            error = exc if isinstance(exc, WorkerUnavailable) else WorkerUnavailable(
                f"the worker of {slot.user!r} could not start: {exc}")
            log.error("worker of %r failed to start: %s", slot.user, error)
            slot.started.set_exception(error)
            slot.started.exception()  # retrieved: waiters get it; nobody else needs to
            self._forget(slot)
            return
        # Where the activation's time went: waiting for the runtime (a thread for the Docker
        # SDK), the runtime's own steps, then until the worker's health check said SERVING.
        ready = loop.time()
        steps = dict(running.phases)
        queued = max(launched - begun - sum(steps.values()), 0.0)
        steps = {"queued": queued, **steps, "until serving": ready - launched}
        log.info("worker of %r ready (%s, %s runtime) in %.0f ms (%s)", slot.user,
                 running.describe(), self.runtime.name, (ready - begun) * 1000,
                 ", ".join(f"{name} {seconds * 1000:.0f}" for name, seconds in steps.items()))
        slot.started.set_result(worker)
        self._idle_if_unused(slot)  # every request that waited for it may have been cancelled

    async def _wait_ready(self, running: RunningWorker) -> Worker:
        """Waits until the worker's socket exists and its health check says SERVING."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._ready_timeout
        delay = 0.002
        while not running.socket.exists():
            if (status := running.exit_status()) is not None:
                raise WorkerUnavailable(f"the worker of {running.user!r} could not start: {status}")
            if loop.time() > deadline:
                raise WorkerUnavailable(
                    f"the worker of {running.user!r} did not become ready within "
                    f"{self._ready_timeout:g}s ({running.describe()})")
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 0.005)  # a stat() per 5 ms is cheap; a late start is not
        channel = grpc.aio.insecure_channel(f"unix:{running.socket}", options=FAST_RECONNECT)
        health = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service=ACCOUNT_SERVICE)
        try:
            while True:
                try:
                    reply = await health.Check(
                        request, timeout=max(deadline - loop.time(), 0.05), wait_for_ready=True)
                except grpc.aio.AioRpcError as exc:
                    raise WorkerUnavailable(
                        f"the worker of {running.user!r} did not answer its health check: "
                        f"{exc.code().name} {exc.details()}") from exc
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    break
                if loop.time() > deadline:
                    raise WorkerUnavailable(
                        f"the worker of {running.user!r} did not become ready within "
                        f"{self._ready_timeout:g}s ({running.describe()})")
                await asyncio.sleep(0.005)
        except BaseException:
            await channel.close()
            raise
        return Worker(running=running, channel=channel,
                      stub=account_pb2_grpc.AccountServiceStub(channel))

    def _release(self, slot: _Slot) -> None:
        slot.in_flight -= 1
        self._idle_if_unused(slot)

    def _idle_if_unused(self, slot: _Slot) -> None:
        """Starts the idle countdown of a ready worker that no request uses."""
        if slot.in_flight > 0 or slot.stopping:
            return
        if not slot.started.done() or slot.started.cancelled() or slot.started.exception():
            return
        slot.idle_since = asyncio.get_running_loop().time()
        if self._idle_ttl == 0:
            self._begin_stop(slot)
        else:
            slot.idle_timer = asyncio.get_running_loop().call_later(
                self._idle_ttl, self._idle_expired, slot)
        self._spawn(self._notify_freed())

    def _idle_expired(self, slot: _Slot) -> None:
        slot.idle_timer = None
        if slot.in_flight == 0 and not slot.stopping:
            log.info("worker of %r idle for %gs; stopping it", slot.user, self._idle_ttl)
            self._begin_stop(slot)

    def _begin_stop(self, slot: _Slot) -> None:
        if slot.stopping:
            return
        slot.stopping = True
        if slot.idle_timer is not None:
            slot.idle_timer.cancel()
            slot.idle_timer = None
        self._spawn(self._stop(slot))

    async def _stop(self, slot: _Slot) -> None:
        try:
            worker = await asyncio.shield(slot.started)
        except BaseException:
            worker = None
        if worker is not None:
            # Closing a channel cancels its calls, and a cancelled call never answers its
            # caller; so calls still running on it (on a worker that stopped answering, they
            # fail on their own within their deadline) are let finish first.
            await worker.channel.close(grace=CALL_GRACE)
            try:
                await self.runtime.stop(worker.running)
            except Exception:
                log.exception("stopping the worker of %r failed", slot.user)
            log.info("worker of %r stopped (%s)", slot.user, worker.running.describe())
        self._forget(slot)

    def _forget(self, slot: _Slot) -> None:
        if self._slots.get(slot.user) is slot:
            del self._slots[slot.user]
            self._tell(slot.user, stopped=True)
        slot.stopped.set()
        self._spawn(self._notify_freed())

    def _tell(self, user: str, *, stopped: bool) -> None:
        if self._listener is None:
            return
        try:
            if stopped:
                self._listener.worker_stopped(user)
            else:
                self._listener.worker_starting(user)
        except Exception:
            log.exception("the pool listener failed on the worker of %r", user)

    async def _notify_freed(self) -> None:
        async with self._freed:
            self._freed.notify_all()

    def _spawn(self, coro: Coroutine[None, None, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Stops every worker; waits until all are gone."""
        self._closed = True
        for slot in list(self._slots.values()):
            self._begin_stop(slot)
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
