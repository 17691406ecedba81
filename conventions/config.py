"""The one place that reads the environment.

Every `UPW_*` variable has a default that works on a laptop. Components receive a `Settings`
and never read the environment themselves.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

RUNTIMES = ("auto", "docker", "process")


class ConfigError(ValueError):
    """An UPW_* variable has a value that cannot be used."""


@dataclass(frozen=True, kw_only=True)
class Settings:
    http_port: int = 8080
    grpc_port: int = 50051
    data_dir: Path = field(default_factory=lambda: Path("var").absolute())
    runtime: str = "auto"
    # Seconds a worker stays warm after its last request; 0 = a fresh worker per request.
    idle_ttl: float = 60.0
    max_workers: int = 64
    # None = an embedded PostgreSQL (pgserver) under <data dir>/postgres.
    database_url: str | None = None
    # Unix sockets live here. It is short on purpose: a socket path may not exceed 107 bytes,
    # and the data dir can be deep. None = /tmp/upw-<hash of the data dir>.
    run_dir_override: Path | None = None
    log_level: str = "INFO"
    # The docker runtime: the worker image and each worker container's limits.
    worker_image: str = "upw/worker:latest"
    worker_memory: str = "128m"
    worker_pids: int = 64

    @property
    def run_dir(self) -> Path:
        if self.run_dir_override is not None:
            return self.run_dir_override
        digest = hashlib.sha256(str(self.data_dir.resolve()).encode()).hexdigest()[:12]
        return Path(tempfile.gettempdir()) / f"upw-{digest}"

    @property
    def etl_socket(self) -> Path:
        # In a directory of its own, so a worker container can mount exactly this directory.
        return self.run_dir / "etl" / "etl.sock"

    @property
    def workers_dir(self) -> Path:
        return self.run_dir / "workers"

    def with_(self, **changes: object) -> Settings:
        return replace(self, **changes)  # type: ignore[arg-type]


def _int(env: Mapping[str, str], name: str, default: int, *, minimum: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise ConfigError(f"{name}={raw!r} must be at least {minimum}")
    return value


def _port(env: Mapping[str, str], name: str, default: int) -> int:
    value = _int(env, name, default, minimum=0)
    if value > 65535:
        raise ConfigError(f"{name}={value} is not a TCP port")
    return value


def from_env(env: Mapping[str, str] | None = None) -> Settings:
    env = os.environ if env is None else env
    runtime = env.get("UPW_RUNTIME", "auto") or "auto"
    if runtime not in RUNTIMES:
        raise ConfigError(f"UPW_RUNTIME={runtime!r} must be one of {', '.join(RUNTIMES)}")
    raw_ttl = env.get("UPW_IDLE_TTL", "") or "60"
    try:
        idle_ttl = float(raw_ttl)
    except ValueError:
        raise ConfigError(f"UPW_IDLE_TTL={raw_ttl!r} is not a number of seconds") from None
    if idle_ttl < 0:
        raise ConfigError(f"UPW_IDLE_TTL={raw_ttl!r} must be 0 or more")
    run_dir = env.get("UPW_RUN_DIR")
    return Settings(
        http_port=_port(env, "UPW_HTTP_PORT", 8080),
        grpc_port=_port(env, "UPW_GRPC_PORT", 50051),
        data_dir=Path(env.get("UPW_DATA_DIR") or "var").absolute(),
        runtime=runtime,
        idle_ttl=idle_ttl,
        max_workers=_int(env, "UPW_MAX_WORKERS", 64, minimum=1),
        database_url=env.get("UPW_DATABASE_URL") or None,
        run_dir_override=Path(run_dir).absolute() if run_dir else None,
        log_level=(env.get("UPW_LOG_LEVEL") or "INFO").upper(),
        worker_image=env.get("UPW_WORKER_IMAGE") or "upw/worker:latest",
        worker_memory=env.get("UPW_WORKER_MEMORY") or "128m",
        worker_pids=_int(env, "UPW_WORKER_PIDS", 64, minimum=8),
    )


def to_env(settings: Settings) -> dict[str, str]:
    """The UPW_* variables that `from_env` turns back into the same settings; the launcher
    passes them to every component it starts."""
    env = {
        "UPW_HTTP_PORT": str(settings.http_port),
        "UPW_GRPC_PORT": str(settings.grpc_port),
        "UPW_DATA_DIR": str(settings.data_dir),
        "UPW_RUNTIME": settings.runtime,
        "UPW_IDLE_TTL": repr(settings.idle_ttl),
        "UPW_MAX_WORKERS": str(settings.max_workers),
        "UPW_LOG_LEVEL": settings.log_level,
        "UPW_WORKER_IMAGE": settings.worker_image,
        "UPW_WORKER_MEMORY": settings.worker_memory,
        "UPW_WORKER_PIDS": str(settings.worker_pids),
    }
    if settings.database_url is not None:
        env["UPW_DATABASE_URL"] = settings.database_url
    if settings.run_dir_override is not None:
        env["UPW_RUN_DIR"] = str(settings.run_dir_override)
    return env
