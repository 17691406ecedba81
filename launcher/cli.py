"""`upw` (also `python -m launcher`): the product's command line.

    upw run         start the whole stack in the foreground; Ctrl-C stops it cleanly
    upw health      check a gRPC server's health (exit 0 = SERVING)
    upw reconcile   compare every user's ledger with PostgreSQL (exit 1 = diverged);
                    --repair makes PostgreSQL agree with the users' databases
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from types import FrameType

from conventions import logs
from conventions.config import ConfigError, from_env
from launcher.stack import Stack, StartError, grpc_serving

log = logging.getLogger("launcher")


def run() -> int:
    try:
        settings = from_env()
    except ConfigError as exc:
        print(f"upw: {exc}", file=sys.stderr)
        return 2
    logs.setup("launcher", settings.log_level)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    stack = Stack(settings)
    try:
        stack.start()
    except StartError as exc:
        log.error("%s", exc)
        return 1
    port = settings.http_port
    log.info(
        "Unlimited Process Works is up (data in %s).\n"
        "  curl http://0.0.0.0:%d/koduki/create\n"
        "  curl http://0.0.0.0:%d/koduki/deposit/128\n"
        "  curl http://0.0.0.0:%d/koduki/show\n"
        "  curl http://0.0.0.0:%d/account_summary\n"
        "  grpcurl -plaintext 127.0.0.1:%d list\n"
        "Press Ctrl-C to stop.",
        settings.data_dir, port, port, port, port, settings.grpc_port)
    try:
        while not stop.wait(0.5):
            for component in stack.components:
                if not component.running:
                    log.error("%s stopped unexpectedly; stopping everything", component.name)
                    stop.set()
    finally:
        log.info("stopping")
        stack.stop()
        log.info("stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="upw", description="Unlimited Process Works")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("run", help="start the whole stack in the foreground (Ctrl-C stops it)")
    health = commands.add_parser("health", help="check a gRPC server's health (exit 0 = SERVING)")
    health.add_argument("target", help="host:port or unix:/path/to.sock")
    health.add_argument("--timeout", type=float, default=2.0)
    reconcile = commands.add_parser(
        "reconcile",
        help="compare every user's SQLite ledger with PostgreSQL (exit 1 = diverged)")
    reconcile.add_argument(
        "--repair", action="store_true",
        help="ship what PostgreSQL lacks, overwrite what it has wrong, then check again")
    args = parser.parse_args(argv)
    if args.command == "run":
        return run()
    if args.command == "health":
        return 0 if grpc_serving(args.target, args.timeout) else 1
    if args.command == "reconcile":
        from etl import reconcile as reconciler  # psycopg and pgserver only for this command

        return reconciler.main(repair=args.repair)
    parser.error(f"unknown command {args.command!r}")
    return 2
