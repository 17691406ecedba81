"""Scenario 2, one worker per request (`UPW_IDLE_TTL=0`, the CGI-like model): every request
through Envoy starts the user's worker, as a process and as a container, and the worker stops
after answering."""

from __future__ import annotations

import logging

from bench import load
from bench.model import Profile, Section
from bench.stackrun import WORKER_IMAGE, bench_stack, docker_available, seed_accounts

log = logging.getLogger("bench.per_request")

USERS = 64
PREFIX = "once"
CLIENTS = (4, 16)
RUNTIMES = ("process", "docker")
# A container per request takes seconds on a small machine; a case shorter than this would
# complete only a handful of requests.
MIN_DURATION = 20.0


def run(profile: Profile) -> Section:
    duration = max(profile.duration, MIN_DURATION)
    section = Section(
        title="2. One worker per request (UPW_IDLE_TTL=0)",
        columns=load.COLUMNS,
        notes=[
            "Idle TTL 0: each request through Envoy starts the user's worker, and the worker "
            "stops after answering (shipping its deposit to the ETL first). "
            f"{USERS} users, their accounts created in their databases before the stack "
            "serves them; deposits and shows half and half, users round robin. Docker "
            f"runtime: image `{WORKER_IMAGE}`, one hardened container per worker, as in "
            "production.",
            f"{duration:g} s of load per case, which starts once no worker of the previous "
            "one is left.",
        ],
    )
    for runtime in RUNTIMES:
        if runtime == "docker" and (why := docker_available()):
            section.rows.append([f"{runtime} runtime: skipped", "", "", "", "", "", "", "", ""])
            section.notes.append(f"The docker runtime was not measured: {why}.")
            continue
        with bench_stack(runtime=runtime, idle_ttl=0.0) as stack:
            names = load.user_names(PREFIX, USERS)
            seed_accounts(stack.data_dir, names)
            # One request first, so Envoy's connection to the dispatcher is open.
            load.create_users(stack.http_port, names[:1])
            for clients in CLIENTS:
                stack.wait_idle()
                result = load.drive(stack.base_url, connections=clients, duration=duration,
                                    users=USERS, prefix=PREFIX)
                case = f"{runtime} runtime, {USERS} users"
                result.add_to(section, case)
                section.metrics[f"requests/s {runtime} {clients}"] = result.rate
    return section
