"""The docker runtime on the real Docker Engine with the real worker image, driven by the real
worker pool. Without an engine or the image these tests skip, or fail under
UPW_REQUIRE_DOCKER=1 (as `.ci/run` sets it)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import docker.errors
import grpc
import pytest
from docker.api import APIClient

from conventions.config import ConfigError, Settings
from conventions.users import account_db, user_dir
from dispatcher.errors import WorkerUnavailable
from dispatcher.pool import WorkerPool
from dispatcher.runtimes import choose_runtime
from dispatcher.runtimes.docker import (
    LABEL_DATA_DIR,
    LABEL_PRODUCT,
    LABEL_USER,
    PRODUCT,
    DockerRuntime,
    DockerWorker,
)
from dispatcher.runtimes.process import ProcessRuntime
from tests.conftest import WORKER_IMAGE
from upw.account.v1 import account_pb2

pytestmark = pytest.mark.docker

T = TypeVar("T")


def run(coro: Awaitable[T]) -> T:
    async def main() -> T:
        return await coro

    return asyncio.run(main())


@pytest.fixture
def make_settings(tmp_path: Path) -> Iterator[Callable[[str], Settings]]:
    """Settings for a data dir under tmp_path, with sockets under a short /tmp directory."""
    run_dirs: list[str] = []

    def make(name: str = "data") -> Settings:
        run_dir = tempfile.mkdtemp(prefix="upw-", dir="/tmp")
        run_dirs.append(run_dir)
        return Settings(data_dir=tmp_path / name, run_dir_override=Path(run_dir), runtime="docker",
                        worker_image=WORKER_IMAGE, worker_memory="96m", worker_pids=48)

    yield make
    for run_dir in run_dirs:
        shutil.rmtree(run_dir, ignore_errors=True)


@pytest.fixture
def make_runtime(
    engine: APIClient, make_settings: Callable[[str], Settings]
) -> Iterator[Callable[[str], DockerRuntime]]:
    """Docker runtimes, each on a data dir of its own; every container they made is removed at
    the end, whatever happened."""
    made: list[DockerRuntime] = []

    def make(name: str = "data") -> DockerRuntime:
        settings = make_settings(name)
        runtime = run(DockerRuntime.connect(
            data_dir=settings.data_dir, workers_dir=settings.workers_dir,
            etl_socket=settings.etl_socket, image=settings.worker_image,
            memory=settings.worker_memory, pids=settings.worker_pids))
        made.append(runtime)
        return runtime

    yield make
    for runtime in made:
        for container in containers_of(engine, runtime):
            with contextlib.suppress(docker.errors.NotFound):
                engine.remove_container(container["Id"], force=True)
        run(runtime.close())


@pytest.fixture
def runtime(make_runtime: Callable[[str], DockerRuntime]) -> DockerRuntime:
    return make_runtime("data")


def containers_of(engine: APIClient, runtime: DockerRuntime, user: str | None = None) -> list[Any]:
    labels = [f"{k}={v}" for k, v in runtime.labels.items()]
    if user is not None:
        labels.append(f"{LABEL_USER}={user}")
    found: list[Any] = engine.containers(all=True, filters={"label": labels})
    return found


async def wait_until(condition: Callable[[], object], what: str) -> None:
    deadline = time.monotonic() + 15.0
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after 15s waiting for {what}")
        await asyncio.sleep(0.05)


def test_a_worker_container_serves_its_user_and_is_hardened(
    engine: APIClient, runtime: DockerRuntime
) -> None:
    data_dir = runtime.data_dir

    async def scenario() -> dict[str, Any]:
        pool = WorkerPool(runtime, idle_ttl=60, max_workers=4)
        try:
            async with pool.lease("nanoha") as worker:
                await worker.stub.CreateAccount(account_pb2.CreateAccountRequest(user="nanoha"))
                change = await worker.stub.Deposit(
                    account_pb2.DepositRequest(user="nanoha", amount=128))
                assert change.account.balance == 128
                account = await worker.stub.GetAccount(
                    account_pb2.GetAccountRequest(user="nanoha"))
                assert account.balance == 128
                assert isinstance(worker.running, DockerWorker)
                # The short path the pool dials; the real socket is in the user's directory.
                assert worker.running.socket.parent.is_symlink()
                assert len(str(worker.running.socket)) <= 107
                [container] = containers_of(engine, runtime, "nanoha")
                return dict(engine.inspect_container(container["Id"]))
        finally:
            await pool.close()

    inspected = run(scenario())
    host_dir = user_dir(data_dir, "nanoha")
    assert account_db(data_dir, "nanoha").is_file()
    assert host_dir.stat().st_uid == 10001

    config, host = inspected["Config"], inspected["HostConfig"]
    assert inspected["Name"] == "/" + runtime.container_name("nanoha")
    # (plus the labels of the image)
    assert config["Labels"].items() >= {LABEL_PRODUCT: PRODUCT, LABEL_USER: "nanoha",
                                        LABEL_DATA_DIR: str(data_dir)}.items()
    shard = host_dir.parent.name
    mounts = sorted((m["Source"], m["Destination"], m["RW"]) for m in inspected["Mounts"])
    assert mounts == sorted([
        (str(host_dir), f"/data/users/{shard}/nanoha", True),
        (str(runtime.etl_socket.parent), "/run/upw/etl", False),
    ])
    assert config["User"].split(":")[0] == "10001"
    assert host["NetworkMode"] == "none"
    assert host["ReadonlyRootfs"] is True
    assert host["CapDrop"] == ["ALL"]
    assert host["SecurityOpt"] == ["no-new-privileges"]
    assert host["Memory"] == 96 * 1024 * 1024
    assert host["MemorySwap"] == 96 * 1024 * 1024
    assert host["PidsLimit"] == 48
    assert set(host["Tmpfs"]) == {"/tmp"}
    assert "noexec" in host["Tmpfs"]["/tmp"]
    assert host["RestartPolicy"]["Name"] in ("", "no")
    assert host["AutoRemove"] is False
    # pool.close() stopped it: the container, the link and the socket are gone.
    assert containers_of(engine, runtime, "nanoha") == []
    assert not (runtime.workers_dir / "nanoha").exists()
    assert not (host_dir / "worker.sock").exists()


def test_a_request_for_an_unknown_user_leaves_nothing_on_disk(
    engine: APIClient, runtime: DockerRuntime
) -> None:
    async def scenario() -> None:
        pool = WorkerPool(runtime, idle_ttl=0, max_workers=4)
        try:
            async with pool.lease("nobody") as worker:
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await worker.stub.GetAccount(account_pb2.GetAccountRequest(user="nobody"))
                assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        finally:
            await pool.close()

    run(scenario())
    assert not user_dir(runtime.data_dir, "nobody").exists()
    assert containers_of(engine, runtime, "nobody") == []


def test_the_worker_reaches_the_etl_socket_through_its_read_only_mount(
    engine: APIClient, runtime: DockerRuntime
) -> None:
    etl_socket = runtime.etl_socket.parent / "etl.sock"
    etl_socket.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    accepted = threading.Event()
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(etl_socket))
        etl_socket.chmod(0o666)  # as the ETL does
        listener.listen()

        def accept() -> None:
            with contextlib.suppress(OSError):
                listener.accept()[0].close()
                accepted.set()

        threading.Thread(target=accept, daemon=True).start()

        async def scenario() -> tuple[int, bytes]:
            worker = await runtime.start("vita")
            try:
                await wait_until(worker.socket.exists, "the worker's socket")
                probe = ("import socket; s = socket.socket(socket.AF_UNIX); "
                         "s.connect('/run/upw/etl/etl.sock'); open('/run/upw/etl/x', 'w')")
                exec_id = engine.exec_create(worker.container_id, ["python", "-c", probe])
                output: bytes = engine.exec_start(exec_id)
                return engine.exec_inspect(exec_id)["ExitCode"], output
            finally:
                await runtime.stop(worker)

        code, output = run(scenario())
    assert accepted.wait(5), output
    # Connected, and then could not write into the mounted directory.
    assert code == 1 and b"Read-only file system" in output, output


def test_stop_removes_the_container_and_is_idempotent(
    engine: APIClient, runtime: DockerRuntime
) -> None:
    async def scenario() -> None:
        worker = await runtime.start("hayate")
        assert len(containers_of(engine, runtime, "hayate")) == 1
        await runtime.stop(worker)
        assert containers_of(engine, runtime, "hayate") == []
        await runtime.stop(worker)

    run(scenario())


def test_leftovers_of_this_data_dir_are_removed_and_no_others(
    engine: APIClient, make_runtime: Callable[[str], DockerRuntime]
) -> None:
    crashed, other = make_runtime("data"), make_runtime("other")
    run(crashed.start("fate"))
    run(other.start("fate"))
    successor = make_runtime("data")
    assert run(successor.remove_leftovers()) == 1
    assert containers_of(engine, crashed) == []
    assert len(containers_of(engine, other)) == 1


def test_a_container_that_dies_before_it_is_ready_is_reported_and_removed(
    engine: APIClient, runtime: DockerRuntime
) -> None:
    broken = account_db(runtime.data_dir, "signum")
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"this is not a SQLite database" * 100)

    async def scenario() -> str:
        pool = WorkerPool(runtime, idle_ttl=60, max_workers=4)
        try:
            with pytest.raises(WorkerUnavailable) as caught:
                async with pool.lease("signum"):
                    pass
            return str(caught.value)
        finally:
            await pool.close()

    message = run(scenario())
    assert "could not start" in message and "exited with status 1" in message, message
    assert "last log lines" in message and "not a database" in message, message
    assert containers_of(engine, runtime, "signum") == []


def test_a_container_killed_after_start_is_reported_by_exit_status(
    engine: APIClient, runtime: DockerRuntime
) -> None:
    async def scenario() -> str | None:
        worker = await runtime.start("zafira")
        try:
            await wait_until(worker.socket.exists, "the worker's socket")
            assert worker.exit_status() is None
            engine.kill(worker.container_id)
            await wait_until(lambda: worker.exit_status() is not None, "the exit status")
            return worker.exit_status()
        finally:
            await runtime.stop(worker)

    status = run(scenario())
    assert status is not None and "exited with status 137" in status, status
    assert containers_of(engine, runtime, "zafira") == []


def test_choose_runtime_picks_docker_when_it_can(
    engine: APIClient, make_settings: Callable[[str], Settings]
) -> None:
    for runtime_name in ("docker", "auto"):
        chosen = run(choose_runtime(make_settings("data").with_(runtime=runtime_name)))
        assert isinstance(chosen, DockerRuntime)
        run(chosen.close())
    missing = make_settings("data").with_(worker_image="upw/no-such-worker:latest")
    with pytest.raises(ConfigError, match=r"upw/no-such-worker:latest.*\./build\.sh worker"):
        run(choose_runtime(missing.with_(runtime="docker")))
    assert isinstance(run(choose_runtime(missing.with_(runtime="auto"))), ProcessRuntime)


@pytest.mark.parametrize("runtime_name", ["docker", "auto"])
def test_choose_runtime_without_an_engine(
    runtime_name: str, make_settings: Callable[[str], Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    settings = make_settings("data").with_(runtime=runtime_name)
    if runtime_name == "docker":
        with pytest.raises(ConfigError, match="no Docker Engine answers"):
            run(choose_runtime(settings))
    else:
        assert isinstance(run(choose_runtime(settings)), ProcessRuntime)

