"""`upw reconcile [--repair]` against real stacks: the users' own SQLite files, the real embedded
PostgreSQL, live workers, and the command run as a real process."""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import apsw

from conventions.config import to_env
from conventions.users import account_db, shard_of, user_dir
from etl.reconcile import reconcile
from tests.conftest import RunningStack, wait_for
from worker.store import Store


def run_reconcile(
    stack: RunningStack, *args: str, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "launcher", "reconcile", *args],
        env={**os.environ, **to_env(stack.settings), **env},
        capture_output=True, text=True, timeout=240,
    )


def user_rows(stack: RunningStack, user: str) -> list[tuple[int, int, int]]:
    """(seq, amount, balance) of every row in the user's own file."""
    connection = apsw.Connection(
        str(account_db(stack.data_dir, user)), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return [(int(s), int(a), int(b)) for s, a, b in connection.execute(
            "SELECT seq, amount, balance FROM ledger ORDER BY seq")]
    finally:
        connection.close()


def pg_rows(stack: RunningStack, user: str) -> list[tuple[int, int, int]]:
    return [(int(s), int(a), int(b)) for s, a, b in stack.pg_rows(
        "SELECT seq, amount, balance FROM ledger WHERE user_name = %s ORDER BY seq", user)]


def caught_up(stack: RunningStack, users: list[str]) -> None:
    for user in users:

        def same(user: str = user) -> bool:
            return pg_rows(stack, user) == user_rows(stack, user)

        wait_for(same, what=f"PostgreSQL to hold the ledger of {user}")


def assert_identical(stack: RunningStack, users: list[str]) -> None:
    for user in users:
        rows = user_rows(stack, user)
        assert pg_rows(stack, user) == rows, user
        assert stack.pg_ledger(user) == stack.sqlite_ledger(user), user
        assert stack.pg_rows(
            "SELECT balance, last_seq FROM accounts WHERE user_name = %s", user
        ) == [(rows[-1][2], rows[-1][0])], user


def open_accounts(stack: RunningStack, users: list[str], deposits: int) -> None:
    for user in users:
        assert stack.http.get(f"/{user}/create").status == 200
        for amount in range(1, deposits + 1):
            assert stack.http.get(f"/{user}/deposit/{amount * 10}").status == 200


def test_in_sync_after_traffic(stack: RunningStack) -> None:
    users = ["koduki", "nanoha", "misuzu"]
    open_accounts(stack, users, deposits=4)
    caught_up(stack, users)

    done = run_reconcile(stack)

    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 users checked" in done.stdout
    assert "3 in sync, 0 behind, 0 diverged" in done.stdout
    assert "\r" not in done.stderr  # no progress bar when stderr is not a terminal


def test_finds_and_repairs_a_broken_postgresql(stack: RunningStack) -> None:
    users = ["alice", "bob", "carol", "dave", "erin"]
    open_accounts(stack, users, deposits=3)
    caught_up(stack, users)
    # alice: a row with the wrong amount and balance; bob: his last rows are gone; carol: a
    # wrong balance in accounts; dave: a row his own ledger never had.
    stack.pg_rows("UPDATE ledger SET amount = amount + 1, balance = balance + 1 "
                  "WHERE user_name = 'alice' AND seq = 2 RETURNING seq")
    stack.pg_rows("DELETE FROM ledger WHERE user_name = 'bob' AND seq >= 3 RETURNING seq")
    stack.pg_rows("UPDATE accounts SET balance = balance + 1000 WHERE user_name = 'carol' "
                  "RETURNING balance")
    stack.pg_rows("INSERT INTO ledger (user_name, seq, kind, amount, balance, at) "
                  "VALUES ('dave', 99, 2, 5, 65, now()) RETURNING seq")
    # Entries that are not user databases: a bad name, and a symlink to another user's files.
    (stack.data_dir / "users" / "abc" / "Bad").mkdir(parents=True)
    frank = user_dir(stack.data_dir, "frank")
    frank.parent.mkdir(parents=True, exist_ok=True)
    frank.symlink_to(user_dir(stack.data_dir, "alice"))

    found = run_reconcile(stack)

    assert found.returncode == 1, found.stdout + found.stderr
    assert "5 users checked" in found.stdout
    assert "1 in sync, 0 behind, 4 diverged" in found.stdout
    lines = found.stdout.splitlines()
    for user, reason in [
        ("alice", "seq 2 differs: PostgreSQL has DEPOSIT 11 (balance 11), "
                  "the user's ledger DEPOSIT 10 (balance 10)"),
        ("bob", "accounts says balance 60 at seq 4, its ledger balance 10 at seq 2"),
        ("carol", "accounts says balance 1060 at seq 4, its ledger balance 60 at seq 4"),
        ("dave", "PostgreSQL has seq 99, which the user's ledger lacks"),
    ]:
        line = next(x for x in lines if x.startswith(f"  diverged {user}:"))
        assert reason in line, line
    assert not any("erin" in line for line in lines)
    assert any("skipped" in x and x.rstrip().endswith("is invalid: use 1 to 63 characters "
               "of a-z, 0-9, '_' and '-', starting with a letter or a digit") for x in lines)
    assert any("skipped" in x and "frank" in x for x in lines)

    repaired = run_reconcile(stack, "--repair")

    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert "repair: 4 users: 2 rows shipped, 1 rows overwritten, 1 rows removed" in (
        repaired.stdout)
    after = next(x for x in repaired.stdout.splitlines() if x.startswith("after repair:"))
    assert "5 users checked" in after and "5 in sync, 0 behind, 0 diverged" in after

    again = run_reconcile(stack)

    assert again.returncode == 0, again.stdout + again.stderr
    assert "5 in sync, 0 behind, 0 diverged" in again.stdout
    assert_identical(stack, users)
    assert user_rows(stack, "alice")[1] == (2, 10, 10)  # the user's file was never touched


def test_behind_is_not_divergence_and_repair_ships_it(stack: RunningStack) -> None:
    open_accounts(stack, ["koduki"], deposits=1)
    caught_up(stack, ["koduki"])
    stack.stack.etl.kill()  # PostgreSQL keeps running; nothing ships now
    for amount in (1, 2, 3):
        assert stack.http.get(f"/koduki/deposit/{amount}").status == 200

    behind = run_reconcile(stack)

    assert behind.returncode == 0, behind.stdout + behind.stderr
    assert "0 in sync, 1 behind, 0 diverged" in behind.stdout
    assert "behind   koduki: PostgreSQL lacks seq 3-5 (3 rows)" in behind.stdout

    repaired = run_reconcile(stack, "--repair")

    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert "repair: 1 users: 3 rows shipped" in repaired.stdout
    assert_identical(stack, ["koduki"])
    stack.stack.etl.start()  # the worker ships the same rows again: nothing changes
    assert stack.http.get("/koduki/deposit/4").status == 200
    caught_up(stack, ["koduki"])
    assert_identical(stack, ["koduki"])
    assert stack.pg_rows("SELECT count(*) FROM ledger") == [(6,)]


def test_a_live_worker_is_never_blocked(stack: RunningStack) -> None:
    users = ["live1", "live2"]
    open_accounts(stack, users, deposits=1)
    acknowledged: list[str] = []
    failures: list[str] = []
    done = threading.Event()

    def deposit_until_done(user: str) -> None:
        while not done.is_set():
            response = stack.http.get(f"/{user}/deposit/7")
            (acknowledged if response.status == 200 else failures).append(
                f"{user} {response.status} {response.text}")

    clients = [threading.Thread(target=deposit_until_done, args=(user,)) for user in users]
    for client in clients:
        client.start()
    runs: list[subprocess.CompletedProcess[str]] = []
    try:
        wait_for(lambda: len(acknowledged) >= 20, what="deposits before reconcile")
        for args in [(), ("--repair",), (), ("--repair",), ()]:
            runs.append(run_reconcile(stack, *args))
        during = len(acknowledged)
        wait_for(lambda: len(acknowledged) >= during + 20, what="deposits after reconcile")
    finally:
        done.set()
        for client in clients:
            client.join()

    assert failures == []
    for run in runs:  # a worker appending meanwhile makes a user behind, never diverged
        assert run.returncode == 0, run.stdout + run.stderr
        assert " 0 diverged" in run.stdout
    caught_up(stack, users)
    assert_identical(stack, users)
    final = run_reconcile(stack)
    assert final.returncode == 0 and "2 in sync" in final.stdout, final.stdout


def _write_users(data_dir: Path, users: dict[str, int]) -> None:
    """Real user databases written through the worker's own store, no worker running."""
    for user, deposits in users.items():
        store = Store.open(account_db(data_dir, user), user=user)
        try:
            store.create()
            for amount in range(1, deposits + 1):
                store.deposit(amount)
        finally:
            store.close()


def _reconcile(stack: RunningStack, **options: Any) -> tuple[int, str, float]:
    out = io.StringIO()
    started = time.monotonic()
    status = asyncio.run(reconcile(stack.settings, out=out, progress=False, **options))
    return status, out.getvalue(), time.monotonic() - started


def test_pages_through_big_ledgers_and_many_users(stack: RunningStack) -> None:
    many = {f"user{i:03d}": 5 for i in range(300)}
    _write_users(stack.data_dir, {**many, "big": 2500})
    users = [*many, "big"]

    status, out, first = _reconcile(stack, page_size=64)
    assert status == 0, out
    assert "301 users checked" in out and "0 in sync, 301 behind, 0 diverged" in out
    status, out, repaired = _reconcile(stack, page_size=64, repair_=True)
    assert status == 0, out
    assert "repair: 301 users: 4301 rows shipped" in out
    assert "after repair: 301 users checked" in out and "301 in sync" in out
    assert_identical(stack, users)

    # Rows far beyond the first page: one wrong, one missing (a gap), and an orphan account.
    stack.pg_rows("UPDATE ledger SET kind = 3 WHERE user_name = 'big' AND seq = 2000 "
                  "RETURNING seq")
    stack.pg_rows("DELETE FROM ledger WHERE user_name = 'big' AND seq = 1500 RETURNING seq")
    stack.pg_rows("INSERT INTO accounts VALUES ('ghost', 1, 1, now(), now()) RETURNING 1")
    status, out, broken = _reconcile(stack, page_size=64)
    assert status == 1, out
    big = next(line for line in out.splitlines() if line.startswith("  diverged big:"))
    assert "seq 2000 differs: PostgreSQL has WITHDRAWAL 1999" in big
    assert "PostgreSQL lacks seq 1500 but has seq 2501" in big
    assert "1 accounts in PostgreSQL have no database" in out and "ghost" in out

    status, out, _ = _reconcile(stack, page_size=64, repair_=True)
    assert status == 1, out  # the orphan stays: it is reported, never deleted
    assert "after repair: 301 users checked" in out and "301 in sync" in out
    assert_identical(stack, users)
    stack.pg_rows("DELETE FROM accounts WHERE user_name = 'ghost' RETURNING 1")
    status, out, last = _reconcile(stack)
    assert status == 0, out
    print(f"\n301 users, {sum(many.values()) + 300 + 2501} rows: first check {first:.2f}s, "
          f"repair {repaired:.2f}s, broken check {broken:.2f}s, in-sync check {last:.2f}s")


def test_postgresql_unreachable_exits_2(tmp_path: Path) -> None:
    env = {**os.environ, "UPW_DATA_DIR": str(tmp_path)}
    command = [sys.executable, "-m", "launcher", "reconcile"]
    down = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert down.returncode == 2
    assert f"the embedded PostgreSQL in {tmp_path / 'postgres'} is not running" in down.stderr
    assert not (tmp_path / "postgres").exists()  # reconcile never starts PostgreSQL

    env["UPW_DATABASE_URL"] = f"postgresql://postgres:@/postgres?host={tmp_path}"
    nowhere = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert nowhere.returncode == 2
    assert "PostgreSQL is unreachable" in nowhere.stderr


def test_shard_mismatch_is_skipped(stack: RunningStack) -> None:
    _write_users(stack.data_dir, {"koduki": 1})
    wrong = stack.data_dir / "users" / ("000" if shard_of("koduki") != "000" else "001")
    wrong.mkdir()
    (user_dir(stack.data_dir, "koduki")).rename(wrong / "koduki")

    status, out, _ = _reconcile(stack)

    assert status == 0, out
    assert "0 users checked" in out
    assert f"belongs in shard {shard_of('koduki')!r}" in out
