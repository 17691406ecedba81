"""Scenario 5, the ETL: change records applied to PostgreSQL per second, and replication lag
(commit in a user's SQLite file to visible in PostgreSQL) under a steady deposit load.

Both run on one real stack (`bench.stackrun`: the ETL with its embedded PostgreSQL, the
dispatcher with process workers, Envoy).

Throughput: several concurrent `Replication.Stream` calls, each for a user of its own, send
pre-built batches straight to the ETL's socket with the generated stub, at most `WINDOW` batches
unacknowledged per stream (as a worker's shipper does). Records/s counts acknowledged rows, and
an Ack means the batch is committed in PostgreSQL.

Lag: a paced client in a process of its own sends `GET /<user>/deposit/1` through Envoy at a
fixed rate, spread over warm users. Every row's lag is `ledger.applied_at - ledger.at` in
PostgreSQL: `at` is the worker's clock just before its SQLite transaction, `applied_at` the
ETL's transaction start (`now()`), so each lag counts the SQLite commit and misses the apply's
own commit (about a millisecond). A probe checks it from the outside: a deposit every 100 ms to
a user of its own, answered, then PostgreSQL polled every millisecond until the row is visible.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import multiprocessing
import multiprocessing.queues
import resource
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import psycopg
from google.protobuf.timestamp_pb2 import Timestamp

from bench import load
from bench.model import Distribution, Profile, Section, latency_cells, points
from bench.stackrun import BenchStack, bench_stack
from etl.embedded import EmbeddedPostgres
from upw.account.v1 import account_pb2
from upw.replication.v1 import replication_pb2, replication_pb2_grpc

if TYPE_CHECKING:
    from upw.replication.v1.replication_pb2_grpc import ReplicationAsyncStub

log = logging.getLogger("bench.etl_rate")

# Unacknowledged batches per stream (the worker's shipper keeps 4).
WINDOW = 4
# (streams, rows per batch): one row per batch is a worker under light load, 500 its maximum.
CASES = ((1, 1), (8, 1), (8, 50), (8, 500), (32, 500))
# Rows pre-built per case at most; a case stops at its deadline or when its rows run out.
MAX_ROWS = 400_000
LAG_RATE = 1000.0
LAG_USERS = 50
LAG_CONNECTIONS = 32


# ---- throughput: batches straight into the Replication stream ------------------------------

def _batches(user: str, rows: int, per_batch: int) -> list[replication_pb2.ChangeBatch]:
    stamp = Timestamp()
    stamp.GetCurrentTime()
    kind = account_pb2.LedgerEntry.KIND_DEPOSIT
    batches = []
    for first in range(1, rows + 1, per_batch):
        last = min(first + per_batch - 1, rows)
        entries = [account_pb2.LedgerEntry(seq=s, kind=kind, amount=1, balance=s, at=stamp)
                   for s in range(first, last + 1)]
        batches.append(replication_pb2.ChangeBatch(user=user, entries=entries, head_seq=rows))
    return batches


async def _stream(stub: ReplicationAsyncStub,
                  batches: list[replication_pb2.ChangeBatch], deadline: float,
                  latencies: list[float]) -> int:
    """Sends `batches` on one stream until `deadline` (monotonic); returns the rows acked."""
    call = stub.Stream()
    sent: list[tuple[float, int]] = []  # (send time, rows) of unacknowledged batches
    acked = 0
    pending = iter(batches)

    async def read_one() -> None:
        nonlocal acked
        ack = await call.read()
        if ack is grpc.aio.EOF:
            raise RuntimeError("the ETL ended the stream early")
        began, rows = sent.pop(0)
        latencies.append((time.perf_counter() - began) * 1000)
        acked += rows

    for batch in pending:
        if time.monotonic() >= deadline:
            break
        if len(sent) >= WINDOW:
            await read_one()
        sent.append((time.perf_counter(), len(batch.entries)))
        await call.write(batch)
    await call.done_writing()
    while sent:
        await read_one()
    return acked


@dataclass
class Rate:
    streams: int
    per_batch: int
    rows: int
    seconds: float
    latencies: list[float] = field(default_factory=list)

    @property
    def per_second(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0


async def _rate(socket: Path, streams: int, per_batch: int, seconds: float, tag: str) -> Rate:
    rows_each = max(per_batch, min(MAX_ROWS // streams, int(60_000 * seconds / streams)))
    rows_each -= rows_each % per_batch
    prepared = [_batches(f"{tag}s{i:03d}", rows_each, per_batch) for i in range(streams)]
    latencies: list[float] = []
    async with grpc.aio.insecure_channel(f"unix:{socket}") as channel:
        stub: ReplicationAsyncStub = replication_pb2_grpc.ReplicationStub(channel)
        await channel.channel_ready()
        began = time.monotonic()
        acked = await asyncio.gather(
            *(_stream(stub, batches, began + seconds, latencies) for batches in prepared))
        took = time.monotonic() - began
    return Rate(streams, per_batch, sum(acked), took, latencies)


def throughput(stack: BenchStack, seconds: float) -> list[Rate]:
    results = []
    for n, (streams, per_batch) in enumerate(CASES):
        result = asyncio.run(_rate(stack.settings.etl_socket, streams, per_batch, seconds,
                                   f"etl{n}"))
        log.info("ETL: %d streams x %d rows per batch: %.0f rows/s", streams, per_batch,
                 result.per_second)
        results.append(result)
    return results


# ---- lag: a paced deposit load through Envoy ------------------------------------------------

async def _http_get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    request: bytes) -> int:
    """One request on a kept-alive HTTP/1.1 connection; returns the status."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    if "content-length" in headers:
        await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding") == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    return status


