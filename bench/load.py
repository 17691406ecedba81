"""The load generator: wrk (C, from Debian's `wrk` package) driven by `scripts/accounts.lua`.

`drive()` runs wrk once and returns what it measured together with wrk's own CPU time, read
from the kernel when wrk is reaped (`os.wait4`), so a report can show that the load generator
was not the bottleneck. Every answer other than 200 is an error, as is every socket error or
timeout; none of them is hidden.

`create_users()` prepares the accounts a run spreads its load over, with plain HTTP requests.
"""

from __future__ import annotations

import http.client
import itertools
import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from bench.model import Distribution, Section, ms

log = logging.getLogger("bench.load")

SCRIPT = Path(__file__).with_name("scripts") / "accounts.lua"
MARKER = "BENCH-JSON "
# A request slower than this is a timeout error; one container per request can take seconds.
TIMEOUT = "30s"


# The table of every throughput case (`LoadResult.row`).
COLUMNS = ["case", "clients", "requests/s", "p50 (ms)", "p90 (ms)", "p99 (ms)", "max (ms)",
           "errors", "wrk CPU %"]


class LoadError(RuntimeError):
    """wrk is missing, failed, or printed no result."""


@dataclass(frozen=True)
class LoadResult:
    """One wrk run. Latencies are milliseconds; `percentiles` are (percentile, ms) points."""

    requests: int
    duration_s: float
    non200: int
    socket_errors: int
    statuses: dict[str, int]
    first_error: str
    max_ms: float
    percentiles: list[tuple[float, float]]
    # wrk's user + system CPU time over the wall time; 100 = one core busy.
    cpu_percent: float
    connections: int
    threads: int

    @property
    def errors(self) -> int:
        return self.non200 + self.socket_errors

    @property
    def rate(self) -> float:
        """Answers per second, errors included (the error column says how many)."""
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0

    def percentile(self, p: float) -> float:
        """The latency at percentile `p`, linearly interpolated between wrk's points."""
        points = self.percentiles
        if not points:
            return float("nan")
        if p <= points[0][0]:
            return points[0][1]
        for (p0, v0), (p1, v1) in itertools.pairwise(points):
            if p0 <= p <= p1:
                return v0 if p1 == p0 else v0 + (v1 - v0) * (p - p0) / (p1 - p0)
        return points[-1][1]

    def row(self, case: str) -> list[str]:
        """The cells of `COLUMNS` for this run."""
        if not self.requests:
            return [case, str(self.connections), "0", "-", "-", "-", "-",
                    self.describe_errors(), f"{self.cpu_percent:.0f}"]
        return [
            case, str(self.connections), f"{self.rate:,.0f}" if self.rate >= 100
            else f"{self.rate:.1f}",
            *(ms(self.percentile(p)) for p in (50, 90, 99)), ms(self.max_ms),
            self.describe_errors(), f"{self.cpu_percent:.0f}",
        ]

    def add_to(self, section: Section, case: str) -> None:
        """Adds this run to `section`: its table row, its distribution (labelled with the
        case and the clients) and any problems as notes."""
        section.rows.append(self.row(case))
        clients = f"{self.connections} client" + "s" * (self.connections != 1)
        section.distributions.append(self.distribution(f"{case}, {clients}"))
        section.notes.extend(self.problems(case))

    def distribution(self, label: str) -> Distribution:
        return Distribution(label, list(self.percentiles) if self.requests else [])

    def problems(self, case: str) -> list[str]:
        """Notes for a report about what went wrong in this run, if anything."""
        found = []
        if not self.requests:
            found.append(f"{case}, {self.connections} clients: no answer at all within the "
                         f"{self.duration_s:.0f} s (wrk drops requests still in flight when "
                         "it stops).")
        if self.errors:
            found.append(f"{case}, {self.connections} clients: {self.errors} errors, the "
                         f"first: {self.first_error.strip()[:200]!r}")
        return found

    def describe_errors(self) -> str:
        """One short phrase: `0`, or the count with what the errors were."""
        if not self.errors:
            return "0"
        parts = [f"{count} x {status}" for status, count in sorted(self.statuses.items())]
        if self.socket_errors:
            parts.append(f"{self.socket_errors} socket")
        return f"**{self.errors}** ({', '.join(parts)})"


def wrk_binary() -> str:
    found = shutil.which("wrk")
    if found is None:
        raise LoadError("wrk is not installed; `apt-get install -y wrk` (make bench does it)")
    return found


