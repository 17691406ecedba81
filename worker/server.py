"""The worker's gRPC server: AccountService, health checking and reflection on one unix socket.

Readiness: the health service answers NOT_SERVING for "" and for
"upw.account.v1.AccountService" until the database is open and migrated, SERVING from then on,
and NOT_SERVING again as soon as shutdown begins.

Shutdown (`serve`, on SIGTERM or SIGINT): stop taking calls and let in-flight calls finish
within `grace` seconds, give the shipper at most `flush_timeout` seconds to get everything
acknowledged by the ETL, close the database and remove the socket file. Rows still not
acknowledged then keep the user's unshipped marker (see `worker.store`), from which the
dispatcher starts a drain of this user without waiting for the user's next request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from upw.account.v1 import account_pb2, account_pb2_grpc
from worker.service import AccountService
from worker.shipper import Shipper
from worker.store import Store

logger = logging.getLogger("worker.server")

ACCOUNT_SERVICE = account_pb2.DESCRIPTOR.services_by_name["AccountService"].full_name
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
SOCKET_MODE = 0o660


@dataclass(frozen=True, kw_only=True)
class Options:
    """Everything `serve` needs; `worker.__main__` builds it from the command line."""

    user: str
    db_path: Path
    listen: Path
    etl_socket: Path
    flush_timeout: float = 2.0
    grace: float = 1.0


def create_server(
    address: str, *, store: Store, shipper: Shipper
) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer]:
    """Builds (but does not start) the server bound to `address`. Returns the server, the
    bound port (0 for a unix socket) and the health servicer, whose statuses start as
    NOT_SERVING; the caller sets SERVING once it is ready."""
    server = grpc.aio.server()
    account_pb2_grpc.add_AccountServiceServicer_to_server(
        AccountService(store, on_commit=shipper.wake), server
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (ACCOUNT_SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME), server
    )
    port: int = server.add_insecure_port(address)
    return server, port, health_servicer


async def _set_health(
    health_servicer: health.aio.HealthServicer, status: health_pb2.HealthCheckResponse.ServingStatus
) -> None:
    for service in ("", ACCOUNT_SERVICE):
        await health_servicer.set(service, status)


async def serve(options: Options, *, stop: asyncio.Event | None = None) -> None:
    """Runs the worker until SIGTERM or SIGINT (or until `stop` is set)."""
    user = options.user
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    # A socket file left by a killed worker would make the bind fail.
    with contextlib.suppress(FileNotFoundError):
        options.listen.unlink()

    store = Store.open(options.db_path, user=user)
    try:
        shipper = Shipper(store, target=f"unix:{options.etl_socket}")
        server, _, health_servicer = create_server(
            f"unix:{options.listen}", store=store, shipper=shipper
        )
        await _set_health(health_servicer, health_pb2.HealthCheckResponse.NOT_SERVING)
        await server.start()
        try:
            os.chmod(options.listen, SOCKET_MODE)
            shipper.start()
            await _set_health(health_servicer, health_pb2.HealthCheckResponse.SERVING)
            logger.info(
                "user %r: serving on unix:%s (database %s, ETL at unix:%s)",
                user,
                options.listen,
                options.db_path,
                options.etl_socket,
            )
            await stop.wait()
            logger.info("user %r: stopping", user)
            await health_servicer.enter_graceful_shutdown()
        finally:
            await server.stop(options.grace)
        try:
            await shipper.flush(options.flush_timeout)
        finally:
            await shipper.stop()
        if store.sync_marker():
            logger.info(
                "user %r: rows %d..%d are not acknowledged yet; left %s for the dispatcher "
                "to drain",
                user,
                store.acked_seq() + 1,
                store.last_seq(),
                store.marker,
            )
        else:
            logger.info("user %r: every ledger row is acknowledged by the ETL", user)
    finally:
        store.close()
        with contextlib.suppress(FileNotFoundError):
            options.listen.unlink()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        logger.info("user %r: stopped", user)
