"""The interface between the worker pool and the places a worker can run."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Protocol


class RunningWorker(Protocol):
    """One started worker of one user."""

    @property
    def user(self) -> str: ...

    @property
    def socket(self) -> Path:
        """The unix socket on which the worker serves AccountService (a path on this host)."""
        ...

    @property
    def phases(self) -> Mapping[str, float]:
        """Seconds each step of the launch took, in order (e.g. a container's `create` and
        `start`, a process's `spawn`); the pool reports them when the worker is ready."""
        ...

    def describe(self) -> str:
        """A short name for logs, e.g. 'pid 1234' or 'container 0123abcd'."""
        ...

    def exit_status(self) -> str | None:
        """None while the worker may still run; otherwise why it ended, for an error message."""
        ...


class Runtime(Protocol):
    """Starts and stops workers. Implementations must be safe to call for many users at once;
    the pool guarantees that start and stop are never called concurrently for one user."""

    name: str

    async def start(self, user: str) -> RunningWorker:
        """Launches the worker of `user` and returns once it is launched (not yet ready: the
        pool waits for its health check). Raises WorkerUnavailable when it cannot launch."""
        ...

    async def stop(self, worker: RunningWorker) -> None:
        """Asks the worker to stop (it ships pending changes first, for a bounded time), then
        forces it. Returns once it is gone. Idempotent."""
        ...

    async def remove_leftovers(self) -> int:
        """Stops workers that an earlier dispatcher run left behind; returns how many."""
        ...

    async def close(self) -> None:
        """Releases what the runtime itself holds (a client, a helper process); workers are
        left alone, so the pool stops them first."""
        ...
