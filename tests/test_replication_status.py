"""The ETL's view of replication lag: per open stream, the worker's head and what PostgreSQL has."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from etl.lag import StreamLag
from tests.conftest import RunningStack, wait_for


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
    line = lag.summary_line(unshipped=3)
    assert "1 of them behind, users with unshipped rows: 3, most behind 'bob' by 5 row(s)" in line
    lag.closed(b)
    assert lag.status().users_behind == 0


def test_the_etl_reports_each_workers_stream(stack: RunningStack) -> None:
    for user in ["alice", "bob"]:
        assert stack.http.get(f"/{user}/create").status == 200
        assert stack.http.get(f"/{user}/deposit/7").status == 200

    def caught_up() -> bool:
        streams = {s.user: s for s in stack.replication_status().streams}
        return all(user in streams and streams[user].applied_seq == streams[user].head_seq == 2
                   for user in ["alice", "bob"])

    wait_for(caught_up, timeout=20, what="both streams to be caught up")
    status = stack.replication_status()
    assert (status.users_behind, status.users_unshipped) == (0, 0)
