"""What can go wrong in a worker, as the worker's own exceptions.

`worker.service` turns each of them into a gRPC status in one place; nothing else needs to know
about gRPC status codes.
"""

from __future__ import annotations


class WorkerError(Exception):
    """Base class of every error a worker reports to its caller."""


class WrongUser(WorkerError):
    """A request names a user other than the one this worker serves."""

    def __init__(self, served: str, requested: str) -> None:
        super().__init__(f"this worker serves {served!r}, not {requested!r}")
        self.served = served
        self.requested = requested


class AccountNotFound(WorkerError):
    """The user has no account yet."""

    def __init__(self, user: str) -> None:
        super().__init__(f"account {user!r} does not exist; create it first")
        self.user = user


class InvalidAmount(WorkerError):
    """An amount that is not a positive int64."""

    def __init__(self, user: str, amount: int) -> None:
        super().__init__(
            f"amount {amount} for account {user!r} is invalid: use a whole number from 1 to "
            "9223372036854775807"
        )
        self.user = user
        self.amount = amount


class InsufficientFunds(WorkerError):
    """A withdrawal larger than the balance."""

    def __init__(self, user: str, amount: int, balance: int) -> None:
        super().__init__(
            f"insufficient funds: account {user!r} cannot withdraw {amount}, "
            f"the balance is only {balance}"
        )
        self.user = user
        self.amount = amount
        self.balance = balance


class BalanceOverflow(WorkerError):
    """A deposit that would take the balance above the int64 maximum."""

    def __init__(self, user: str, amount: int, balance: int) -> None:
        super().__init__(
            f"account {user!r} cannot take a deposit of {amount}: the balance {balance} would "
            "exceed 9223372036854775807"
        )
        self.user = user
        self.amount = amount
        self.balance = balance


class InvalidPage(WorkerError):
    """A ListTransactions page request with a negative cursor or size."""

    def __init__(self, user: str, field: str, value: int) -> None:
        super().__init__(f"{field} {value} for account {user!r} is invalid: it must be 0 or more")
        self.user = user
        self.field = field
        self.value = value


class SchemaTooNew(Exception):
    """The database was migrated by a newer worker than this one."""

    def __init__(self, path: str, found: int, known: int) -> None:
        super().__init__(
            f"the database {path!r} has schema version {found}, but this worker knows only up "
            f"to {known}; run a newer worker"
        )
        self.path = path
        self.found = found
        self.known = known
