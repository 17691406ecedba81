"""The real worker process (`python -m worker`) through a real gRPC channel on a unix socket.

The ETL here is a small in-test Replication servicer that records batches and acknowledges
them: this is a unit test of the worker's side of the stream, not of the ETL.
"""

from __future__ import annotations

import asyncio
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from conventions import users
from upw.account.v1 import account_pb2 as pb
from upw.account.v1 import account_pb2_grpc
from upw.replication.v1 import replication_pb2, replication_pb2_grpc
from worker.shipper import Shipper
from worker.store import INT64_MAX, Store

pytestmark = pytest.mark.timeout(60)

USER = "koduki"
# The default first reconnect backoff is 1 s; a test dials before the worker has bound.
FAST_RECONNECT = [
    ("grpc.initial_reconnect_backoff_ms", 20),
    ("grpc.min_reconnect_backoff_ms", 20),
    ("grpc.max_reconnect_backoff_ms", 100),
    ("grpc.use_local_subchannel_pool", 1),
]


def wait_until(predicate: Callable[[], bool], *, timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        time.sleep(0.02)


@pytest.fixture
def run_dir() -> Iterator[Path]:
    # Short on purpose: a unix socket path may not exceed 107 bytes.
    path = Path(tempfile.mkdtemp(prefix="upw-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


class FakeEtl(replication_pb2_grpc.ReplicationServicer):
    """Records every batch and acknowledges it at once."""

    def __init__(self) -> None:
        self.batches: list[replication_pb2.ChangeBatch] = []
        self._lock = threading.Lock()

    def Stream(
        self,
        request_iterator: Iterator[replication_pb2.ChangeBatch],
        context: grpc.ServicerContext,
    ) -> Iterator[replication_pb2.Ack]:
        for batch in request_iterator:
            with self._lock:
                self.batches.append(batch)
            yield replication_pb2.Ack(user=batch.user, acked_seq=batch.entries[-1].seq)

    def GetStatus(
        self, request: replication_pb2.GetStatusRequest, context: grpc.ServicerContext
    ) -> replication_pb2.ReplicationStatus:
        return replication_pb2.ReplicationStatus()  # the worker never asks

    def seqs(self) -> list[int]:
        with self._lock:
            return [entry.seq for batch in self.batches for entry in batch.entries]


@dataclass
class EtlServer:
    socket: Path
    servicer: FakeEtl = field(default_factory=FakeEtl)
    server: grpc.Server | None = None

    def start(self) -> None:
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        replication_pb2_grpc.add_ReplicationServicer_to_server(self.servicer, self.server)
        self.server.add_insecure_port(f"unix:{self.socket}")
        self.server.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(0).wait()
            self.server = None


@pytest.fixture
def etl(run_dir: Path) -> Iterator[EtlServer]:
    """A fake ETL that is NOT started yet; call `etl.start()`."""
    server = EtlServer(run_dir / "etl.sock")
    yield server
    server.stop()


@dataclass
class Worker:
    process: subprocess.Popen[bytes]
    socket: Path
    data_dir: Path
    log: Path
    channel: grpc.Channel

    @property
    def stub(self) -> account_pb2_grpc.AccountServiceStub:
        return account_pb2_grpc.AccountServiceStub(self.channel)

    @property
    def db(self) -> Path:
        return users.account_db(self.data_dir, USER)

    def acked_seq(self) -> int:
        store = Store.open(self.db, user=USER)
        try:
            return store.acked_seq()
        finally:
            store.close()

    def terminate(self, timeout: float = 10.0) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)


def worker_command(run_dir: Path, *, user: str = USER, flush_timeout: float = 2.0) -> list[str]:
    return [
        sys.executable, "-m", "worker",
        "--user", user,
        "--data-dir", str(run_dir / "data"),
        "--listen", str(run_dir / "worker.sock"),
        "--etl-socket", str(run_dir / "etl.sock"),
        "--flush-timeout", str(flush_timeout),
    ]  # fmt: skip


def serving(channel: grpc.Channel) -> bool:
    health = health_pb2_grpc.HealthStub(channel)
    try:
        answer = health.Check(
            health_pb2.HealthCheckRequest(service="upw.account.v1.AccountService"), timeout=0.5
        )
    except grpc.RpcError:
        return False
    return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)


@pytest.fixture
def start_worker(run_dir: Path) -> Iterator[Callable[..., Worker]]:
    started: list[Worker] = []

    def start(*, flush_timeout: float = 2.0) -> Worker:
        log = run_dir / f"worker-{len(started)}.log"
        with log.open("wb") as stderr:
            process = subprocess.Popen(
                worker_command(run_dir, flush_timeout=flush_timeout), stderr=stderr, cwd=run_dir
            )
        socket = run_dir / "worker.sock"
        channel = grpc.insecure_channel(f"unix:{socket}", options=FAST_RECONNECT)
        worker = Worker(process, socket, run_dir / "data", log, channel)
        started.append(worker)

        def ready() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"the worker exited: {log.read_text()}")
            return serving(channel)

        wait_until(ready, what="the worker to be SERVING")
        return worker

    yield start
    for worker in started:
        worker.channel.close()
        if worker.process.poll() is None:
            worker.process.kill()
            worker.process.wait()


