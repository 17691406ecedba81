"""`python -m worker`: the command line the dispatcher runs, as a local process or in a container.

    python -m worker --user USER --data-dir DIR --listen SOCKET_PATH --etl-socket SOCKET_PATH
                     [--flush-timeout SECONDS] [--log-level LEVEL]

Every path comes from the arguments. The worker creates the user's directory (mode 0700) if it
is missing, and touches nothing else outside it except the listen socket.

Exit codes: 0 after a clean shutdown (SIGTERM or SIGINT), 2 for a bad command line or user
name, 1 when the worker could not start or failed (the reason is logged).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from conventions import logs, users
from worker.server import Options, serve

logger = logging.getLogger("worker")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# sun_path holds 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107


def _seconds(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a number of seconds") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{raw!r} must be 0 or more")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m worker",
        description="Serve upw.account.v1.AccountService for one user on a unix socket.",
    )
    p.add_argument("--user", required=True, help="the one user this worker serves")
    p.add_argument("--data-dir", required=True, type=Path, help="the UPW data directory")
    p.add_argument("--listen", required=True, type=Path, help="unix socket path to serve on")
    p.add_argument("--etl-socket", required=True, type=Path, help="unix socket of the ETL")
    p.add_argument(
        "--flush-timeout",
        type=_seconds,
        default=2.0,
        help="seconds to wait at shutdown for the ETL to acknowledge every row (default 2)",
    )
    p.add_argument(
        "--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS, help="default INFO"
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    for name in ("listen", "etl_socket"):
        path = getattr(args, name).absolute()
        if len(str(path).encode()) > MAX_SOCKET_PATH:
            p.error(
                f"--{name.replace('_', '-')} {str(path)!r} is longer than {MAX_SOCKET_PATH} "
                "bytes, the limit of a unix socket path; use a shorter directory"
            )
    logs.setup("worker", args.log_level)
    try:
        user = users.validate_user(args.user)
    except users.InvalidUserName as exc:
        logger.error("%s", exc)
        return EXIT_USAGE
    # The time of this line, against the runtime's launch, is the interpreter's start-up cost.
    logger.info("user %r: worker process %d running main()", user, os.getpid())
    data_dir = args.data_dir.absolute()
    db_path = users.account_db(data_dir, user)
    options = Options(
        user=user,
        db_path=db_path,
        listen=args.listen.absolute(),
        etl_socket=args.etl_socket.absolute(),
        flush_timeout=args.flush_timeout,
    )
    try:
        asyncio.run(serve(options))
    except Exception:
        logger.exception("user %r: the worker failed", user)
        return EXIT_FAILED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
