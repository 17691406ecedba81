"""The process runtime's fork server: real `python -m worker.forkserver` and real worker
processes forked from it (no stack; the ETL socket is absent, which a worker tolerates)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import grpc

from dispatcher.runtimes.forkserver import ForkServerClient, is_alive
from dispatcher.runtimes.process import ProcessRuntime, worker_processes
from tests.conftest import wait_for
from upw.account.v1 import account_pb2, account_pb2_grpc


def worker_argv(tmp_path: Path, user: str) -> list[str]:
    return ["--user", user, "--data-dir", str(tmp_path / "data"),
            "--listen", str(tmp_path / "run" / f"{user}.sock"),
            "--etl-socket", str(tmp_path / "run" / "etl.sock")]


async def wait_for_socket(path: Path) -> None:
    await asyncio.to_thread(wait_for, path.exists, 20, f"{path} to appear")


def cmdline(pid: int) -> list[bytes]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")


def test_a_forked_worker_serves_and_reports_its_exit(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    forks = ForkServerClient(python=sys.executable, workers_dir=tmp_path / "run")

    async def scenario() -> None:
        worker = await forks.spawn(worker_argv(tmp_path, "fate"))
        socket = tmp_path / "run" / "fate.sock"
        await wait_for_socket(socket)
        async with grpc.aio.insecure_channel(f"unix:{socket}") as channel:
            stub = account_pb2_grpc.AccountServiceStub(channel)
            await stub.CreateAccount(account_pb2.CreateAccountRequest(user="fate"))
            change = await stub.Deposit(account_pb2.DepositRequest(user="fate", amount=7))
        assert change.account.balance == 7
        # The worker inherits the fork server's command line, which names the workers dir.
        assert b"worker.forkserver" in cmdline(worker.pid)
        assert str(tmp_path / "run").encode() in cmdline(worker.pid)
        assert os.getsid(worker.pid) == worker.pid, "a session of its own"
        assert not worker.ended
        worker.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(worker.wait(), 20) == 0
        assert worker.ended and not is_alive(worker.pid)

        # A bad command line: the worker's own usage error, reported as its exit status.
        bad = await forks.spawn(worker_argv(tmp_path, "../etc"))
        assert await asyncio.wait_for(bad.wait(), 20) == 2
        await forks.close()

    asyncio.run(scenario())
    assert (tmp_path / "data").is_dir()
    assert not (tmp_path / "run" / "fate.sock").exists(), "removed at a clean stop"


def test_workers_outlive_a_killed_fork_server_and_the_next_run_stops_them(
    tmp_path: Path,
) -> None:
    workers_dir = tmp_path / "run"

    def runtime() -> ProcessRuntime:
        return ProcessRuntime(data_dir=tmp_path / "data", workers_dir=workers_dir,
                              etl_socket=workers_dir / "etl.sock", stop_grace=10)

    async def first_run() -> None:
        first = runtime()
        worker = await first.start("signum")
        await wait_for_socket(worker.socket)
        assert worker_processes(workers_dir) == [worker.process.pid]
        fork_server = first._forks._process
        assert fork_server is not None
        fork_server.kill()  # as an operator's kill -9 would
        # The fork server's end is noticed; its worker goes on, its status unknown.
        for _ in range(200):
            if first._forks._process is None:
                break
            await asyncio.sleep(0.02)
        assert first._forks._process is None
        assert is_alive(worker.process.pid) and worker.exit_status() is None
        # The runtime still starts workers (a new fork server) ...
        other = await first.start("lightning")
        await wait_for_socket(other.socket)
        # ... and stops the orphan: its end is seen through /proc.
        await first.stop(worker)
        assert worker.process.ended and not is_alive(worker.process.pid)
        assert "status unknown" in (worker.exit_status() or "")
        # A crash of the whole dispatcher: its fork server ends with it, the worker stays.
        await first.close()
        assert is_alive(other.process.pid)

    async def next_run() -> int:
        second = runtime()
        try:
            return await second.remove_leftovers()
        finally:
            await second.close()

    asyncio.run(first_run())
    [leftover] = worker_processes(workers_dir, "lightning")
    assert asyncio.run(next_run()) == 1
    assert not is_alive(leftover)
    assert worker_processes(workers_dir) == []
    assert list(workers_dir.glob("*.pid")) == []
