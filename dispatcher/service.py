"""The dispatcher's public servicers.

`AccountForwarder` passes every typed AccountService call to the user's worker unchanged.
`TextGateway` answers the original plain-text routes byte for byte, on top of the same calls.
gRPC status codes are chosen here and only here (`_status_of`): the worker's own statuses pass
through untouched, the dispatcher's errors are translated.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import grpc
from google.api import httpbody_pb2

from conventions import answers
from conventions.users import InvalidUserName, validate_user
from dispatcher.errors import SummaryUnavailable, WorkerCapReached, WorkerUnavailable
from dispatcher.pool import CALL_GRACE, WorkerPool
from upw.account.v1 import account_pb2, account_pb2_grpc
from upw.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from upw.summary.v1 import summary_pb2

if TYPE_CHECKING:
    from upw.account.v1.account_pb2_grpc import AccountServiceAsyncStub
    from upw.summary.v1.summary_pb2_grpc import SummaryServiceAsyncStub

    Context = grpc.aio.ServicerContext[Any, Any]

log = logging.getLogger(__name__)

T = TypeVar("T")
INT64_MAX = 2**63 - 1
TEXT = "text/plain; charset=utf-8"
WORKER_CALL_TIMEOUT = CALL_GRACE
SUMMARY_TIMEOUT = 30.0


class InvalidAmount(ValueError):
    """An amount in a text route that is not a positive whole number."""


class AmountOutOfRange(ValueError):
    """An amount in a text route larger than the largest balance."""


class _WorkerStatus(Exception):
    """A status the worker answered; passed to the caller unchanged."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code


def _status_of(exc: Exception) -> tuple[grpc.StatusCode, str] | None:
    match exc:
        case _WorkerStatus():
            return exc.code, str(exc)
        case InvalidUserName() | InvalidAmount():
            return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
        case AmountOutOfRange():
            return grpc.StatusCode.OUT_OF_RANGE, str(exc)
        case WorkerCapReached():
            return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
        case WorkerUnavailable() | SummaryUnavailable():
            return grpc.StatusCode.UNAVAILABLE, str(exc)
    return None


async def _abort(context: Context, exc: Exception) -> NoReturn:
    status = _status_of(exc)
    if status is None:
        raise exc
    await context.abort(*status)
    raise AssertionError("unreachable: abort raises")


def parse_amount(text: str) -> int:
    """The amount of `/<user>/deposit/<amount>`: decimal digits of a positive int64."""
    if not re.fullmatch(r"[0-9]{1,30}", text):
        shown = text if len(text) <= 40 else text[:40] + "..."
        raise InvalidAmount(f"amount {shown!r} is not a positive whole number of yen")
    amount = int(text)
    if amount == 0:
        raise InvalidAmount("amount must be at least 1 yen")
    if amount > INT64_MAX:
        raise AmountOutOfRange(f"amount {text} exceeds the largest balance, {INT64_MAX} yen")
    return amount


class WorkerCalls:
    """Runs one call on the worker of a user, through the pool."""

    def __init__(self, pool: WorkerPool) -> None:
        self._pool = pool

    async def run(
        self, user: str, call: Callable[[AccountServiceAsyncStub], Awaitable[T]]
    ) -> T:
        validate_user(user)
        async with self._pool.lease(user) as worker:
            try:
                return await call(worker.stub)
            except grpc.aio.AioRpcError as exc:
                if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    self._pool.discard(user, worker)
                    raise WorkerUnavailable(
                        f"the worker of {user!r} stopped answering ({exc.code().name}); "
                        "the request may not have been applied, check before retrying"
                    ) from exc
                raise _WorkerStatus(exc.code(), exc.details() or exc.code().name) from exc


