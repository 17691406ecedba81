"""The original curl session, byte for byte, through real Envoy, dispatcher, worker processes,
ETL and PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from conventions.users import user_dir
from tests.conftest import WALKTHROUGH, RunningStack, summary_lines, wait_for

TEXT = "text/plain; charset=utf-8"


@pytest.mark.parametrize("runtime", ["process", "docker"])
def test_original_walkthrough(make_stack: Callable[..., RunningStack], runtime: str) -> None:
    stack = make_stack(runtime=runtime)
    http = stack.http
    steps = [
        *WALKTHROUGH,
        ("/koduki/create", "Hello, koduki. Welcome Unlimited Process Works!\n"),  # idempotent
        ("/koduki/show", "koduki's account is 256 yen.\n"),
    ]
    for path, expected in steps:
        response = http.get(path)
        assert (response.status, response.body) == (200, expected.encode()), path
        assert response.content_type == TEXT

    expected_summary = ["koduki, 256", "nanoha, 156", "misuzu, 75"]
    wait_for(lambda: summary_lines(stack) == expected_summary, timeout=20,
             what=f"the summary to read {expected_summary}")
    response = http.get("/account_summary")
    assert response.body == b"koduki, 256\nnanoha, 156\nmisuzu, 75\n"
    assert response.content_type == TEXT
    for user in ["koduki", "nanoha", "misuzu"]:
        assert stack.worker_starts(user) == 1
        if runtime == "docker":  # seen from the engine's side: one container per user
            [container] = stack.containers(user)
            assert container["State"] == "running"
            assert_hardened(stack, user, container["Id"])


def assert_hardened(stack: RunningStack, user: str, container_id: str) -> None:
    """The worker container of `user` has only its user's directory and the ETL's socket
    directory mounted, no network, a read-only root, a non-root user, no capabilities and the
    configured limits."""
    assert stack.engine is not None
    inspected = stack.engine.inspect_container(container_id)
    host, config = inspected["HostConfig"], inspected["Config"]
    assert sorted((m["Source"], m["RW"]) for m in inspected["Mounts"]) == sorted([
        (str(user_dir(stack.data_dir, user)), True),
        (str(stack.settings.etl_socket.parent), False),
    ])
    assert config["User"].split(":")[0] == "10001"
    assert host["NetworkMode"] == "none"
    assert host["ReadonlyRootfs"] is True
    assert host["CapDrop"] == ["ALL"]
    assert host["SecurityOpt"] == ["no-new-privileges"]
    assert host["Memory"] == 128 * 1024 * 1024  # the default UPW_WORKER_MEMORY
    assert host["PidsLimit"] == stack.settings.worker_pids


def test_json_routes(stack: RunningStack) -> None:
    http = stack.http
    created = http.post("/v1/accounts/fate", {})
    assert created.status == 200, created.text
    assert created.json()["created"] is True
    assert http.post("/v1/accounts/fate", {}).json()["created"] is False

    deposit = http.post("/v1/accounts/fate:deposit", {"amount": "500"})
    assert deposit.status == 200, deposit.text
    assert deposit.json()["account"]["balance"] == "500"
    assert deposit.json()["entry"]["kind"] == "KIND_DEPOSIT"

    withdraw = http.post("/v1/accounts/fate:withdraw", {"amount": 120})
    assert withdraw.status == 200, withdraw.text
    assert http.get("/v1/accounts/fate").json()["balance"] == "380"

    entries = http.get("/v1/accounts/fate/transactions").json()["entries"]
    assert [(e["seq"], e["kind"], e["balance"]) for e in entries] == [
        ("1", "KIND_OPEN", "0"), ("2", "KIND_DEPOSIT", "500"), ("3", "KIND_WITHDRAWAL", "380")]

    def summary() -> list[tuple[str, str]]:
        accounts = http.get("/v1/summary").json().get("accounts", [])
        return [(a["user"], a["balance"]) for a in accounts]

    wait_for(lambda: summary() == [("fate", "380")], timeout=20, what="the JSON summary")
