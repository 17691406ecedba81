"""The embedded PostgreSQL (pgserver) that the ETL uses when no UPW_DATABASE_URL is set.

pgserver runs `initdb` once, then starts PostgreSQL with `pg_ctl` as a daemon in a session of
its own, listening only on a unix socket (in the data directory, or under pgserver's runtime
directory when that path is too long). Because the server outlives the process that started it,
an ETL that was SIGKILLed and started again finds it through `postmaster.pid` and reattaches;
when it is not running any more (a reboot, a crash), pgserver starts it again and PostgreSQL
recovers from its WAL. Nothing committed is lost either way.

When running as root, pgserver runs PostgreSQL as the system user `pgserver` (created if
missing) and widens the permissions of the data directory's parents so that user can reach it.

`stop()` shuts the server down with `pg_ctl stop -m fast`; the ETL calls it only on a clean exit.
"""

from __future__ import annotations

import logging
import subprocess
import warnings
from pathlib import Path
from typing import Any

from tenacity import retry, retry_if_exception_type, stop_after_delay, wait_fixed

from etl.errors import EmbeddedDatabaseError

logger = logging.getLogger(__name__)

# pgserver logs every command and its whole output over many lines at INFO.
logging.getLogger("pgserver").setLevel(logging.WARNING)


def _pgserver() -> Any:
    # pgserver computes a runtime directory when imported, and platformdirs warns when
    # XDG_RUNTIME_DIR is unset (it falls back to /tmp/runtime-<uid>, which is fine).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pgserver
        import pgserver.postgres_server
    return pgserver


class EmbeddedPostgres:
    """One PostgreSQL data directory run by pgserver."""

    def __init__(self, pgdata: Path, *, start_timeout: float = 60.0) -> None:
        self.pgdata = pgdata.expanduser().resolve()
        self._start_timeout = start_timeout
        self._server: Any = None

    def running_url(self) -> str | None:
        """The connection string of the PostgreSQL running on this data directory, read from
        its `postmaster.pid`; None when none runs. Starts nothing."""
        info = _pgserver().utils.PostmasterInfo.read_from_pgdata(self.pgdata)
        if info is None or not info.is_running():
            return None
        return str(info.get_uri())

    def start(self) -> str:
        """Starts PostgreSQL, or reattaches to the one already running on this data directory,
        and returns its connection string. Blocks; call it from a thread in async code."""
        self.pgdata.parent.mkdir(parents=True, exist_ok=True)

        # A server found while it is still starting or recovering fails pgserver's readiness
        # check; it is ready moments later.
        @retry(
            retry=retry_if_exception_type(EmbeddedDatabaseError),
            stop=stop_after_delay(self._start_timeout),
            wait=wait_fixed(0.5),
            reraise=True,
        )
        def attempt() -> str:
            try:
                server = _pgserver().get_server(self.pgdata, cleanup_mode=None)
                uri = str(server.get_uri())
            except (AssertionError, OSError, subprocess.SubprocessError, RuntimeError) as e:
                _pgserver().postgres_server.PostgresServer._instances.pop(self.pgdata, None)
                raise EmbeddedDatabaseError(
                    f"starting the embedded PostgreSQL in {self.pgdata} failed: {e!r}; "
                    f"see {self.pgdata / 'log'}"
                ) from e
            self._server = server
            return uri

        uri = attempt()
        info = self._server.get_postmaster_info()
        logger.info("embedded PostgreSQL pid %s on %s (data %s)", info.pid, uri, self.pgdata)
        return uri

    def stop(self, *, timeout: float = 60.0) -> None:
        """Shuts the server down (fast mode: open transactions roll back, nothing committed is
        lost). Does nothing when `start()` was not called."""
        server, self._server = self._server, None
        if server is None:
            return
        # Releases this process's pgserver handle (cleanup_mode=None: it stops nothing itself).
        server.cleanup()
        _pgserver().postgres_server.PostgresServer._instances.pop(self.pgdata, None)
        pg_ctl = _pgserver().postgres_server.POSTGRES_BIN_PATH / "pg_ctl"
        try:
            subprocess.run(
                [str(pg_ctl), "-D", str(self.pgdata), "-m", "fast", "-w", "stop"],
                check=True,
                capture_output=True,
                text=True,
                timeout=timeout,
                user=server.system_user,
            )
        except subprocess.CalledProcessError as e:
            raise EmbeddedDatabaseError(
                f"stopping the embedded PostgreSQL in {self.pgdata} failed: "
                f"{e.stderr.strip() or e.stdout.strip()}"
            ) from e
        except (OSError, subprocess.SubprocessError) as e:
            raise EmbeddedDatabaseError(
                f"stopping the embedded PostgreSQL in {self.pgdata} failed: {e!r}"
            ) from e
        logger.info("embedded PostgreSQL in %s stopped", self.pgdata)
