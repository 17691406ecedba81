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
from dispatcher.drain import Drainer, DrainQueue
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
REPLICATION_SERVICE = "upw.replication.v1.Replication"
ETL_PROBE = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
    ("grpc.use_local_subchannel_pool", 1),
]


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
    # After the leftovers are gone: what they shipped or left unshipped is on disk by now.
    queue = DrainQueue(settings.data_dir)
    if queue.users():
        log.info("drain queue: %d user(s) to look at from an earlier run", len(queue.users()))
    pool = WorkerPool(
        runtime, idle_ttl=settings.idle_ttl, max_workers=settings.max_workers, listener=queue
    )
    etl_channel = grpc.aio.insecure_channel(
        f"unix:{settings.etl_socket}", options=[("grpc.max_receive_message_length", MAX_MESSAGE)]
    )
    # A channel of its own with a short reconnect backoff: gRPC's default backoff grows to
    # minutes while the ETL is down, and drains should start within a second of its return.
    probe_channel = grpc.aio.insecure_channel(f"unix:{settings.etl_socket}", options=ETL_PROBE)
    etl_health = health_pb2_grpc.HealthStub(probe_channel)

    async def etl_ready() -> bool:
        try:
            reply = await etl_health.Check(
                health_pb2.HealthCheckRequest(service=REPLICATION_SERVICE), timeout=1.0
            )
        except grpc.aio.AioRpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    drainer = Drainer(pool, queue, etl_ready=etl_ready)
    server, port = await create_server(
        f"0.0.0.0:{settings.grpc_port}", pool, summary_pb2_grpc.SummaryServiceStub(etl_channel)
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await server.start()
    drainer.start()
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
        await drainer.stop()
        await pool.close()
        await runtime.close()
        await etl_channel.close()
        await probe_channel.close()
        log.info("dispatcher stopped")
