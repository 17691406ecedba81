"""`upw.account.v1.AccountService` for one user: translates protobuf messages to `Store` calls
and back, and chooses every gRPC status code of the worker (in `STATUS_OF`).

Store calls run inline on the event loop (see `worker.store` for why that is safe). After each
committed write the injected `on_commit` callback is called; it must not block (the worker
passes `Shipper.wake`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from upw.account.v1 import account_pb2, account_pb2_grpc
from worker import errors
from worker.store import Account, Entry, Store

logger = logging.getLogger("worker.service")

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000

# The one place where the worker's exceptions become gRPC status codes.
STATUS_OF: dict[type[errors.WorkerError], grpc.StatusCode] = {
    errors.WrongUser: grpc.StatusCode.INVALID_ARGUMENT,
    errors.InvalidAmount: grpc.StatusCode.INVALID_ARGUMENT,
    errors.InvalidPage: grpc.StatusCode.INVALID_ARGUMENT,
    errors.BalanceOverflow: grpc.StatusCode.OUT_OF_RANGE,
    errors.AccountNotFound: grpc.StatusCode.NOT_FOUND,
    errors.InsufficientFunds: grpc.StatusCode.FAILED_PRECONDITION,
}

T = TypeVar("T")


def _timestamp(at_us: int) -> Timestamp:
    stamp = Timestamp()
    stamp.FromMicroseconds(at_us)
    return stamp


def account_message(account: Account) -> account_pb2.Account:
    return account_pb2.Account(
        user=account.user,
        balance=account.balance,
        last_seq=account.last_seq,
        created_at=_timestamp(account.created_at_us),
    )


def entry_message(entry: Entry) -> account_pb2.LedgerEntry:
    """A ledger row as the protobuf message that is both answered and shipped to the ETL."""
    return account_pb2.LedgerEntry(
        seq=entry.seq,
        kind=account_pb2.LedgerEntry.Kind.ValueType(int(entry.kind)),
        amount=entry.amount,
        balance=entry.balance,
        at=_timestamp(entry.at_us),
    )


class AccountService(account_pb2_grpc.AccountServiceServicer):
    """Serves the one user whose database `store` is."""

    def __init__(self, store: Store, *, on_commit: Callable[[], None] = lambda: None) -> None:
        self._store = store
        self._user = store.user
        self._on_commit = on_commit

    async def _run(
        self, context: grpc.aio.ServicerContext[Any, Any], requested: str, call: Callable[[], T]
    ) -> T:
        try:
            if requested != self._user:
                raise errors.WrongUser(self._user, requested)
            return call()
        except errors.WorkerError as exc:
            code = STATUS_OF[type(exc)]
            logger.info("user %r: %s: %s", self._user, code.name, exc)
            await context.abort(code, str(exc))
            raise AssertionError("context.abort returned") from exc

    def _committed(self) -> None:
        try:
            self._on_commit()
        except Exception:
            # The write is durable already; a failing notification must not fail the call.
            logger.exception("user %r: on_commit callback failed", self._user)

    async def CreateAccount(
        self,
        request: account_pb2.CreateAccountRequest,
        context: grpc.aio.ServicerContext[
            account_pb2.CreateAccountRequest, account_pb2.CreateAccountResponse
        ],
    ) -> account_pb2.CreateAccountResponse:
        account, created = await self._run(context, request.user, self._store.create)
        if created:
            self._committed()
        return account_pb2.CreateAccountResponse(account=account_message(account), created=created)

    async def Deposit(
        self,
        request: account_pb2.DepositRequest,
        context: grpc.aio.ServicerContext[account_pb2.DepositRequest, account_pb2.BalanceChange],
    ) -> account_pb2.BalanceChange:
        account, entry = await self._run(
            context, request.user, lambda: self._store.deposit(request.amount)
        )
        self._committed()
        return account_pb2.BalanceChange(
            account=account_message(account), entry=entry_message(entry)
        )

    async def Withdraw(
        self,
        request: account_pb2.WithdrawRequest,
        context: grpc.aio.ServicerContext[account_pb2.WithdrawRequest, account_pb2.BalanceChange],
    ) -> account_pb2.BalanceChange:
        account, entry = await self._run(
            context, request.user, lambda: self._store.withdraw(request.amount)
        )
        self._committed()
        return account_pb2.BalanceChange(
            account=account_message(account), entry=entry_message(entry)
        )

    async def GetAccount(
        self,
        request: account_pb2.GetAccountRequest,
        context: grpc.aio.ServicerContext[account_pb2.GetAccountRequest, account_pb2.Account],
    ) -> account_pb2.Account:
        account = await self._run(context, request.user, self._store.account)
        return account_message(account)

    def _page(self, after_seq: int, page_size: int) -> tuple[list[Entry], int]:
        if after_seq < 0:
            raise errors.InvalidPage(self._user, "after_seq", after_seq)
        if page_size < 0:
            raise errors.InvalidPage(self._user, "page_size", page_size)
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        self._store.account()  # NOT_FOUND before an empty page
        rows = self._store.entries(after_seq, size + 1)
        if len(rows) > size:
            return rows[:size], rows[size - 1].seq
        return rows, 0

    async def ListTransactions(
        self,
        request: account_pb2.ListTransactionsRequest,
        context: grpc.aio.ServicerContext[
            account_pb2.ListTransactionsRequest, account_pb2.ListTransactionsResponse
        ],
    ) -> account_pb2.ListTransactionsResponse:
        rows, next_after_seq = await self._run(
            context, request.user, lambda: self._page(request.after_seq, request.page_size)
        )
        return account_pb2.ListTransactionsResponse(
            entries=[entry_message(row) for row in rows], next_after_seq=next_after_seq
        )
