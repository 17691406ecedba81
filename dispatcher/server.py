"""Builds and runs the dispatcher's gRPC server."""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from conventions.config import Settings
from dispatcher.pool import WorkerPool
from dispatcher.runtimes import choose_runtime
from dispatcher.service import AccountForwarder, TextGateway, WorkerCalls
from upw.account.v1 import account_pb2, account_pb2_grpc
from upw.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from upw.summary.v1 import summary_pb2_grpc

if TYPE_CHECKING:
    from upw.summary.v1.summary_pb2_grpc import SummaryServiceAsyncStub

log = logging.getLogger(__name__)

MAX_MESSAGE = 64 * 1024 * 1024
SERVICES = (
    account_pb2.DESCRIPTOR.services_by_name["AccountService"].full_name,
    gateway_pb2.DESCRIPTOR.services_by_name["TextGateway"].full_name,
)
SHUTDOWN_GRACE = 5.0


async def create_server(
    address: str, pool: WorkerPool, summary: SummaryServiceAsyncStub
) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server(
        options=[
            ("grpc.max_send_message_length", MAX_MESSAGE),
            ("grpc.max_receive_message_length", MAX_MESSAGE),
        ]
    )
    calls = WorkerCalls(pool)
    account_pb2_grpc.add_AccountServiceServicer_to_server(AccountForwarder(calls), server)
    gateway_pb2_grpc.add_TextGatewayServicer_to_server(TextGateway(calls, summary), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", *SERVICES):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (*SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    port = server.add_insecure_port(address)
    return server, port


async def serve(settings: Settings) -> None:
    runtime = await choose_runtime(settings)
    left = await runtime.remove_leftovers()
    if left:
        log.info("stopped %d worker(s) left behind by an earlier run", left)
    pool = WorkerPool(runtime, idle_ttl=settings.idle_ttl, max_workers=settings.max_workers)
    etl_channel = grpc.aio.insecure_channel(
        f"unix:{settings.etl_socket}", options=[("grpc.max_receive_message_length", MAX_MESSAGE)]
    )
    server, port = await create_server(
        f"0.0.0.0:{settings.grpc_port}", pool, summary_pb2_grpc.SummaryServiceStub(etl_channel)
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await server.start()
    log.info(
        "dispatcher ready on 0.0.0.0:%d (runtime %s, idle ttl %gs, max workers %d)",
        port,
        runtime.name,
        settings.idle_ttl,
        settings.max_workers,
    )
    try:
        await stop.wait()
        log.info("dispatcher stopping")
    finally:
        await server.stop(SHUTDOWN_GRACE)
        await pool.close()
        await etl_channel.close()
        log.info("dispatcher stopped")
