"""The global PostgreSQL read model: the connection pool and every SQL statement against it.

Contract: `apply` is idempotent. Applying a batch twice, or an older batch after a newer one,
changes nothing; a batch is committed in one transaction, so when `apply` returns, every row of
the batch is durable in PostgreSQL. `accounts.balance` always equals the balance of the user's
ledger row with the highest seq. `repair` is the one exception to "rows are never
overwritten": reconcile calls it with rows read from the user's own database, the source of truth.

Concurrency: any number of `apply` calls may wait at once; one task commits them in groups,
one transaction at a time (group commit). `repair` runs on a pooled connection of its own. Every
transaction inserts ledger rows in (user, seq) order and upserts account rows last, in user
order, so two cannot deadlock; the `last_seq` guard makes their order irrelevant.

psycopg and psycopg_pool exceptions are translated here, and only here, into `etl.errors`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import NamedTuple

import psycopg
import psycopg_pool
from psycopg.rows import TupleRow

from etl.errors import DatabaseUnavailable, InvalidPage, SinkError

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
# The most rows one group commit takes (a batch is never split).
GROUP_ROWS = 5000

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

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
    # The newest seq the user's worker reported (ChangeBatch.head_seq): head_seq > last_seq
    # means the worker holds rows PostgreSQL does not have yet. Added after version 1 shipped.
    "ALTER TABLE accounts ADD COLUMN IF NOT EXISTS head_seq bigint NOT NULL DEFAULT 0",
    """CREATE INDEX IF NOT EXISTS accounts_unshipped ON accounts (user_name)
        WHERE head_seq > last_seq""",
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

# Rows of several users at once: one array element per row.
_INSERT_LEDGER = """
INSERT INTO ledger (user_name, seq, kind, amount, balance, at)
SELECT u.user_name, u.seq, u.kind, u.amount, u.balance, u.at
FROM unnest(
    %(users)s::text[], %(seqs)s::bigint[], %(kinds)s::smallint[], %(amounts)s::bigint[],
    %(balances)s::bigint[], %(ats)s::timestamptz[]
) AS u(user_name, seq, kind, amount, balance, at)
ON CONFLICT (user_name, seq) DO NOTHING
"""

# One array element per user (each user at most once). Balance, last_seq and head_seq move only
# forward; created_at only backward.
_UPSERT_ACCOUNTS = """
INSERT INTO accounts AS a (user_name, balance, last_seq, head_seq, created_at, updated_at)
SELECT u.user_name, u.balance, u.last_seq, u.head_seq, u.created_at, now()
FROM unnest(
    %(users)s::text[], %(balances)s::bigint[], %(seqs)s::bigint[], %(heads)s::bigint[],
    %(created)s::timestamptz[]
) AS u(user_name, balance, last_seq, head_seq, created_at)
ON CONFLICT (user_name) DO UPDATE SET
    balance = CASE WHEN excluded.last_seq > a.last_seq THEN excluded.balance ELSE a.balance END,
    updated_at = CASE WHEN excluded.last_seq > a.last_seq THEN now() ELSE a.updated_at END,
    last_seq = GREATEST(a.last_seq, excluded.last_seq),
    head_seq = GREATEST(a.head_seq, excluded.head_seq),
    created_at = LEAST(a.created_at, excluded.created_at)
"""

_UNSHIPPED_USERS = "SELECT count(*) FROM accounts WHERE head_seq > last_seq"

# LIMIT NULL means no limit.
# created_at as whole microseconds since the epoch: an int is far cheaper to fetch and to put
# in a protobuf Timestamp than a datetime, which matters at 100,000 rows.
_SUMMARY_FIRST = """
SELECT user_name, balance, last_seq, (extract(epoch FROM created_at) * 1000000)::bigint
FROM accounts
ORDER BY created_at, user_name
LIMIT %(limit)s
"""

_SUMMARY_AFTER = """
SELECT user_name, balance, last_seq, (extract(epoch FROM created_at) * 1000000)::bigint
FROM accounts
WHERE (created_at, user_name) > (%(created_at)s, %(user)s)
ORDER BY created_at, user_name
LIMIT %(limit)s
"""

# The text of `conventions.answers.summary_line` for every account, in summary order.
_SUMMARY_TEXT = """
SELECT coalesce(
    string_agg(user_name || ', ' || balance || E'\n', '' ORDER BY created_at, user_name), '')
