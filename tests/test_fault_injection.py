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
from tests.conftest import RunningStack, amounts_in

USERS = [f"u{i:03d}" for i in range(200)]
CLIENTS = 16


class Chaos:
    """Breaks one component at a time and brings it back, at random moments of the load: each
    fault waits for a random count of acknowledged deposits, so the faults spread over the
    whole load however fast it runs. Faults come in rounds, each breaking every kind once in a
    random order, so every kind happens `rounds` times. `finished` is set after the last."""

    def __init__(self, stack: RunningStack, postgres: EmbeddedPostgres, seed: int,
                 rounds: int) -> None:
        self.stack = stack
        self.postgres = postgres
        self.rng = random.Random(seed)
        self.rounds = rounds
        self.finished = threading.Event()
        self.counts: Counter[str] = Counter()

    def run(self, progress: Callable[[], int], total: int) -> None:
        """Runs every fault; `progress()` is the count of deposits acknowledged so far, out
        of `total`."""
        actions = []
        for _ in range(self.rounds):
            kinds = [self.kill_etl, self.stop_postgres, self.kill_worker, self.restart_dispatcher]
            self.rng.shuffle(kinds)
            actions += kinds
        moments = sorted(self.rng.uniform(0.05, 0.95) * total for _ in actions)
        for action, moment in zip(actions, moments, strict=True):
            while progress() < moment:
                time.sleep(0.05)
            action()
            self.counts[action.__name__] += 1
        self.finished.set()

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
    # Workers stay warm between a user's deposits (as in production, where the idle timeout
    # is minutes): the faults, not cold starts, are what this test is about.
    stack = make_stack(database_url=postgres.start(), idle_ttl=120.0, max_workers=256)
    for user in USERS:
        assert stack.http.get(f"/{user}/create").status == 200

    chaos = Chaos(stack, postgres, seed=1, rounds=30 if soak else 3)
    amounts = itertools.count(1)  # every amount unique, so a ledger row names its request
    lock = threading.Lock()
    acknowledged: dict[str, list[int]] = {u: [] for u in USERS}
    refused: dict[str, list[int]] = {u: [] for u in USERS}
    statuses: Counter[int] = Counter()

    def progress() -> int:
        return sum(len(a) for a in acknowledged.values())

    def client(seed: int) -> None:
        """Deposits until `deposits` are acknowledged and every fault has happened. A refused
        deposit is not retried as such: it may have been applied, so the next attempt is a new
        deposit with a new amount."""
        rng = random.Random(seed)
        while True:
            with lock:
                if progress() >= deposits and chaos.finished.is_set():
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

    chaos_thread = threading.Thread(target=chaos.run, args=(progress, deposits))
    clients = [threading.Thread(target=client, args=(seed,)) for seed in range(CLIENTS)]
    started = time.monotonic()
    chaos_thread.start()
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join()
    chaos_thread.join()
    elapsed = time.monotonic() - started

    # Everything is up again; PostgreSQL catches up on its own (drains for stopped workers).
    for component in stack.stack.components:
        if not component.running:
            component.start()
    catch_up_started = time.monotonic()
    for user in USERS:
        stack.wait_for_postgres(user, timeout=120)
    catch_up = time.monotonic() - catch_up_started

    lost = duplicated = invented = 0
    for user in USERS:
        applied = amounts_in(stack.sqlite_ledger(user))
        lost += len(set(acknowledged[user]) - set(applied))
        duplicated += len(applied) - len(set(applied))
        invented += len(set(applied) - set(acknowledged[user]) - set(refused[user]))
    total_acknowledged = progress()
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
    assert min(chaos.counts[kind] for kind in (
        "kill_etl", "stop_postgres", "kill_worker", "restart_dispatcher")) >= chaos.rounds
