"""What a worker container can reach, checked from inside a real worker container of a real
docker stack: no network, no writes outside its user's directory, no other user's files."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from conventions.users import user_dir
from tests.conftest import RunningStack

pytestmark = pytest.mark.docker

# Runs as the worker's own user inside its container; prints what it could and could not do.
PROBE = r"""
import json, os, socket, sys
report = {}
try:
    socket.create_connection(("10.0.0.1", 80), timeout=2).close()
    report["network"] = "connected"
except OSError as exc:
    report["network"] = type(exc).__name__
report["interfaces"] = sorted(name for _, name in socket.if_nameindex())
def can_write(path):
    try:
        with open(path, "w") as f:
            f.write("x")
        os.unlink(path)
        return True
    except OSError:
        return False
own = sys.argv[1]
report["write_own"] = can_write(os.path.join(own, "probe"))
report["write_root"] = can_write("/probe")
report["write_data"] = can_write("/data/probe")
report["write_users"] = can_write("/data/users/probe")
report["write_tmp"] = can_write("/tmp/probe")
report["users_visible"] = sorted(
    os.path.relpath(os.path.join(d, n), "/data/users")
    for d, dirs, files in os.walk("/data/users") for n in dirs + files)
report["uid"] = os.getuid()
print(json.dumps(report))
"""


def test_a_worker_container_is_isolated(make_stack: Callable[..., RunningStack]) -> None:
    stack = make_stack(runtime="docker")
    for user in ["alice", "bob"]:
        assert stack.http.get(f"/{user}/create").status == 200
        assert stack.http.get(f"/{user}/deposit/5").status == 200
    assert stack.engine is not None
    [container] = [c for c in stack.containers("alice") if c["State"] == "running"]
    shard = user_dir(stack.data_dir, "alice").parent.name
    own = f"/data/users/{shard}/alice"
    python = stack.engine.inspect_container(container["Id"])["Config"]["Entrypoint"][0]
    run = stack.engine.exec_create(container["Id"], [python, "-c", PROBE, own])
    output = stack.engine.exec_start(run["Id"]).decode()
    assert stack.engine.exec_inspect(run["Id"])["ExitCode"] == 0, output
    report = json.loads(output.strip().splitlines()[-1])

    assert report["network"] != "connected"
    assert report["interfaces"] == ["lo"]
    assert report["uid"] == 10001
    assert report["write_own"] is True
    assert report["write_tmp"] is True
    assert not any(report[k] for k in ("write_root", "write_data", "write_users"))
    # Only alice's own directory exists in there; bob's is not mounted.
    assert all(p.startswith(f"{shard}/alice") or p == shard for p in report["users_visible"])
    assert not any("bob" in p for p in report["users_visible"])
    assert user_dir(stack.data_dir, "bob").is_dir()  # it does exist on the host