FROM accounts
"""

# Reconcile reads and repairs. The account row and the newest ledger row are read in one
# statement, so they come from one snapshot and an apply committing meanwhile cannot make them
# look inconsistent.
_ACCOUNT_CHECK = """
SELECT a.balance, a.last_seq, l.seq, l.balance
FROM (SELECT 1) AS one
LEFT JOIN accounts AS a ON a.user_name = %(user)s
LEFT JOIN LATERAL (
    SELECT seq, balance FROM ledger WHERE user_name = %(user)s ORDER BY seq DESC LIMIT 1
) AS l ON true
"""

_LEDGER_PAGE = """
SELECT seq, kind, amount, balance, at FROM ledger
WHERE user_name = %(user)s AND seq > %(after)s
ORDER BY seq
LIMIT %(limit)s
"""

_ACCOUNT_NAMES = "SELECT user_name FROM accounts ORDER BY user_name"

# The worker's row wins: an existing row with the same seq is overwritten.
_OVERWRITE_LEDGER = """
INSERT INTO ledger AS l (user_name, seq, kind, amount, balance, at)
SELECT %(user)s, u.seq, u.kind, u.amount, u.balance, u.at
FROM unnest(
    %(seqs)s::bigint[], %(kinds)s::smallint[], %(amounts)s::bigint[],
    %(balances)s::bigint[], %(ats)s::timestamptz[]
) AS u(seq, kind, amount, balance, at)
ON CONFLICT (user_name, seq) DO UPDATE SET
    kind = excluded.kind, amount = excluded.amount, balance = excluded.balance,
    at = excluded.at, applied_at = now()
WHERE (l.kind, l.amount, l.balance, l.at)
    IS DISTINCT FROM (excluded.kind, excluded.amount, excluded.balance, excluded.at)
"""

_DROP_LEDGER = "DELETE FROM ledger WHERE user_name = %(user)s AND seq = ANY(%(seqs)s::bigint[])"

_LOCK_ACCOUNT = "SELECT 1 FROM accounts WHERE user_name = %(user)s FOR UPDATE"

# Run while holding the account row's lock, in a statement of its own: its snapshot then holds
# every committed apply, and an apply still in flight upserts the account after this commits.
_RESET_ACCOUNT = """
UPDATE accounts AS a SET balance = l.balance, last_seq = l.seq, updated_at = now()
FROM (
    SELECT seq, balance FROM ledger WHERE user_name = %(user)s ORDER BY seq DESC LIMIT 1
) AS l
WHERE a.user_name = %(user)s AND (a.balance, a.last_seq) IS DISTINCT FROM (l.balance, l.seq)
"""

# When there was no account row to lock, an apply may insert one meanwhile; its row then
# stands unless it is older than the ledger read here.
_CREATE_ACCOUNT = """
INSERT INTO accounts AS a (user_name, balance, last_seq, created_at, updated_at)
SELECT %(user)s, l.balance, l.seq, f.at, now()
FROM (
    SELECT seq, balance FROM ledger WHERE user_name = %(user)s ORDER BY seq DESC LIMIT 1
) AS l, (
    SELECT at FROM ledger WHERE user_name = %(user)s ORDER BY seq LIMIT 1
) AS f
ON CONFLICT (user_name) DO UPDATE SET
    balance = excluded.balance, last_seq = excluded.last_seq, updated_at = now(),
    created_at = LEAST(a.created_at, excluded.created_at)
