"""How far PostgreSQL is behind each worker: what the ETL knows of its open streams.

A worker reports its newest seq (`head_seq`) with every batch; the ETL knows what it has
committed. `StreamLag` keeps both per open stream, answers `Replication.GetStatus`, and logs one
line every `log_every` seconds while streams are open or users have unshipped rows. A worker
that has stopped has no stream; the count of users with unshipped rows comes from PostgreSQL
(`Sink.unshipped_users`), which keeps each worker's last reported head.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp

from upw.replication.v1 import replication_pb2

logger = logging.getLogger(__name__)


@dataclass
class _Stream:
    user: str = ""
    head_seq: int = 0
    applied_seq: int = 0
    last_apply_lag_ms: int = 0
    connected_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    @property
    def behind(self) -> int:
        return max(self.head_seq - self.applied_seq, 0)


class StreamLag:
    def __init__(self, *, log_every: float = 10.0) -> None:
        self._streams: dict[int, _Stream] = {}
        self._ids = itertools.count(1)
        self._log_every = log_every

    def opened(self) -> int:
        """Registers a new stream; returns its handle."""
        handle = next(self._ids)
        self._streams[handle] = _Stream()
        return handle

    def closed(self, handle: int) -> None:
        self._streams.pop(handle, None)

    def applied(self, handle: int, user: str, head_seq: int, applied_seq: int,
                newest_at: datetime) -> None:
        """Records a committed batch: its user, the worker's head and the newest applied row."""
        stream = self._streams.get(handle)
        if stream is None:
            return
        stream.user = user
        stream.head_seq = max(stream.head_seq, head_seq, applied_seq)
        stream.applied_seq = max(stream.applied_seq, applied_seq)
        lag = datetime.now(UTC) - newest_at
        stream.last_apply_lag_ms = max(int(lag.total_seconds() * 1000), 0)

    def status(self) -> replication_pb2.ReplicationStatus:
        reply = replication_pb2.ReplicationStatus()
        for stream in sorted(self._streams.values(), key=lambda s: s.user):
            connected_at = Timestamp()
            connected_at.FromDatetime(stream.connected_at)
            reply.streams.add(
                user=stream.user, head_seq=stream.head_seq, applied_seq=stream.applied_seq,
                last_apply_lag_ms=stream.last_apply_lag_ms, connected_at=connected_at)
        reply.users_behind = sum(1 for s in self._streams.values() if s.behind)
        return reply

    def summary_line(self, unshipped: int) -> str:
        """One line for the log; `unshipped` is the count of users with unshipped rows (-1 =
        unknown, PostgreSQL unreachable)."""
        streams = list(self._streams.values())
        behind = [s for s in streams if s.behind]
        worst = max(behind, key=lambda s: s.behind, default=None)
        known = "unknown (PostgreSQL unreachable)" if unshipped < 0 else str(unshipped)
        line = (f"replication: {len(streams)} open stream(s), {len(behind)} of them behind, "
                f"users with unshipped rows: {known}")
        if worst is not None:
            line += f", most behind {worst.user!r} by {worst.behind} row(s)"
        if streams:
            line += f", newest apply lag {max(s.last_apply_lag_ms for s in streams)} ms"
        return line

    async def log_periodically(self, unshipped_users: Callable[[], Awaitable[int]]) -> None:
        """Logs `summary_line` every `log_every` seconds while streams are open or users have
        unshipped rows, and once more when both became none."""
        was_active = False
        while True:
            await asyncio.sleep(self._log_every)
            unshipped = await unshipped_users()
            active = bool(self._streams) or unshipped != 0
            if active or was_active:
                logger.info("%s", self.summary_line(unshipped))
            was_active = active
