"""Scenario 4, cold activation: from a request for a new user to its answer, and where the time
goes; and how many new users per second one engine takes.

For each runtime, a real stack (`bench.stackrun`) answers `GET /<new user>/create` through
Envoy, one new user at a time (after one unmeasured warm-up), then a burst of as many new users
at once. Workers stay running (a long idle TTL, a cap above the count), so no worker's stop
overlaps a measurement.

Each activation is split with the product's own log lines, so the split needs no hooks:
- the dispatcher's `worker of 'x' ready (...) in N ms (queued a, create b, start c, until
  serving d)` (`dispatcher/pool.py`): the runtime's steps, measured around each call;
- the worker's `worker process N running main()` (`worker/__main__.py`) and `serving on`
  (`worker/server.py`) lines, whose log timestamps (1 ms resolution) place the interpreter's
  start-up and the socket's readiness between the launch and the dispatcher's health check.

Phases (ms), in order: queued (waiting for a thread of the dispatcher's executor), create and
start (the Docker API calls) or spawn (the fork server's answer to a fork request), interpreter
(launch returned to main() running: in a container, Python start-up and imports; for a process,
only what a fork of the pre-imported fork server takes), socket (main() to the worker's server
bound and SERVING: opening the database, building the server), health (the worker serving to the
dispatcher's health check seeing it: socket polling and the first connection), first call (the
dispatcher's `ready` line to the client's answer: the CreateAccount call itself, creating the
database, and the way back through Envoy).

The engine's floor bounds the docker runtime's activation from below: the same Docker SDK
calls, host config and user as the runtime's, of a container that only runs `true`, one at a
time, split into create, start, wait (until it exited) and remove.
"""

from __future__ import annotations

import calendar
import http.client
import itertools
import logging
import re
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from docker.api import APIClient
from docker.utils import kwargs_from_env

from bench.model import Distribution, Profile, Section, latency_cells, points, quantile
from bench.stackrun import WORKER_IMAGE, BenchStack, bench_stack, docker_available
from conventions.config import Settings
from dispatcher.runtimes.docker import DATA_MOUNT, DockerRuntime, container_owner

log = logging.getLogger("bench.cold")

# The pause after each measured activation, so its worker's first shipment to the ETL is done.
SETTLE = 0.15
ASCTIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")
READY = re.compile(
    r"^(?P<at>\S+ \S+) INFO dispatcher dispatcher\.pool: worker of '(?P<user>[^']+)' ready "
    r"\((?P<what>[^,]+), (?P<runtime>\w+) runtime\) in (?P<total>\d+) ms \((?P<steps>[^)]*)\)",
    re.MULTILINE,
)
MAIN = re.compile(r"worker: user '(?P<user>[^']+)': worker process \d+ running main\(\)")
SERVING = re.compile(r"worker\.server: user '(?P<user>[^']+)': serving on ")


# ---- numbers ---------------------------------------------------------------------------------

def spread(label: str, values: Sequence[float]) -> list[str]:
    """`label`, count, p50, p90, p99 and max of `values` (ms) as table cells."""
    return [label, str(len(values)), *latency_cells(values)]


# ---- one activation ---------------------------------------------------------------------------

@dataclass
class Activation:
    user: str
    total_ms: float  # as the client saw it
    status: int
    steps: dict[str, float] = field(default_factory=dict)  # the dispatcher's line
    phases: dict[str, float] = field(default_factory=dict)  # the whole split


def create(port: int, user: str, timeout: float = 60.0) -> tuple[int, float]:
    """`GET /<user>/create` through Envoy: (status, milliseconds)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.connect()  # the TCP handshake is not part of the activation
        began = time.perf_counter()
        connection.request("GET", f"/{user}/create")
        reply = connection.getresponse()
        reply.read()
        return reply.status, (time.perf_counter() - began) * 1000
    except OSError:
        return 0, float("nan")
    finally:
        connection.close()


def _wall(asctime: str, *, utc: bool) -> float:
    """Epoch seconds of a log line's `%(asctime)s` (local time, or UTC inside a container)."""
    parsed = datetime.strptime(asctime, "%Y-%m-%d %H:%M:%S,%f")
    if utc:
        return calendar.timegm(parsed.timetuple()) + parsed.microsecond / 1e6
    return parsed.timestamp()


