"""Builds and runs the ETL's gRPC server: Replication, SummaryService, health and reflection.

`serve()` is the whole life of the ETL process: embedded PostgreSQL (when no database URL is
configured), the sink, the server on a unix socket, graceful shutdown on SIGTERM/SIGINT.
Health reports NOT_SERVING until the sink's schema exists, then SERVING for "" and both services.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from pathlib import Path
from typing import Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential

from conventions import logs
from conventions.config import ConfigError, Settings, from_env
from etl.embedded import EmbeddedPostgres
from etl.errors import DatabaseUnavailable
from etl.lag import StreamLag
from etl.replication import BatchSink, ReplicationServicer, unshipped_users
from etl.sink import Sink
from etl.summary import SummaryServicer, SummarySource
from upw.replication.v1 import replication_pb2, replication_pb2_grpc
from upw.summary.v1 import summary_pb2, summary_pb2_grpc

logger = logging.getLogger(__name__)

# A summary of 100,000 accounts is several MB; a worker's backlog batch can be large too.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
SHUTDOWN_GRACE = 5.0

SERVICE_NAMES = (
    replication_pb2.DESCRIPTOR.services_by_name["Replication"].full_name,
    summary_pb2.DESCRIPTOR.services_by_name["SummaryService"].full_name,
)


class EtlSink(BatchSink, SummarySource, Protocol):
    """What the servicers need from a sink; `etl.sink.Sink` is the real one."""


async def set_serving(health_servicer: health.aio.HealthServicer, serving: bool) -> None:
    status = (
        health_pb2.HealthCheckResponse.SERVING
        if serving
        else health_pb2.HealthCheckResponse.NOT_SERVING
    )
    for name in ("", *SERVICE_NAMES):
        await health_servicer.set(name, status)


def create_server(
    address: str,
    sink: EtlSink,
    *,
    health_servicer: health.aio.HealthServicer | None = None,
    lag: StreamLag | None = None,
) -> tuple[grpc.aio.Server, int]:
    """A server bound to `address` (e.g. "unix:/run/etl.sock" or "127.0.0.1:0"), not started.

    Returns the server and the bound port (for a unix socket, a positive number without meaning).
    The caller owns `health_servicer` and reports through `set_serving`; without one, a new
    servicer is registered that knows only "" (SERVING, the library's default).
    """
    server = grpc.aio.server(
        options=[
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ]
    )
    replication_pb2_grpc.add_ReplicationServicer_to_server(
        ReplicationServicer(sink, lag), server)
    summary_pb2_grpc.add_SummaryServiceServicer_to_server(SummaryServicer(sink), server)
    health_pb2_grpc.add_HealthServicer_to_server(
        health_servicer or health.aio.HealthServicer(), server
    )
    reflection.enable_server_reflection(
        (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    port: int = server.add_insecure_port(address)
    return server, port


def prepare_socket(path: Path) -> None:
    """Creates the socket's directory (0755) and removes a socket left by a previous run."""
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    if path.is_socket() or path.is_symlink():
        path.unlink()
    elif path.exists():
        raise FileExistsError(f"{path} exists and is not a socket; remove it or set UPW_RUN_DIR")


async def _open_sink(sink: Sink) -> None:
    """Creates the schema, retrying while PostgreSQL is unreachable (logged at each attempt)."""
    async for attempt in AsyncRetrying(
        retry=retry_if_exception_type(DatabaseUnavailable),
        wait=wait_exponential(multiplier=0.2, max=5),
        before_sleep=lambda state: logger.warning(
            "PostgreSQL not ready, retrying: %s",
            state.outcome.exception() if state.outcome else None,
        ),
    ):
        with attempt:
            await sink.open()


async def serve(settings: Settings) -> None:
    embedded: EmbeddedPostgres | None = None
    conninfo = settings.database_url
    if conninfo is None:
        embedded = EmbeddedPostgres(settings.data_dir / "postgres")
        conninfo = await asyncio.to_thread(embedded.start)
    sink = Sink(conninfo)
    health_servicer = health.aio.HealthServicer()
    await set_serving(health_servicer, False)
    socket = settings.etl_socket
    prepare_socket(socket)
    address = f"unix:{socket}"
    lag = StreamLag()
    server, _ = create_server(address, sink, health_servicer=health_servicer, lag=lag)
    lag_log = asyncio.create_task(lag.log_periodically(lambda: unshipped_users(sink)))

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    try:
        await server.start()
        socket.chmod(0o666)  # workers in containers run under another uid
        opening = asyncio.create_task(_open_sink(sink))
        stopped = asyncio.create_task(stopping.wait())
        await asyncio.wait({opening, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if opening.done():
            opening.result()
            await set_serving(health_servicer, True)
            logger.info("etl ready on %s", address)
            await stopped
        else:
            opening.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await opening
        logger.info("etl stopping")
    finally:
        lag_log.cancel()
        await health_servicer.enter_graceful_shutdown()
        await server.stop(SHUTDOWN_GRACE)
        await sink.close()
        socket.unlink(missing_ok=True)
        if embedded is not None:
            await asyncio.to_thread(embedded.stop)
        logger.info("etl stopped")


def main() -> None:
    try:
        settings = from_env()
    except ConfigError as e:
        sys.exit(f"etl: {e}")
    logs.setup("etl", settings.log_level)
    asyncio.run(serve(settings))