WHERE excluded.last_seq > a.last_seq
"""


@dataclass(frozen=True, kw_only=True)
class Change:
    """One ledger row of one user, as shipped by its worker."""

    seq: int
    kind: int
    amount: int
    balance: int
    at: datetime


class AccountRow(NamedTuple):
    """One line of the summary. A tuple, not a dataclass: the summary builds 100,000 of them."""

    user: str
    balance: int
    last_seq: int
    created_at_us: int  # microseconds since the epoch

    @property
    def created_at(self) -> datetime:
        return _EPOCH + timedelta(microseconds=self.created_at_us)


@dataclass(frozen=True)
class _Batch:
    """A batch waiting for the group commit, and the future its `apply` awaits."""

    user: str
    changes: Sequence[Change]
    head_seq: int
    done: asyncio.Future[int]


@dataclass(frozen=True, kw_only=True)
class AccountCheck:
    """A user's account row and the newest ledger row, as PostgreSQL held them at one moment;
    a field is None when the row does not exist."""

    balance: int | None
    last_seq: int | None
    ledger_last_seq: int | None
    ledger_last_balance: int | None


@dataclass(frozen=True, kw_only=True)
class Repaired:
    """What one `Sink.repair` call changed."""

    rows_written: int
    rows_dropped: int
    account_fixed: bool


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
        self._waiting: deque[_Batch] = deque()
        self._committer: asyncio.Task[None] | None = None

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

    async def apply(self, user: str, changes: Sequence[Change], *, head_seq: int = 0) -> int:
        """Commits the rows of one user and returns the highest seq of the batch: every row of
        `user` up to that seq is then in PostgreSQL. `head_seq` is the newest seq the worker
        reported (0 = not reported), kept for `unshipped_users`.

        Group commit: batches that arrive while a transaction is committing wait for it, then
        go together in the next one (one transaction, one commit for many users), so the cost
        of a commit is shared when many workers ship single deposits. A failure fails every
        batch of the group; their workers resend, which is safe (idempotent).

        `changes` must be non-empty and in ascending seq order (the caller validates).
        """
        done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiting.append(_Batch(user, changes, head_seq, done))
        if self._committer is None or self._committer.done():
            self._committer = asyncio.create_task(self._commit_waiting())
        return await done

    async def _commit_waiting(self) -> None:
        """Commits the waiting batches, a group at a time, until none waits."""
        while self._waiting:
            group, rows = [], 0
            while self._waiting and rows < GROUP_ROWS:
                batch = self._waiting.popleft()
                group.append(batch)
                rows += len(batch.changes)
            try:
                await self._commit(group)
            except Exception as e:  # EtlError, or a bug: either way every waiter hears of it
                for batch in group:
                    if not batch.done.done():
                        batch.done.set_exception(e)
            else:
                for batch in group:
                    if not batch.done.done():  # a stream that ended meanwhile stops waiting
                        batch.done.set_result(batch.changes[-1].seq)

    async def _commit(self, group: Sequence[_Batch]) -> None:
        # Users sorted, rows ascending within each: locks are always taken in the same order.
        rows = sorted(((b.user, c) for b in group for c in b.changes),
                      key=lambda r: (r[0], r[1].seq))
        accounts: dict[str, tuple[Change, int, datetime]] = {}  # user: newest, head, oldest at
        for batch in group:
            newest, oldest = batch.changes[-1], min(c.at for c in batch.changes)
            head = max(batch.head_seq, newest.seq)
            if batch.user in accounts:  # two activations of one user in one group
                other, other_head, other_oldest = accounts[batch.user]
                newest = max(newest, other, key=lambda c: c.seq)
                head, oldest = max(head, other_head), min(oldest, other_oldest)
            accounts[batch.user] = (newest, head, oldest)
        users = sorted(accounts)
        what = f"applying {len(rows)} rows of {len(users)} user(s) ({', '.join(users[:3])}...)"
        async with self._connection(what) as conn:
            # One network round trip for BEGIN, both statements and COMMIT, not four.
            async with conn.pipeline(), conn.transaction():
                await conn.execute(_INSERT_LEDGER, {
                    "users": [u for u, _ in rows],
                    "seqs": [c.seq for _, c in rows],
                    "kinds": [c.kind for _, c in rows],
                    "amounts": [c.amount for _, c in rows],
                    "balances": [c.balance for _, c in rows],
                    "ats": [c.at for _, c in rows],
                })
                await conn.execute(_UPSERT_ACCOUNTS, {
                    "users": users,
                    "balances": [accounts[u][0].balance for u in users],
                    "seqs": [accounts[u][0].seq for u in users],
                    "heads": [accounts[u][1] for u in users],
                    "created": [accounts[u][2] for u in users],
                })

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
        accounts = list(map(AccountRow._make, rows))
        if page_size and len(accounts) > page_size:
            del accounts[page_size:]
            return SummaryPage(accounts=accounts, next_page_token=_encode_token(accounts[-1]))
        return SummaryPage(accounts=accounts, next_page_token="")

    async def summary_text(self) -> str:
        """Every account as one `name, balance` line, in summary order: the original text
        route's body (`conventions.answers.summary_line`), built by PostgreSQL."""
        async with self._connection("reading the summary text") as conn:
            cursor = await conn.execute(_SUMMARY_TEXT)
            row = await cursor.fetchone()
        assert row is not None
        return str(row[0])

    async def unshipped_users(self) -> int:
        """How many users' workers reported rows that PostgreSQL does not have yet (from the
        last batch each sent; a worker that wrote while the ETL was unreachable reports its
        rows when it reconnects, until then only the dispatcher's drain queue knows)."""
        async with self._connection("counting users with unshipped rows") as conn:
            cursor = await conn.execute(_UNSHIPPED_USERS)
            row = await cursor.fetchone()
        assert row is not None
        return int(row[0])

    async def counts(self) -> tuple[int, int]:
        """(accounts, ledger rows): for operators and tests."""
        async with self._connection("counting rows") as conn:
            cursor = await conn.execute(
                "SELECT (SELECT count(*) FROM accounts), (SELECT count(*) FROM ledger)"
            )
            row = await cursor.fetchone()
        assert row is not None
        return int(row[0]), int(row[1])

    async def attach(self) -> None:
        """Opens the pool on a schema the ETL has already created, creating nothing (for
        tools such as reconcile). Raises DatabaseUnavailable when PostgreSQL cannot be
        reached, SinkError when it holds no ETL schema or a newer one."""
        await self._pool.open(wait=False)
        async with self._connection("reading the ETL schema version", schema=False) as conn:
            cursor = await conn.execute("SELECT to_regclass('etl_schema') IS NOT NULL")
            exists = await cursor.fetchone()
            version = None
            if exists is not None and exists[0]:
                cursor = await conn.execute("SELECT max(version) FROM etl_schema")
                row = await cursor.fetchone()
                version = None if row is None else row[0]
        if version is None:
            raise SinkError(
                "PostgreSQL holds no ETL schema; is this the ETL's database (UPW_DATABASE_URL), "
                "and has the ETL run against it once?"
            )
        if version > SCHEMA_VERSION:
            raise SinkError(
                f"PostgreSQL holds ETL schema version {version}, newer than this code's "
                f"{SCHEMA_VERSION}; use the newer upw"
            )
        self._ready = True

    async def account_check(self, user: str) -> AccountCheck:
        """The account row of `user` and the newest ledger row, from one snapshot."""
        async with self._connection(f"checking the account of {user!r}") as conn:
            cursor = await conn.execute(_ACCOUNT_CHECK, {"user": user})
            row = await cursor.fetchone()
        assert row is not None
        return AccountCheck(
            balance=row[0], last_seq=row[1], ledger_last_seq=row[2], ledger_last_balance=row[3]
        )

    async def ledger_page(self, user: str, *, after_seq: int, limit: int) -> list[Change]:
        """At most `limit` ledger rows of `user` with seq > `after_seq`, in seq order."""
        async with self._connection(f"reading the ledger of {user!r} after {after_seq}") as c:
            cursor = await c.execute(
                _LEDGER_PAGE, {"user": user, "after": after_seq, "limit": limit}
            )
            rows = await cursor.fetchall()
        return [Change(seq=r[0], kind=r[1], amount=r[2], balance=r[3], at=r[4]) for r in rows]

    async def account_names(self) -> list[str]:
        """Every user with an account row, in name order."""
        async with self._connection("listing the accounts") as conn:
            cursor = await conn.execute(_ACCOUNT_NAMES)
            rows = await cursor.fetchall()
        return [str(r[0]) for r in rows]

    async def repair(
        self, user: str, changes: Sequence[Change], *, drop_seqs: Sequence[int] = ()
    ) -> Repaired:
        """Makes PostgreSQL agree with the worker's ledger, in one transaction: writes
        `changes` (ascending seq order) over whatever rows of the same seq hold, deletes the rows
        `drop_seqs` that the worker's ledger does not have, and sets the account row to the
        newest ledger row. Unlike `apply` it overwrites, so the caller must pass rows read from
        the user's own database. Safe to run while batches of the same user are applied: it
        takes its locks in the same order as `apply` (ledger rows ascending, account row last).
        """
        params = {
            "user": user,
            "seqs": [c.seq for c in changes],
            "kinds": [c.kind for c in changes],
            "amounts": [c.amount for c in changes],
            "balances": [c.balance for c in changes],
            "ats": [c.at for c in changes],
        }
        written = dropped = 0
        async with self._connection(f"repairing the rows of {user!r}") as conn:
            async with conn.transaction():
                if changes:
                    cursor = await conn.execute(_OVERWRITE_LEDGER, params)
                    written = max(cursor.rowcount, 0)
                if drop_seqs:
                    cursor = await conn.execute(
                        _DROP_LEDGER, {"user": user, "seqs": list(drop_seqs)}
                    )
                    dropped = max(cursor.rowcount, 0)
                cursor = await conn.execute(_LOCK_ACCOUNT, {"user": user})
                locked = await cursor.fetchone() is not None
                cursor = await conn.execute(
                    _RESET_ACCOUNT if locked else _CREATE_ACCOUNT, {"user": user}
                )
                fixed = cursor.rowcount > 0
        if written or dropped or fixed:
            logger.info(
                "user %r: repaired %d ledger rows, dropped %d, account row %s",
                user, written, dropped, "fixed" if fixed else "unchanged",
            )
        return Repaired(rows_written=written, rows_dropped=dropped, account_fixed=fixed)

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