def _first_times(text: str, pattern: re.Pattern[str], *, utc: bool) -> dict[str, float]:
    """user -> epoch seconds of the first line of `text` matching `pattern`."""
    found: dict[str, float] = {}
    for line in text.splitlines():
        match = pattern.search(line)
        stamp = ASCTIME.match(line)
        if match and stamp and match["user"] not in found:
            found[match["user"]] = _wall(stamp[1], utc=utc)
    return found


def ready_lines(text: str) -> dict[str, tuple[float, float, dict[str, float]]]:
    """user -> (epoch seconds of the line, total ms, {step: ms}) from the dispatcher's log."""
    found = {}
    for match in READY.finditer(text):
        steps = {}
        for part in match["steps"].split(", "):
            name, _, value = part.rpartition(" ")
            steps[name] = float(value)
        found[match["user"]] = (_wall(match["at"], utc=False), float(match["total"]), steps)
    return found


class WorkerLogs:
    """The worker lines each activation needs: in the dispatcher's log for process workers
    (they share its stderr), in each container's log for docker workers."""

    def __init__(self, stack: BenchStack) -> None:
        self._stack = stack
        self._api = None
        if stack.settings.runtime == "docker":
            from docker.api import APIClient
            from docker.utils import kwargs_from_env
            self._api = APIClient(version="auto", timeout=30, **kwargs_from_env())

    def times(self, users: Sequence[str]) -> tuple[dict[str, float], dict[str, float]]:
        """(main() began, serving) epoch seconds by user."""
        if self._api is None:
            text = self._stack.log_text("dispatcher")
            return (_first_times(text, MAIN, utc=False), _first_times(text, SERVING, utc=False))
        from dispatcher.runtimes.docker import container_name

        began: dict[str, float] = {}
        serving: dict[str, float] = {}
        for user in users:
            name = container_name(self._stack.settings.data_dir, user)
            try:
                raw: bytes = self._api.logs(name, stdout=True, stderr=True)
            except Exception as exc:  # a container gone: its phases stay unsplit
                log.warning("no logs of %s: %s", name, exc)
                continue
            text = raw.decode(errors="replace")
            # A container without TZ logs in UTC.
            began.update(_first_times(text, MAIN, utc=True))
            serving.update(_first_times(text, SERVING, utc=True))
        return began, serving

    def close(self) -> None:
        if self._api is not None:
            self._api.close()


def split(activations: list[Activation], stack: BenchStack, logs: WorkerLogs) -> None:
    """Fills each activation's `steps` and `phases` from the logs."""
    ready = ready_lines(stack.log_text("dispatcher"))
    began, serving = logs.times([a.user for a in activations])
    for a in activations:
        if a.user not in ready:
            continue
        ready_at, dispatcher_ms, steps = ready[a.user]
        a.steps = steps
        until_serving = steps.pop("until serving")
        phases = dict(steps)
        launched_at = ready_at - until_serving / 1000
        if a.user in began:
            interpreter = (began[a.user] - launched_at) * 1000
            phases["interpreter"] = interpreter
            if a.user in serving:
                socket = (serving[a.user] - began[a.user]) * 1000
                phases["socket"] = socket
                phases["health"] = until_serving - interpreter - socket
            else:
                phases["socket + health"] = until_serving - interpreter
        else:
            phases["until serving"] = until_serving
        phases["first call"] = a.total_ms - dispatcher_ms
        a.phases = phases


# ---- the scenario -----------------------------------------------------------------------------

def sequential(stack: BenchStack, count: int, prefix: str) -> list[Activation]:
    create(stack.http_port, f"{prefix}warmup")  # the first start pays for caches and threads
    time.sleep(SETTLE)
    activations = []
    for i in range(count):
        user = f"{prefix}{i:04d}"
        status, took = create(stack.http_port, user)
        activations.append(Activation(user=user, total_ms=took, status=status))
        time.sleep(SETTLE)
    return activations


