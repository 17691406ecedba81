"""The whole product as child processes, started in dependency order and stopped in reverse.

`make run` uses it in the foreground; the integration tests use it to run several real stacks
side by side and to stop, kill and restart single components. Every component gets its
settings through the UPW_* environment (`conventions.config.to_env`).
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conventions.config import Settings, to_env
from launcher import envoy_config

log = logging.getLogger(__name__)



class StartError(RuntimeError):
    """A component exited or did not become ready in time."""


def grpc_serving(target: str, timeout: float = 0.5) -> bool:
    """True when the gRPC server at `target` answers its health check with SERVING."""
    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def http_ok(port: int, path: str, timeout: float = 1.0) -> bool:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", path)
        return connection.getresponse().status == 200
    except OSError:
        return False
    finally:
        connection.close()


class Component:
    """One child process and the check that says it is ready."""

    def __init__(
        self, name: str, argv: list[str], env: dict[str, str], ready: Callable[[], bool],
        *, log_file: Path | None, stop_timeout: float,
    ) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.ready = ready
        self.log_file = log_file
        self.stop_timeout = stop_timeout
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, ready_timeout: float = 60.0) -> None:
        if self.running:
            raise StartError(f"{self.name} is already running")
        if self.log_file is not None:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            self._log = self.log_file.open("ab")
        self.process = subprocess.Popen(
            self.argv, env=self.env, stdout=self._log, stderr=self._log,
            # No preexec_fn: forking a process that runs gRPC threads can deadlock the child.
            start_new_session=True,
        )
        deadline = time.monotonic() + ready_timeout
        delay = 0.01
        while not self.ready():
            if self.process.poll() is not None:
                raise StartError(f"{self.name} exited with status {self.process.returncode} "
                                 f"before it was ready{self._log_hint()}")
            if time.monotonic() > deadline:
                self.stop()
                raise StartError(f"{self.name} was not ready within {ready_timeout:g}s"
                                 f"{self._log_hint()}")
            time.sleep(delay)
            delay = min(delay * 1.5, 0.2)
        log.info("%s ready (pid %d)", self.name, self.process.pid)

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        """Signals the process and waits for it; SIGKILL after stop_timeout. Returns the exit
        status (None when it was not running)."""
        if self.process is None:
            return None
        process, self.process = self.process, None
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(sig)
            try:
                process.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %gs; killing it", self.name, self.stop_timeout)
                process.kill()
                process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        return process.returncode

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def _log_hint(self) -> str:
        if self.log_file is None or not self.log_file.exists():
            return ""
        tail = self.log_file.read_bytes()[-3000:].decode(errors="replace")
        return f"; the end of {self.log_file}:\n{tail}"


class Stack:
    """ETL, dispatcher and Envoy for one Settings. With `log_dir`, each component logs to
    `<log_dir>/<name>.log`; otherwise to the launcher's own stderr."""

    def __init__(self, settings: Settings, *, log_dir: Path | None = None,
                 extra_env: dict[str, str] | None = None) -> None:
        self.settings = settings
        env = {**os.environ, **to_env(settings), "PYTHONUNBUFFERED": "1", **(extra_env or {})}
        python = sys.executable
        settings.run_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
        config_path = settings.run_dir / "envoy.yaml"
        config_path.write_text(envoy_config.render(settings))

        def logs(name: str) -> Path | None:
            return None if log_dir is None else log_dir / f"{name}.log"

        self.etl = Component(
            "etl", [python, "-m", "etl"], env,
            lambda: settings.etl_socket.exists() and grpc_serving(f"unix:{settings.etl_socket}"),
            log_file=logs("etl"), stop_timeout=20.0)
        self.dispatcher = Component(
            "dispatcher", [python, "-m", "dispatcher"], env,
            lambda: grpc_serving(f"127.0.0.1:{settings.grpc_port}"),
            log_file=logs("dispatcher"), stop_timeout=30.0)
        self.envoy = Component(
            "envoy", envoy_config.envoy_command(config_path, settings), env,
            lambda: http_ok(settings.http_port, "/account_summary"),
            log_file=logs("envoy"), stop_timeout=10.0)

    @property
    def components(self) -> list[Component]:
        return [self.etl, self.dispatcher, self.envoy]

    def start(self) -> None:
        try:
            for component in self.components:
                component.start()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for component in reversed(self.components):
            component.stop()
