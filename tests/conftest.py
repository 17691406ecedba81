"""Fixtures that run real stacks: ETL with an embedded PostgreSQL, dispatcher with real worker
processes, and Envoy, each in its own data dir with its own ports, so tests may run side by side."""

from __future__ import annotations

import contextlib
import functools
import http.client
import itertools
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import apsw
import docker.errors
import grpc
import psycopg
import pytest
from docker.api import APIClient
from docker.utils import kwargs_from_env

from conventions.config import Settings
from conventions.users import account_db
from dispatcher.runtimes.process import worker_processes
from etl import reconcile
from etl.embedded import EmbeddedPostgres
from launcher.stack import Stack
from upw.replication.v1 import replication_pb2, replication_pb2_grpc


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--soak", action="store_true",
                     help="run the fault-injection test ten times longer")


WORKER_IMAGE = os.environ.get("UPW_WORKER_IMAGE") or "upw/worker:latest"


@pytest.fixture(scope="session")
def engine() -> Iterator[APIClient]:
    """The Docker Engine, once it answers and has the worker image (`make test` builds it with
    `./build.sh worker`). Without them a test skips with the reason, or fails when
    UPW_REQUIRE_DOCKER=1."""
    api: APIClient | None = None
    try:
        api = APIClient(version="auto", **kwargs_from_env())
        api.ping()
        api.inspect_image(WORKER_IMAGE)
    except (docker.errors.DockerException, OSError) as exc:
        if api is not None:
            api.close()
        reason = f"needs a Docker Engine with the image {WORKER_IMAGE!r} (./build.sh worker): {exc}"
        if os.environ.get("UPW_REQUIRE_DOCKER") == "1":
            pytest.fail(f"UPW_REQUIRE_DOCKER=1: {reason}", pytrace=False)
        pytest.skip(reason)
    yield api
    api.close()


