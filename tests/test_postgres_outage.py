"""PostgreSQL down while deposits go on: deposits still succeed, the summary answers 503 instead
of stale data, nothing is acknowledged by the ETL, and PostgreSQL catches up exactly after."""

from __future__ import annotations

from collections.abc import Callable

import apsw

from conventions.users import account_db
from etl.embedded import EmbeddedPostgres
from tests.conftest import RunningStack, wait_for

USERS = ["fate", "nanoha", "hayate"]


def acked_seq(stack: RunningStack, user: str) -> int:
    """The replication watermark in the user's own database."""
    connection = apsw.Connection(str(account_db(stack.data_dir, user)),
                                 flags=apsw.SQLITE_OPEN_READONLY)
    try:
        [(seq,)] = connection.execute("SELECT acked_seq FROM replication").fetchall()
        assert isinstance(seq, int)
        return seq
    finally:
        connection.close()


def test_a_postgres_outage_loses_nothing(
    make_stack: Callable[..., RunningStack], own_postgres: EmbeddedPostgres
) -> None:
    postgres = own_postgres
    url = postgres.start()  # already running: answers its URL
    stack = make_stack(database_url=url)
    for user in USERS:
        assert stack.http.get(f"/{user}/create").status == 200
        assert stack.http.get(f"/{user}/deposit/10").status == 200
    wait_for(lambda: all(stack.pg_ledger(u) == stack.sqlite_ledger(u) for u in USERS),
             what="the first catch-up")

    postgres.stop()
    for round_ in range(5):
        for user in USERS:
            response = stack.http.get(f"/{user}/deposit/{round_ + 1}")
            assert response.status == 200, response.text
    summary = stack.http.get("/account_summary")
    assert summary.status == 503, summary.text
    assert "unavailable" in summary.text.lower()
    for user in USERS:  # the workers hold every row; the ETL acknowledged none of the new ones
        assert len(stack.sqlite_ledger(user)) == 7
        assert acked_seq(stack, user) == 2
    assert stack.replication_status().users_unshipped == -1  # unknown, and said so

    postgres.start()
    for user in USERS:
        stack.wait_for_postgres(user)
    assert stack.http.get("/account_summary").text == "fate, 25\nnanoha, 25\nhayate, 25\n"
    assert stack.replication_status().users_unshipped == 0