@pytest.fixture
def worker(start_worker: Callable[..., Worker]) -> Worker:
    return start_worker()


@pytest.fixture
def account(worker: Worker) -> Worker:
    worker.stub.CreateAccount(pb.CreateAccountRequest(user=USER))
    return worker


def test_create_is_idempotent(worker: Worker) -> None:
    first = worker.stub.CreateAccount(pb.CreateAccountRequest(user=USER))
    assert first.created
    assert (first.account.user, first.account.balance, first.account.last_seq) == (USER, 0, 1)
    again = worker.stub.CreateAccount(pb.CreateAccountRequest(user=USER))
    assert not again.created
    assert again.account == first.account


def test_deposit_withdraw_and_get(account: Worker) -> None:
    deposit = account.stub.Deposit(pb.DepositRequest(user=USER, amount=256))
    assert (deposit.account.balance, deposit.account.last_seq) == (256, 2)
    assert deposit.entry.kind == pb.LedgerEntry.KIND_DEPOSIT
    assert (deposit.entry.seq, deposit.entry.amount, deposit.entry.balance) == (2, 256, 256)
    withdrawal = account.stub.Withdraw(pb.WithdrawRequest(user=USER, amount=56))
    assert withdrawal.entry.kind == pb.LedgerEntry.KIND_WITHDRAWAL
    assert (withdrawal.entry.seq, withdrawal.entry.amount) == (3, 56)
    assert withdrawal.account.balance == 200
    got = account.stub.GetAccount(pb.GetAccountRequest(user=USER))
    assert (got.user, got.balance, got.last_seq) == (USER, 200, 3)
    assert got.created_at.ToMicroseconds() > 0


def test_list_transactions_pages(account: Worker) -> None:
    for amount in range(1, 5):
        account.stub.Deposit(pb.DepositRequest(user=USER, amount=amount))
    everything = account.stub.ListTransactions(pb.ListTransactionsRequest(user=USER))
    assert [e.seq for e in everything.entries] == [1, 2, 3, 4, 5]
    assert everything.entries[0].kind == pb.LedgerEntry.KIND_OPEN
    assert [e.balance for e in everything.entries] == [0, 1, 3, 6, 10]
    assert everything.next_after_seq == 0
    seen, after = [], 0
    while True:
        page = account.stub.ListTransactions(
            pb.ListTransactionsRequest(user=USER, after_seq=after, page_size=2)
        )
        seen.append([e.seq for e in page.entries])
        if not page.next_after_seq:
            break
        after = page.next_after_seq
    assert seen == [[1, 2], [3, 4], [5]]
    huge = account.stub.ListTransactions(
        pb.ListTransactionsRequest(user=USER, after_seq=3, page_size=1_000_000)
    )
    assert [e.seq for e in huge.entries] == [4, 5]


