"""`./build.sh`, then `docker compose up`: the original curl walkthrough on the published port,
and the data still there after `down` and `up`."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from docker.api import APIClient

from tests.conftest import WALKTHROUGH, Http, free_port, wait_for

pytestmark = pytest.mark.docker

ROOT = Path(__file__).resolve().parent.parent


def compose_command() -> list[str]:
    """`docker compose` (v2) where the CLI has it, else the `docker-compose` of the machine."""
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, check=False)
    if probe.returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    pytest.fail("neither `docker compose` nor `docker-compose` is installed")


class Compose:
    def __init__(self, project: str, env: dict[str, str]) -> None:
        self.data_dir = env["UPW_DATA_DIR"]
        self.base = [*compose_command(), "-p", project, "-f", str(ROOT / "docker-compose.yml")]
        self.env = {**os.environ, **env}

    def __call__(self, *args: str) -> None:
        result = subprocess.run([*self.base, *args], env=self.env, cwd=ROOT, capture_output=True,
                                text=True, timeout=600, check=False)
        assert result.returncode == 0, f"compose {' '.join(args)}:\n{result.stdout}{result.stderr}"


@pytest.fixture
def compose(engine: APIClient, tmp_path: Path) -> Iterator[tuple[Compose, Http]]:
    built = subprocess.run(["./build.sh"], cwd=ROOT, capture_output=True, text=True,
                           timeout=1800, check=False)
    assert built.returncode == 0, built.stdout + built.stderr
    run_dir = tempfile.mkdtemp(prefix="upw-", dir="/tmp")
    os.chmod(run_dir, 0o1777)  # sockets of containers with different uids, as build.sh makes it
    http_port = free_port()
    project = f"upwtest{http_port}"
    compose = Compose(project, {
        "UPW_DATA_DIR": str(tmp_path / "data"), "UPW_RUN_DIR": run_dir,
        "UPW_HTTP_PORT": str(http_port), "UPW_GRPC_PORT": str(free_port()),
    })
    try:
        yield compose, Http(http_port)
    finally:
        compose("down", "-v", "--timeout", "20")
        leftovers = engine.containers(
            all=True, filters={"label": f"upw.data-dir={compose.data_dir}"})
        for container in leftovers:
            engine.remove_container(container["Id"], force=True)
        shutil.rmtree(run_dir, ignore_errors=True)


def summary(http: Http) -> str | None:
    """The summary text; None while the stack does not answer yet."""
    try:
        response = http.get("/account_summary")
    except OSError:
        return None
    return response.text if response.status == 200 else None


# The fixture builds every image, from scratch on a fresh machine (base image, wheels): that
# alone took over 5 minutes on a loaded 2-core machine, beyond the suite's default timeout.
@pytest.mark.timeout(1800)
def test_build_then_compose_up_serves_the_walkthrough(
    compose: tuple[Compose, Http], engine: APIClient
) -> None:
    up, http = compose
    up("up", "-d")
    wait_for(lambda: summary(http) == "", timeout=120, what="the composed stack to answer")
    for path, expected in WALKTHROUGH:
        response = http.get(path)
        assert (response.status, response.text) == (200, expected), path
    expected_summary = "koduki, 256\nnanoha, 156\nmisuzu, 75\n"
    wait_for(lambda: summary(http) == expected_summary, timeout=30, what="the summary")

    up("down", "--timeout", "20")
    # The dispatcher removed its worker containers when it stopped.
    assert engine.containers(all=True, filters={"label": f"upw.data-dir={up.data_dir}"}) == []
    up("up", "-d")
    wait_for(lambda: summary(http) == expected_summary, timeout=120,
             what="the same summary after down and up")
    assert http.get("/koduki/show").text == "koduki's account is 256 yen.\n"
