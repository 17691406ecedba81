"""`upw.summary.v1.SummaryService`: the cross-user read model, answered from PostgreSQL."""

from __future__ import annotations

import logging
from typing import Any, NoReturn, Protocol

import grpc

from etl.errors import DatabaseUnavailable, EtlError, InvalidPage
from etl.sink import SummaryPage
from upw.summary.v1 import summary_pb2, summary_pb2_grpc

logger = logging.getLogger(__name__)


class SummarySource(Protocol):
    async def summary(self, page_size: int = 0, page_token: str = "") -> SummaryPage: ...

    async def summary_text(self) -> str: ...


def _status_of(error: Exception) -> grpc.StatusCode:
    """The one place where this service chooses a gRPC status code."""
    if isinstance(error, InvalidPage):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(error, DatabaseUnavailable):
        return grpc.StatusCode.UNAVAILABLE
    return grpc.StatusCode.INTERNAL


async def _abort(
    context: grpc.aio.ServicerContext[Any, Any], rpc: str, error: EtlError
) -> NoReturn:
    code = _status_of(error)
    logger.warning("%s fails with %s: %s", rpc, code.name, error)
    await context.abort(code, str(error))


class SummaryServicer(summary_pb2_grpc.SummaryServiceServicer):
    def __init__(self, sink: SummarySource) -> None:
        self._sink = sink

    async def GetSummary(
        self,
        request: summary_pb2.GetSummaryRequest,
        context: grpc.aio.ServicerContext[
            summary_pb2.GetSummaryRequest, summary_pb2.GetSummaryResponse
        ],
    ) -> summary_pb2.GetSummaryResponse:
        try:
            page = await self._sink.summary(request.page_size, request.page_token)
        except EtlError as e:
            await _abort(context, "GetSummary", e)
        response = summary_pb2.GetSummaryResponse(next_page_token=page.next_page_token)
        add = response.accounts.add
        for user, balance, last_seq, created_at_us in page.accounts:
            created_at = add(user=user, balance=balance, last_seq=last_seq).created_at
            created_at.seconds, micros = divmod(created_at_us, 1_000_000)
            created_at.nanos = micros * 1000
        return response

    async def GetSummaryText(
        self,
        request: summary_pb2.GetSummaryTextRequest,
        context: grpc.aio.ServicerContext[
            summary_pb2.GetSummaryTextRequest, summary_pb2.SummaryText
        ],
    ) -> summary_pb2.SummaryText:
        try:
            return summary_pb2.SummaryText(text=await self._sink.summary_text())
        except EtlError as e:
            await _abort(context, "GetSummaryText", e)