class AccountForwarder(account_pb2_grpc.AccountServiceServicer):
    """Every typed call goes to the user's worker unchanged; so does the worker's answer."""

    def __init__(self, calls: WorkerCalls) -> None:
        self._calls = calls

    async def _forward(
        self, context: Context, user: str, call: Callable[[AccountServiceAsyncStub], Awaitable[T]]
    ) -> T:
        try:
            return await self._calls.run(user, call)
        except Exception as exc:
            await _abort(context, exc)

    async def CreateAccount(
        self, request: account_pb2.CreateAccountRequest, context: Context
    ) -> account_pb2.CreateAccountResponse:
        return await self._forward(
            context, request.user, lambda s: s.CreateAccount(request, timeout=WORKER_CALL_TIMEOUT))

    async def Deposit(
        self, request: account_pb2.DepositRequest, context: Context
    ) -> account_pb2.BalanceChange:
        return await self._forward(
            context, request.user, lambda s: s.Deposit(request, timeout=WORKER_CALL_TIMEOUT))

    async def Withdraw(
        self, request: account_pb2.WithdrawRequest, context: Context
    ) -> account_pb2.BalanceChange:
        return await self._forward(
            context, request.user, lambda s: s.Withdraw(request, timeout=WORKER_CALL_TIMEOUT))

    async def GetAccount(
        self, request: account_pb2.GetAccountRequest, context: Context
    ) -> account_pb2.Account:
        return await self._forward(
            context, request.user, lambda s: s.GetAccount(request, timeout=WORKER_CALL_TIMEOUT))

    async def ListTransactions(
        self, request: account_pb2.ListTransactionsRequest, context: Context
    ) -> account_pb2.ListTransactionsResponse:
        return await self._forward(
            context, request.user,
            lambda s: s.ListTransactions(request, timeout=WORKER_CALL_TIMEOUT))


def _text(body: str) -> httpbody_pb2.HttpBody:
    return httpbody_pb2.HttpBody(content_type=TEXT, data=body.encode())


class TextGateway(gateway_pb2_grpc.TextGatewayServicer):
    def __init__(self, calls: WorkerCalls, summary: SummaryServiceAsyncStub) -> None:
        self._calls = calls
        self._summary = summary

    async def Create(
        self, request: gateway_pb2.UserRequest, context: Context
    ) -> httpbody_pb2.HttpBody:
        try:
            await self._calls.run(request.user, lambda s: s.CreateAccount(
                account_pb2.CreateAccountRequest(user=request.user), timeout=WORKER_CALL_TIMEOUT))
        except Exception as exc:
            await _abort(context, exc)
        return _text(answers.welcome(request.user))

    async def Deposit(
        self, request: gateway_pb2.TextDepositRequest, context: Context
    ) -> httpbody_pb2.HttpBody:
        try:
            validate_user(request.user)
            amount = parse_amount(request.amount)
            await self._calls.run(request.user, lambda s: s.Deposit(
                account_pb2.DepositRequest(user=request.user, amount=amount),
                timeout=WORKER_CALL_TIMEOUT))
        except Exception as exc:
            await _abort(context, exc)
        return _text(answers.deposited(request.user, amount))

    async def Show(
        self, request: gateway_pb2.UserRequest, context: Context
    ) -> httpbody_pb2.HttpBody:
        try:
            account = await self._calls.run(request.user, lambda s: s.GetAccount(
                account_pb2.GetAccountRequest(user=request.user), timeout=WORKER_CALL_TIMEOUT))
        except Exception as exc:
            await _abort(context, exc)
        return _text(answers.balance(request.user, account.balance))

    async def AccountSummary(
        self, request: gateway_pb2.AccountSummaryRequest, context: Context
    ) -> httpbody_pb2.HttpBody:
        try:
            summary = await self._fetch_summary()
        except Exception as exc:
            await _abort(context, exc)
        return _text(summary.text)

    async def _fetch_summary(self) -> summary_pb2.SummaryText:
        try:
            response: summary_pb2.SummaryText = await self._summary.GetSummaryText(
                summary_pb2.GetSummaryTextRequest(), timeout=SUMMARY_TIMEOUT)
        except grpc.aio.AioRpcError as exc:
            raise SummaryUnavailable(
                f"the account summary is unavailable: {exc.details() or exc.code().name}") from exc
        return response
