"""The ETL against a real PostgreSQL (pgserver, started once for this module), through a real
grpc.aio server on a unix socket, and as a real `python -m etl` process."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import psycopg
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from conventions import answers
from etl.embedded import EmbeddedPostgres
from etl.errors import DatabaseUnavailable, InvalidPage
from etl.server import SERVICE_NAMES, create_server, set_serving
from etl.sink import Change, Sink
from upw.account.v1 import account_pb2
from upw.replication.v1 import replication_pb2, replication_pb2_grpc
from upw.summary.v1 import summary_pb2, summary_pb2_grpc

T0 = datetime(2024, 1, 1, tzinfo=UTC)
DEPOSIT = account_pb2.LedgerEntry.KIND_DEPOSIT
_databases = itertools.count()


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The conninfo of a real PostgreSQL, shared by this module's tests."""
    server = EmbeddedPostgres(tmp_path_factory.mktemp("pg") / "pgdata")
    conninfo = server.start()
    yield conninfo
    server.stop()


@pytest.fixture
def conninfo(postgres: str) -> str:
    """A fresh, empty database of its own for each test."""
    name = f"etl_test_{next(_databases)}"
    with psycopg.connect(postgres, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")  # a name from a counter, not from input
    return psycopg.conninfo.make_conninfo(postgres, dbname=name)


@pytest.fixture
def sockdir() -> Iterator[Path]:
    # Unix socket paths may not exceed 107 bytes; pytest's tmp_path can be longer.
    path = Path(tempfile.mkdtemp(prefix="upw-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@contextlib.asynccontextmanager
async def opened(conninfo: str, *, pool_timeout: float = 5.0) -> AsyncIterator[Sink]:
    sink = Sink(conninfo, timeout=pool_timeout)
    try:
        await sink.open()
        yield sink
    finally:
        await sink.close()


@contextlib.asynccontextmanager
async def serving(sink: Sink, sockdir: Path) -> AsyncIterator[grpc.aio.Channel]:
    address = f"unix:{sockdir / 'etl.sock'}"
    health_servicer = health.aio.HealthServicer()
    server, port = create_server(address, sink, health_servicer=health_servicer)
    assert port > 0
    await server.start()
    await set_serving(health_servicer, True)
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            yield channel
    finally:
        await server.stop(None)


def change(seq: int, balance: int, *, at: datetime = T0, amount: int = 1) -> Change:
    return Change(
        seq=seq, kind=DEPOSIT, amount=amount, balance=balance, at=at + timedelta(seconds=seq)
    )


def changes(first: int, last: int, *, at: datetime = T0) -> list[Change]:
    """seq first..last, each depositing `seq`, so the balance after seq n is n(n+1)/2."""
    return [change(s, s * (s + 1) // 2, at=at, amount=s) for s in range(first, last + 1)]


async def read_ack(call: grpc.aio.StreamStreamCall) -> replication_pb2.Ack:  # type: ignore[type-arg]
    ack = await call.read()
    assert isinstance(ack, replication_pb2.Ack), ack
    return ack


def batch(user: str, first: int, last: int, *, at: datetime = T0) -> replication_pb2.ChangeBatch:
    message = replication_pb2.ChangeBatch(user=user)
    for c in changes(first, last, at=at):
        entry = message.entries.add(seq=c.seq, kind=DEPOSIT, amount=c.amount, balance=c.balance)
        entry.at.FromDatetime(c.at)
    return message


# --- the sink -------------------------------------------------------------------------------


def test_summary_is_in_creation_order(conninfo: str) -> None:
    async def scenario() -> None:
        async with opened(conninfo) as sink:
            # Names sort differently from creation times.
            assert await sink.apply("zed", changes(1, 3, at=T0)) == 3
            assert await sink.apply("amy", changes(1, 2, at=T0 + timedelta(hours=1))) == 2
            assert await sink.apply("bob", changes(1, 1, at=T0 + timedelta(hours=1))) == 1
            page = await sink.summary()
            assert [(a.user, a.balance, a.last_seq) for a in page.accounts] == [
                ("zed", 6, 3),
                ("amy", 3, 2),
                ("bob", 1, 1),
            ]
            assert page.accounts[0].created_at == T0 + timedelta(seconds=1)
            assert page.next_page_token == ""

    asyncio.run(scenario())


def test_the_summary_text_is_the_summary_in_the_original_words(conninfo: str) -> None:
    async def scenario() -> None:
        async with opened(conninfo) as sink:
            assert await sink.summary_text() == ""
            await sink.apply("zed", changes(1, 3, at=T0))
            await sink.apply("amy", changes(1, 2, at=T0 + timedelta(hours=1)))
            await sink.apply("bob-2", changes(1, 1, at=T0 + timedelta(hours=1)))
            page = await sink.summary()
            expected = "".join(answers.summary_line(a.user, a.balance) for a in page.accounts)
            assert await sink.summary_text() == expected
            assert expected.count("\n") == 3

    asyncio.run(scenario())


def test_replayed_batch_changes_nothing(conninfo: str) -> None:
    async def scenario() -> None:
        async with opened(conninfo) as sink:
            await sink.apply("koduki", changes(1, 4))
            before = (await sink.counts(), (await sink.summary()).accounts)
            assert await sink.apply("koduki", changes(1, 4)) == 4
            assert await sink.apply("koduki", changes(2, 3)) == 3
            assert (await sink.counts(), (await sink.summary()).accounts) == before
            assert before[0] == (1, 4)

    asyncio.run(scenario())


def test_older_batch_after_newer_keeps_newest_balance(conninfo: str) -> None:
    async def scenario() -> None:
        async with opened(conninfo) as sink:
            await sink.apply("koduki", changes(4, 6))
            await sink.apply("koduki", changes(1, 3))
            (account,) = (await sink.summary()).accounts
            assert (account.balance, account.last_seq) == (21, 6)
            # created_at moves back to the earliest row seen.
            assert account.created_at == T0 + timedelta(seconds=1)
            assert await sink.counts() == (1, 6)

    asyncio.run(scenario())


def test_users_with_unshipped_rows_are_counted_from_the_reported_heads(conninfo: str) -> None:
    async def scenario() -> None:
        async with opened(conninfo) as sink:
            await sink.apply("koduki", changes(1, 2), head_seq=5)  # rows 3-5 still on the worker
            await sink.apply("nanoha", changes(1, 3), head_seq=3)
            await sink.apply("misuzu", changes(1, 1))  # no head reported: the batch's own seq
            assert await sink.unshipped_users() == 1
            await sink.apply("koduki", changes(3, 5), head_seq=4)  # an older head never wins
            assert await sink.unshipped_users() == 0

    asyncio.run(scenario())


def test_overlapping_batches_give_each_row_once(conninfo: str) -> None:
    async def scenario() -> None:
        async with opened(conninfo) as sink:
            await sink.apply("koduki", changes(1, 5))
            assert await sink.apply("koduki", changes(3, 8)) == 8
            (account,) = (await sink.summary()).accounts
            assert (account.balance, account.last_seq) == (36, 8)
            assert await sink.counts() == (1, 8)

    asyncio.run(scenario())


def test_concurrent_batches_of_many_users_commit_together_and_correctly(conninfo: str) -> None:
    """Group commit: batches that wait together go in one transaction, including two
    overlapping activations of one user and an older batch after a newer one."""

    async def scenario() -> None:
        async with opened(conninfo) as sink:
            acks = await asyncio.gather(
                *(sink.apply(f"u{i:02d}", changes(1, 3), head_seq=4) for i in range(40)),
                sink.apply("koduki", changes(1, 5)),
                sink.apply("koduki", changes(3, 8)),  # a second activation, overlapping
                sink.apply("koduki", changes(1, 2)),  # an old resend
            )
            assert acks == [3] * 40 + [5, 8, 2]
            assert await sink.counts() == (41, 40 * 3 + 8)
            accounts = {a.user: a for a in (await sink.summary()).accounts}
            assert (accounts["koduki"].balance, accounts["koduki"].last_seq) == (36, 8)
            assert {(a.balance, a.last_seq) for u, a in accounts.items() if u != "koduki"} == {
                (6, 3)}
            assert await sink.unshipped_users() == 40  # each reported head 4, PostgreSQL has 3

    asyncio.run(scenario())


@pytest.mark.parametrize("page_size", [1, 2, 3, 7, 50])
def test_pages_return_every_account_once(conninfo: str, page_size: int) -> None:
    users = [f"user-{i:02d}" for i in range(20)]

    async def scenario() -> None:
        async with opened(conninfo) as sink:
            for i, user in enumerate(users):
                # Pairs of accounts share a creation time, so the user name breaks ties.
                await sink.apply(user, changes(1, 1, at=T0 + timedelta(minutes=i // 2)))
            seen: list[str] = []
            token = ""
            while True:
                page = await sink.summary(page_size, token)
                assert len(page.accounts) <= page_size
                seen += [a.user for a in page.accounts]
                token = page.next_page_token
                if not token:
                    break
            assert seen == users
            assert [a.user for a in (await sink.summary(0)).accounts] == users

    asyncio.run(scenario())


@pytest.mark.parametrize(("page_size", "token"), [(-1, ""), (1, "bm90IGEgdG9rZW4="), (1, "!!")])
def test_bad_page_is_refused(conninfo: str, page_size: int, token: str) -> None:
    async def scenario() -> None:
        async with opened(conninfo) as sink:
            with pytest.raises(InvalidPage):
                await sink.summary(page_size, token)

    asyncio.run(scenario())


def test_unreachable_database_is_unavailable(sockdir: Path) -> None:
    async def scenario() -> None:
        sink = Sink(f"host={sockdir} dbname=nothing connect_timeout=1", timeout=0.5)
        try:
            with pytest.raises(DatabaseUnavailable, match="unreachable"):
                await sink.open()
            with pytest.raises(DatabaseUnavailable, match="schema"):
                await sink.apply("koduki", changes(1, 1))
        finally:
            await sink.close()

    asyncio.run(scenario())


# --- over gRPC --------------------------------------------------------------------------------


def test_stream_acks_after_commit(conninfo: str, sockdir: Path) -> None:
    async def scenario() -> None:
        async with opened(conninfo) as sink, serving(sink, sockdir) as channel:
            call = replication_pb2_grpc.ReplicationStub(channel).Stream()
            await call.write(batch("koduki", 1, 3))
            ack = await read_ack(call)
            assert (ack.user, ack.acked_seq) == ("koduki", 3)
            # Acknowledged means committed: another connection already sees the rows.
            assert await sink.counts() == (1, 3)
            for first, last in [(4, 5), (1, 5), (3, 8)]:
                await call.write(batch("koduki", first, last))
                assert (await read_ack(call)).acked_seq == last
            await call.write(batch("amy", 1, 1, at=T0 + timedelta(days=1)))
            assert (await read_ack(call)).user == "amy"
            await call.done_writing()
            assert await call.read() == grpc.aio.EOF
            assert await call.code() == grpc.StatusCode.OK

            stub = summary_pb2_grpc.SummaryServiceStub(channel)
            answer = await stub.GetSummary(summary_pb2.GetSummaryRequest())
            assert [(a.user, a.balance, a.last_seq) for a in answer.accounts] == [
                ("koduki", 36, 8),
                ("amy", 1, 1),
            ]
            created = answer.accounts[0].created_at.ToDatetime(tzinfo=UTC)
            assert created == T0 + timedelta(seconds=1)
            page = await stub.GetSummary(summary_pb2.GetSummaryRequest(page_size=1))
            assert [a.user for a in page.accounts] == ["koduki"]
            rest = await stub.GetSummary(
                summary_pb2.GetSummaryRequest(page_size=1, page_token=page.next_page_token)
            )
            assert [a.user for a in rest.accounts] == ["amy"]
            assert rest.next_page_token == ""

    asyncio.run(scenario())


def _entry_at(seq: int) -> account_pb2.LedgerEntry:
    entry = account_pb2.LedgerEntry(seq=seq, kind=DEPOSIT, amount=1, balance=seq)
    entry.at.FromDatetime(T0)
    return entry


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (batch("Koduki", 1, 1), "user name 'Koduki' is invalid"),
        (batch("../etc", 1, 1), "is invalid"),
        (replication_pb2.ChangeBatch(user="koduki"), "has no entries"),
        (
            replication_pb2.ChangeBatch(user="koduki", entries=[_entry_at(2), _entry_at(2)]),
            "strictly ascending",
        ),
        (replication_pb2.ChangeBatch(user="koduki", entries=[_entry_at(0)]), "ascending"),
        (
            replication_pb2.ChangeBatch(
                user="koduki", entries=[account_pb2.LedgerEntry(seq=1, balance=1)]
            ),
            "no 'at'",
        ),
    ],
)
def test_invalid_batch_is_invalid_argument(
    conninfo: str, sockdir: Path, message: replication_pb2.ChangeBatch, expected: str
) -> None:
    async def scenario() -> None:
        async with opened(conninfo) as sink, serving(sink, sockdir) as channel:
            call = replication_pb2_grpc.ReplicationStub(channel).Stream()
            await call.write(batch("good", 1, 1))
            assert (await read_ack(call)).acked_seq == 1
            await call.write(message)
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await call.read()
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert expected in (raised.value.details() or "")
            assert await sink.counts() == (1, 1)

    asyncio.run(scenario())


def test_lost_database_is_unavailable(postgres: str, conninfo: str, sockdir: Path) -> None:
    async def scenario() -> None:
        async with opened(conninfo, pool_timeout=1.0) as sink, serving(sink, sockdir) as channel:
            call = replication_pb2_grpc.ReplicationStub(channel).Stream()
            await call.write(batch("koduki", 1, 1))
            assert (await read_ack(call)).acked_seq == 1
            dbname = psycopg.conninfo.conninfo_to_dict(conninfo)["dbname"]
            async with await psycopg.AsyncConnection.connect(postgres, autocommit=True) as admin:
                await admin.execute(f"DROP DATABASE {dbname} WITH (FORCE)")
            await call.write(batch("koduki", 2, 2))
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await call.read()
            assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
            with pytest.raises(grpc.aio.AioRpcError) as summary:
                stub = summary_pb2_grpc.SummaryServiceStub(channel)
                await stub.GetSummary(summary_pb2.GetSummaryRequest())
            assert summary.value.code() == grpc.StatusCode.UNAVAILABLE

    asyncio.run(scenario())


def test_summary_bad_page_is_invalid_argument(conninfo: str, sockdir: Path) -> None:
    async def scenario() -> None:
        async with opened(conninfo) as sink, serving(sink, sockdir) as channel:
            stub = summary_pb2_grpc.SummaryServiceStub(channel)
            for request in [
                summary_pb2.GetSummaryRequest(page_size=-1),
                summary_pb2.GetSummaryRequest(page_token="garbage"),
            ]:
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await stub.GetSummary(request)
                assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    asyncio.run(scenario())


def test_health_is_serving(conninfo: str, sockdir: Path) -> None:
    async def scenario() -> None:
        async with opened(conninfo) as sink, serving(sink, sockdir) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for name in ("", *SERVICE_NAMES):
                answer = await stub.Check(health_pb2.HealthCheckRequest(service=name))
                assert answer.status == health_pb2.HealthCheckResponse.SERVING

    asyncio.run(scenario())


# --- the process ----------------------------------------------------------------------------


def _wait_serving(socket: Path, process: subprocess.Popen[bytes], timeout: float = 90) -> float:
    """Seconds until the ETL's health check answers SERVING."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        assert process.poll() is None, f"the ETL exited with {process.returncode}"
        if socket.is_socket():
            with grpc.insecure_channel(f"unix:{socket}") as channel:
                with contextlib.suppress(grpc.RpcError):
                    answer = health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(service=SERVICE_NAMES[0]), timeout=2
                    )
                    if answer.status == health_pb2.HealthCheckResponse.SERVING:
                        return time.monotonic() - started
        time.sleep(0.1)
    raise AssertionError(f"the ETL did not report SERVING on {socket} within {timeout} s")


def test_process_survives_sigkill(tmp_path: Path, sockdir: Path) -> None:
    data_dir = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("UPW_")}
    env |= {"UPW_DATA_DIR": str(data_dir), "UPW_RUN_DIR": str(sockdir)}
    socket = sockdir / "etl" / "etl.sock"

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-m", "etl"], env=env, cwd=tmp_path)

    def replicate(user: str, first: int, last: int) -> list[int]:
        with grpc.insecure_channel(f"unix:{socket}") as channel:
            acks = replication_pb2_grpc.ReplicationStub(channel).Stream(
                iter([batch(user, first, last)]), timeout=30
            )
            return [ack.acked_seq for ack in acks]

    def summary() -> list[tuple[str, int]]:
        with grpc.insecure_channel(f"unix:{socket}") as channel:
            stub = summary_pb2_grpc.SummaryServiceStub(channel)
            answer = stub.GetSummary(summary_pb2.GetSummaryRequest(), timeout=30)
            return [(a.user, a.balance) for a in answer.accounts]

    process = start()
    try:
        _wait_serving(socket, process)
        assert socket.stat().st_mode & 0o777 == 0o666
        assert replicate("koduki", 1, 3) == [3]
        process.kill()
        assert process.wait(timeout=30) == -signal.SIGKILL

        process = start()
        _wait_serving(socket, process)
        assert summary() == [("koduki", 6)]
        assert replicate("koduki", 2, 5) == [5]
        assert summary() == [("koduki", 15)]

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        assert not socket.exists()
        assert not (data_dir / "postgres" / "postmaster.pid").exists()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if (data_dir / "postgres" / "postmaster.pid").exists():
            leftover = EmbeddedPostgres(data_dir / "postgres")
            leftover.start()
            leftover.stop()


def test_two_overlapping_activations_of_one_user(conninfo: str, sockdir: Path) -> None:
    """An old worker still flushing while the new one of the same user ships: two streams at
    once, with overlapping and duplicated batches in any interleaving."""

    async def scenario() -> None:
        async with opened(conninfo) as sink, serving(sink, sockdir) as channel:
            stub = replication_pb2_grpc.ReplicationStub(channel)

            async def activation(ranges: list[tuple[int, int]]) -> list[int]:
                call = stub.Stream()
                acked = []
                for first, last in ranges:
                    await call.write(batch("vita", first, last))
                    acked.append((await read_ack(call)).acked_seq)
                await call.done_writing()
                return acked

            old = [(1, 10), (11, 20), (11, 20), (21, 25)]  # with a duplicated batch
            new = [(1, 25), (26, 40), (21, 30), (41, 60)]  # replays what the old one had
            old_acks, new_acks = await asyncio.gather(activation(old), activation(new))
            assert old_acks == [10, 20, 20, 25]
            assert new_acks == [25, 40, 30, 60]
            async with await psycopg.AsyncConnection.connect(conninfo) as connection:
                cursor = await connection.execute(
                    "SELECT seq, balance FROM ledger WHERE user_name = 'vita' ORDER BY seq")
                rows = await cursor.fetchall()
                cursor = await connection.execute(
                    "SELECT balance, last_seq FROM accounts WHERE user_name = 'vita'")
                account = await cursor.fetchone()
            assert rows == [(s, s * (s + 1) // 2) for s in range(1, 61)]
            assert account == (60 * 61 // 2, 60)

    asyncio.run(scenario())
