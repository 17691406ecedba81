"""Scenario 3, the original model as the baseline: each request runs the worker with the
`docker run --rm` CLI (`python -m worker.oneshot`, the same `Store` and the same image as the
product's workers) and answers what it printed once it has exited.

`BaselineServer` is that model's web server: a small threaded HTTP server on 127.0.0.1 with
the original text routes. It is driven by the same wrk script, at the same concurrency, as
scenario 2.

The engine's floor is measured beside it: the same `docker run --rm`, flags and image, of a
container that only runs `true`, at the same concurrency for the same time. No design that
starts one container per request can answer faster than that on this engine.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from bench import load
from bench.model import Distribution, Profile, Section, latency_cells, points
from bench.stackrun import WORKER_IMAGE, docker_available, seed_accounts
from conventions.config import Settings
from conventions.users import InvalidUserName, shard_of, user_dir, validate_user
from dispatcher.runtimes.docker import DATA_MOUNT, TMPFS, container_owner

log = logging.getLogger("bench.docker_run")

USERS = 64
PREFIX = "orig"
CLIENTS = (4, 16)
MIN_DURATION = 20.0  # as in scenario 2
ROUTE = re.compile(r"/([^/]+)/(create|show|deposit/([0-9]{1,18}))")
LABEL = "upw.bench.docker-run"
RUN_TIMEOUT = 120.0
FLOOR_CASE = "docker run --rm of `true` (no Python, the engine's floor)"


class Baseline:
    """Answers one text route by running one container with the docker CLI."""

    def __init__(self, data_dir: Path, *, image: str = WORKER_IMAGE) -> None:
        self.data_dir = data_dir
        self.image = image
        defaults = Settings()
        self._memory = defaults.worker_memory
        self._pids = defaults.worker_pids
        self.owner = container_owner()
        self._in_flight = 0
        self._lock = threading.Lock()

    def wait_idle(self, timeout: float = 120.0) -> None:
        """Waits until no request is being answered (wrk drops requests in flight when it
        stops, but their containers run to the end)."""
        deadline = time.monotonic() + timeout
        while self._in_flight and time.monotonic() < deadline:
            time.sleep(0.2)

    def _docker_run(self) -> list[str]:
        """`docker run --rm` with the docker runtime's hardening, up to the volume and the
        entrypoint: shared by the baseline and its floor, so they differ only in what runs."""
        return [
            "docker", "run", "--rm", "--label", f"{LABEL}={self.data_dir}",
            "--network", "none", "--read-only", "--tmpfs", f"/tmp:{TMPFS}",
            "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
            "--user", f"{self.owner[0]}:{self.owner[1]}",
            "--memory", self._memory, "--memory-swap", self._memory,
            "--pids-limit", str(self._pids),
        ]

    def command(self, user: str, operation: list[str]) -> list[str]:
        inner = DATA_MOUNT / "users" / shard_of(user) / user
        return [
            *self._docker_run(),
            "--volume", f"{user_dir(self.data_dir, user)}:{inner}:rw",
            "--entrypoint", "/opt/upw/bin/python", self.image,
            "-P", "-m", "worker.oneshot", "--user", user, "--data-dir", str(DATA_MOUNT),
            *operation,
        ]

    def floor_command(self) -> list[str]:
        """The same container running the image's `true` instead of Python, without the
        user's volume (it serves no user)."""
        return [*self._docker_run(), "--entrypoint", "true", self.image]

    def answer(self, path: str) -> tuple[int, bytes]:
        """(HTTP status, body) of one request for `path`."""
        with self._lock:
            self._in_flight += 1
        try:
            return self._answer(path)
        finally:
            with self._lock:
                self._in_flight -= 1

    def _answer(self, path: str) -> tuple[int, bytes]:
        match = ROUTE.fullmatch(path)
        if match is None:
            return 404, b"not found\n"
        try:
            user = validate_user(match[1])
        except InvalidUserName as exc:
            return 400, f"{exc}\n".encode()
        operation = ["deposit", match[3]] if match[3] else [match[2]]
        directory = user_dir(self.data_dir, user)
        # Without it the engine would create the bind source itself, owned by root.
        if not directory.is_dir():
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chown(directory, *self.owner)
        try:
            done = subprocess.run(self.command(user, operation), capture_output=True,
                                  timeout=RUN_TIMEOUT, check=False)
        except subprocess.TimeoutExpired:
            return 504, f"docker run took longer than {RUN_TIMEOUT:g}s\n".encode()
        if done.returncode == 0:
            return 200, done.stdout
        status = 400 if done.returncode in (1, 2) else 500
        return status, done.stderr or f"docker run exited with {done.returncode}\n".encode()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as wrk expects
    baseline: Baseline

    def do_GET(self) -> None:
        status, body = self.baseline.answer(self.path)
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # wrk stopped and closed its connections

    def log_message(self, format: str, *args: object) -> None:
        pass  # one line per request would cost more than it tells


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        # wrk closes its connections when it stops; anything else is worth a traceback.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)  # type: ignore[arg-type]


