"""Where workers run. One module per runtime, all behind `base.Runtime`; `choose_runtime`
picks one from the settings."""

from __future__ import annotations

import logging

from conventions.config import ConfigError, Settings
from dispatcher.errors import WorkerUnavailable
from dispatcher.runtimes.base import Runtime
from dispatcher.runtimes.docker import DockerRuntime
from dispatcher.runtimes.process import ProcessRuntime

log = logging.getLogger(__name__)


async def choose_runtime(settings: Settings) -> Runtime:
    """The runtime named by UPW_RUNTIME. `docker` raises ConfigError when no engine answers or
    the worker image is missing; `auto` picks docker when both are there, otherwise process,
    and says in the log which it picked and why."""
    if settings.runtime in ("docker", "auto"):
        try:
            runtime = await DockerRuntime.connect(
                data_dir=settings.data_dir,
                workers_dir=settings.workers_dir,
                etl_socket=settings.etl_socket,
                image=settings.worker_image,
                memory=settings.worker_memory,
                pids=settings.worker_pids,
                log_level=settings.log_level,
                max_pool_size=max(10, min(settings.max_workers + 4, 128)),
            )
        except WorkerUnavailable as exc:
            if settings.runtime == "docker":
                raise ConfigError(f"UPW_RUNTIME=docker: {exc}") from exc
            log.info("runtime auto: picked process, since the docker runtime cannot run: %s", exc)
        else:
            log.info("runtime %s: picked docker (an engine answers and the worker image %r "
                     "exists)", settings.runtime, settings.worker_image)
            return runtime
    return ProcessRuntime(
        data_dir=settings.data_dir,
        workers_dir=settings.workers_dir,
        etl_socket=settings.etl_socket,
        log_level=settings.log_level,
    )
