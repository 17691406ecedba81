"""`python -m worker.forkserver --control-fd N --workers-dir DIR`: starts worker processes by
fork() from a process that has already imported everything a worker needs.

A new interpreter spends ~100 ms importing asyncio, grpc and protobuf before a worker can
serve; a fork of this process starts `worker.__main__.main` at once, and its children share
the imported code's pages. The process runtime (dispatcher/runtimes/forkserver.py) runs one
fork server per dispatcher.

Protocol on the control socket (fd N, a unix stream socket), one JSON object per line:
- request `{"argv": [...]}`: the arguments of `python -m worker`;
- answer `{"pid": P}` or `{"error": "..."}`, one per request, in the order of the requests;
- event `{"exit": P, "status": S}` once a worker has ended and been reaped, S as
  `subprocess.Popen.returncode` (negative: killed by that signal). Never before P's answer.
At the end of the control socket (the dispatcher has gone) the fork server exits; its workers
go on in sessions of their own, as the workers of a crashed dispatcher always have, and the
next dispatcher finds them by their pid files. `--workers-dir` is not used here: it is in the
command line, which every worker inherits, so the runtime can tell its workers from a process
that took over a pid.

Fork safety: this process only imports. It creates no thread, event loop or gRPC object, so
every child starts from the state of a fresh interpreter after its imports.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import socket
import sys
import traceback
from collections.abc import Sequence
from typing import Any, NoReturn

# Everything a worker imports, imported once here (the reason this process exists).
from worker.__main__ import EXIT_FAILED
from worker.__main__ import main as worker_main


class ForkServer:
    def __init__(self, control: socket.socket) -> None:
        self._control = control
        self._buffer = b""
        # SIGCHLD only wakes the select loop; exits are collected with waitpid.
        self._wakeup_r, self._wakeup_w = os.pipe()
        os.set_blocking(self._wakeup_r, False)
        os.set_blocking(self._wakeup_w, False)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)
        signal.set_wakeup_fd(self._wakeup_w)

    def serve(self) -> None:
        """Answers requests and reports exits until the control socket ends."""
        while True:
            ready, _, _ = select.select([self._control.fileno(), self._wakeup_r], [], [])
            if self._wakeup_r in ready:
                while _read_some(self._wakeup_r):
                    pass
            self._report_exits()
            if self._control.fileno() in ready:
                data = self._control.recv(65536)
                if not data:
                    return
                self._buffer += data
                while b"\n" in self._buffer:
                    line, self._buffer = self._buffer.split(b"\n", 1)
                    self._send(self._answer(line))

    def _answer(self, line: bytes) -> dict[str, Any]:
        try:
            argv = json.loads(line)["argv"]
            if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
                raise ValueError("argv must be a list of strings")
        except (ValueError, KeyError, TypeError) as exc:
            return {"error": f"bad request {line[:200]!r}: {exc}"}
        try:
            pid = os.fork()
        except OSError as exc:
            return {"error": f"fork failed: {exc}"}
        if pid == 0:
            self._become_worker(argv)
        return {"pid": pid}

    def _become_worker(self, argv: Sequence[str]) -> NoReturn:
        """Runs in the child: drops the fork server's descriptors and signal handling, and
        runs the worker in a session of its own (a Ctrl-C meant for the dispatcher must not
        reach it before the dispatcher stops it in order)."""
        code = EXIT_FAILED
        try:
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            self._control.close()
            os.close(self._wakeup_r)
            os.close(self._wakeup_w)
            os.setsid()
            code = worker_main(argv)
        except SystemExit as exc:  # argparse's usage errors
            code = exc.code if isinstance(exc.code, int) else EXIT_FAILED
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

    def _report_exits(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self._send({"exit": pid, "status": os.waitstatus_to_exitcode(status)})

    def _send(self, message: dict[str, Any]) -> None:
        self._control.sendall(json.dumps(message).encode() + b"\n")


def _read_some(fd: int) -> bool:
    try:
        return bool(os.read(fd, 512))
    except BlockingIOError:
        return False


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m worker.forkserver", description=__doc__)
    p.add_argument("--control-fd", type=int, required=True)
    p.add_argument("--workers-dir", required=True)
    args = p.parse_args(argv)
    control = socket.socket(fileno=args.control_fd)
    try:
        ForkServer(control).serve()
    except (BrokenPipeError, ConnectionResetError):
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