@contextmanager
def baseline_server(baseline: Baseline) -> Iterator[int]:
    """Serves `baseline` on 127.0.0.1, one thread per connection; yields the port."""
    handler = type("Handler", (_Handler,), {"baseline": baseline})
    server = _Server(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, name="bench-docker-run",
                              daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@dataclass(frozen=True)
class Loop:
    """`clients` threads running one command, each call after the previous one ended."""

    clients: int
    wall_s: float  # from the first call to the end of the last
    latencies: list[float]  # ms of every call, failed ones too (as wrk counts errors)
    errors: int
    first_error: str

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.wall_s if self.wall_s > 0 else 0.0

    def add_to(self, section: Section, case: str) -> None:
        """Adds this loop to `section` as wrk's runs are added (`LoadResult.add_to`): a row of
        `load.COLUMNS` (no wrk, so no wrk CPU), its distribution, and its errors as a note."""
        errors = f"**{self.errors}**" if self.errors else "0"
        section.rows.append([case, str(self.clients), f"{self.rate:.1f}",
                             *latency_cells(self.latencies), errors, "-"])
        section.distributions.append(
            Distribution(f"{case}, {self.clients} clients", points(self.latencies)))
        if self.errors:
            section.notes.append(f"{case}, {self.clients} clients: {self.errors} errors, the "
                                 f"first: {self.first_error.strip()[:200]!r}")


def loop(command: list[str], *, clients: int, duration: float) -> Loop:
    """Runs `command` in `clients` threads, one call after the other, until `duration` seconds
    have passed. Every call started is waited for and counted, over the wall time until the
    last one ended, so nothing is dropped at the end (wrk drops the requests in flight)."""
    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()
    begun = time.monotonic()
    deadline = begun + duration

    def client() -> None:
        while time.monotonic() < deadline:
            called = time.perf_counter()
            try:
                done = subprocess.run(command, capture_output=True, timeout=RUN_TIMEOUT,
                                      check=False)
            except subprocess.TimeoutExpired:
                failure = f"docker run took longer than {RUN_TIMEOUT:g}s"
            else:
                failure = (f"exit status {done.returncode}: "
                           f"{done.stderr.decode(errors='replace')}" if done.returncode else "")
            took = (time.perf_counter() - called) * 1000
            with lock:
                latencies.append(took)
                if failure:
                    failures.append(failure)

    threads = [threading.Thread(target=client, name=f"bench-floor-{i}")
               for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return Loop(clients=clients, wall_s=time.monotonic() - begun, latencies=latencies,
                errors=len(failures), first_error=failures[0] if failures else "")


def _remove_leftovers(data_dir: Path) -> None:
    found = subprocess.run(
        ["docker", "ps", "-aq", "--filter", f"label={LABEL}={data_dir}"],
        capture_output=True, text=True, check=False).stdout.split()
    if found:
        subprocess.run(["docker", "rm", "-f", *found], capture_output=True, check=False)


def run(profile: Profile) -> Section:
    section = Section(
        title="3. Baseline: `docker run` per request",
        columns=load.COLUMNS,
        notes=[
            "The original model: a threaded HTTP server runs `docker run --rm` of the worker "
            "image (`python -m worker.oneshot`, the same `Store`) per request and answers "
            "its output after the container exited. Same hardening as the docker runtime "
            "(no network, read-only root, no capabilities, uid 10001, memory and pid "
            f"limits). {USERS} users, their accounts created in their databases before "
            "measuring; the same wrk script, "
            "deposits and shows half and half.",
            "It favours the baseline slightly: no Envoy hop, and nothing is shipped to the "
            "ETL (scenario 2's workers ship each deposit before they stop).",
            f"{FLOOR_CASE}: the baseline's `docker run --rm`, hardening flags and image, but "
            "`--entrypoint true` and no volume (it serves no user), measured right after "
            "the baseline at the same concurrency for the same time: each client is a thread "
            "running the docker CLI one call after the other; requests/s counts every call, "
            "over the wall time until the last one ended. Not wrk, so no wrk CPU.",
        ],
    )
    why = docker_available()
    if why:
        section.rows.append(["docker run: skipped", "", "", "", "", "", "", "", ""])
        section.notes.append(f"Not measured: {why}.")
        return section
    duration = max(profile.duration, MIN_DURATION)
    section.notes.append(f"{duration:g} s of load per case, which starts once no request of "
                         "the previous one is left.")
    root = Path(tempfile.mkdtemp(prefix="upw-bench-run-", dir="/tmp"))
    try:
        baseline = Baseline(root / "data")
        names = load.user_names(PREFIX, USERS)
        seed_accounts(baseline.data_dir, names, owner=baseline.owner)
        with baseline_server(baseline) as port:
            # One request first, so the image's files are in the page cache.
            load.create_users(port, names[:1])
            for clients in CLIENTS:
                url = f"http://127.0.0.1:{port}"
                baseline.wait_idle()
                result = load.drive(url, connections=clients, duration=duration,
                                    users=USERS, prefix=PREFIX)
                case = f"docker run, {USERS} users"
                result.add_to(section, case)
                section.metrics[f"requests/s docker run {clients}"] = result.rate
                baseline.wait_idle()
                floor = loop(baseline.floor_command(), clients=clients, duration=duration)
                floor.add_to(section, FLOOR_CASE)
                # Not "requests/s docker run ...": `compare` takes those for the baseline.
                section.metrics[f"requests/s engine floor {clients}"] = floor.rate
                if floor.rate > 0:
                    section.notes.append(
                        f"At {clients} clients, the `docker run` baseline: {result.rate:,.1f} "
                        f"requests/s, **{result.rate / floor.rate:,.2f} times** the engine's "
                        f"floor ({floor.rate:,.1f} containers/s of `true`).")
    finally:
        _remove_leftovers(root / "data")
        shutil.rmtree(root, ignore_errors=True)
    return section
