"""Deposits under faults: the ETL SIGKILLed and restarted, PostgreSQL stopped and restarted,
workers SIGKILLed, the dispatcher SIGKILLed and restarted, at random moments, while clients
deposit to 200 users. Afterwards every acknowledged deposit is in its user's SQLite ledger and in
PostgreSQL exactly once. `pytest --soak` runs it ten times longer."""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable

import pytest

from conventions.config import to_env
from etl.embedded import EmbeddedPostgres
from tests.conftest import RunningStack, amounts_in, wait_for

USERS = [f"u{i:03d}" for i in range(200)]
CLIENTS = 16


class Chaos:
    """Breaks one component at a time, at random moments, and brings it back."""

    def __init__(self, stack: RunningStack, postgres: EmbeddedPostgres, seed: int,
                 dispatcher_restarts: int) -> None:
        self.dispatcher_restarts = dispatcher_restarts
        self.stack = stack
        self.postgres = postgres
        self.rng = random.Random(seed)
        self.done = threading.Event()
        self.counts: Counter[str] = Counter()

    def run(self) -> None:
        # A dispatcher restart costs the most (every worker starts again, ~150 ms of CPU each),
        # so it comes least, and only a few times.
        actions = [self.kill_etl, self.stop_postgres, self.kill_worker, self.restart_dispatcher]
        weights = [3, 3, 3, 1]
        while not self.done.wait(self.rng.uniform(1.0, 3.0)):
            [action] = self.rng.choices(actions, weights)
            if action == self.restart_dispatcher and self.dispatcher_restarts <= 0:
                continue

            action()
            self.counts[action.__name__] += 1

    def pause(self) -> None:
        time.sleep(self.rng.uniform(0.2, 1.0))

    def kill_etl(self) -> None:
        self.stack.stack.etl.kill()
        self.pause()
        self.stack.stack.etl.start()

    def stop_postgres(self) -> None:
        self.postgres.stop()
        self.pause()
        self.postgres.start()

    def kill_worker(self) -> None:
        live = [pid for user in self.rng.sample(USERS, 20) for pid in self.stack.worker_pids(user)]
        if live:
            with contextlib.suppress(ProcessLookupError):  # it may have idled out meanwhile
                os.kill(self.rng.choice(live), signal.SIGKILL)

    def restart_dispatcher(self) -> None:
        self.dispatcher_restarts -= 1
        self.stack.stack.dispatcher.kill()
        self.pause()
        self.stack.stack.dispatcher.start()


@pytest.mark.timeout(1800)
def test_nothing_acknowledged_is_lost_under_faults(
    make_stack: Callable[..., RunningStack], own_postgres: EmbeddedPostgres,
    request: pytest.FixtureRequest,
) -> None:
    soak = request.config.getoption("--soak")
    deposits = 50_000 if soak else 5_000
    postgres = own_postgres
    stack = make_stack(database_url=postgres.start(), idle_ttl=10.0, max_workers=256)
    for user in USERS:
        assert stack.http.get(f"/{user}/create").status == 200

    amounts = itertools.count(1)  # every amount unique, so a ledger row names its request
    lock = threading.Lock()
    acknowledged: dict[str, list[int]] = {u: [] for u in USERS}
    refused: dict[str, list[int]] = {u: [] for u in USERS}
    statuses: Counter[int] = Counter()

    def client(seed: int) -> None:
        """Deposits until `deposits` are acknowledged. A refused deposit is not retried as such:
        it may have been applied, so the next attempt is a new deposit with a new amount."""
        rng = random.Random(seed)
        while True:
            with lock:
                if sum(len(a) for a in acknowledged.values()) >= deposits:
                    return
                amount = next(amounts)
            user = rng.choice(USERS)
            try:
                status = stack.http.get(f"/{user}/deposit/{amount}").status
            except OSError:  # Envoy itself never goes down, but a reset is not an answer
                status = 0
            with lock:
                statuses[status] += 1
                (acknowledged if status == 200 else refused)[user].append(amount)
            if status != 200:
                time.sleep(0.05)

    chaos = Chaos(stack, postgres, seed=1, dispatcher_restarts=30 if soak else 3)
    chaos_thread = threading.Thread(target=chaos.run)
    clients = [threading.Thread(target=client, args=(seed,)) for seed in range(CLIENTS)]
    started = time.monotonic()
    chaos_thread.start()
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join()
    chaos.done.set()
    chaos_thread.join()
    elapsed = time.monotonic() - started

    # Everything is up again; PostgreSQL catches up on its own (drains for stopped workers).
    for component in stack.stack.components:
        if not component.running:
            component.start()
    catch_up_started = time.monotonic()
    for user in USERS:
        ledger = stack.sqlite_ledger(user)
        wait_for(lambda user=user, ledger=ledger: stack.pg_ledger(user) == ledger, timeout=120,
                 what=f"PostgreSQL to catch up with {user}")
    catch_up = time.monotonic() - catch_up_started

    lost = duplicated = invented = 0
    for user in USERS:
        applied = amounts_in(stack.sqlite_ledger(user))
        lost += len(set(acknowledged[user]) - set(applied))
        duplicated += len(applied) - len(set(applied))
        invented += len(set(applied) - set(acknowledged[user]) - set(refused[user]))
    total_acknowledged = sum(len(a) for a in acknowledged.values())
    pg_rows = stack.pg_rows("SELECT count(*), count(DISTINCT (user_name, seq)) FROM ledger")
    print(f"\n{deposits} deposits in {elapsed:.1f}s: {total_acknowledged} acknowledged, "
          f"statuses {dict(statuses)}, faults {dict(chaos.counts)}, "
          f"caught up {catch_up:.1f}s after the last fault; PostgreSQL ledger rows {pg_rows}")
    assert (lost, duplicated, invented) == (0, 0, 0)
    assert pg_rows[0][0] == pg_rows[0][1] == sum(len(stack.sqlite_ledger(u)) for u in USERS)
    assert total_acknowledged >= deposits
    reconcile = subprocess.run(
        [sys.executable, "-m", "launcher", "reconcile"],
        env={**os.environ, **to_env(stack.settings)},
        capture_output=True, text=True, timeout=300, check=False)
    print(reconcile.stdout)
    assert reconcile.returncode == 0, reconcile.stdout + reconcile.stderr
    assert f"{len(USERS)} users checked" in reconcile.stdout
    assert f"{len(USERS)} in sync, 0 behind, 0 diverged" in reconcile.stdout
    assert sum(chaos.counts.values()) >= 4
