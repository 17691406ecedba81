"""Scenario 6, footprint: what one user costs at rest and what many users cost.

- Memory of one warm worker (its account created, a few deposits, a show): RSS, PSS and USS
  from `/proc/<pid>/smaps_rollup`, as a process and as a container (the container's main
  process is a host process too), and for the container its cgroup's charge as the engine
  reports it (`docker stats`: the charge less inactive page cache, and the whole charge).
- Disk of one user: its directory (`users/<shard>/<user>`: every file's allocated blocks and the
  directory itself) while the worker runs, and after the idle TTL stopped it (is the WAL
  checkpointed into account.db and removed, is the unshipped marker gone, is a process left?).
- N user databases created through `worker.store.Store` in one process of its own (no
  worker, no ETL): seconds, bytes on disk per database, and the process's peak RSS.
- `GET /account_summary` through Envoy over `summary_accounts` accounts, loaded with one COPY
  into the ETL's own `accounts` table: p50 of several requests, the body size, and the query
  alone in PostgreSQL for comparison.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import psycopg

from bench import load
from bench.etl_rate import database_url
from bench.model import Distribution, Profile, Section, ms, points
from bench.stackrun import BenchStack, bench_stack, docker_available
from conventions.users import account_db, user_dir
from dispatcher.runtimes.process import worker_processes
from upw.summary.v1 import summary_pb2, summary_pb2_grpc

log = logging.getLogger("bench.footprint")

USER = "footprint"
DEPOSITS = 5
IDLE_TTL = 3.0
SUMMARY_REQUESTS = 7
MB = 1024 * 1024


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.05)


def smaps(pid: int) -> dict[str, int]:
    """Bytes of Rss, Pss and Uss (private clean + dirty) of a process."""
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, _, rest = line.partition(":")
        parts = rest.split()
        if len(parts) == 2 and parts[1] == "kB":
            fields[name] = int(parts[0]) * 1024
    return {"rss": fields.get("Rss", 0), "pss": fields.get("Pss", 0),
            "uss": fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)}


def disk(directory: Path) -> tuple[int, int, dict[str, int]]:
    """(allocated bytes, apparent bytes, {file name: apparent bytes}) of a directory, itself
    included, as `du` counts them."""
    if not directory.exists():
        return 0, 0, {}
    allocated = directory.stat().st_blocks * 512
    apparent = 0
    files = {}
    for path in sorted(directory.rglob("*")):
        stat = path.lstat()
        allocated += stat.st_blocks * 512
        apparent += stat.st_size
        files[str(path.relative_to(directory))] = stat.st_size
    return allocated, apparent, files


def kb(value: float) -> str:
    return f"{value / 1024:,.1f} KB"


def warm_user(stack: BenchStack) -> None:
    for path in [f"/{USER}/create", *[f"/{USER}/deposit/{i + 1}" for i in range(DEPOSITS)],
                 f"/{USER}/show"]:
        # A start slower than Envoy's route timeout (a busy machine) answers 504; the worker
        # still becomes ready, and the same request again finds it.
        for _ in range(3):
            status, body = load.request(stack.http_port, "GET", path)
            if status not in (503, 504):
                break
            log.warning("GET %s answered %d; trying again", path, status)
        if status != 200:
            raise RuntimeError(f"GET {path} answered {status}: {body[:300]!r}")


def parent_pid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def describe_disk(label: str, directory: Path) -> tuple[list[str], int]:
    allocated, apparent, files = disk(directory)
    listed = ", ".join(f"{name} {size:,} B" for name, size in files.items()) or "nothing"
    return [label, kb(allocated), f"{apparent:,} B apparent: {listed}"], allocated


def container_memory(stack: BenchStack, user: str) -> tuple[int, dict[str, int], str]:
    """(host pid of the container's main process, its cgroup charge, the container id)."""
    from docker.api import APIClient
    from docker.utils import kwargs_from_env

    from dispatcher.runtimes.docker import container_name

    api = APIClient(version="auto", timeout=30, **kwargs_from_env())
    try:
        name = container_name(stack.settings.data_dir, user)
        info = api.inspect_container(name)
        stats: dict[str, Any] = api.stats(name, stream=False)
    finally:
        api.close()
    memory = stats.get("memory_stats", {})
    detail = memory.get("stats", {})
    # What `docker stats` shows: the charge less inactive page cache (v1 and v2 names).
    inactive = detail.get("total_inactive_file", detail.get("inactive_file", 0))
    usage = int(memory.get("usage", 0))
    charge = {"usage": usage, "shown": usage - int(inactive),
              "anon": int(detail.get("anon", detail.get("total_rss", detail.get("rss", 0)))),
              "file": int(detail.get("file", detail.get("total_cache", detail.get("cache", 0))))}
    return int(info["State"]["Pid"]), charge, str(info["Id"])


def one_user(runtime: str, section: Section, summary_accounts: int) -> None:
    with bench_stack(runtime=runtime, idle_ttl=IDLE_TTL) as stack:
        warm_user(stack)
        where = user_dir(stack.settings.data_dir, USER)
        if runtime == "docker":
            pid, charge, container = container_memory(stack, USER)
        else:
            [pid] = worker_processes(stack.settings.workers_dir, USER)
        memory = smaps(pid)
        warm_row, _ = describe_disk(f"{runtime}: disk of one user, worker running", where)
        if runtime == "docker":
            section.rows.append([
                f"{runtime}: memory of one warm worker (container {container[:12]})",
                f"{memory['rss'] / MB:.1f} MB RSS",
                f"PSS {memory['pss'] / MB:.1f} MB, USS {memory['uss'] / MB:.1f} MB of its "
                f"python process; cgroup charge {charge['shown'] / MB:.1f} MB as docker stats "
                f"shows it ({charge['usage'] / MB:.1f} MB with all page cache; anon "
                f"{charge['anon'] / MB:.1f} MB, file {charge['file'] / MB:.1f} MB)"])
        else:
            # The worker's parent is the fork server, paid once per dispatcher; the worker
            # shares the pages it has not written since the fork with it.
            fork_server = smaps(parent_pid(pid))
            section.rows.append([
                f"{runtime}: memory of one warm worker (pid {pid})",
                f"{memory['rss'] / MB:.1f} MB RSS",
                f"PSS {memory['pss'] / MB:.1f} MB, USS {memory['uss'] / MB:.1f} MB; its fork "
                f"server (one per dispatcher): RSS {fork_server['rss'] / MB:.1f} MB, USS "
                f"{fork_server['uss'] / MB:.1f} MB"])
        section.rows.append(warm_row)
        # The idle TTL stops the worker; the account's directory is all that is left.
        wait_until(lambda: not worker_processes(stack.settings.workers_dir, USER)
                   and not Path(f"/proc/{pid}").exists(), IDLE_TTL + 30, "the idle worker to stop")
        time.sleep(0.5)  # a container's removal follows its process's exit
        idle_row, _ = describe_disk(
            f"{runtime}: disk of one idle user (worker stopped, no process left)", where)
        section.rows.append(idle_row)
        if not account_db(stack.settings.data_dir, USER).with_name("account.db-wal").exists():
            section.notes.append(f"{runtime}: the stopped worker left no WAL file: its last "
                                 "connection checkpointed it into account.db.")
        if summary_accounts:
            summary(stack, summary_accounts, section)


def summary(stack: BenchStack, accounts: int, section: Section) -> None:
    url = database_url(stack)
    base = datetime(2026, 1, 1, tzinfo=UTC)
    began = time.monotonic()
    buffer = io.StringIO()
    for i in range(accounts):
        at = (base + timedelta(microseconds=i)).isoformat()
        buffer.write(f"sum{i:07d}\t{i % 1000}\t{i % 7 + 1}\t{at}\t{at}\n")
    buffer.seek(0)
    with psycopg.connect(url, autocommit=True) as pg:
        with pg.cursor().copy(
                "COPY accounts (user_name, balance, last_seq, created_at, updated_at) "
                "FROM STDIN") as copy:
            while chunk := buffer.read(1 << 20):
                copy.write(chunk)
        pg.execute("ANALYZE accounts")
        loaded = time.monotonic() - began
    # The text route's upstream call (the body built by PostgreSQL), and the typed, paged
    # summary (`/v1/summary`) that converts every row, for comparison.
    text, typed = [], []
    with grpc.insecure_channel(f"unix:{stack.settings.etl_socket}") as channel:
        stub = summary_pb2_grpc.SummaryServiceStub(channel)
        for _ in range(SUMMARY_REQUESTS):
            t = time.perf_counter()
            stub.GetSummaryText(summary_pb2.GetSummaryTextRequest(), timeout=60)
            text.append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            stub.GetSummary(summary_pb2.GetSummaryRequest(), timeout=60)
            typed.append((time.perf_counter() - t) * 1000)
    took = []
    size = 0
    for _ in range(SUMMARY_REQUESTS):
        t = time.perf_counter()
        status, body = load.request(stack.http_port, "GET", "/account_summary")
        took.append((time.perf_counter() - t) * 1000)
        if status != 200:
            raise RuntimeError(f"GET /account_summary answered {status}: {body[:300]!r}")
        size = len(body)
    lines = body.count(b"\n")
    section.rows.append([
        f"GET /account_summary over {lines:,} accounts, through Envoy",
        f"{ms(statistics.median(took))} ms p50",
        f"{SUMMARY_REQUESTS} requests, min {ms(min(took))}, max {ms(max(took))} ms; body "
        f"{size / MB:.2f} MB; p50 over the ETL's socket: SummaryService.GetSummaryText (what "
        f"the route asks for) {ms(statistics.median(text))} ms, the typed GetSummary of every "
        f"account {ms(statistics.median(typed))} ms"])
    section.distributions.append(Distribution("GET /account_summary", points(took)))
    section.notes.append(f"{accounts:,} accounts were loaded with one COPY in {loaded:.1f} s.")


# The child of `databases`: imports only what it measures, so its peak RSS is the store's.
CREATE_DATABASES = """
import json, resource, sys, time
from pathlib import Path
from conventions.users import account_db
from worker.store import Store

def peak():
    # VmHWM starts again at exec; ru_maxrss would carry the parent's peak over.
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

base, count = Path(sys.argv[1]), int(sys.argv[2])
before = peak()
began = time.perf_counter()
for i in range(count):
    user = f"db{i:07d}"
    store = Store.open(account_db(base, user), user=user)
    try:
        store.create()
    finally:
        store.close()
took = time.perf_counter() - began
usage = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"seconds": took, "maxrss": peak(), "before": before,
                  "cpu": usage.ru_utime + usage.ru_stime}))
"""


def databases(count: int, section: Section) -> None:
    root = Path(tempfile.mkdtemp(prefix="upw-bench-dbs-", dir="/tmp"))
    try:
        done = subprocess.run([sys.executable, "-c", CREATE_DATABASES, str(root), str(count)],
                              capture_output=True, text=True, check=False, timeout=3600,
                              cwd=Path(__file__).resolve().parent.parent)
        if done.returncode != 0:
            raise RuntimeError(f"creating {count} databases failed: {done.stderr[-2000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        allocated, apparent, files = disk(root)
        wal = sum(1 for name in files if name.endswith("-wal"))
        shards = sum(1 for _ in (root / "users").iterdir())
    finally:
        shutil.rmtree(root, ignore_errors=True)
    seconds = result["seconds"]
    section.rows.append([
        f"create {count:,} user databases (worker.store.Store, one process)",
        f"{seconds:.1f} s",
        f"{seconds / count * 1000:.2f} ms and {kb(allocated / count)} on disk per database "
        f"({apparent / count:,.0f} B apparent; its directory and a share of the {shards:,} "
        f"shard directories included); peak RSS {result['maxrss'] / MB:.1f} MB "
        f"({result['before'] / MB:.1f} MB after imports); CPU {result['cpu']:.1f} s; "
        f"WAL files left: {wal}"])


def run(profile: Profile) -> Section:
    section = Section(title="Footprint", columns=["what", "measured", "detail"])
    parts: list[tuple[str, Callable[[], None]]] = [
        ("process runtime", lambda: one_user("process", section, profile.summary_accounts))]
    if (reason := docker_available()) is None:
        parts.append(("docker runtime", lambda: one_user("docker", section, 0)))
    else:
        section.notes.append(f"docker runtime not measured: {reason}")
    parts.append(("databases", lambda: databases(profile.databases, section)))
    for name, part in parts:
        try:
            part()
        except Exception as exc:  # one failed part leaves the others' numbers standing
            log.exception("footprint: %s failed", name)
            section.notes.append(f"**{name}: not measured**: {exc}")
    section.notes.append(
        f"One user: created, {DEPOSITS} deposits and a show through Envoy; memory read from "
        "/proc/<pid>/smaps_rollup at once (RSS counts shared libraries in full, PSS shares "
        "them out, USS is the process's own); disk is allocated blocks (du), the user's "
        f"directory included; then the {IDLE_TTL:g} s idle TTL stopped the worker.")
    return section

