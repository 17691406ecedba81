"""A real stack for a benchmark: ETL with its embedded PostgreSQL, dispatcher and Envoy, started
with `launcher.stack.Stack` in a fresh temporary data dir, on free ports, as the integration
tests do (`tests/conftest.py`, `make_stack`).

    with bench_stack(runtime="docker", idle_ttl=0) as stack:
        load.drive(stack.base_url, ...)

Every keyword is a `conventions.config.Settings` field. The data dir, the run dir and the
logs are removed when the block ends, and so is any worker container left behind. The logs
are copied first into `$UPW_BENCH_LOG_DIR/<n>-<runtime>-ttl<idle TTL>/` when that is set
(`python -m bench` sets it to `<out>/logs`), and kept in place when the block raises.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from conventions.config import Settings
from conventions.users import account_db, user_dir
from dispatcher.runtimes.process import worker_processes
from launcher.stack import Stack
from worker.store import Store

log = logging.getLogger("bench.stackrun")

WORKER_IMAGE = os.environ.get("UPW_WORKER_IMAGE") or "upw/worker:latest"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class BenchStack:
    stack: Stack
    settings: Settings
    log_dir: Path

    @property
    def http_port(self) -> int:
        return self.settings.http_port

    @property
    def base_url(self) -> str:
        """Envoy, the only public entry."""
        return f"http://127.0.0.1:{self.settings.http_port}"

    @property
    def data_dir(self) -> Path:
        return self.settings.data_dir

    def live_workers(self) -> int:
        """Worker processes (process runtime) or running containers (docker) of this stack."""
        if self.settings.runtime == "docker":
            return len(_containers(self.data_dir, running_only=True))
        return len(worker_processes(self.settings.workers_dir))

    def wait_idle(self, timeout: float = 60.0) -> float:
        """Waits until no worker of this stack runs (requests a load generator dropped may
        still be starting workers), so one case does not pay for the last; returns the
        seconds waited."""
        started = time.monotonic()
        while self.live_workers() and time.monotonic() - started < timeout:
            time.sleep(0.2)
        return time.monotonic() - started

    def log_text(self, component: str) -> str:
        """The log of `component` (etl, dispatcher, envoy) so far."""
        path = self.log_dir / f"{component}.log"
        return path.read_text(errors="replace") if path.exists() else ""


def docker_available(image: str = WORKER_IMAGE) -> str | None:
    """None when a Docker Engine answers and has `image`; otherwise why not."""
    from docker.api import APIClient
    from docker.errors import DockerException
    from docker.utils import kwargs_from_env

    try:
        api = APIClient(version="auto", timeout=10, **kwargs_from_env())
    except (DockerException, OSError) as exc:
        return f"no Docker Engine answers ({exc})"
    try:
        api.ping()
        api.inspect_image(image)
    except (DockerException, OSError) as exc:
        return f"no Docker Engine with the image {image!r} (./build.sh worker): {exc}"
    finally:
        api.close()
    return None


def _containers(data_dir: Path, *, running_only: bool = False) -> list[str]:
    """The ids of the worker containers of the stack on `data_dir`."""
    from docker.api import APIClient
    from docker.utils import kwargs_from_env

    api = APIClient(version="auto", timeout=30, **kwargs_from_env())
    try:
        found = api.containers(all=not running_only,
                               filters={"label": f"upw.data-dir={data_dir}"})
        return [str(c["Id"]) for c in found]
    finally:
        api.close()


def _remove_containers(data_dir: Path) -> None:
    from docker.api import APIClient
    from docker.errors import DockerException
    from docker.utils import kwargs_from_env

    try:
        ids = _containers(data_dir)
        if ids:
            api = APIClient(version="auto", timeout=30, **kwargs_from_env())
            try:
                for container_id in ids:
                    api.remove_container(container_id, force=True)
            finally:
                api.close()
    except (DockerException, OSError) as exc:
        log.warning("could not remove the worker containers of %s: %s", data_dir, exc)


def seed_accounts(data_dir: Path, names: Iterable[str], *,
                  owner: tuple[int, int] | None = None) -> float:
    """Creates each account directly in its own database, through `worker.store.Store` (the
    code a worker runs), much faster than a container start per user: setup, not measured.
    `owner` (uid, gid) gets the user's directory and files. Returns the seconds it took."""
    started = time.monotonic()
    quiet = logging.getLogger("worker.store")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # not one "account created" line per user
    try:
        for name in names:
            _seed(data_dir, name, owner)
    finally:
        quiet.setLevel(level)
    return time.monotonic() - started


def _seed(data_dir: Path, name: str, owner: tuple[int, int] | None) -> None:
    store = Store.open(account_db(data_dir, name), user=name)
    try:
        store.create()
    finally:
        store.close()
    if owner is not None:
        directory = user_dir(data_dir, name)
        for path in (directory, *directory.iterdir()):
            os.chown(path, *owner)


def _keep_logs(log_dir: Path, label: str) -> None:
    keep = os.environ.get("UPW_BENCH_LOG_DIR")
    if not keep or not log_dir.is_dir():
        return
    target = Path(keep)
    target.mkdir(parents=True, exist_ok=True)
    number = len(list(target.iterdir())) + 1
    shutil.copytree(log_dir, target / f"{number:02d}-{label}")


@contextlib.contextmanager
def bench_stack(**overrides: object) -> Iterator[BenchStack]:
    """Starts a stack with the test defaults (process runtime, 60 s idle TTL, 64 workers, INFO
    logs) changed by `overrides`, yields it running, and stops and removes it afterwards."""
    root = Path(tempfile.mkdtemp(prefix="upw-bench-", dir="/tmp"))
    # Socket paths are limited to 107 bytes: the run dir is short and of its own.
    run_dir = Path(tempfile.mkdtemp(prefix="upw-", dir="/tmp"))
    settings = Settings(
        http_port=free_port(), grpc_port=free_port(), data_dir=root / "data",
        runtime="process", idle_ttl=60.0, max_workers=64, run_dir_override=run_dir,
        log_level="INFO", worker_image=WORKER_IMAGE,
    ).with_(**overrides)
    log_dir = root / "logs"
    stack = Stack(settings, log_dir=log_dir)
    failed = False
    try:
        log.info("starting a stack (runtime %s, idle TTL %gs, at most %d workers) in %s",
                 settings.runtime, settings.idle_ttl, settings.max_workers, root)
        stack.start()
        yield BenchStack(stack, settings, log_dir)
    except BaseException:
        failed = True
        raise
    finally:
        stack.stop()
        if settings.runtime != "process":
            _remove_containers(settings.data_dir)
        shutil.rmtree(run_dir, ignore_errors=True)
        _keep_logs(log_dir, f"{settings.runtime}-ttl{settings.idle_ttl:g}")
        if failed:
            log.warning("the stack's logs are kept in %s", log_dir)
            shutil.rmtree(settings.data_dir, ignore_errors=True)
        else:
            shutil.rmtree(root, ignore_errors=True)