def burst(stack: BenchStack, count: int, prefix: str) -> tuple[list[Activation], float]:
    """`count` new users at once, one connection each; returns them and the wall seconds from
    the first request to the last answer."""
    results: list[Activation | None] = [None] * count
    gate = threading.Barrier(count + 1)
    ends = [0.0] * count

    def one(i: int) -> None:
        user = f"{prefix}{i:04d}"
        gate.wait()
        status, took = create(stack.http_port, user)
        ends[i] = time.perf_counter()
        results[i] = Activation(user=user, total_ms=took, status=status)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    gate.wait()
    begun = time.perf_counter()
    for thread in threads:
        thread.join()
    return [r for r in results if r is not None], max(ends) - begun


PHASE_ORDER = ("queued", "create", "start", "spawn", "interpreter", "socket", "health",
               "socket + health", "until serving", "first call")


def measure(runtime: str, profile: Profile, section: Section) -> None:
    count = profile.cold_activations
    # The burst gets a stack of its own, not one holding the series' workers.
    with bench_stack(runtime=runtime, idle_ttl=3600.0, max_workers=count + 16) as stack:
        logs = WorkerLogs(stack)
        try:
            log.info("cold activations: %d one at a time, %s runtime", count, runtime)
            one_by_one = sequential(stack, count, f"c{runtime[0]}")
            split(one_by_one, stack, logs)
        finally:
            logs.close()
    with bench_stack(runtime=runtime, idle_ttl=3600.0, max_workers=count + 16) as stack:
        log.info("cold activations: a burst of %d new users, %s runtime", count, runtime)
        at_once, wall = burst(stack, count, f"b{runtime[0]}")
        logs = WorkerLogs(stack)
        try:
            split(at_once, stack, logs)
        finally:
            logs.close()
    ok = [a for a in one_by_one if a.status == 200]
    totals = [a.total_ms for a in ok]
    section.rows.append([runtime, *spread("activation, one at a time (client)", totals)])
    for phase in PHASE_ORDER:
        values = [a.phases[phase] for a in ok if phase in a.phases]
        if values:
            section.rows.append([runtime, *spread(f"  {phase}", values)])
    section.distributions.append(Distribution(f"{runtime}: one at a time", points(totals)))
    burst_ok = [a for a in at_once if a.status == 200]
    burst_totals = [a.total_ms for a in burst_ok]
    rate = len(burst_ok) / wall if wall > 0 else 0.0
    section.rows.append([runtime, *spread(
        f"burst of {count} new users at once: {rate:.1f} users/s", burst_totals)])
    section.distributions.append(
        Distribution(f"{runtime}: burst of {count}", points(burst_totals)))
    errors = [a for a in one_by_one + at_once if a.status != 200]
    section.notes.append(
        f"{runtime}: {len(ok)} activations one at a time, median {quantile(totals, 50):.0f} ms "
        f"= {medians(ok)} ms (medians of each phase; they need not add up exactly); a burst "
        f"of {count} took {wall:.2f} s, {rate:.1f} new users/s, each activation's phases "
        f"(medians) {medians(burst_ok)} ms"
        + (f"; **{len(errors)} errors** (statuses {sorted({a.status for a in errors})})"
           if errors else ""))


def medians(activations: list[Activation]) -> str:
    """`phase median, ...` over the activations that have each phase."""
    return ", ".join(
        f"{p} {statistics.median(v):.0f}" for p in PHASE_ORDER
        if (v := [a.phases[p] for a in activations if p in a.phases]))


# ---- the engine's floor -----------------------------------------------------------------------

FLOOR_STEPS = ("create", "start", "wait (exit)", "remove")
FLOOR_WHAT = ("engine floor: create + start + wait + remove of a container running `true`, "
              "one at a time")