def _call(stub: account_pb2_grpc.AccountServiceStub, name: str, **fields: object) -> None:
    request_type = {
        "CreateAccount": pb.CreateAccountRequest,
        "Deposit": pb.DepositRequest,
        "Withdraw": pb.WithdrawRequest,
        "GetAccount": pb.GetAccountRequest,
        "ListTransactions": pb.ListTransactionsRequest,
    }[name]
    getattr(stub, name)(request_type(**fields), timeout=5)


@pytest.mark.parametrize(
    ("create", "setup", "call", "fields", "code", "message"),
    [
        (False, [], "CreateAccount", {"user": "other"}, "INVALID_ARGUMENT",
         "this worker serves 'koduki', not 'other'"),
        (False, [], "GetAccount", {"user": "Bad Name"}, "INVALID_ARGUMENT",
         "this worker serves 'koduki', not 'Bad Name'"),
        (False, [], "GetAccount", {"user": USER}, "NOT_FOUND",
         "account 'koduki' does not exist; create it first"),
        (False, [], "Deposit", {"user": USER, "amount": 5}, "NOT_FOUND", "create it first"),
        (False, [], "Withdraw", {"user": USER, "amount": 5}, "NOT_FOUND", "create it first"),
        (False, [], "ListTransactions", {"user": USER}, "NOT_FOUND", "create it first"),
        (True, [], "Deposit", {"user": USER, "amount": 0}, "INVALID_ARGUMENT", "amount 0"),
        (True, [], "Withdraw", {"user": USER, "amount": -3}, "INVALID_ARGUMENT", "amount -3"),
        (True, [10], "Withdraw", {"user": USER, "amount": 11}, "FAILED_PRECONDITION",
         "insufficient funds: account 'koduki' cannot withdraw 11, the balance is only 10"),
        (True, [INT64_MAX], "Deposit", {"user": USER, "amount": 1}, "OUT_OF_RANGE",
         "would exceed 9223372036854775807"),
        (True, [], "ListTransactions", {"user": USER, "page_size": -1}, "INVALID_ARGUMENT",
         "page_size -1"),
        (True, [], "ListTransactions", {"user": USER, "after_seq": -1}, "INVALID_ARGUMENT",
         "after_seq -1"),
    ],
)  # fmt: skip
def test_error_statuses(
    worker: Worker,
    create: bool,
    setup: list[int],
    call: str,
    fields: dict[str, object],
    code: str,
    message: str,
) -> None:
    if create:
        worker.stub.CreateAccount(pb.CreateAccountRequest(user=USER))
    for amount in setup:
        worker.stub.Deposit(pb.DepositRequest(user=USER, amount=amount))
    with pytest.raises(grpc.RpcError) as caught:
        _call(worker.stub, call, **fields)
    assert caught.value.code().name == code
    assert message in (caught.value.details() or "")


def test_health_and_reflection(worker: Worker) -> None:
    health = health_pb2_grpc.HealthStub(worker.channel)
    for service in ("", "upw.account.v1.AccountService"):
        answer = health.Check(health_pb2.HealthCheckRequest(service=service))
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    services = ProtoReflectionDescriptorDatabase(worker.channel).get_services()
    assert {"upw.account.v1.AccountService", "grpc.health.v1.Health"} <= set(services)


def test_rows_are_shipped_in_order_and_acknowledged(
    etl: EtlServer, start_worker: Callable[..., Worker]
) -> None:
    etl.start()
    worker = start_worker()
    worker.stub.CreateAccount(pb.CreateAccountRequest(user=USER))
    for amount in range(1, 31):
        worker.stub.Deposit(pb.DepositRequest(user=USER, amount=amount))
    wait_until(lambda: etl.servicer.seqs()[-1:] == [31], what="row 31 at the ETL")
    assert etl.servicer.seqs() == list(range(1, 32))
    assert {batch.user for batch in etl.servicer.batches} == {USER}
    last = etl.servicer.batches[-1].entries[-1]
    assert (last.kind, last.amount, last.balance) == (pb.LedgerEntry.KIND_DEPOSIT, 30, 465)
    wait_until(lambda: worker.acked_seq() == 31, what="the watermark to reach 31")


