"""Ships one user's ledger rows to the ETL over the `upw.replication.v1.Replication` stream.

Contract: every ledger row is eventually acknowledged by the ETL, as long as the worker lives
long enough for the ETL to be reachable once. Delivery is at-least-once: after a reconnect the
shipper resends from the stored watermark, and the ETL applies a replayed row as a no-op.

The shipper is a background task of the worker's event loop. It never raises into its caller
and never makes a customer call wait: `wake()` only sets an event, and an absent or failing ETL
only makes the shipper log once and retry with capped, jittered exponential backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import deque

import grpc

from upw.replication.v1 import replication_pb2, replication_pb2_grpc
from worker.service import entry_message
from worker.store import Store

logger = logging.getLogger("worker.shipper")


class StreamEnded(Exception):
    """The ETL closed the replication stream."""


class Shipper:
    """Keeps one Replication.Stream open to `target` (a gRPC target such as
    `unix:/run/etl.sock`) and ships the rows of `store` above its watermark."""

    def __init__(
        self,
        store: Store,
        *,
        target: str,
        batch_rows: int = 500,
        batch_bytes: int = 1 << 20,
        window: int = 4,
        backoff_initial: float = 0.05,
        backoff_max: float = 2.0,
        unmark_after: float = 1.0,
    ) -> None:
        self._store = store
        self._user = store.user
        self._target = target
        self._batch_rows = batch_rows
        self._batch_bytes = batch_bytes
        self._window = window
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._unmark_after = unmark_after
        self._wake = asyncio.Event()
        self._acked = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # None until the first state is known; False while the stream is down (logging, flush).
        self._up: bool | None = None

    @property
    def stream_up(self) -> bool | None:
        """Whether the stream is delivering acknowledgements; None before the first attempt."""
        return self._up

    def wake(self) -> None:
        """Tells the shipper that new rows are committed. Never blocks."""
        self._wake.set()

    def start(self) -> None:
        """Starts the background task on the running event loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"shipper-{self._user}"
            )

    async def stop(self) -> None:
        """Stops the background task and closes the stream. Unacknowledged rows stay in the
        database and are shipped by the next worker of this user."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # A bool answer rather than asyncio.timeout: "not everything was acknowledged in time" is
    # an expected outcome at shutdown, not an error.
    async def flush(self, timeout: float) -> bool:  # noqa: ASYNC109
        """Waits at most `timeout` seconds for the ETL to acknowledge every row committed so
        far; returns whether it did. Gives up at once while the stream is known to be down
        (the ETL or its PostgreSQL unreachable): waiting would only delay the stop, and what
        is left is drained later. The background task must be running."""
        target = self._store.last_seq()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        self.wake()
        while self._store.acked_seq() < target:
            remaining = deadline - loop.time()
            if remaining <= 0 or self._up is False:
                return False
            self._acked.clear()
            if self._store.acked_seq() >= target:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._acked.wait(), remaining)
        return True

    def _state(self, up: bool, detail: str) -> None:
        if up == self._up:
            return
        self._up = up
        self._acked.set()  # a flush waiting for acknowledgements learns the stream is down
        if up:
            logger.info("user %r: replication stream to %s is up", self._user, self._target)
        else:
            logger.info(
                "user %r: replication stream to %s is down (%s); retrying in the background",
                self._user,
                self._target,
                detail,
            )

    async def _run(self) -> None:
        # gRPC's own reconnect backoff is capped like ours, so a restarted ETL is found quickly;
        # a local subchannel pool keeps this channel's backoff state to itself.
        options = [
            ("grpc.initial_reconnect_backoff_ms", int(self._backoff_initial * 1000)),
            ("grpc.min_reconnect_backoff_ms", int(self._backoff_initial * 1000)),
            ("grpc.max_reconnect_backoff_ms", int(self._backoff_max * 1000)),
            ("grpc.use_local_subchannel_pool", 1),
        ]
        failures = 0
        async with grpc.aio.insecure_channel(self._target, options=options) as channel:
            stub = replication_pb2_grpc.ReplicationStub(channel)
            while True:
                try:
                    progressed = await self._session(stub)
                    detail = "the ETL closed the stream"
                except asyncio.CancelledError:
                    raise
                except grpc.aio.AioRpcError as exc:
                    progressed = False
                    detail = f"{exc.code().name}: {exc.details()}"
                except Exception as exc:
                    # A background task logs and carries on; the rows wait in the database.
                    # One traceback per outage, not one per retry.
                    log = logger.exception if self._up is not False else logger.debug
                    log("user %r: replication failed", self._user, exc_info=True)
                    progressed = False
                    detail = repr(exc)
                self._state(False, detail)
                failures = 1 if progressed else failures + 1
                ceiling = min(self._backoff_max, self._backoff_initial * 2 ** (failures - 1))
                await asyncio.sleep(random.uniform(ceiling / 2, ceiling))

    async def _session(self, stub: replication_pb2_grpc.ReplicationAsyncStub) -> bool:
        """Runs one stream until it fails; returns whether any acknowledgement arrived."""
        call = stub.Stream()
        sent = self._store.acked_seq()
        in_flight: deque[int] = deque()  # last seq of each unacknowledged batch
        progressed = False

        async def read() -> None:
            nonlocal progressed
            while True:
                ack = await call.read()
                if ack is grpc.aio.EOF:
                    raise StreamEnded()
                assert isinstance(ack, replication_pb2.Ack)
                if ack.user != self._user:
                    logger.warning("user %r: ignored an ack for user %r", self._user, ack.user)
                    continue
                progressed = True
                self._state(True, "")
                self._store.acknowledge(ack.acked_seq)
                while in_flight and in_flight[0] <= ack.acked_seq:
                    in_flight.popleft()
                self._acked.set()
                self._wake.set()  # the window may have room again

        loop = asyncio.get_running_loop()
        reader = loop.create_task(read())
        reader.add_done_callback(lambda _: self._wake.set())
        quiet = False

        def quiet_now() -> None:
            nonlocal quiet
            quiet = True
            self._wake.set()

        try:
            while True:
                self._wake.clear()
                while len(in_flight) < self._window:
                    # Rows that would not fill a batch wait for the batch in flight (as Nagle's
                    # algorithm does): a hot user's rows then go in fewer, fuller batches, which
                    # the ETL applies and acknowledges once each. A backlog goes out at once.
                    if in_flight and self._store.last_seq() - sent < self._batch_rows:
                        break
                    batch = self._next_batch(sent)
                    if batch is None:
                        break
                    # In flight before the write: its ack can arrive while the write awaits.
                    sent = batch.entries[-1].seq
                    in_flight.append(sent)
                    await call.write(batch)
                # Caught up: once the stream has been quiet for `unmark_after` seconds, the
                # unshipped marker goes (not at every ack: see worker.store). A timer rather
                # than a timeout on the wait: one wait per wake-up, no task per deposit.
                quiet = False
                timer = loop.call_later(self._unmark_after, quiet_now) \
                    if not in_flight and self._store.marked else None
                try:
                    await self._wake.wait()
                finally:
                    if timer is not None:
                        timer.cancel()
                if quiet:
                    self._store.sync_marker()
                if reader.done():
                    reader.result()  # raises the stream's error
                    return progressed
        except StreamEnded:
            return progressed
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
            call.cancel()

    def _next_batch(self, after_seq: int) -> replication_pb2.ChangeBatch | None:
        rows = self._store.pending(after_seq, self._batch_rows)
        if not rows:
            return None
        batch = replication_pb2.ChangeBatch(user=self._user, head_seq=self._store.last_seq())
        size = 0
        for row in rows:
            message = entry_message(row)
            size += message.ByteSize() + 4
            if batch.entries and size > self._batch_bytes:
                break
            batch.entries.append(message)
        return batch
