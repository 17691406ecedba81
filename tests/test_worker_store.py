"""worker.store on real SQLite files."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import apsw
import pytest

from worker import errors
from worker.store import INT64_MAX, SCHEMA_VERSION, Kind, Store


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "account.db"


@pytest.fixture
def store(db: Path) -> Iterator[Store]:
    opened = Store.open(db, user="koduki")
    yield opened
    opened.close()


@pytest.fixture
def account(store: Store) -> Store:
    store.create()
    return store


def test_pragmas_and_schema_version(account: Store) -> None:
    assert account.pragma("journal_mode") == "wal"
    assert account.pragma("synchronous") == 2  # FULL
    assert account.schema_version() == SCHEMA_VERSION == 1
    assert account.pragma("busy_timeout") == 5000


def test_no_file_until_the_account_is_created(tmp_path: Path) -> None:
    db = tmp_path / "users" / "abc" / "koduki" / "account.db"
    store = Store.open(db, user="koduki")
    try:
        with pytest.raises(errors.AccountNotFound):
            store.deposit(5)
        assert store.pending(0, 10) == []
        assert not (tmp_path / "users").exists()
        store.create()
        assert db.is_file()
    finally:
        store.close()


def test_new_database_has_no_account(store: Store) -> None:
    assert not store.exists()
    assert store.last_seq() == 0
    assert store.acked_seq() == 0
    with pytest.raises(errors.AccountNotFound, match="account 'koduki' does not exist"):
        store.account()


def test_create_writes_the_open_row_and_is_idempotent(store: Store) -> None:
    first, created = store.create()
    assert created
    assert (first.user, first.balance, first.last_seq) == ("koduki", 0, 1)
    again, created_again = store.create()
    assert not created_again
    assert again == first
    [row] = store.entries(0, 10)
    assert (row.seq, row.kind, row.amount, row.balance) == (1, Kind.OPEN, 0, 0)
    assert row.at_us == first.created_at_us


def test_deposit_and_withdraw_append_rows(account: Store) -> None:
    after, entry = account.deposit(128)
    assert (after.balance, after.last_seq) == (128, 2)
    assert (entry.seq, entry.kind, entry.amount, entry.balance) == (2, Kind.DEPOSIT, 128, 128)
    after, entry = account.withdraw(28)
    assert (after.balance, after.last_seq) == (100, 3)
    assert (entry.seq, entry.kind, entry.amount, entry.balance) == (3, Kind.WITHDRAWAL, 28, 100)
    assert account.account().balance == 100


def test_seq_increases_by_one(account: Store) -> None:
    for amount in range(1, 21):
        account.deposit(amount)
        if amount % 3 == 0:
            account.withdraw(1)
    seqs = [row.seq for row in account.entries(0, 1000)]
    assert seqs == list(range(1, len(seqs) + 1))
    assert account.last_seq() == seqs[-1]


@pytest.mark.parametrize(
    ("setup", "operation", "amount", "error", "message"),
    [
        ((), "deposit", 0, errors.InvalidAmount, "amount 0 for account 'koduki'"),
        ((), "deposit", -5, errors.InvalidAmount, "amount -5"),
        ((), "deposit", INT64_MAX + 1, errors.InvalidAmount, "9223372036854775808"),
        ((), "withdraw", 0, errors.InvalidAmount, "amount 0"),
        ((), "withdraw", -1, errors.InvalidAmount, "amount -1"),
        ((), "withdraw", 1, errors.InsufficientFunds, "cannot withdraw 1, the balance is only 0"),
        ((10,), "withdraw", 11, errors.InsufficientFunds, "the balance is only 10"),
        ((INT64_MAX,), "deposit", 1, errors.BalanceOverflow, "would exceed"),
        ((INT64_MAX - 5,), "deposit", 6, errors.BalanceOverflow, "deposit of 6"),
    ],
)
def test_rejected_amounts_change_nothing(
    account: Store,
    setup: tuple[int, ...],
    operation: str,
    amount: int,
    error: type[Exception],
    message: str,
) -> None:
    for deposit in setup:
        account.deposit(deposit)
    before = account.account()
    with pytest.raises(error, match=message):
        getattr(account, operation)(amount)
    assert account.account() == before


@pytest.mark.parametrize(
    ("operation", "amount", "balance"),
    [("deposit", INT64_MAX, INT64_MAX), ("withdraw", 7, 0)],
)
def test_boundary_amounts_are_accepted(
    account: Store, operation: str, amount: int, balance: int
) -> None:
    if operation == "withdraw":
        account.deposit(7)
    after, _ = getattr(account, operation)(amount)
    assert after.balance == balance


@pytest.mark.parametrize("operation", ["deposit", "withdraw"])
def test_writes_need_an_account(store: Store, operation: str) -> None:
    with pytest.raises(errors.AccountNotFound, match="create it first"):
        getattr(store, operation)(1)
    assert store.last_seq() == 0


def test_pending_and_watermark(account: Store) -> None:
    for amount in (1, 2, 3, 4):
        account.deposit(amount)
    assert [row.seq for row in account.pending(0, 100)] == [1, 2, 3, 4, 5]
    assert [row.seq for row in account.pending(0, 2)] == [1, 2]
    assert [row.seq for row in account.pending(3, 100)] == [4, 5]
    assert account.acknowledge(2) == 2
    assert [row.seq for row in account.pending(0, 100)] == [3, 4, 5]
    assert account.acknowledge(1) == 2, "the watermark never moves backwards"
    assert account.acked_seq() == 2
    assert account.acknowledge(99) == 5, "the watermark never passes the newest row"
    assert account.pending(0, 100) == []
    assert account.pragma("synchronous") == 2, "deposits stay FULL after an acknowledgement"


def test_reopening_keeps_data_and_watermark(db: Path) -> None:
    first = Store.open(db, user="koduki")
    first.create()
    first.deposit(256)
    first.acknowledge(1)
    first.close()
    second = Store.open(db, user="koduki")
    try:
        assert second.schema_version() == SCHEMA_VERSION
        assert second.account().balance == 256
        assert second.acked_seq() == 1
        assert [row.seq for row in second.pending(0, 10)] == [2]
    finally:
        second.close()


def test_open_migrates_an_unversioned_database(db: Path) -> None:
    conn = apsw.Connection(str(db))
    assert conn.execute("PRAGMA user_version").fetchone() == (0,)
    conn.close()
    store = Store.open(db, user="koduki")
    try:
        assert store.schema_version() == SCHEMA_VERSION
        store.create()
    finally:
        store.close()


def test_open_refuses_a_newer_schema(db: Path) -> None:
    conn = apsw.Connection(str(db))
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(errors.SchemaTooNew, match="run a newer worker"):
        Store.open(db, user="koduki")


def test_a_second_reader_sees_committed_rows(db: Path, account: Store) -> None:
    account.deposit(5)
    reader = Store.open(db, user="koduki")
    try:
        assert reader.account().balance == 5
    finally:
        reader.close()


def test_public_names_are_documented() -> None:
    import worker.store as module

    for name in ("Store", "Entry", "Account", "Kind"):
        assert getattr(module, name).__doc__
    for name, member in vars(Store).items():
        if not name.startswith("_") and callable(member):
            assert member.__doc__, f"Store.{name} has no docstring"


def test_the_unshipped_marker_covers_every_unacknowledged_row(db: Path) -> None:
    marker = db.parent / "unshipped"
    store = Store.open(db, user="koduki")
    try:
        assert not marker.exists()
        store.create()
        assert marker.exists()  # the OPEN row is not acknowledged yet
        store.acknowledge(1)
        assert marker.exists() and store.marked  # removed by sync_marker, not by an ack
        assert store.sync_marker() is False
        assert not marker.exists() and not store.marked
        store.deposit(5)
        store.deposit(6)
        store.acknowledge(2)
        assert store.sync_marker() is True
        assert marker.exists()  # seq 3 is still to ship
        with pytest.raises(errors.InsufficientFunds):
            store.withdraw(100)
        store.acknowledge(3)
        assert store.sync_marker() is False
        assert not marker.exists()
        store.deposit(7)
    finally:
        store.close()
    # A worker that stopped with rows unshipped leaves the marker; the next open keeps it.
    assert marker.exists()
    reopened = Store.open(db, user="koduki")
    try:
        assert marker.exists() and store.marker == marker
        reopened.acknowledge(4)
        reopened.sync_marker()
        assert not marker.exists()
    finally:
        reopened.close()
    # A stale marker (nothing unshipped) is removed when the database is opened.
    marker.touch()
    Store.open(db, user="koduki").close()
    assert not marker.exists()