async def _pace_async(port: int, users: list[str], rate: float, seconds: float,
                      connections: int) -> dict[str, object]:
    total = int(rate * seconds)
    loop = asyncio.get_running_loop()
    counter = itertools.count()
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    start = loop.time() + 0.2

    async def connection() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while (i := next(counter)) < total:
                due = start + i / rate
                if loop.time() > start + seconds:
                    break  # a stack that cannot keep up: what is still due is not sent
                if (wait := due - loop.time()) > 0:
                    await asyncio.sleep(wait)
                user = users[i % len(users)]
                request = f"GET /{user}/deposit/1 HTTP/1.1\r\nHost: bench\r\n\r\n".encode()
                try:
                    status = await _http_get(reader, writer, request)
                except (OSError, asyncio.IncompleteReadError, ValueError):
                    status = 0
                    writer.close()
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                # From when it was due: a late start counts (no coordinated omission).
                latencies.append((loop.time() - due) * 1000)
                statuses[status] = statuses.get(status, 0) + 1
        finally:
            writer.close()

    await asyncio.gather(*(connection() for _ in range(connections)))
    return {"wall": loop.time() - start, "latencies": latencies, "statuses": statuses}


def _pace(port: int, users: list[str], rate: float, seconds: float, connections: int,
          out: multiprocessing.queues.Queue[dict[str, object]]) -> None:
    """The paced client's process: its answers and its own CPU time."""
    result = asyncio.run(_pace_async(port, users, rate, seconds, connections))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result["cpu"] = usage.ru_utime + usage.ru_stime
    out.put(result)


def _probe(port: int, url: str, user: str, stop: threading.Event, lags: list[float]) -> None:
    """Every 100 ms: a deposit, then PostgreSQL polled each ms until its row is visible."""
    with psycopg.connect(url, autocommit=True) as pg:
        while not stop.is_set():
            status, body = load.request(
                port, "POST", f"/v1/accounts/{user}:deposit", b'{"amount": 1}', timeout=30)
            answered = time.perf_counter()
            if status != 200:
                log.warning("probe deposit answered %d: %s", status, body[:200])
                stop.wait(0.1)
                continue
            seq = int(json.loads(body)["entry"]["seq"])
            while True:
                row = pg.execute("SELECT 1 FROM ledger WHERE user_name = %s AND seq = %s",
                                 (user, seq)).fetchone()
                if row is not None:
                    lags.append((time.perf_counter() - answered) * 1000)
                    break
                if time.perf_counter() - answered > 30:
                    log.warning("probe: seq %d of %r not in PostgreSQL after 30 s", seq, user)
                    break
                time.sleep(0.001)
            stop.wait(0.1)


