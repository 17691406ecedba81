"""The ETL's view of replication lag: per open stream, the worker's head and what PostgreSQL has."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import grpc

from etl.lag import StreamLag
from tests.conftest import RunningStack, wait_for
from upw.replication.v1 import replication_pb2, replication_pb2_grpc


def test_stream_lag_counts_users_behind() -> None:
    lag = StreamLag()
    a, b = lag.opened(), lag.opened()
    lag.applied(a, "alice", head_seq=10, applied_seq=10, newest_at=datetime.now(UTC))
    lag.applied(b, "bob", head_seq=9, applied_seq=4,
                newest_at=datetime.now(UTC) - timedelta(milliseconds=300))
    status = lag.status()
    assert [(s.user, s.head_seq, s.applied_seq) for s in status.streams] == [
        ("alice", 10, 10), ("bob", 9, 4)]
    assert status.users_behind == 1
    assert status.streams[1].last_apply_lag_ms >= 300
    assert "most behind 'bob' by 5 row(s)" in lag.summary_line()
    lag.closed(b)
    assert lag.status().users_behind == 0


def test_the_etl_reports_each_workers_stream(stack: RunningStack) -> None:
    for user in ["alice", "bob"]:
        assert stack.http.get(f"/{user}/create").status == 200
        assert stack.http.get(f"/{user}/deposit/7").status == 200

    def status() -> replication_pb2.ReplicationStatus:
        with grpc.insecure_channel(f"unix:{stack.settings.etl_socket}") as channel:
            reply: replication_pb2.ReplicationStatus = replication_pb2_grpc.ReplicationStub(
                channel).GetStatus(replication_pb2.GetStatusRequest(), timeout=5)
            return reply

    def caught_up() -> bool:
        streams = {s.user: s for s in status().streams}
        return all(user in streams and streams[user].applied_seq == streams[user].head_seq == 2
                   for user in ["alice", "bob"])

    wait_for(caught_up, timeout=20, what="both streams to be caught up")
    assert status().users_behind == 0
