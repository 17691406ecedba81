"""Workers as Docker containers: one hardened container per user, run with the Docker SDK.

The container of user U on data dir D:
- is named `upw-<hash of D>-U` and labelled `upw.product`, `upw.user=U` and `upw.data-dir=D`;
  several stacks share one engine, and each removes only the containers of its own data dir;
- mounts exactly two host directories: U's directory (`user_dir(D, U)`, read-write, at the same
  layout under /data, so the worker gets `--data-dir /data`) and the ETL's socket directory
  (read-only: connecting to a unix socket needs write permission on the socket file, which the
  ETL makes 0666, and a read-only mount does not restrict sockets);
- runs the image's entrypoint (`python -m worker`) with the arguments the process runtime uses,
  as uid 10001, with no network, a read-only root and a small noexec tmpfs on /tmp, no
  capabilities, no-new-privileges, memory (no swap) and pid limits, and no restart policy.

The dispatcher creates U's directory and hands it to uid 10001 before the container starts,
since the worker creates its database there. The worker listens on `worker.sock` in that
directory; its host path can exceed the 107 bytes of a unix socket path, so the dispatcher dials
it through a short symlink `<workers dir>/U` -> U's directory.

Every SDK call blocks, so each one runs in a thread (`asyncio.to_thread`). Docker SDK errors
are turned into WorkerUnavailable here and nowhere else.

One thread per runtime follows the engine's `die` events of its containers, so `exit_status`
can say without a blocking call that a container ended, and why (exit code, OOM kill, its last
log lines). A container that dies is kept until `stop` removes it, so its logs can be read.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import docker.errors
from docker.api import APIClient
from docker.constants import DEFAULT_UNIX_SOCKET
from docker.utils import kwargs_from_env

from conventions.users import shard_of, user_dir, validate_user
from dispatcher.errors import WorkerUnavailable
from dispatcher.runtimes.base import RunningWorker

log = logging.getLogger(__name__)


PRODUCT = "unlimited-process-works"
LABEL_PRODUCT = "upw.product"
LABEL_USER = "upw.user"
LABEL_DATA_DIR = "upw.data-dir"
# The non-root user of the worker image.
WORKER_UID = 10001
WORKER_GID = 10001
DATA_MOUNT = PurePosixPath("/data")
ETL_MOUNT = PurePosixPath("/run/upw/etl")
SOCKET_NAME = "worker.sock"
# sun_path holds 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107
TMPFS = "rw,noexec,nosuid,nodev,size=16m"
LOG_LINES = 20
BUILD_HINT = "build it with ./build.sh worker"
ENGINE_HINT = "start a Docker Engine, set DOCKER_HOST, or use UPW_RUNTIME=process"


def container_name(data_dir: Path, user: str) -> str:
    """`upw-<12 hex digits of the data dir's hash>-<user>`: one name per user and data dir, so
    the engine itself refuses a second container of one user."""
    digest = hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:12]
    return f"upw-{digest}-{validate_user(user)}"


def container_owner() -> tuple[int, int]:
    """The uid:gid of the worker containers: the image's user (10001) when the dispatcher is
    root and can hand the user's directory to it; a non-root dispatcher cannot, so its
    containers run under its own uid instead."""
    if os.geteuid() == 0:
        return WORKER_UID, WORKER_GID
    return os.getuid(), os.getgid()


def _explain(exc: BaseException) -> str:
    if isinstance(exc, docker.errors.APIError):
        explanation = exc.explanation or str(exc)
        return f"{explanation} (HTTP {exc.status_code})" if exc.status_code else str(explanation)
    return str(exc) or type(exc).__name__


def _is_conflict(exc: BaseException) -> bool:
    return isinstance(exc, docker.errors.APIError) and exc.status_code == 409


@contextlib.contextmanager
def _translated(doing: str, hint: str = "") -> Iterator[None]:
    """Turns Docker SDK errors (and the OSErrors of its HTTP transport) into WorkerUnavailable."""
    try:
        yield
    except (docker.errors.DockerException, OSError) as exc:
        message = f"{doing}: {_explain(exc)}"
        raise WorkerUnavailable(f"{message}; {hint}" if hint else message) from exc


@dataclass(eq=False)
class DockerWorker:
    user: str
    socket: Path
    container_id: str
    name: str
    host_dir: Path
    link: Path
    stopping: bool = False
    # Seconds of `create` (including the directory's preparation) and `start`.
    phases: dict[str, float] = field(default_factory=dict)
    # Set once, by the events thread, when the container has ended.
    ended: str | None = field(default=None, repr=False)

    def describe(self) -> str:
        return f"container {self.container_id[:12]}"

    def exit_status(self) -> str | None:
        return self.ended


class DockerRuntime:
    """Workers as containers of one Docker Engine. Build it with `DockerRuntime.connect`, which
    checks that the engine answers and that the worker image exists."""

    name = "docker"

    def __init__(
        self,
        api: APIClient,
        *,
        data_dir: Path,
        workers_dir: Path,
        etl_socket: Path,
        image: str,
        memory: str,
        pids: int,
        stop_grace: float = 5.0,
        log_level: str = "INFO",
    ) -> None:
        self._api = api
        self._data_dir = data_dir.absolute()
        self._workers_dir = workers_dir
        self._etl_socket = etl_socket
        self._image = image
        self._memory = memory
        self._pids = pids
        # The worker gets up to 2 s to ship pending changes after SIGTERM; then SIGKILL.
        self._stop_grace = stop_grace
        self._log_level = log_level
        self._uid, self._gid = container_owner()
        self._labels = {LABEL_PRODUCT: PRODUCT, LABEL_DATA_DIR: str(self._data_dir)}
        self._workers: dict[str, DockerWorker] = {}
        self._lock = threading.Lock()
        self._events: _Events | None = None

    @classmethod
    async def connect(
        cls,
        *,
        data_dir: Path,
        workers_dir: Path,
        etl_socket: Path,
        image: str,
        memory: str,
        pids: int,
        log_level: str = "INFO",
        max_pool_size: int = 32,
    ) -> DockerRuntime:
        """A runtime on the engine named by DOCKER_HOST (default: the local socket). Raises
        WorkerUnavailable, with a hint, when no engine answers or the image is missing."""

        def client() -> APIClient:
            with _translated("no Docker Engine answers", ENGINE_HINT):
                options = kwargs_from_env()
                base_url = str(options.get("base_url") or DEFAULT_UNIX_SOCKET)
                # The SDK leaks a socket when it cannot connect to a unix socket, and a missing
                # socket is the usual way of having no engine, so that case is caught first.
                for scheme in ("unix://", "http+unix://"):
                    if base_url.startswith(scheme):
                        path = Path("/" + base_url.removeprefix(scheme).lstrip("/"))
                        if not path.exists():
                            raise FileNotFoundError(f"{base_url}: no such socket")
                api = APIClient(
                    version="auto", timeout=60, max_pool_size=max_pool_size, **options)
                api.ping()
            try:
                with _translated(f"the worker image {image!r} is missing", BUILD_HINT):
                    api.inspect_image(image)
            except BaseException:
                api.close()
                raise
            return api

        api = await asyncio.to_thread(client)
        return cls(api, data_dir=data_dir, workers_dir=workers_dir, etl_socket=etl_socket,
                   image=image, memory=memory, pids=pids, log_level=log_level)

    @property
    def api(self) -> APIClient:
        return self._api

    @property
    def data_dir(self) -> Path:
        return self._data_dir

    @property
    def workers_dir(self) -> Path:
        return self._workers_dir

    @property
    def etl_socket(self) -> Path:
        return self._etl_socket

    @property
    def labels(self) -> dict[str, str]:
        """The labels every container of this runtime carries (plus `upw.user`)."""
        return dict(self._labels)

    def container_name(self, user: str) -> str:
        return container_name(self._data_dir, user)

    async def start(self, user: str) -> DockerWorker:
        validate_user(user)
        link = self._workers_dir / user
        socket = link / SOCKET_NAME
        if len(str(socket).encode()) > MAX_SOCKET_PATH:
            raise WorkerUnavailable(
                f"the socket path {str(socket)!r} of the worker of {user!r} is longer than "
                f"{MAX_SOCKET_PATH} bytes; set UPW_RUN_DIR to a shorter directory")
        self._ensure_events()
        return await asyncio.to_thread(self._launch, user, link)

    def _launch(self, user: str, link: Path) -> DockerWorker:
        begun = time.monotonic()
        host_dir = user_dir(self._data_dir, user)
        inner_dir = DATA_MOUNT / "users" / shard_of(user) / user
        etl_dir = self._etl_socket.parent
        with _translated(f"the container settings of {user!r} are invalid",
                         "check UPW_WORKER_MEMORY and UPW_WORKER_PIDS"):
            host_config = self.host_config(host_dir, inner_dir, etl_dir)
        command = [
            "--user", user,
            "--data-dir", str(DATA_MOUNT),
            "--listen", str(inner_dir / SOCKET_NAME),
            "--etl-socket", str(ETL_MOUNT / self._etl_socket.name),
            "--log-level", self._log_level,
        ]
        name = self.container_name(user)
        self._prepare(user, host_dir, link)

        def create() -> str:
            container = self._api.create_container(
                self._image, command=command, name=name, user=f"{self._uid}:{self._gid}",
                labels={**self._labels, LABEL_USER: user}, host_config=host_config,
            )
            return str(container["Id"])

        doing = f"could not create the container of {user!r}"
        try:
            with _translated(doing, f"is the image {self._image!r} there? {BUILD_HINT}"):
                try:
                    container_id = create()
                except docker.errors.APIError as exc:
                    if not _is_conflict(exc):
                        raise
                    # A container of this user left behind (its stop failed, or a crashed
                    # dispatcher): it is ours by name, so it goes.
                    log.warning("removing container %s of %r left behind", name, user)
                    self._api.remove_container(name, force=True)
                    container_id = create()
        except BaseException:
            self._unlink(host_dir, link)
            raise
        created = time.monotonic()
        worker = DockerWorker(user=user, socket=link / SOCKET_NAME, container_id=container_id,
                              name=name, host_dir=host_dir, link=link)
        with self._lock:
            self._workers[container_id] = worker
        try:
            with _translated(f"could not start the container of {user!r}"):
                self._api.start(container_id)
        except BaseException:
            self._remove(worker)
            raise
        worker.phases.update(create=created - begun, start=time.monotonic() - created)
        return worker

    def host_config(self, host_dir: Path, inner_dir: PurePosixPath, etl_dir: Path) -> Any:
        """The hardened host config of a worker container (also the bench's engine floor)."""
        return self._api.create_host_config(
            binds={
                str(host_dir): {"bind": str(inner_dir), "mode": "rw"},
                str(etl_dir): {"bind": str(ETL_MOUNT), "mode": "ro"},
            },
            network_mode="none",
            read_only=True,
            tmpfs={"/tmp": TMPFS},
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
            mem_limit=self._memory,
            memswap_limit=self._memory,
            pids_limit=self._pids,
            auto_remove=False,
        )

    def _prepare(self, user: str, host_dir: Path, link: Path) -> None:
        """Makes the user's directory, owned by the container's user, and the short link."""
        try:
            host_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            # A directory made by the process runtime (or a killed container's socket) is
            # handed over too; there are only a few files in it.
            for path in (host_dir, *host_dir.iterdir()):
                if path.name == SOCKET_NAME and path != host_dir:
                    path.unlink(missing_ok=True)
                    continue
                stat = path.lstat()
                if (stat.st_uid, stat.st_gid) != (self._uid, self._gid):
                    os.chown(path, self._uid, self._gid, follow_symlinks=False)
            self._workers_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            # Mounted even before the ETL runs; the ETL's socket appears in it later.
            self._etl_socket.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(host_dir, target_is_directory=True)
        except OSError as exc:
            raise WorkerUnavailable(
                f"could not prepare the directory {str(host_dir)!r} of {user!r} for its "
                f"container (uid {self._uid}): {exc}; the dispatcher must be able to create "
                "and chown it (run it as root, as docker compose does)") from exc

    async def stop(self, worker: RunningWorker) -> None:
        assert isinstance(worker, DockerWorker), worker
        worker.stopping = True
        await asyncio.to_thread(self._stop, worker)

    def _stop(self, worker: DockerWorker) -> None:
        try:
            with _translated(f"could not stop the container of {worker.user!r}"):
                try:
                    # The engine takes whole seconds.
                    self._api.stop(worker.container_id, timeout=math.ceil(self._stop_grace))
                except docker.errors.NotFound:
                    pass
        finally:
            self._remove(worker)

    def _remove(self, worker: DockerWorker) -> None:
        """Removes the container (forced), the link and, for a user without an account, the
        empty directory, so a request for an unknown user leaves nothing on disk."""
        with self._lock:
            self._workers.pop(worker.container_id, None)
        try:
            with _translated(f"could not remove the container of {worker.user!r}"):
                try:
                    self._api.remove_container(worker.container_id, force=True)
                except docker.errors.NotFound:
                    pass
                except docker.errors.APIError as exc:
                    if not _is_conflict(exc):  # 409: its removal is already in progress
                        raise
        finally:
            self._unlink(worker.host_dir, worker.link)

    @staticmethod
    def _unlink(host_dir: Path, link: Path) -> None:
        with contextlib.suppress(OSError):
            link.unlink()
        with contextlib.suppress(OSError):
            (host_dir / SOCKET_NAME).unlink()
        with contextlib.suppress(OSError):
            host_dir.rmdir()  # only when empty

    async def remove_leftovers(self) -> int:
        return await asyncio.to_thread(self._remove_leftovers)

    def _remove_leftovers(self) -> int:
        filters = {"label": [f"{k}={v}" for k, v in self._labels.items()]}
        removed = 0
        with _translated("could not list the worker containers left behind", ENGINE_HINT):
            for container in self._api.containers(all=True, filters=filters):
                labels = container.get("Labels") or {}
                log.info("removing container %s of %r left behind by an earlier run",
                         str(container["Id"])[:12], labels.get(LABEL_USER))
                try:
                    self._api.remove_container(container["Id"], force=True)
                except docker.errors.NotFound:
                    continue
                removed += 1
        if self._workers_dir.is_dir():
            for entry in self._workers_dir.iterdir():
                if entry.is_symlink():
                    entry.unlink(missing_ok=True)
        return removed

    def _ensure_events(self) -> None:
        if self._events is None:
            self._events = _Events(self._api, self._labels, self._on_die)
            self._events.start()

    def _on_die(self, container_id: str) -> None:
        """Runs in the events thread: records why a container that nobody stopped ended."""
        with self._lock:
            worker = self._workers.get(container_id)
        if worker is None or worker.stopping or worker.ended is not None:
            return
        worker.ended = self._why_ended(worker)
        log.warning("worker of %r (%s) ended: %s", worker.user, worker.describe(), worker.ended)

    def _why_ended(self, worker: DockerWorker) -> str:
        what = f"its container {worker.container_id[:12]} exited"
        try:
            state: dict[str, Any] = self._api.inspect_container(worker.container_id)["State"]
            raw: bytes = self._api.logs(worker.container_id, stdout=True, stderr=True,
                                        tail=LOG_LINES)
        except (docker.errors.DockerException, OSError) as exc:
            return f"{what} (its state and logs could not be read: {_explain(exc)})"
        what += f" with status {state.get('ExitCode')}"
        if state.get("OOMKilled"):
            what += f" (killed for using more than {self._memory}; raise UPW_WORKER_MEMORY)"
        if state.get("Error"):
            what += f" ({state['Error']})"
        lines = raw.decode(errors="replace").rstrip().splitlines()[-LOG_LINES:]
        if not lines:
            return f"{what}, logging nothing"
        return f"{what}; its last log lines:\n" + "\n".join(f"  {line}" for line in lines)

    async def close(self) -> None:
        """Stops following events and closes the client; the containers are left alone."""
        events, self._events = self._events, None
        if events is not None:
            await asyncio.to_thread(events.close)
        await asyncio.to_thread(self._api.close)


class _Events:
    """A thread that follows the engine's `die` events of one runtime's containers and calls
    `on_die(container id)`. It reconnects when the stream breaks (an engine restart), asking
    for the events it missed."""

    def __init__(
        self, api: APIClient, labels: dict[str, str], on_die: Callable[[str], None]
    ) -> None:
        self._api = api
        self._filters = {
            "type": "container",
            "event": "die",
            "label": [f"{k}={v}" for k, v in labels.items()],
        }
        self._on_die = on_die
        # Events are replayed from here on, so none is lost between a start and the stream.
        self._since = int(time.time()) - 1
        self._closed = threading.Event()
        self._stream: Any = None
        self._thread = threading.Thread(target=self._run, name="upw-docker-events", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._closed.is_set():
            try:
                stream = self._api.events(since=self._since, filters=self._filters, decode=True)
            except Exception:
                if not self._closed.is_set():
                    log.exception("following the Docker Engine's events failed; retrying")
                self._closed.wait(1.0)
                continue
            self._stream = stream
            try:
                # close() may have come before the stream existed.
                if not self._closed.is_set():
                    for event in stream:
                        self._since = max(self._since, int(event.get("time", 0)))
                        container_id = event.get("id") or event.get("Actor", {}).get("ID")
                        if container_id:
                            self._on_die(str(container_id))
            except Exception:
                if not self._closed.is_set():
                    log.exception("following the Docker Engine's events failed; retrying")
            finally:
                self._stream = None
                with contextlib.suppress(Exception):
                    stream.close()
                # close() shuts the socket down; only closing the response frees its descriptor.
                response = getattr(stream, "_response", None)
                if response is not None:
                    with contextlib.suppress(Exception):
                        response.close()
            self._closed.wait(1.0)

    def close(self) -> None:
        self._closed.set()
        stream = self._stream
        if stream is not None:
            with contextlib.suppress(Exception):
                stream.close()
        self._thread.join(5.0)