@dataclass
class Lag:
    rate: float
    achieved: float
    errors: int
    client_cpu: float
    latencies: list[float]
    lags: list[float]
    probe: list[float]
    caught_up: float
    # Rows of answered deposits that PostgreSQL still lacked a minute after the load.
    missing: int


def database_url(stack: BenchStack) -> str:
    if stack.settings.database_url:
        return stack.settings.database_url
    url = EmbeddedPostgres(stack.settings.data_dir / "postgres").running_url()
    if url is None:
        raise RuntimeError("the ETL's embedded PostgreSQL is not running")
    return url


def idle_probe(stack: BenchStack, seconds: float) -> list[float]:
    """The probe alone for `seconds`: the lag of a stack with nothing else to do."""
    status, body = load.request(stack.http_port, "GET", "/lagprobe/create")
    if status != 200:
        raise RuntimeError(f"GET /lagprobe/create answered {status}: {body[:300]!r}")
    stop = threading.Event()
    lags: list[float] = []
    prober = threading.Thread(
        target=_probe, args=(stack.http_port, database_url(stack), "lagprobe", stop, lags))
    prober.start()
    time.sleep(seconds)
    stop.set()
    prober.join()
    return lags


def lag(stack: BenchStack, rate: float, seconds: float) -> Lag:
    port = stack.http_port
    users = [f"lag{i:03d}" for i in range(LAG_USERS)]
    for user in [*users, "lagprobe"]:
        for path in (f"/{user}/create", f"/{user}/show"):
            status, body = load.request(port, "GET", path)
            if status != 200:
                raise RuntimeError(f"GET {path} answered {status}: {body[:300]!r}")
    url = database_url(stack)
    with psycopg.connect(url, autocommit=True) as pg:
        window_start = pg.execute("SELECT now()").fetchone()[0]  # type: ignore[index]
    stop = threading.Event()
    probe: list[float] = []
    prober = threading.Thread(target=_probe, args=(port, url, "lagprobe", stop, probe))
    prober.start()
    context = multiprocessing.get_context("spawn")
    out: multiprocessing.queues.Queue[dict[str, object]] = context.Queue()
    pacer = context.Process(target=_pace,
                            args=(port, users, rate, seconds, LAG_CONNECTIONS, out))
    pacer.start()
    try:
        result = out.get(timeout=seconds + 120)
    finally:
        pacer.join(10)
        stop.set()
        prober.join()
    statuses: dict[int, int] = result["statuses"]  # type: ignore[assignment]
    ok = statuses.get(200, 0)
    # Every answered deposit must reach PostgreSQL: one OPEN row plus one per deposit.
    ended = time.monotonic()
    with psycopg.connect(url, autocommit=True) as pg:
        expected = len(users) + ok
        while True:
            row = pg.execute("SELECT coalesce(sum(last_seq), 0) FROM accounts "
                             "WHERE user_name = ANY(%s)", (users,)).fetchone()
            held = 0 if row is None else int(row[0])
            if held >= expected or time.monotonic() - ended > 60:
                break
            time.sleep(0.05)
        caught_up = time.monotonic() - ended
        rows = pg.execute(
            "SELECT extract(epoch FROM applied_at - at) * 1000 FROM ledger "
            "WHERE user_name = ANY(%s) AND kind = 2 AND at >= %s",
            (users, window_start)).fetchall()
    wall = float(result["wall"])  # type: ignore[arg-type]
    return Lag(rate=rate, achieved=ok / wall if wall else 0.0, errors=sum(statuses.values()) - ok,
               client_cpu=100 * float(result["cpu"]) / wall,  # type: ignore[arg-type]
               latencies=list(result["latencies"]),  # type: ignore[call-overload]
               lags=[float(r[0]) for r in rows], probe=probe, caught_up=caught_up,
               missing=max(expected - held, 0))