def test_writes_succeed_while_the_etl_is_absent_and_ship_later(
    etl: EtlServer, start_worker: Callable[..., Worker]
) -> None:
    worker = start_worker()
    worker.stub.CreateAccount(pb.CreateAccountRequest(user=USER))
    for _ in range(5):
        started = time.monotonic()
        worker.stub.Deposit(pb.DepositRequest(user=USER, amount=10), timeout=5)
        assert time.monotonic() - started < 1.0, "a deposit waited for the absent ETL"
    assert worker.acked_seq() == 0
    etl.start()
    wait_until(lambda: worker.acked_seq() == 6, what="the rows to reach the late ETL")
    # At-least-once: a row may arrive twice, but every row arrives, and in order per batch.
    assert sorted(set(etl.servicer.seqs())) == [1, 2, 3, 4, 5, 6]


def test_an_etl_restart_resumes_from_the_watermark(
    etl: EtlServer, start_worker: Callable[..., Worker]
) -> None:
    etl.start()
    worker = start_worker()
    worker.stub.CreateAccount(pb.CreateAccountRequest(user=USER))
    wait_until(lambda: worker.acked_seq() == 1, what="the OPEN row to be acknowledged")
    etl.stop()
    worker.stub.Deposit(pb.DepositRequest(user=USER, amount=7))
    etl.servicer = FakeEtl()
    etl.start()
    wait_until(lambda: worker.acked_seq() == 2, what="the deposit to reach the new ETL")
    assert etl.servicer.seqs() == [2]
    worker.terminate()
    log = worker.log.read_text()
    assert log.count("is down") == 1 and log.count("is up") == 2, log


def test_sigterm_flushes_exits_0_and_removes_the_socket(
    etl: EtlServer, start_worker: Callable[..., Worker]
) -> None:
    etl.start()
    worker = start_worker()
    worker.stub.CreateAccount(pb.CreateAccountRequest(user=USER))
    worker.stub.Deposit(pb.DepositRequest(user=USER, amount=1))
    assert worker.terminate() == 0
    assert not worker.socket.exists()
    assert worker.acked_seq() == 2, "the shutdown flush did not ship every row"
    # Nothing but the user's own directory was written under the data dir.
    user_dir = users.user_dir(worker.data_dir, USER)
    written = {p for p in worker.data_dir.rglob("*") if p.is_file()}
    assert written and all(p.parent == user_dir for p in written)
    assert user_dir.stat().st_mode & 0o777 == 0o700


def test_sigterm_without_an_etl_gives_up_after_the_flush_timeout(
    start_worker: Callable[..., Worker],
) -> None:
    worker = start_worker(flush_timeout=0.2)
    worker.stub.CreateAccount(pb.CreateAccountRequest(user=USER))
    started = time.monotonic()
    assert worker.terminate() == 0
    assert time.monotonic() - started < 5
    assert not worker.socket.exists()
    assert worker.acked_seq() == 0


def test_a_flush_gives_up_at_once_while_the_stream_is_down(
    tmp_path: Path, etl: EtlServer
) -> None:
    """A worker that stops while its ETL is unreachable does not spend its flush timeout
    waiting: its rows are drained later, and the stop (and whoever waits for it) goes on."""
    store = Store.open(tmp_path / "account.db", user=USER)
    store.create()

    async def flush_while_down() -> tuple[bool, float]:
        shipper = Shipper(store, target=f"unix:{etl.socket}", backoff_initial=5.0)
        shipper.start()
        try:
            for _ in range(500):
                if shipper.stream_up is False:
                    break
                await asyncio.sleep(0.01)
            started = asyncio.get_running_loop().time()
            flushed = await shipper.flush(30)
            return flushed, asyncio.get_running_loop().time() - started
        finally:
            await shipper.stop()

    try:
        flushed, waited = asyncio.run(flush_while_down())
    finally:
        store.close()
    assert flushed is False
    assert waited < 10, f"the flush waited {waited:.1f}s for a stream that is down"


def test_a_stale_socket_file_is_replaced(
    run_dir: Path, start_worker: Callable[..., Worker]
) -> None:
    (run_dir / "worker.sock").write_bytes(b"left behind")
    worker = start_worker()
    assert worker.stub.CreateAccount(pb.CreateAccountRequest(user=USER)).created
    assert os.stat(worker.socket).st_mode & 0o777 == 0o660


