"""The dispatcher's end of `python -m worker.forkserver` (see worker/forkserver.py): one fork
server per process runtime, started with the first worker and again after it ended.

A worker it forks is a child of the fork server, not of the dispatcher, so `ForkedProcess`
learns the worker's exit from the fork server's `exit` events. If the fork server itself ends
(killed by an operator), its workers go on as orphans: `ForkedProcess` then watches /proc for
their end, and their exit status is unknown.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import signal
import socket
from pathlib import Path
from typing import Any

from dispatcher.errors import WorkerUnavailable

log = logging.getLogger(__name__)

# How long a fork may take before the fork server counts as stuck.
SPAWN_TIMEOUT = 10.0
ORPHAN_POLL = 0.05


class ForkedProcess:
    """A worker forked by the fork server, with the part of `asyncio.subprocess.Process` that
    the runtime uses."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None  # as Popen's; stays None for an orphan (unknown)
        self._ended = False
        self._orphaned = False
        self._changed = asyncio.Event()

    @property
    def ended(self) -> bool:
        if not self._ended and self._orphaned and not is_alive(self.pid):
            self._ended = True
        return self._ended

    def send_signal(self, signum: int) -> None:
        # Never once it ended: the pid may belong to another process by then.
        if not self.ended:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    async def wait(self) -> int | None:
        """Waits for the end; returns the exit status (None for an orphan: unknown)."""
        while not self.ended:
            if self._orphaned:
                await asyncio.sleep(ORPHAN_POLL)
            else:
                await self._changed.wait()
        return self.returncode

    def _exited(self, code: int) -> None:
        self.returncode = code
        self._ended = True
        self._changed.set()

    def _orphan(self) -> None:
        self._orphaned = True
        self._changed.set()  # waiters move to polling /proc


class ForkServerClient:
    """Starts workers through one fork server, started on first use and again after it
    ended. Forks are answered in order; `_read` routes answers and exit events."""

    def __init__(self, *, python: str, workers_dir: Path) -> None:
        self._python = python
        self._workers_dir = workers_dir
        self._lock = asyncio.Lock()
        self._process: asyncio.subprocess.Process | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._answers: collections.deque[asyncio.Future[dict[str, Any]]] = collections.deque()
        self._children: dict[int, ForkedProcess] = {}

    def command(self, control_fd: int) -> list[str]:
        return [self._python, "-m", "worker.forkserver", "--control-fd", str(control_fd),
                "--workers-dir", str(self._workers_dir)]

    async def spawn(self, argv: list[str]) -> ForkedProcess:
        """Forks a worker running `python -m worker <argv>`. WorkerUnavailable when the fork
        server cannot start or answer."""
        async with self._lock:
            writer = await self._started()
            answer: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
            self._answers.append(answer)
            writer.write(json.dumps({"argv": argv}).encode() + b"\n")
        try:
            reply = await asyncio.wait_for(answer, SPAWN_TIMEOUT)
        except TimeoutError:
            raise WorkerUnavailable(
                f"the worker fork server did not answer within {SPAWN_TIMEOUT:g} s") from None
        if "error" in reply:
            raise WorkerUnavailable(f"the worker fork server could not fork: {reply['error']}")
        return self._children[int(reply["pid"])]

    async def _started(self) -> asyncio.StreamWriter:
        if self._writer is not None and self._reader_task is not None \
                and not self._reader_task.done():
            return self._writer
        ours, theirs = socket.socketpair()
        try:
            # A session of its own: a Ctrl-C meant for the dispatcher must not reach it.
            self._process = await asyncio.create_subprocess_exec(
                *self.command(theirs.fileno()), pass_fds=(theirs.fileno(),),
                stdin=asyncio.subprocess.DEVNULL, start_new_session=True)
        except OSError as exc:
            ours.close()
            raise WorkerUnavailable(f"could not start the worker fork server: {exc}") from exc
        finally:
            theirs.close()
        reader, self._writer = await asyncio.open_unix_connection(sock=ours)
        self._reader_task = asyncio.create_task(self._read(reader), name="upw-forkserver")
        log.info("worker fork server started (pid %d)", self._process.pid)
        return self._writer

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while line := await reader.readline():
                message = json.loads(line)
                if "exit" in message:
                    child = self._children.pop(int(message["exit"]), None)
                    if child is not None:
                        child._exited(int(message["status"]))
                    continue
                answer = self._answers.popleft() if self._answers else None
                if answer is not None and not answer.done():
                    if "pid" in message:
                        self._children[int(message["pid"])] = ForkedProcess(int(message["pid"]))
                    answer.set_result(message)
                elif "pid" in message:
                    # Forked after its caller gave up waiting: nobody would manage it.
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(message["pid"]), signal.SIGTERM)
        except (OSError, ValueError) as exc:
            log.error("reading from the worker fork server failed: %s", exc)
        finally:
            await self._gone()

    async def _gone(self) -> None:
        """The fork server is gone: pending forks fail, its workers become orphans."""
        process, self._process = self._process, None
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
        status = None
        if process is not None:
            # Also when reading failed and the fork server still runs: it is of no more use.
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            status = await process.wait()
        if self._children or self._answers:
            log.error("the worker fork server ended (status %s); %d workers go on without it",
                      status, len(self._children))
        while self._answers:
            answer = self._answers.popleft()
            if not answer.done():
                answer.set_exception(WorkerUnavailable("the worker fork server ended"))
        for child in self._children.values():
            child._orphan()
        self._children.clear()

    async def close(self) -> None:
        """Ends the fork server (its workers go on; the runtime stops them first)."""
        if self._writer is not None:
            self._writer.close()
        if self._reader_task is not None:
            with contextlib.suppress(Exception):
                await self._reader_task


def is_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except (OSError, IndexError):
        return False