# ---- the scenario -----------------------------------------------------------------------------

def run(profile: Profile) -> Section:
    section = Section(
        title="ETL",
        columns=["case", "records/s", "n", "p50 (ms)", "p90 (ms)", "p99 (ms)", "max (ms)"],
    )
    seconds = min(profile.duration, 5.0) if profile.name == "quick" else profile.duration / 2
    with bench_stack(runtime="process", idle_ttl=3600.0, max_workers=LAG_USERS + 16) as stack:
        rates = throughput(stack, seconds)
        measured: list[Lag] = []
        at_rest: list[float] = []
        try:
            at_rest = idle_probe(stack, 3.0)
            measured.append(lag(stack, LAG_RATE, profile.duration))
            if measured[0].achieved < 0.9 * LAG_RATE:
                # Saturated: the lag then is mostly queueing. Once more at a rate it sustains.
                lower = max(10.0, round(measured[0].achieved * 0.6, -1))
                measured.append(lag(stack, lower, profile.duration))
        except Exception as exc:  # the throughput numbers still stand
            log.exception("the replication lag could not be measured")
            section.notes.append(f"**lag: not measured**: {exc}")
    for r in rates:
        section.rows.append([
            f"Replication.Stream: {r.streams} streams x {r.per_batch} rows per batch "
            "(batch ack latency)", f"{r.per_second:,.0f}", str(len(r.latencies)),
            *latency_cells(r.latencies)])
        section.distributions.append(Distribution(
            f"ack of a batch: {r.streams} streams x {r.per_batch} rows", points(r.latencies)))
    best = max(rates, key=lambda r: r.per_second)
    section.notes.append(
        f"Throughput: each case ran {seconds:g} s; the best was {best.per_second:,.0f} "
        f"records/s ({best.streams} streams x {best.per_batch} rows per batch). Records are "
        "pre-built batches sent straight to the ETL's socket with the generated stub, at most "
        f"{WINDOW} unacknowledged per stream; each Ack is a committed PostgreSQL transaction.")
    section.notes.append(
        "Lag: `applied_at - at` is every row's, from the worker's clock just before its SQLite "
        "transaction to the ETL transaction's start (`now()`, about a millisecond before its "
        "commit); the probe deposits every 100 ms to a user of its own and polls PostgreSQL "
        "each millisecond until its row is visible. When the stack cannot answer the rate "
        f"asked ({LAG_RATE:,.0f}/s), the lag is measured again at 60% of what it answered.")
    if at_rest:
        section.rows.append(["lag probe (answered to visible), no other load", "",
                             str(len(at_rest)), *latency_cells(at_rest)])
    for one in measured:
        _lag_rows(one, profile, section)
    return section


def _lag_rows(measured: Lag, profile: Profile, section: Section) -> None:
    at = f"{measured.rate:,.0f}/s asked, {measured.achieved:,.0f}/s answered"
    for label, values in ((f"lag (applied_at - at), deposits {at}", measured.lags),
                          (f"lag probe (answered to visible), deposits {at}", measured.probe),
                          (f"deposit latency from its due time, {at}, {measured.errors} errors",
                           measured.latencies)):
        section.rows.append([label, "", str(len(values)), *latency_cells(values)])
    section.distributions.append(
        Distribution(f"lag at {measured.rate:,.0f}/s asked", points(measured.lags)))
    section.notes.append(
        f"Lag at {measured.rate:,.0f} deposits/s asked: {measured.achieved:,.0f}/s answered "
        f"(200) over {LAG_USERS} warm users for {profile.duration:g} s through Envoy "
        f"({LAG_CONNECTIONS} connections, paced, requests still due at the end not sent; client "
        f"CPU {measured.client_cpu:.0f}% of a core); "
        + (f"PostgreSQL held every answered deposit {measured.caught_up:.2f} s after the load "
           "ended." if not measured.missing else
           f"**PostgreSQL still lacked {measured.missing} answered deposits "
           f"{measured.caught_up:.0f} s after the load ended.**"))