def wrk_version() -> str:
    try:
        done = subprocess.run([wrk_binary(), "-v"], capture_output=True, text=True, timeout=10)
    except (LoadError, OSError, subprocess.SubprocessError) as exc:
        return f"unknown ({exc})"
    # wrk prints its version line, then its usage, and exits 1.
    text = (done.stdout or done.stderr).strip()
    # "wrk debian/4.1.0-3+b2 [epoll] Copyright (C) 2012 Will Glozer"
    return text.splitlines()[0].split(" Copyright")[0].strip() if text else "unknown"


def drive(
    base_url: str,
    *,
    connections: int,
    duration: float,
    users: int,
    prefix: str,
    deposit_percent: int = 50,
    threads: int = 1,
) -> LoadResult:
    """Runs wrk against `base_url` with `connections` keep-alive connections for `duration`
    seconds, spreading requests over `users` users named PREFIX0001..; returns its result.

    One wrk thread drives 64 connections at tens of thousands of requests a second, and on a
    small machine every core wrk does not take serves the stack, so one thread is the default.
    """
    threads = max(1, min(threads, connections))
    seconds = max(1, round(duration))
    argv = [
        wrk_binary(), "--threads", str(threads), "--connections", str(connections),
        "--duration", f"{seconds}s", "--timeout", TIMEOUT, "--script", str(SCRIPT),
        base_url, "--", str(users), prefix, str(deposit_percent),
    ]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.monotonic()
        process = subprocess.Popen(argv, stdout=out, stderr=err)
        try:
            # wait4 reaps wrk and returns the CPU time of exactly that process.
            _, status, usage = os.wait4(process.pid, 0)
        except BaseException:
            process.kill()
            process.wait()
            raise
        wall = time.monotonic() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode(errors="replace")
        stderr = err.read().decode(errors="replace")
    if process.returncode != 0:
        raise LoadError(f"wrk exited with status {process.returncode}: {stderr.strip()}")
    line = next((x for x in stdout.splitlines() if x.startswith(MARKER)), None)
    if line is None:
        raise LoadError(f"wrk printed no {MARKER.strip()} line:\n{stdout}\n{stderr}")
    raw = json.loads(line.removeprefix(MARKER))
    result = LoadResult(
        requests=int(raw["requests"]),
        duration_s=raw["duration_us"] / 1e6,
        non200=int(raw["non200"]),
        socket_errors=sum(int(raw[k]) for k in
                          ("connect_errors", "read_errors", "write_errors", "timeouts")),
        statuses={str(k): int(v) for k, v in raw["statuses"].items()},
        first_error=str(raw["first_error"]),
        max_ms=raw["latency_max_us"] / 1000,
        percentiles=[(float(p), us / 1000) for p, us in raw["percentiles_us"]],
        cpu_percent=100 * (usage.ru_utime + usage.ru_stime) / wall,
        connections=connections,
        threads=threads,
    )
    log.info("wrk %s, %d connections, %ds: %.0f requests/s, p50 %.2f ms, p99 %.2f ms, "
             "%d errors, wrk CPU %.0f%%", base_url, connections, seconds, result.rate,
             result.percentile(50), result.percentile(99), result.errors, result.cpu_percent)
    return result


def request(port: int, method: str, path: str, body: bytes | None = None, *,
            timeout: float = 60.0) -> tuple[int, bytes]:
    """One request on 127.0.0.1:`port` (a JSON body when given): (status, body)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, path, body=body,
                           headers={"content-type": "application/json"} if body else {})
        reply = connection.getresponse()
        return reply.status, reply.read()
    finally:
        connection.close()


def user_names(prefix: str, count: int) -> list[str]:
    """The names the Lua script uses: PREFIX0001 .. PREFIX<count>."""
    return [f"{prefix}{i:04d}" for i in range(1, count + 1)]


def create_users(port: int, names: list[str], *, concurrency: int = 8,
                 warm: bool = False) -> float:
    """Creates each account with `GET /<user>/create` (and, when `warm`, one `show` after it,
    so its worker is running); returns the seconds it took. Raises LoadError on any answer
    other than 200."""
    started = time.monotonic()

    def prepare(user: str) -> None:
        for path in [f"/{user}/create"] + ([f"/{user}/show"] if warm else []):
            status, body = request(port, "GET", path)
            if status != 200:
                raise LoadError(f"GET {path} answered {status}: {body.strip()[:300]!r}")

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        for _ in pool.map(prepare, names):
            pass
    took = time.monotonic() - started
    log.info("created %d users in %.1fs", len(names), took)
    return took
