"""`python -m bench [--profile quick|full] [--out DIR] [--only SCENARIO ...]` (`make bench`).

Runs the scenario modules in order (each `bench/<name>.py` exposes `run(profile) -> Section`;
a module that does not exist is skipped), then writes into the output directory (default
`results/<UTC timestamp>/`, copied to `results/latest/`): `report.md`, one latency plot PNG
per section that has distributions, and `results.json` with everything the report shows.
A scenario that fails is reported as failed and the others still run; the exit status is
then 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from bench import load, report
from bench.model import FULL, QUICK, Profile, Section
from conventions import logs

log = logging.getLogger("bench")

SCENARIOS = ("warm", "per_request", "docker_run", "cold", "etl_rate", "footprint")
PROFILES = {"quick": QUICK, "full": FULL}
RESULTS = Path(__file__).resolve().parent.parent / "results"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Measure the real stack and write a report with latency plots (make bench).")
    p.add_argument("--profile", choices=sorted(PROFILES), default="quick",
                   help="quick (a couple of minutes, the default) or full")
    p.add_argument("--out", type=Path, default=None,
                   help="output directory (default results/<UTC timestamp>, copied to "
                        "results/latest)")
    p.add_argument("--only", nargs="+", choices=SCENARIOS, metavar="SCENARIO",
                   help=f"run only these scenarios, of: {', '.join(SCENARIOS)}")
    p.add_argument("--duration", type=float, default=None,
                   help="seconds of load per throughput case, instead of the profile's")
    return p


def _command(argv: Sequence[str]) -> str:
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unknown ({exc})"
    text = (done.stdout or done.stderr).strip()
    return text.splitlines()[0].strip() if text else "unknown"


def _first(path: str, key: str) -> str:
    try:
        with open(path) as f:
            for line in f:
                name, _, value = line.partition(":" if ":" in line else "=")
                if name.strip() == key:
                    return value.strip().strip('"')
    except OSError:
        pass
    return "unknown"


def _docker_version() -> str:
    from docker.api import APIClient
    from docker.errors import DockerException
    from docker.utils import kwargs_from_env

    try:
        api = APIClient(version="auto", timeout=10, **kwargs_from_env())
        try:
            version = api.version()
        finally:
            api.close()
    except (DockerException, OSError) as exc:
        return f"no engine answers ({exc})"
    return f"{version.get('Version')} (API {version.get('ApiVersion')}, " \
           f"{version.get('Os')}/{version.get('Arch')})"


def machine() -> report.Machine:
    from launcher.envoy_config import envoy_binary

    try:
        envoy = _command([str(envoy_binary()), "--version"]).split("version:")[-1].strip()
    except Exception as exc:
        envoy = f"unknown ({exc})"
    memory_kb = _first("/proc/meminfo", "MemTotal").split()[0]
    cores = os.cpu_count() or 0
    usable = len(os.sched_getaffinity(0))
    load1, load5, _ = os.getloadavg()
    root = Path(__file__).resolve().parent.parent
    commit = _command(["git", "-C", str(root), "describe", "--always", "--dirty"])
    return report.Machine([
        ("CPU", _first("/proc/cpuinfo", "model name")),
        ("cores", f"{cores}" + (f" ({usable} usable)" if usable != cores else "")),
        ("memory", f"{int(memory_kb) / 1024 ** 2:.1f} GiB" if memory_kb.isdigit() else "?"),
        ("OS", _first("/etc/os-release", "PRETTY_NAME")),
        ("kernel", f"{platform.system()} {platform.release()}"),
        ("Python", f"{platform.python_implementation()} {platform.python_version()}"),
        ("Envoy", envoy),
        ("Docker Engine", _docker_version()),
        ("load generator", load.wrk_version()),
        ("load average at start", f"{load1:.2f} (1 min), {load5:.2f} (5 min)"),
        ("commit", commit),
    ])


def run_scenario(name: str, profile: Profile, *, required: bool) -> tuple[Section | None, bool]:
    """The scenario's section and whether it failed; no section when its module does not
    exist (and was not asked for), a section saying why when it failed."""
    log.info("scenario %r: starting", name)
    started = time.monotonic()
    try:
        try:
            module = importlib.import_module(f"bench.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"bench.{name}" or required:
                raise
            log.info("scenario %r: no module bench/%s.py; skipped", name, name)
            return None, False
        section: Section = module.run(profile)
    except Exception as exc:
        log.exception("scenario %r failed", name)
        return Section(title=f"{name}: FAILED", columns=[],
                       notes=[f"The scenario failed: {type(exc).__name__}: {exc}"]), True
    log.info("scenario %r: done in %.0fs", name, time.monotonic() - started)
    return section, False


def compare(sections: dict[str, Section]) -> None:
    """Adds the ratios across scenarios to the notes of the baseline section."""
    baseline = sections.get("docker_run")
    if baseline is None:
        return
    for key, base_rate in sorted(baseline.metrics.items()):
        if not key.startswith("requests/s docker run ") or base_rate <= 0:
            continue
        clients = key.rsplit(" ", 1)[1]
        for scenario, other, what in (
            ("per_request", f"requests/s docker {clients}",
             "one container per request (scenario 2, docker runtime)"),
            ("per_request", f"requests/s process {clients}",
             "one process per request (scenario 2, process runtime)"),
            ("warm", f"requests/s warm {clients}", "warm workers (scenario 1, many users)"),
        ):
            rate = sections.get(scenario, Section("", [])).metrics.get(other)
            if rate is not None:
                baseline.notes.append(
                    f"At {clients} clients, {what}: {rate:,.1f} requests/s, "
                    f"**{rate / base_rate:,.1f} times** the `docker run` baseline "
                    f"({base_rate:,.1f} requests/s).")
                # A container per request cannot pass the engine's floor (bench/docker_run.py).
                floor = baseline.metrics.get(f"requests/s engine floor {clients}")
                if floor and other.startswith("requests/s docker "):
                    baseline.notes.append(
                        f"At {clients} clients, {what}: **{rate / floor:,.2f} times** the "
                        f"engine's floor ({floor:,.1f} containers/s of `true`).")


def write(out: Path, sections: list[Section], profile: Profile, *, started: datetime,
          took: float, machine_info: report.Machine) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    plots: dict[str, str] = {}
    for section in sections:
        name = f"{report.slug(section.title)}.png"
        if report.plot(section, out / name):
            plots[section.title] = name
    preamble = [
        f"Profile **{profile.name}** ({profile.duration:g} s of load per throughput case), "
        f"started {started:%Y-%m-%d %H:%M} UTC, took {took / 60:.1f} min. "
        "Made with `make bench` (`python -m bench`); nothing here is asserted, the numbers "
        "are the product. Latencies are wrk's, from request sent to answer read, in ms.",
    ]
    text = report.render(sections, machine=machine_info, heading="Benchmark report",
                         preamble=preamble, plots=plots)
    (out / "report.md").write_text(text)
    (out / "results.json").write_text(json.dumps({
        "profile": dataclasses.asdict(profile),
        "started": started.isoformat(),
        "seconds": took,
        "machine": dict(machine_info.rows),
        "sections": [dataclasses.asdict(s) for s in sections],
    }, indent=1))
    return out / "report.md"


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logs.setup("bench", os.environ.get("UPW_LOG_LEVEL", "INFO").upper())
    profile = PROFILES[args.profile]
    if args.duration is not None:
        profile = dataclasses.replace(profile, duration=args.duration)
    started = datetime.now(UTC)
    out = args.out or RESULTS / started.strftime("%Y%m%dT%H%M%SZ")
    machine_info = machine()
    # Each stack's logs are copied here (bench/stackrun.py), so errors can be looked into.
    os.environ["UPW_BENCH_LOG_DIR"] = str(out / "logs")
    begun = time.monotonic()
    names = args.only or list(SCENARIOS)
    sections: dict[str, Section] = {}
    failed: list[str] = []
    for name in SCENARIOS:
        if name in names:
            section, broke = run_scenario(name, profile, required=bool(args.only))
            if section is not None:
                sections[name] = section
            if broke:
                failed.append(name)
    compare(sections)
    path = write(out, list(sections.values()), profile, started=started,
                 took=time.monotonic() - begun, machine_info=machine_info)
    if args.out is None:
        latest = RESULTS / "latest"
        shutil.rmtree(latest, ignore_errors=True)
        shutil.copytree(out, latest)
    log.info("report written to %s", path)
    if failed:
        log.error("these scenarios failed: %s", ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
