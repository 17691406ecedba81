"""The global PostgreSQL read model: the connection pool and every SQL statement against it.

Contract: `apply` is idempotent. Applying a batch twice, or an older batch after a newer one,
changes nothing; a batch is committed in one transaction, so when `apply` returns, every row of
the batch is durable in PostgreSQL. `accounts.balance` always equals the balance of the user's
ledger row with the highest seq.

Concurrency: any number of batches may be applied at once, each on its own pooled connection.
Two transactions touching one user insert ledger rows in ascending seq order and upsert the
account row last, so they cannot deadlock; the `last_seq` guard makes their order irrelevant.

psycopg and psycopg_pool exceptions are translated here, and only here, into `etl.errors`.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime

import psycopg
import psycopg_pool
from psycopg.rows import TupleRow

from etl.errors import DatabaseUnavailable, InvalidPage, SinkError

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1

# Each statement is idempotent, so the whole list runs at every start.
_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS etl_schema (
        version integer PRIMARY KEY,
        applied_at timestamptz NOT NULL DEFAULT now()
    )""",
    """CREATE TABLE IF NOT EXISTS accounts (
        user_name text PRIMARY KEY,
        balance bigint NOT NULL,
        last_seq bigint NOT NULL,
        created_at timestamptz NOT NULL,
        updated_at timestamptz NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS accounts_creation_order ON accounts (created_at, user_name)",
    """CREATE TABLE IF NOT EXISTS ledger (
        user_name text NOT NULL,
        seq bigint NOT NULL,
        kind smallint NOT NULL,
        amount bigint NOT NULL,
        balance bigint NOT NULL,
        at timestamptz NOT NULL,
        applied_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (user_name, seq)
    )""",
)

_INSERT_LEDGER = """
INSERT INTO ledger (user_name, seq, kind, amount, balance, at)
SELECT %(user)s, u.seq, u.kind, u.amount, u.balance, u.at
FROM unnest(
    %(seqs)s::bigint[], %(kinds)s::smallint[], %(amounts)s::bigint[],
    %(balances)s::bigint[], %(ats)s::timestamptz[]
) AS u(seq, kind, amount, balance, at)
ON CONFLICT (user_name, seq) DO NOTHING
"""

# Balance and last_seq move only forward; created_at only backward.
_UPSERT_ACCOUNT = """
INSERT INTO accounts AS a (user_name, balance, last_seq, created_at, updated_at)
VALUES (%(user)s, %(balance)s, %(seq)s, %(created_at)s, now())
ON CONFLICT (user_name) DO UPDATE SET
    balance = CASE WHEN excluded.last_seq > a.last_seq THEN excluded.balance ELSE a.balance END,
    updated_at = CASE WHEN excluded.last_seq > a.last_seq THEN now() ELSE a.updated_at END,
    last_seq = GREATEST(a.last_seq, excluded.last_seq),
    created_at = LEAST(a.created_at, excluded.created_at)
