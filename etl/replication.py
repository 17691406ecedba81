"""`upw.replication.v1.Replication`: change batches in, acknowledgements out.

A batch is acknowledged only after the sink has committed it, so an Ack{user, acked_seq} means
every row of that user up to acked_seq is in PostgreSQL. Batches of one stream are applied one
after the other, in the order they arrive. When PostgreSQL is unreachable the stream ends with
UNAVAILABLE; the worker reconnects and resends whatever was not acknowledged, which is safe
because the sink is idempotent.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from datetime import UTC
from typing import Protocol

import grpc

from conventions.users import InvalidUserName, validate_user
from etl.errors import DatabaseUnavailable, EtlError, InvalidBatch
from etl.lag import StreamLag
from etl.sink import Change
from upw.replication.v1 import replication_pb2, replication_pb2_grpc

logger = logging.getLogger(__name__)


class BatchSink(Protocol):
    async def apply(self, user: str, changes: Sequence[Change], *, head_seq: int = 0) -> int: ...

    async def unshipped_users(self) -> int: ...


def changes_of(batch: replication_pb2.ChangeBatch) -> tuple[str, list[Change]]:
    """The batch's user and rows, or InvalidBatch/InvalidUserName naming what is wrong."""
    user = validate_user(batch.user)
    if not batch.entries:
        raise InvalidBatch(f"the batch of {user!r} has no entries")
    changes: list[Change] = []
    previous = 0
    for entry in batch.entries:
        if entry.seq <= previous:
            raise InvalidBatch(
                f"the batch of {user!r} is not in strictly ascending seq order "
                f"(seq {entry.seq} after {previous}); seq starts at 1"
            )
        if not entry.HasField("at"):
            raise InvalidBatch(f"entry seq {entry.seq} of {user!r} has no 'at' timestamp")
        previous = entry.seq
        changes.append(
            Change(
                seq=entry.seq,
                kind=entry.kind,
                amount=entry.amount,
                balance=entry.balance,
                at=entry.at.ToDatetime(tzinfo=UTC),
            )
        )
    return user, changes


def _status_of(error: Exception) -> grpc.StatusCode:
    """The one place where this service chooses a gRPC status code."""
    if isinstance(error, InvalidUserName | InvalidBatch):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(error, DatabaseUnavailable):
        return grpc.StatusCode.UNAVAILABLE
    return grpc.StatusCode.INTERNAL


async def unshipped_users(sink: BatchSink, timeout: float = 1.0) -> int:  # noqa: ASYNC109
    """The sink's count of users with unshipped rows, or -1 when PostgreSQL does not answer
    within `timeout` seconds: a status report still answers, with what it knows, during an
    outage."""
    try:
        return await asyncio.wait_for(sink.unshipped_users(), timeout)
    except (EtlError, TimeoutError) as e:
        logger.debug("could not count users with unshipped rows: %r", e)
        return -1


class ReplicationServicer(replication_pb2_grpc.ReplicationServicer):
    def __init__(self, sink: BatchSink, lag: StreamLag | None = None) -> None:
        self._sink = sink
        self.lag = lag or StreamLag()

    async def GetStatus(
        self,
        request: replication_pb2.GetStatusRequest,
        context: grpc.aio.ServicerContext[
            replication_pb2.GetStatusRequest, replication_pb2.ReplicationStatus],
    ) -> replication_pb2.ReplicationStatus:
        reply = self.lag.status()
        reply.users_unshipped = await unshipped_users(self._sink)
        return reply

    async def Stream(
        self,
        request_iterator: AsyncIterator[replication_pb2.ChangeBatch],
        context: grpc.aio.ServicerContext[replication_pb2.ChangeBatch, replication_pb2.Ack],
    ) -> AsyncIterator[replication_pb2.Ack]:
        peer = context.peer()
        handle = self.lag.opened()
        try:
            async for batch in request_iterator:
                try:
                    user, changes = changes_of(batch)
                    acked = await self._sink.apply(user, changes, head_seq=batch.head_seq)
                except (InvalidUserName, EtlError) as e:
                    code = _status_of(e)
                    logger.warning(
                        "replication of %r from %s ends with %s: %s",
                        batch.user, peer, code.name, e,
                    )
                    await context.abort(code, str(e))
                self.lag.applied(handle, user, batch.head_seq, acked, changes[-1].at)
                logger.debug("applied seq %d-%d of %r", changes[0].seq, acked, user)
                yield replication_pb2.Ack(user=user, acked_seq=acked)
        finally:
            self.lag.closed(handle)
