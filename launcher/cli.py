"""`upw` (also `python -m launcher`): the product's command line.

    upw run         start the whole stack in the foreground; Ctrl-C stops it cleanly
    upw health      check a gRPC server's health (exit 0 = SERVING)
    upw status      replication lag and the users with unshipped changes
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

import grpc

from conventions import logs
from conventions.config import ConfigError, Settings, from_env
from dispatcher.drain import unshipped_on_disk
from launcher.stack import Stack, StartError, grpc_serving
from upw.replication.v1 import replication_pb2, replication_pb2_grpc

log = logging.getLogger("launcher")


def _settings() -> Settings | None:
    """The UPW_* settings, or None after saying on stderr why they cannot be used."""
    try:
        return from_env()
    except ConfigError as exc:
        print(f"upw: {exc}", file=sys.stderr)
        return None


def run() -> int:
    settings = _settings()
    if settings is None:
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


def status() -> int:
    """Prints what the ETL reports of replication and what the data dir holds unshipped.
    Exit 0 when nothing is unshipped, 1 when some user has unshipped rows, 2 when the ETL
    does not answer."""
    settings = _settings()
    if settings is None:
        return 2
    queued, unshipped = unshipped_on_disk(settings.data_dir)
    print(f"data dir {settings.data_dir}: {len(unshipped)} user(s) with unshipped rows "
          f"({queued} in the drain queue)" + (f": {', '.join(unshipped[:20])}" if unshipped else "")
          + (" ..." if len(unshipped) > 20 else ""))
    with grpc.insecure_channel(f"unix:{settings.etl_socket}") as channel:
        try:
            reply: replication_pb2.ReplicationStatus = replication_pb2_grpc.ReplicationStub(
                channel).GetStatus(replication_pb2.GetStatusRequest(), timeout=5)
        except grpc.RpcError as exc:
            print(f"upw: the ETL at unix:{settings.etl_socket} does not answer "
                  f"({exc.code().name}); is the product running?", file=sys.stderr)
            return 2
    known = "unknown (PostgreSQL unreachable)" if reply.users_unshipped < 0 else str(
        reply.users_unshipped)
    print(f"ETL: {len(reply.streams)} open stream(s), {reply.users_behind} behind; users whose "
          f"last report names rows PostgreSQL lacks: {known}")
    for stream in reply.streams:
        if stream.head_seq > stream.applied_seq:
            print(f"  {stream.user}: worker at seq {stream.head_seq}, PostgreSQL at "
                  f"{stream.applied_seq}")
    return 1 if unshipped else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="upw", description="Unlimited Process Works")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("run", help="start the whole stack in the foreground (Ctrl-C stops it)")
    health = commands.add_parser("health", help="check a gRPC server's health (exit 0 = SERVING)")
    health.add_argument("target", help="host:port or unix:/path/to.sock")
    health.add_argument("--timeout", type=float, default=2.0)
    commands.add_parser(
        "status", help="replication lag and users with unshipped changes (exit 1 = some)")
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
    if args.command == "status":
        return status()
    if args.command == "reconcile":
        from etl import reconcile as reconciler  # psycopg and pgserver only for this command

        return reconciler.main(repair=args.repair)
    parser.error(f"unknown command {args.command!r}")
    return 2
