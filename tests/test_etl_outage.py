"""Deposits go on while the ETL is down; PostgreSQL catches up exactly once it is back."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

from tests.conftest import RunningStack, wait_for


def test_deposits_survive_an_etl_outage(stack: RunningStack) -> None:
    users = [f"user{i}" for i in range(6)]
    for user in users:
        assert stack.http.get(f"/{user}/create").status == 200
    rng = random.Random(7)

    def deposit_some(count: int) -> None:
        def one(user: str) -> None:
            response = stack.http.get(f"/{user}/deposit/{rng.randint(1, 1000)}")
            assert response.status == 200, response.text

        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(one, [rng.choice(users) for _ in range(count)]))

    deposit_some(30)
    stack.stack.etl.kill()  # SIGKILL, mid-stream
    deposit_some(60)  # still acknowledged: durable in each user's SQLite
    summary = stack.http.get("/account_summary")
    assert summary.status == 503, summary.text
    stack.stack.etl.start()
    deposit_some(30)

    for user in users:
        ledger = stack.sqlite_ledger(user)
        wait_for(lambda user=user, ledger=ledger: stack.pg_ledger(user) == ledger, timeout=30,
                 what=f"PostgreSQL to hold the ledger of {user}")
    total_rows = sum(len(stack.sqlite_ledger(u)) for u in users)
    assert total_rows == 6 + 120
    assert stack.pg_rows("SELECT count(*), count(DISTINCT (user_name, seq)) FROM ledger") == [
        (total_rows, total_rows)]
    for user in users:
        last_balance = stack.sqlite_ledger(user)[-1][1]
        assert stack.pg_rows("SELECT balance FROM accounts WHERE user_name = %s", user) == [
            (last_balance,)]
