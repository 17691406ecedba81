"""Workers as local processes: the embedded default where no Docker engine answers.

Each worker runs `worker.__main__.main` with the same arguments a container gets, in a process
forked by the runtime's fork server (`python -m worker.forkserver`, which has the worker's
modules imported already; see dispatcher/runtimes/forkserver.py). A pid file per worker
(`<workers dir>/<user>.pid`) lets the next dispatcher run find and stop workers that a crashed
run left behind; the process's command line (the fork server's, naming the workers dir) is
checked before it is signalled, so a reused pid is never killed by mistake.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from conventions.users import validate_user
from dispatcher.errors import WorkerUnavailable
from dispatcher.runtimes.base import RunningWorker
from dispatcher.runtimes.forkserver import ForkedProcess, ForkServerClient, is_alive

log = logging.getLogger(__name__)


@dataclass
class ProcessWorker:
    user: str
    socket: Path
    process: ForkedProcess
    phases: dict[str, float] = field(default_factory=dict)

    def describe(self) -> str:
        return f"pid {self.process.pid}"

    def exit_status(self) -> str | None:
        if not self.process.ended:
            return None
        code = self.process.returncode
        if code is None:
            return f"worker process {self.process.pid} ended (status unknown: its fork server " \
                "had ended)"
        return f"worker process {self.process.pid} exited with status {code}"


class ProcessRuntime:
    name = "process"

    def __init__(
        self,
        *,
        data_dir: Path,
        workers_dir: Path,
        etl_socket: Path,
        stop_grace: float = 5.0,
        log_level: str = "INFO",
        python: str = sys.executable,
    ) -> None:
        self._data_dir = data_dir
        self._workers_dir = workers_dir
        self._etl_socket = etl_socket
        self._stop_grace = stop_grace
        self._log_level = log_level
        self._forks = ForkServerClient(python=python, workers_dir=workers_dir)

    def _socket(self, user: str) -> Path:
        return self._workers_dir / f"{validate_user(user)}.sock"

    def _pid_file(self, user: str) -> Path:
        return self._workers_dir / f"{validate_user(user)}.pid"

    async def start(self, user: str) -> ProcessWorker:
        socket = self._socket(user)
        self._workers_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        socket.unlink(missing_ok=True)
        argv = [
            "--user", user,
            "--data-dir", str(self._data_dir),
            "--listen", str(socket),
            "--etl-socket", str(self._etl_socket),
            "--log-level", self._log_level,
        ]
        begun = time.monotonic()
        try:
            process = await self._forks.spawn(argv)
        except WorkerUnavailable as exc:
            raise WorkerUnavailable(f"could not start the worker process of {user!r}: {exc}") \
                from exc
        spawned = time.monotonic()
        self._pid_file(user).write_text(f"{process.pid}\n")
        return ProcessWorker(user=user, socket=socket, process=process,
                             phases={"spawn": spawned - begun})

    async def stop(self, worker: RunningWorker) -> None:
        assert isinstance(worker, ProcessWorker), worker
        process = worker.process
        if not process.ended:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), self._stop_grace)
            except TimeoutError:
                log.warning(
                    "worker of %r (pid %d) ignored SIGTERM; killing it", worker.user, process.pid
                )
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        self._pid_file(worker.user).unlink(missing_ok=True)
        worker.socket.unlink(missing_ok=True)

    async def remove_leftovers(self) -> int:
        """Stops every leftover worker at once: each may spend its flush timeout shipping to
        the ETL, and a crashed dispatcher can leave hundreds."""
        leftovers = worker_processes(self._workers_dir)
        for pid in leftovers:
            log.info("stopping worker pid %d left behind by an earlier run", pid)
        await asyncio.gather(*(_terminate(pid, self._stop_grace) for pid in leftovers))
        for pid_file in sorted(self._workers_dir.glob("*.pid")):
            pid_file.unlink(missing_ok=True)
            pid_file.with_suffix(".sock").unlink(missing_ok=True)
        return len(leftovers)

    async def close(self) -> None:
        """Ends the fork server; the workers are left alone (the pool stops them first)."""
        await self._forks.close()


def worker_processes(workers_dir: Path, user: str | None = None) -> list[int]:
    """The live worker processes that the pid files in `workers_dir` name (all, or `user`'s),
    each checked to be a worker of that directory (a pid can be reused)."""
    pid_files = [workers_dir / f"{validate_user(user)}.pid"] if user is not None \
        else sorted(workers_dir.glob("*.pid"))
    found = []
    for pid_file in pid_files:
        try:
            pid = int(pid_file.read_text().strip())
        except (OSError, ValueError):
            continue
        if is_alive(pid) and _is_worker(pid, workers_dir):
            found.append(pid)
    return found


def _is_worker(pid: int, workers_dir: Path) -> bool:
    """True when `pid` runs the command line of the fork server of `workers_dir`, which its
    workers inherit."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"worker.forkserver" in argv and str(workers_dir).encode() in argv


async def _terminate(pid: int, grace: float) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = asyncio.get_running_loop().time() + grace
    while asyncio.get_running_loop().time() < deadline:
        if not is_alive(pid):
            return
        await asyncio.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