# The original curl session: (path, the exact body answered).
WALKTHROUGH = [
    ("/koduki/create", "Hello, koduki. Welcome Unlimited Process Works!\n"),
    ("/koduki/deposit/128", "koduki's account deposit 128 yen.\n"),
    ("/koduki/deposit/128", "koduki's account deposit 128 yen.\n"),
    ("/koduki/show", "koduki's account is 256 yen.\n"),
    ("/nanoha/create", "Hello, nanoha. Welcome Unlimited Process Works!\n"),
    ("/nanoha/deposit/156", "nanoha's account deposit 156 yen.\n"),
    ("/misuzu/create", "Hello, misuzu. Welcome Unlimited Process Works!\n"),
    ("/misuzu/deposit/75", "misuzu's account deposit 75 yen.\n"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str

    @property
    def text(self) -> str:
        return self.body.decode()

    def json(self) -> Any:
        return json.loads(self.body)


class Http:
    """A curl-like client: sends the request target exactly as given (no normalisation of
    `..` or `%2F`), one connection per request."""

    def __init__(self, port: int) -> None:
        self.port = port

    def request(self, method: str, target: str, body: Any = None) -> Response:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            payload = None if body is None else json.dumps(body).encode()
            headers = {} if body is None else {"content-type": "application/json"}
            connection.request(method, target, body=payload, headers=headers)
            reply = connection.getresponse()
            return Response(reply.status, reply.read(), reply.getheader("content-type", ""))
        finally:
            connection.close()

    def get(self, target: str) -> Response:
        return self.request("GET", target)

    def post(self, target: str, body: Any) -> Response:
        return self.request("POST", target, body)


def wait_for(condition: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    """Polls until `condition()` is truthy; returns its value."""
    deadline = time.monotonic() + timeout
    delay = 0.02
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.25)


class RunningStack:
    def __init__(self, stack: Stack, log_dir: Path, engine: APIClient | None = None) -> None:
        self.stack = stack
        self.engine = engine
        self.settings = stack.settings
        self.log_dir = log_dir
        self.http = Http(stack.settings.http_port)
        self.grpc_target = f"127.0.0.1:{stack.settings.grpc_port}"

    @property
    def data_dir(self) -> Path:
        return self.settings.data_dir

    def dispatcher_log(self) -> str:
        return (self.log_dir / "dispatcher.log").read_text(errors="replace")

    def worker_starts(self, user: str) -> int:
        """How many times the dispatcher reported a worker of `user` ready."""
        return self.dispatcher_log().count(f"dispatcher.pool: worker of {user!r} ready")

    def containers(self, user: str) -> list[dict[str, Any]]:
        """Every container, running or not, of `user` under this stack's data dir."""
        assert self.engine is not None, "not a docker stack"
        labels = [f"upw.user={user}", f"upw.data-dir={self.data_dir}"]
        found: list[dict[str, Any]] = self.engine.containers(all=True, filters={"label": labels})
        return found

    def live_workers(self, user: str) -> int:
        if self.engine is not None:
            return sum(1 for c in self.containers(user) if c["State"] == "running")
        return len(self.worker_pids(user))

    def worker_pids(self, user: str) -> list[int]:
        """Live worker processes of `user` in this stack (process runtime), from their pid files."""
        return worker_processes(self.settings.workers_dir, user)

    def database_url(self) -> str:
        return reconcile.database_url(self.settings)

    def replication_status(self) -> replication_pb2.ReplicationStatus:
        """The ETL's Replication.GetStatus answer."""
        with grpc.insecure_channel(f"unix:{self.settings.etl_socket}") as channel:
            reply: replication_pb2.ReplicationStatus = replication_pb2_grpc.ReplicationStub(
                channel).GetStatus(replication_pb2.GetStatusRequest(), timeout=5)
            return reply

    def pg_rows(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.database_url(), autocommit=True) as connection:
            return connection.execute(query, params).fetchall()

    def sqlite_ledger(self, user: str) -> list[tuple[int, int]]:
        """(seq, balance) of every ledger row of `user`, read from the user's own file."""
        path = account_db(self.data_dir, user)
        connection = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
        try:
            return [(int(s), int(b)) for s, b in
                    connection.execute("SELECT seq, balance FROM ledger ORDER BY seq")]
        finally:
            connection.close()

    def pg_ledger(self, user: str) -> list[tuple[int, int]]:
        return [(int(s), int(b)) for s, b in self.pg_rows(
            "SELECT seq, balance FROM ledger WHERE user_name = %s ORDER BY seq", user)]

    def wait_for_postgres(self, user: str, timeout: float = 30.0) -> list[tuple[int, int]]:
        """Waits until PostgreSQL holds exactly the user's SQLite ledger (read once, now);
        returns that ledger."""
        ledger = self.sqlite_ledger(user)
        wait_for(functools.partial(self._pg_holds, user, ledger), timeout=timeout,
                 what=f"PostgreSQL to hold the ledger of {user} ({len(ledger)} rows)")
        return ledger

    def _pg_holds(self, user: str, ledger: list[tuple[int, int]]) -> bool:
        return self.pg_ledger(user) == ledger


@pytest.fixture
def make_stack(
    tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., RunningStack]]:
    """Starts a real stack; `make_stack(idle_ttl=..., runtime="docker", ...)` overrides
    settings. A docker stack needs the engine (and skips or fails without it)."""
    started: list[RunningStack] = []
    run_dirs: list[str] = []

    def make(**overrides: Any) -> RunningStack:
        # Socket paths are limited to 107 bytes, so sockets live in a short directory of their own.
        run_dir = tempfile.mkdtemp(prefix="upw-", dir="/tmp")
        run_dirs.append(run_dir)
        index = len(started)
        settings = Settings(
            http_port=free_port(), grpc_port=free_port(), data_dir=tmp_path / f"data{index}",
            runtime="process", idle_ttl=60.0, max_workers=64, run_dir_override=Path(run_dir),
            log_level="INFO",
        ).with_(**overrides)
        engine = request.getfixturevalue("engine") if settings.runtime == "docker" else None
        settings = settings.with_(worker_image=WORKER_IMAGE)
        log_dir = tmp_path / f"logs{index}"
        stack = Stack(settings, log_dir=log_dir)
        running = RunningStack(stack, log_dir, engine)
        started.append(running)
        stack.start()
        return running

    yield make
    for running in reversed(started):
        running.stack.stop()
        if running.engine is not None:  # whatever a failed test left behind
            leftovers = running.engine.containers(
                all=True, filters={"label": f"upw.data-dir={running.data_dir}"})
            for container in leftovers:
                running.engine.remove_container(container["Id"], force=True)
    for run_dir in run_dirs:
        shutil.rmtree(run_dir, ignore_errors=True)


@pytest.fixture
def own_postgres(tmp_path: Path) -> Iterator[EmbeddedPostgres]:
    """A PostgreSQL of its own (not the ETL's embedded one), so a test can stop it alone."""
    server = EmbeddedPostgres(tmp_path / "pg")
    server.start()
    yield server
    server.stop()


def amounts_in(ledger: list[tuple[int, int]]) -> list[int]:
    """The amounts a ledger of (seq, balance) rows moved, from its balance steps."""
    return [b - a for (_, a), (_, b) in itertools.pairwise(ledger)]


@pytest.fixture
def stack(make_stack: Callable[..., RunningStack]) -> RunningStack:
    return make_stack()


def summary_lines(running: RunningStack) -> list[str]:
    response = running.http.get("/account_summary")
    return response.text.splitlines() if response.status == 200 else []


@contextlib.contextmanager
def stopped(pid: int) -> Iterator[None]:
    """SIGSTOPs a process for the block, so whatever it serves hangs."""
    import signal

    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)