def engine_floor(count: int) -> list[dict[str, float]]:
    """`count` lifecycles of a container running `true`, one at a time after an unmeasured
    one: the ms of each of `FLOOR_STEPS`. The host config is the docker runtime's own
    (`DockerRuntime.host_config`, so the two cannot drift apart), with temporary directories
    bound as the user's and the ETL's."""
    root = Path(tempfile.mkdtemp(prefix="upw-bench-floor-", dir="/tmp"))
    api = APIClient(version="auto", timeout=60, **kwargs_from_env())
    try:
        defaults = Settings()
        runtime = DockerRuntime(
            api, data_dir=root / "data", workers_dir=root / "workers",
            etl_socket=root / "etl" / "etl.sock", image=WORKER_IMAGE,
            memory=defaults.worker_memory, pids=defaults.worker_pids)
        user_dir = root / "data" / "users" / "floor"
        etl_dir = root / "etl"
        for directory in (user_dir, etl_dir):
            directory.mkdir(parents=True)
        host_config = runtime.host_config(user_dir, DATA_MOUNT / "users" / "floor", etl_dir)
        uid, gid = container_owner()

        def lifecycle() -> dict[str, float]:
            marks = [time.perf_counter()]
            container_id = str(api.create_container(
                WORKER_IMAGE, entrypoint=["true"], user=f"{uid}:{gid}",
                labels=runtime.labels, host_config=host_config)["Id"])
            marks.append(time.perf_counter())
            try:
                api.start(container_id)
                marks.append(time.perf_counter())
                status = api.wait(container_id)["StatusCode"]
                marks.append(time.perf_counter())
            finally:
                api.remove_container(container_id, force=True)  # as the runtime removes
            marks.append(time.perf_counter())
            if status != 0:
                raise RuntimeError(f"`true` exited with status {status} in its container")
            return {step: (end - begin) * 1000 for step, (begin, end)
                    in zip(FLOOR_STEPS, itertools.pairwise(marks), strict=True)}

        lifecycle()  # the first pays for caches, as the activations' warm-up does
        return [lifecycle() for _ in range(count)]
    finally:
        api.close()
        shutil.rmtree(root, ignore_errors=True)


def measure_floor(count: int, section: Section) -> None:
    log.info("engine floor: %d containers running `true`, one at a time", count)
    steps = engine_floor(count)
    totals = [sum(s.values()) for s in steps]
    section.rows.append(["docker", *spread(FLOOR_WHAT, totals)])
    for step in FLOOR_STEPS:
        section.rows.append(["docker", *spread(f"  {step}", [s[step] for s in steps])])
    section.distributions.append(Distribution("docker: engine floor (`true`)", points(totals)))
    section.notes.append(
        f"docker engine floor: {len(steps)} containers running `true`, with the docker "
        "runtime's Docker SDK calls, host config (its binds on temporary directories) and "
        f"user, one at a time: median {quantile(totals, 50):.0f} ms = "
        + ", ".join(f"{step} {statistics.median(s[step] for s in steps):.0f}"
                    for step in FLOOR_STEPS)
        + " ms (medians). No docker activation can take less than the floor's create + "
        "start; the worker's own start-up comes on top.")


def run(profile: Profile) -> Section:
    section = Section(
        title="Cold activation",
        columns=["runtime", "what", "n", "p50 (ms)", "p90 (ms)", "p99 (ms)", "max (ms)"],
    )
    no_docker = docker_available()
    for runtime in ("process", "docker"):
        if runtime == "docker" and no_docker is not None:
            section.notes.append(f"docker runtime not measured: {no_docker}")
            continue
        try:
            measure(runtime, profile, section)
        except Exception as exc:  # the other runtime's numbers still stand
            log.exception("cold activations of the %s runtime failed", runtime)
            section.notes.append(f"**{runtime} runtime: not measured**: {exc}")
    if no_docker is None:
        try:
            measure_floor(profile.cold_activations, section)
        except Exception as exc:  # the activations' numbers still stand
            log.exception("the engine floor failed")
            section.notes.append(f"**docker engine floor: not measured**: {exc}")
    section.notes.append(
        "An activation is `GET /<new user>/create` through Envoy on a kept-alive connection, "
        "one at a time after an unmeasured warm-up, workers kept running; its phases come from "
        "the dispatcher's `worker ... ready` line and the worker's `running main()` and "
        "`serving on` lines (log timestamps, 1 ms resolution). The burst sends every request "
        "at once, one connection each; users/s is answers over the wall time from the first "
        "request to the last answer.")
    return section
