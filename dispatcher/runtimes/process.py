"""Workers as local child processes: the embedded default where no Docker engine answers.

Each worker is `python -m worker` with the same arguments a container gets. A pid file per
worker (`<workers dir>/<user>.pid`) lets the next dispatcher run find and stop workers that a
crashed run left behind; the process's command line is checked before it is signalled, so a
reused pid is never killed by mistake.
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

log = logging.getLogger(__name__)


@dataclass
class ProcessWorker:
    user: str
    socket: Path
    process: asyncio.subprocess.Process
    phases: dict[str, float] = field(default_factory=dict)

    def describe(self) -> str:
        return f"pid {self.process.pid}"

    def exit_status(self) -> str | None:
        code = self.process.returncode
        if code is None:
            return None
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
        self._python = python

    def _socket(self, user: str) -> Path:
        return self._workers_dir / f"{validate_user(user)}.sock"

    def _pid_file(self, user: str) -> Path:
        return self._workers_dir / f"{validate_user(user)}.pid"

    async def start(self, user: str) -> ProcessWorker:
        socket = self._socket(user)
        self._workers_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        socket.unlink(missing_ok=True)
        argv = [
            self._python,
            "-m",
            "worker",
            "--user",
            user,
            "--data-dir",
            str(self._data_dir),
            "--listen",
            str(socket),
            "--etl-socket",
            str(self._etl_socket),
            "--log-level",
            self._log_level,
        ]
        begun = time.monotonic()
        try:
            # A session of its own: a Ctrl-C meant for the dispatcher must not reach workers
            # before the dispatcher has stopped them in order.
            process = await asyncio.create_subprocess_exec(*argv, start_new_session=True)
        except OSError as exc:
            raise WorkerUnavailable(
                f"could not start the worker process of {user!r}: {exc}"
            ) from exc
        spawned = time.monotonic()
        self._pid_file(user).write_text(f"{process.pid}\n")
        return ProcessWorker(user=user, socket=socket, process=process,
                             phases={"spawn": spawned - begun})

    async def stop(self, worker: RunningWorker) -> None:
        assert isinstance(worker, ProcessWorker), worker
        process = worker.process
        if process.returncode is None:
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
        if not self._workers_dir.is_dir():
            return 0
        leftovers = []
        for pid_file in sorted(self._workers_dir.glob("*.pid")):
            socket = pid_file.with_suffix(".sock")
            try:
                pid = int(pid_file.read_text().strip())
            except (OSError, ValueError):
                pid = 0
            if pid and _is_worker(pid, socket):
                log.info(
                    "stopping worker pid %d left behind by an earlier run (%s)", pid, socket.name
                )
                leftovers.append(pid)
            else:
                pid_file.unlink(missing_ok=True)
                socket.unlink(missing_ok=True)
        await asyncio.gather(*(_terminate(pid, self._stop_grace) for pid in leftovers))
        for pid_file in sorted(self._workers_dir.glob("*.pid")):
            pid_file.unlink(missing_ok=True)
            pid_file.with_suffix(".sock").unlink(missing_ok=True)
        return len(leftovers)


def worker_processes(data_dir: Path, user: str | None = None) -> list[int]:
    """The live (not zombie) worker processes started for `data_dir`, or for one `user` of it,
    found by their command line in /proc. For tools and tests; the runtime trusts its pid
    files and checks each with `_is_worker`."""
    wanted = [b"worker", str(data_dir).encode()]
    if user is not None:
        wanted += [b"--user", user.encode()]
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if all(w in argv for w in wanted) and not _is_zombie(int(entry.name)):
            found.append(int(entry.name))
    return found


def _is_worker(pid: int, socket: Path) -> bool:
    """True when `pid` is a worker process serving on `socket`."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"worker" in argv and str(socket).encode() in argv


async def _terminate(pid: int, grace: float) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = asyncio.get_running_loop().time() + grace
    while asyncio.get_running_loop().time() < deadline:
        if not Path(f"/proc/{pid}").exists() or _is_zombie(pid):
            return
        await asyncio.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except (OSError, IndexError):
        return True
