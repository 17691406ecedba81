"""Deposits go on while the ETL is down; PostgreSQL catches up exactly once it is back."""

from __future__ import annotations

import random
import threading

from tests.conftest import RunningStack, wait_for

USERS = [f"user{i}" for i in range(6)]


def test_deposits_survive_an_etl_outage(stack: RunningStack) -> None:
    for user in USERS:
        assert stack.http.get(f"/{user}/create").status == 200
    acknowledged: list[tuple[str, int]] = []
    failures: list[str] = []
    done = threading.Event()

    def deposit_until_done(seed: int) -> None:
        rng = random.Random(seed)
        while not done.is_set():
            user, amount = rng.choice(USERS), rng.randint(1, 1000)
            response = stack.http.get(f"/{user}/deposit/{amount}")
            if response.status == 200:
                acknowledged.append((user, amount))
            else:
                failures.append(f"{response.status} {response.text}")

    clients = [threading.Thread(target=deposit_until_done, args=(seed,)) for seed in range(4)]
    for client in clients:
        client.start()
    try:
        wait_for(lambda: len(acknowledged) >= 40, what="deposits before the outage")
        stack.stack.etl.kill()  # SIGKILL, in the middle of the streams
        during = len(acknowledged)
        wait_for(lambda: len(acknowledged) >= during + 80, what="deposits during the outage")
        summary = stack.http.get("/account_summary")
        assert summary.status == 503, summary.text
        stack.stack.etl.start()
        after = len(acknowledged)
        wait_for(lambda: len(acknowledged) >= after + 40, what="deposits after the outage")
    finally:
        done.set()
        for client in clients:
            client.join()

    assert failures == []  # durable in each user's SQLite, so never refused
    for user in USERS:
        ledger = stack.sqlite_ledger(user)
        deposits = [amount for u, amount in acknowledged if u == user]
        assert ledger[-1][1] == sum(deposits)
        assert len(ledger) == 1 + len(deposits)
        stack.wait_for_postgres(user)
        assert stack.pg_rows("SELECT balance FROM accounts WHERE user_name = %s", user) == [
            (ledger[-1][1],)]
    total = len(USERS) + len(acknowledged)
    assert stack.pg_rows("SELECT count(*), count(DISTINCT (user_name, seq)) FROM ledger") == [
        (total, total)]
