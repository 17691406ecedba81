"""Scenario 1, warm: every worker already running (process runtime, an idle TTL longer than
the run), durable deposits and shows through Envoy, spread over many users at 1, 16 and 64
concurrent clients, deposits alone at 16, and one hot user taking all the traffic."""

from __future__ import annotations

import logging

from bench import load
from bench.model import Profile, Section
from bench.stackrun import bench_stack

log = logging.getLogger("bench.warm")

USERS = 200
PREFIX = "warm"
HOT = "hot"
CLIENTS = (1, 16, 64)
# Each case starts after this much unmeasured load, so Envoy's connections to the dispatcher
# and the workers' caches are as warm as the workers.
WARMUP = 2.0


def run(profile: Profile) -> Section:
    section = Section(
        title="1. Warm workers",
        columns=load.COLUMNS,
        notes=[
            f"Process runtime, idle TTL 1 h: {USERS} users created and their workers started "
            "before measuring (plus one hot user). Requests go through Envoy "
            "(`GET /<user>/deposit/1` or `GET /<user>/show`, users taken round robin); "
            "every deposit is committed with `synchronous=FULL` before it is answered, and "
            "the ETL ships it to PostgreSQL during the run.",
            f"{profile.duration:g} s of load per case after {WARMUP:g} s unmeasured; "
            "one wrk thread; wrk CPU 100 % = one core.",
        ],
    )
    cases: list[tuple[str, int, int, str, int]] = [
        *((f"{USERS} users, deposit+show", clients, USERS, PREFIX, 50) for clients in CLIENTS),
        (f"{USERS} users, deposit only", 16, USERS, PREFIX, 100),
        ("1 hot user, deposit+show", 16, 1, HOT, 50),
    ]
    with bench_stack(runtime="process", idle_ttl=3600.0, max_workers=USERS + 16) as stack:
        took = load.create_users(stack.http_port, load.user_names(PREFIX, USERS),
                                 concurrency=8, warm=True)
        load.create_users(stack.http_port, load.user_names(HOT, 1), warm=True)
        section.notes.append(f"Creating and starting the {USERS} workers took {took:.1f} s "
                             f"({USERS / took:.0f} users/s at 8 concurrent requests).")
        for case, clients, users, prefix, deposits in cases:
            load.drive(stack.base_url, connections=clients, duration=WARMUP, users=users,
                       prefix=prefix, deposit_percent=deposits)
            result = load.drive(stack.base_url, connections=clients, duration=profile.duration,
                                users=users, prefix=prefix, deposit_percent=deposits)
            result.add_to(section, case)
            if users == USERS and deposits == 50:
                section.metrics[f"requests/s warm {clients}"] = result.rate
    return section