"""

# LIMIT NULL means no limit.
_SUMMARY_FIRST = """
SELECT user_name, balance, last_seq, created_at FROM accounts
ORDER BY created_at, user_name
LIMIT %(limit)s
"""

_SUMMARY_AFTER = """
SELECT user_name, balance, last_seq, created_at FROM accounts
WHERE (created_at, user_name) > (%(created_at)s, %(user)s)
ORDER BY created_at, user_name
LIMIT %(limit)s
"""


@dataclass(frozen=True, kw_only=True)
class Change:
    """One ledger row of one user, as shipped by its worker."""

    seq: int
    kind: int
    amount: int
    balance: int
    at: datetime


@dataclass(frozen=True, kw_only=True)
class AccountRow:
    user: str
    balance: int
    last_seq: int
    created_at: datetime


@dataclass(frozen=True, kw_only=True)
class SummaryPage:
    accounts: list[AccountRow]
    # Empty on the last page.
    next_page_token: str


def _encode_token(row: AccountRow) -> str:
    raw = json.dumps([row.created_at.isoformat(), row.user]).encode()
    return base64.urlsafe_b64encode(raw).decode()


def _decode_token(token: str) -> tuple[datetime, str]:
    try:
        created_at, user = json.loads(base64.urlsafe_b64decode(token.encode()))
        parsed = datetime.fromisoformat(created_at)
    except (binascii.Error, ValueError, TypeError, UnicodeError):
        raise InvalidPage(f"the page token {token[:40]!r} was not issued by this ETL") from None
    if not isinstance(user, str) or parsed.tzinfo is None:
        raise InvalidPage(f"the page token {token[:40]!r} was not issued by this ETL")
    return parsed, user


class Sink:
    """The PostgreSQL read model behind one connection pool; `open()` it, then `close()` it."""

    def __init__(
        self,
        conninfo: str,
        *,
        min_size: int = 1,
        max_size: int = 8,
        timeout: float = 5.0,
        name: str = "etl",
    ) -> None:
        # `timeout` bounds how long a call waits for a connection before it reports the
        # database unavailable; the worker then retries, so a short wait is the better answer.
        self._pool: psycopg_pool.AsyncConnectionPool[psycopg.AsyncConnection[TupleRow]] = (
            psycopg_pool.AsyncConnectionPool(
                conninfo,
                min_size=min_size,
                max_size=max_size,
                timeout=timeout,
                open=False,
                name=name,
                check=psycopg_pool.AsyncConnectionPool.check_connection,
            )
        )
        self._ready = False

    @property
    def ready(self) -> bool:
        """True once the schema exists; until then every call raises DatabaseUnavailable."""
        return self._ready

    async def open(self) -> None:
        """Opens the pool (without waiting for PostgreSQL) and creates the schema.

        Raises DatabaseUnavailable when PostgreSQL cannot be reached; calling `open()` again
        retries the schema.
        """
        await self._pool.open(wait=False)
        async with self._connection("creating the schema", schema=False) as conn:
            for statement in _SCHEMA:
                await conn.execute(statement)
            await conn.execute(
                "INSERT INTO etl_schema (version) VALUES (%s) ON CONFLICT DO NOTHING",
                (SCHEMA_VERSION,),
            )
        self._ready = True
        logger.info("schema version %d ready in pool %r", SCHEMA_VERSION, self._pool.name)

    async def close(self) -> None:
        await self._pool.close()

    async def apply(self, user: str, changes: Sequence[Change]) -> int:
        """Commits the rows of one user in one transaction and returns the highest seq of the
        batch: every row of `user` up to that seq is then in PostgreSQL.

        `changes` must be non-empty and in ascending seq order (the caller validates).
        """
        newest = changes[-1]
        params = {
            "user": user,
            "seqs": [c.seq for c in changes],
            "kinds": [c.kind for c in changes],
            "amounts": [c.amount for c in changes],
            "balances": [c.balance for c in changes],
            "ats": [c.at for c in changes],
        }
        async with self._connection(f"applying seq {changes[0].seq}-{newest.seq} of {user!r}") as c:
            async with c.transaction():
                await c.execute(_INSERT_LEDGER, params)
                await c.execute(
                    _UPSERT_ACCOUNT,
                    {
                        "user": user,
                        "balance": newest.balance,
                        "seq": newest.seq,
                        "created_at": min(ch.at for ch in changes),
                    },
                )
        return newest.seq

    async def summary(self, page_size: int = 0, page_token: str = "") -> SummaryPage:
        """Accounts in creation order (created_at, then user name); `page_size` 0 means all.

        Raises InvalidPage for a negative size or a token this sink did not issue.
        """
        if page_size < 0:
            raise InvalidPage(f"page_size {page_size} must be 0 (every account) or more")
        limit = page_size + 1 if page_size else None
        if page_token:
            created_at, user = _decode_token(page_token)
            query, params = _SUMMARY_AFTER, {"limit": limit, "created_at": created_at, "user": user}
        else:
            query, params = _SUMMARY_FIRST, {"limit": limit}
        async with self._connection("reading the summary") as conn:
            cursor = await conn.execute(query, params)
            rows = await cursor.fetchall()
        accounts = [
            AccountRow(user=r[0], balance=r[1], last_seq=r[2], created_at=r[3]) for r in rows
        ]
        if page_size and len(accounts) > page_size:
            del accounts[page_size:]
            return SummaryPage(accounts=accounts, next_page_token=_encode_token(accounts[-1]))
        return SummaryPage(accounts=accounts, next_page_token="")

    async def counts(self) -> tuple[int, int]:
        """(accounts, ledger rows): for operators and tests."""
        async with self._connection("counting rows") as conn:
            cursor = await conn.execute(
                "SELECT (SELECT count(*) FROM accounts), (SELECT count(*) FROM ledger)"
            )
            row = await cursor.fetchone()
        assert row is not None
        return int(row[0]), int(row[1])

    @asynccontextmanager
    async def _connection(
        self, operation: str, *, schema: bool = True
    ) -> AsyncIterator[psycopg.AsyncConnection[TupleRow]]:
        """A pooled connection; psycopg errors come out as etl.errors naming `operation`.
        With `schema`, the call fails fast until `open()` has created the schema."""
        if schema and not self._ready:
            raise DatabaseUnavailable(f"{operation}: the ETL schema is not created yet")
        try:
            async with self._pool.connection() as conn:
                yield conn
        except (psycopg_pool.PoolTimeout, psycopg_pool.PoolClosed, psycopg.OperationalError) as e:
            raise DatabaseUnavailable(
                f"{operation}: PostgreSQL is unreachable ({e}); is the database running?"
            ) from e
        except psycopg.Error as e:
            raise SinkError(f"{operation}: {type(e).__name__}: {e}") from e