@pytest.mark.parametrize("user", ["Koduki", "../etc", "", "a" * 64])
def test_a_bad_user_name_exits_2(run_dir: Path, user: str) -> None:
    done = subprocess.run(
        worker_command(run_dir, user=user), capture_output=True, timeout=30, check=False
    )
    assert done.returncode == 2
    assert b"is invalid" in done.stderr
    assert not (run_dir / "data").exists()


def test_the_shipper_sends_bounded_consecutive_batches_and_flushes(
    tmp_path: Path, etl: EtlServer
) -> None:
    store = Store.open(tmp_path / "account.db", user=USER)
    store.create()
    for amount in range(1, 25):
        store.deposit(amount)

    async def ship() -> tuple[bool, bool]:
        shipper = Shipper(store, target=f"unix:{etl.socket}", batch_rows=4, window=2,
                          unmark_after=0.05)
        shipper.start()
        try:
            absent = await shipper.flush(0.1)
            etl.start()
            for _ in range(1000):  # a flush gives up while the stream is down
                if shipper.stream_up:
                    break
                await asyncio.sleep(0.01)
            present = await shipper.flush(10)
            assert store.marker.exists()  # caught up, but the marker waits for a quiet stream
            for _ in range(1000):
                if not store.marker.exists():
                    break
                await asyncio.sleep(0.01)
            return absent, present
        finally:
            await shipper.stop()

    try:
        absent, present = asyncio.run(ship())
        assert (absent, present) == (False, True)
        assert store.acked_seq() == 25
        assert not store.marker.exists(), "a caught-up, quiet stream removes the marker"
    finally:
        store.close()
    batches = [[e.seq for e in batch.entries] for batch in etl.servicer.batches]
    assert all(1 <= len(seqs) <= 4 for seqs in batches)
    assert all(seqs == list(range(seqs[0], seqs[0] + len(seqs))) for seqs in batches)
    assert sorted({seq for seqs in batches for seq in seqs}) == list(range(1, 26))


class HeldEtl(FakeEtl):
    """Records batches as they arrive, but acknowledges nothing until `release` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def Stream(
        self,
        request_iterator: Iterator[replication_pb2.ChangeBatch],
        context: grpc.ServicerContext,
    ) -> Iterator[replication_pb2.Ack]:
        arrived: queue.Queue[replication_pb2.ChangeBatch | None] = queue.Queue()

        def read() -> None:
            try:
                for batch in request_iterator:
                    with self._lock:
                        self.batches.append(batch)
                    arrived.put(batch)
            except grpc.RpcError:
                pass  # the worker cancelled the stream (its shipper stopped)
            finally:
                arrived.put(None)

        threading.Thread(target=read, daemon=True).start()
        self.release.wait(30)
        while (batch := arrived.get()) is not None:
            yield replication_pb2.Ack(user=batch.user, acked_seq=batch.entries[-1].seq)


def test_rows_committed_while_a_batch_is_in_flight_go_together(
    tmp_path: Path, run_dir: Path
) -> None:
    etl = EtlServer(run_dir / "etl.sock", servicer=HeldEtl())
    etl.start()
    store = Store.open(tmp_path / "account.db", user=USER)
    store.create()

    async def ship() -> bool:
        shipper = Shipper(store, target=f"unix:{etl.socket}", window=4)
        shipper.start()
        try:
            for _ in range(1000):
                if etl.servicer.batches:
                    break
                await asyncio.sleep(0.01)
            for amount in range(1, 6):  # one at a time, each with time to be shipped alone
                store.deposit(amount)
                shipper.wake()
                await asyncio.sleep(0.05)
            assert len(etl.servicer.batches) == 1, "a partial batch waits for the one in flight"
            assert isinstance(etl.servicer, HeldEtl)
            etl.servicer.release.set()
            return await shipper.flush(10)
        finally:
            await shipper.stop()

    try:
        assert asyncio.run(ship())
    finally:
        store.close()
        etl.stop()
    assert [[e.seq for e in batch.entries] for batch in etl.servicer.batches] == [
        [1], [2, 3, 4, 5, 6]]
