"""`upw.summary.v1.SummaryService`: the cross-user read model, answered from PostgreSQL."""

from __future__ import annotations

import logging
from typing import Protocol

import grpc

from etl.errors import DatabaseUnavailable, EtlError, InvalidPage
from etl.sink import SummaryPage
from upw.summary.v1 import summary_pb2, summary_pb2_grpc

logger = logging.getLogger(__name__)


class SummarySource(Protocol):
    async def summary(self, page_size: int = 0, page_token: str = "") -> SummaryPage: ...


def _status_of(error: Exception) -> grpc.StatusCode:
    """The one place where this service chooses a gRPC status code."""
    if isinstance(error, InvalidPage):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(error, DatabaseUnavailable):
        return grpc.StatusCode.UNAVAILABLE
    return grpc.StatusCode.INTERNAL


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
            code = _status_of(e)
            logger.warning("GetSummary fails with %s: %s", code.name, e)
            await context.abort(code, str(e))
        response = summary_pb2.GetSummaryResponse(next_page_token=page.next_page_token)
        for row in page.accounts:
            account = response.accounts.add(
                user=row.user, balance=row.balance, last_seq=row.last_seq
            )
            account.created_at.FromDatetime(row.created_at)
        return response
