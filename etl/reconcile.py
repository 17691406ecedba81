"""`upw reconcile [--repair]`: compares every user's SQLite ledger with PostgreSQL.

The user's own database is the source of truth. Each user comes out as one of:

- in sync: PostgreSQL holds exactly the user's ledger, and `accounts` agrees with its last row;
- behind: PostgreSQL lacks only a suffix of the ledger (replication lag, or an outage); the
  worker ships it on its own, so this is not an error;
- diverged: PostgreSQL holds a row that differs from the user's row of the same seq, a row the
  user's ledger does not have, or a gap, or its `accounts` row disagrees with its own ledger.

`--repair` ships what PostgreSQL lacks through `Sink.apply` (the ETL's own idempotent path),
overwrites wrong rows and removes extra ones with `Sink.repair`, then checks those users again.
An account in PostgreSQL whose user has no database under the data dir is reported, never
deleted: a wrong UPW_DATA_DIR would otherwise empty PostgreSQL.

Reading never gets in a worker's way: a user database is opened read-only (and never through a
symlink), each read is one statement, so one short WAL read transaction, and a WAL reader does
not block the writer. PostgreSQL's page is always read before the user's page of the same range:
a row reaches PostgreSQL only after it is committed to the user's file, so rows that a live
worker adds meanwhile can make a user look behind, never diverged.

This module reads the user database itself, read-only, because `worker.store.Store` opens it for
writing and migrates it; every statement against PostgreSQL is in `etl.sink`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import Enum
from pathlib import Path
from typing import TextIO

import apsw
from tqdm import tqdm

from conventions import logs
from conventions.config import ConfigError, Settings, from_env
from conventions.users import InvalidUserName, account_db, shard_of, validate_user
from etl.embedded import EmbeddedPostgres
from etl.errors import EtlError
from etl.sink import Change, Sink
from worker.store import Entry, Kind, LedgerReader

logger = logging.getLogger(__name__)

PAGE_SIZE = 10_000
# Users checked at once; each holds at most one pooled PostgreSQL connection at a time.
CONCURRENCY = 8
# How many users of each kind the summary names.
SHOWN = 10

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class ReconcileError(Exception):
    """Reconcile cannot run at all (settings, PostgreSQL); exit status 2."""


class State(Enum):
    IN_SYNC = "in sync"
    BEHIND = "behind"
    DIVERGED = "diverged"


@dataclass(frozen=True, kw_only=True)
class UserDb:
    user: str
    path: Path


@dataclass(frozen=True, kw_only=True)
class Skipped:
    """An entry under `<data dir>/users` that is not a user database reconcile can read."""

    path: Path
    reason: str


@dataclass(kw_only=True)
class Verdict:
    user: str
    state: State = State.IN_SYNC
    reasons: list[str] = field(default_factory=list)
    # Seq ranges (inclusive) the user's ledger has and PostgreSQL lacks.
    missing: list[tuple[int, int]] = field(default_factory=list)
    # Seqs whose PostgreSQL row differs from the user's row.
    wrong: list[int] = field(default_factory=list)
    # Seqs PostgreSQL has and the user's ledger does not.
    extra: list[int] = field(default_factory=list)
    account_wrong: bool = False

    @property
    def missing_rows(self) -> int:
        return sum(hi - lo + 1 for lo, hi in self.missing)


@dataclass(kw_only=True)
class Report:
    checked: int = 0
    in_sync: int = 0
    # Users that are not in sync, in name order once `finish()` ran.
    behind: list[Verdict] = field(default_factory=list)
    diverged: list[Verdict] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    # Accounts in PostgreSQL with no user database under the data dir.
    orphans: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def add(self, verdict: Verdict) -> None:
        self.checked += 1
        if verdict.state is State.IN_SYNC:
            self.in_sync += 1
        elif verdict.state is State.BEHIND:
            self.behind.append(verdict)
        else:
            self.diverged.append(verdict)

    def finish(self) -> None:
        self.behind.sort(key=lambda v: v.user)
        self.diverged.sort(key=lambda v: v.user)

    @property
    def has_divergence(self) -> bool:
        return bool(self.diverged or self.orphans)


@dataclass(kw_only=True)
class RepairStats:
    users: int = 0
    shipped: int = 0
    overwritten: int = 0
    dropped: int = 0
    accounts_fixed: int = 0


# -- where the users are -------------------------------------------------------------------


def _is_dir(entry: os.DirEntry[str]) -> bool:
    return entry.is_dir(follow_symlinks=False)


def walk(data_dir: Path) -> tuple[list[UserDb], list[Skipped]]:
    """Every `<data dir>/users/<shard>/<user>/account.db`, in name order, and every entry
    that is not one. Symlinks are never followed."""
    root = data_dir / "users"
    users: list[UserDb] = []
    skipped: list[Skipped] = []
    try:
        shards = sorted(os.scandir(root), key=lambda e: e.name)
    except FileNotFoundError:
        return [], []
    for shard in shards:
        if not _is_dir(shard):
            skipped.append(Skipped(path=Path(shard.path), reason="not a shard directory"))
            continue
        for entry in sorted(os.scandir(shard.path), key=lambda e: e.name):
            path = Path(entry.path)
            if not _is_dir(entry):
                skipped.append(Skipped(path=path, reason="not a user directory"))
                continue
            try:
                user = validate_user(entry.name)
            except InvalidUserName as e:
                skipped.append(Skipped(path=path, reason=str(e)))
                continue
            if shard_of(user) != shard.name:
                skipped.append(Skipped(
                    path=path, reason=f"belongs in shard {shard_of(user)!r}, not {shard.name!r}"))
                continue
            db = account_db(data_dir, user)
            try:
                mode = db.lstat().st_mode
            except FileNotFoundError:
                skipped.append(Skipped(path=path, reason="no account.db"))
                continue
            if not stat.S_ISREG(mode):
                skipped.append(Skipped(path=db, reason="account.db is not a regular file"))
                continue
            users.append(UserDb(user=user, path=db))
    return users, skipped


# -- the user's side -----------------------------------------------------------------------


def _change(entry: Entry) -> Change:
    return Change(seq=entry.seq, kind=int(entry.kind), amount=entry.amount,
                  balance=entry.balance, at=_EPOCH + timedelta(microseconds=entry.at_us))


def _page(mine: LedgerReader, *, after_seq: int, limit: int) -> list[Change]:
    return [_change(e) for e in mine.page(after_seq=after_seq, limit=limit)]


def _chunks(items: Sequence[int], size: int) -> Iterator[Sequence[int]]:
    # itertools.batched needs Python 3.12.
    for start in range(0, len(items), size):
        yield items[start:start + size]


# -- comparing -----------------------------------------------------------------------------


def _describe(change: Change) -> str:
    return f"{Kind(change.kind).name} {change.amount} (balance {change.balance})"


def _add_missing(verdict: Verdict, seq: int) -> None:
    if verdict.missing and verdict.missing[-1][1] == seq - 1:
        verdict.missing[-1] = (verdict.missing[-1][0], seq)
    else:
        verdict.missing.append((seq, seq))


def _compare(verdict: Verdict, pg: list[Change], mine: list[Change], upto: float) -> int:
    """Merges two pages up to seq `upto`; returns the highest PostgreSQL seq among them."""
    theirs = {c.seq: c for c in pg if c.seq <= upto}
    pg_high = max(theirs, default=0)
    for change in mine:
        if change.seq > upto:
            break
        other = theirs.pop(change.seq, None)
        if other is None:
            _add_missing(verdict, change.seq)
        elif other != change:
            if not verdict.wrong:
                verdict.reasons.append(
                    f"seq {change.seq} differs: PostgreSQL has {_describe(other)}, "
                    f"the user's ledger {_describe(change)}")
            verdict.wrong.append(change.seq)
    if theirs and not verdict.extra:
        verdict.reasons.append(f"PostgreSQL has seq {min(theirs)}, which the user's ledger lacks")
    verdict.extra += sorted(theirs)
    return pg_high


async def check_user(sink: Sink, db: UserDb, *, page_size: int = PAGE_SIZE) -> Verdict:
    verdict = Verdict(user=db.user)
    user = db.user
    account = await sink.account_check(user)
    pg_high = 0
    with LedgerReader(db.path) as mine:
        cursor = 0
        while True:
            # PostgreSQL first: whatever it holds was committed to the user's file before.
            pg = await sink.ledger_page(user, after_seq=cursor, limit=page_size)
            rows = _page(mine, after_seq=cursor, limit=page_size)
            if not pg and not rows:
                break
            upto: float = float("inf")
            if len(rows) == page_size:
                upto = rows[-1].seq
            if len(pg) == page_size:
                upto = min(upto, pg[-1].seq)
            pg_high = max(pg_high, _compare(verdict, pg, rows, upto))
            if upto == float("inf"):
                break
            cursor = int(upto)
    gaps = [(lo, hi) for lo, hi in verdict.missing if lo < pg_high]
    if gaps:
        lo, hi = gaps[0]
        verdict.reasons.append(
            f"PostgreSQL lacks seq {_span(lo, hi)} but has seq {pg_high}")
    if account.last_seq is None and account.ledger_last_seq is not None:
        verdict.account_wrong = True
        verdict.reasons.append(
            f"no accounts row, although its ledger reaches seq {account.ledger_last_seq}")
    elif account.last_seq is not None and account.ledger_last_seq is None:
        verdict.account_wrong = True
        verdict.reasons.append("an accounts row but no ledger rows")
    elif (account.balance, account.last_seq) != (
            account.ledger_last_balance, account.ledger_last_seq):
        verdict.account_wrong = True
        verdict.reasons.append(
            f"accounts says balance {account.balance} at seq {account.last_seq}, its ledger "
            f"balance {account.ledger_last_balance} at seq {account.ledger_last_seq}")
    if verdict.reasons:
        verdict.state = State.DIVERGED
    elif verdict.missing:
        verdict.state = State.BEHIND
        lo, hi = verdict.missing[0]
        verdict.reasons.append(f"PostgreSQL lacks seq {_span(lo, hi)}")
    return verdict


def _span(lo: int, hi: int) -> str:
    return str(lo) if lo == hi else f"{lo}-{hi}"


async def _each(
    users: Sequence[UserDb], work: Callable[[UserDb], Awaitable[None]], *, progress: bool,
    what: str,
) -> None:
    """Runs `work` for every user, CONCURRENCY at a time, with a progress bar on a terminal."""
    pending = iter(users)
    with tqdm(total=len(users), desc=what, unit="user", file=sys.stderr,
              disable=not (progress and sys.stderr.isatty())) as bar:

        async def run() -> None:
            for db in pending:
                await work(db)
                bar.update()

        await asyncio.gather(*(run() for _ in range(min(CONCURRENCY, len(users)) or 1)))


async def check(
    sink: Sink, users: Sequence[UserDb], *, page_size: int = PAGE_SIZE, progress: bool = True
) -> Report:
    report = Report()
    started = time.monotonic()

    async def one(db: UserDb) -> None:
        try:
            verdict = await check_user(sink, db, page_size=page_size)
        except apsw.Error as e:
            report.skipped.append(Skipped(path=db.path, reason=f"unreadable: {e}"))
            return
        report.add(verdict)

    await _each(users, one, progress=progress, what="checking")
    report.finish()
    report.seconds = time.monotonic() - started
    return report


async def _orphans(sink: Sink, data_dir: Path, users: Iterable[UserDb]) -> list[str]:
    """Accounts in PostgreSQL without a user database (looked for again, in case the user was
    created after the walk)."""
    known = {db.user for db in users}
    orphans = []
    for name in await sink.account_names():
        if name in known:
            continue
        try:
            path = account_db(data_dir, name)
        except InvalidUserName:
            orphans.append(name)
            continue
        if not path.exists():
            orphans.append(name)
    return orphans


# -- repairing -----------------------------------------------------------------------------


async def repair_user(
    sink: Sink, db: UserDb, verdict: Verdict, *, page_size: int = PAGE_SIZE
) -> RepairStats:
    stats = RepairStats(users=1)
    with LedgerReader(db.path) as mine:
        for lo, hi in verdict.missing:
            cursor = lo - 1
            while cursor < hi:
                rows = _page(mine, after_seq=cursor, limit=min(page_size, hi - cursor))
                if not rows:
                    break
                await sink.apply(db.user, rows)
                stats.shipped += len(rows)
                cursor = rows[-1].seq
        if verdict.state is not State.DIVERGED:
            return stats
        chunks = [[_change(e) for e in mine.rows(chunk)]
                  for chunk in _chunks(verdict.wrong, page_size)]
    for rows in [*chunks, []]:
        last = not rows
        repaired = await sink.repair(db.user, rows, drop_seqs=verdict.extra if last else ())
        stats.overwritten += repaired.rows_written
        stats.dropped += repaired.rows_dropped
        stats.accounts_fixed += repaired.account_fixed
    logger.info("user %r: repaired (%s)", db.user, "; ".join(verdict.reasons))
    return stats


async def repair(
    sink: Sink, users: Sequence[UserDb], report: Report, *, page_size: int = PAGE_SIZE,
    progress: bool = True,
) -> RepairStats:
    by_name = {db.user: db for db in users}
    verdicts = {v.user: v for v in (*report.behind, *report.diverged)}
    total = RepairStats()

    async def one(db: UserDb) -> None:
        stats = await repair_user(sink, db, verdicts[db.user], page_size=page_size)
        total.users += stats.users
        total.shipped += stats.shipped
        total.overwritten += stats.overwritten
        total.dropped += stats.dropped
        total.accounts_fixed += stats.accounts_fixed

    await _each([by_name[user] for user in verdicts], one, progress=progress, what="repairing")
    return total


# -- the command ---------------------------------------------------------------------------


def database_url(settings: Settings) -> str:
    """UPW_DATABASE_URL, or the URL of the embedded PostgreSQL under the data dir, read from
    its `postmaster.pid` the way the ETL's pgserver reads it. Reconcile never starts
    PostgreSQL: ReconcileError when the embedded one is not running."""
    if settings.database_url is not None:
        return settings.database_url
    pgdata = settings.data_dir / "postgres"
    url = EmbeddedPostgres(pgdata).running_url()
    if url is None:
        raise ReconcileError(
            f"the embedded PostgreSQL in {pgdata} is not running; start the stack "
            "(upw run) or set UPW_DATABASE_URL")
    return url


def format_report(report: Report, data_dir: Path, *, title: str = "reconcile") -> str:
    lines = [
        f"{title}: {report.checked} users checked in {report.seconds:.1f}s: "
        f"{report.in_sync} in sync, {len(report.behind)} behind, "
        f"{len(report.diverged)} diverged"
    ]
    if report.behind:
        rows = sum(v.missing_rows for v in report.behind)
        lines.append(f"  ({rows} rows not in PostgreSQL yet; the workers ship them on their own)")
    for verdict in report.diverged[:SHOWN]:
        lines.append(f"  diverged {verdict.user}: {'; '.join(verdict.reasons)}")
    if len(report.diverged) > SHOWN:
        lines.append(f"  ... and {len(report.diverged) - SHOWN} more diverged")
    for verdict in report.behind[:SHOWN]:
        lines.append(
            f"  behind   {verdict.user}: {verdict.reasons[0]} ({verdict.missing_rows} rows)")
    if len(report.behind) > SHOWN:
        lines.append(f"  ... and {len(report.behind) - SHOWN} more behind")
    if report.orphans:
        shown = ", ".join(report.orphans[:SHOWN])
        more = f" and {len(report.orphans) - SHOWN} more" if len(report.orphans) > SHOWN else ""
        lines.append(
            f"  {len(report.orphans)} accounts in PostgreSQL have no database under "
            f"{data_dir}: {shown}{more} (never removed by --repair; check UPW_DATA_DIR)")
    for skipped in report.skipped[:SHOWN]:
        lines.append(f"  skipped  {skipped.path}: {skipped.reason}")
    if len(report.skipped) > SHOWN:
        lines.append(f"  ... and {len(report.skipped) - SHOWN} more skipped")
    return "\n".join(lines)


async def reconcile(
    settings: Settings, *, repair_: bool = False, page_size: int = PAGE_SIZE,
    out: TextIO = sys.stdout, progress: bool = True,
) -> int:
    """Checks (and with `repair_`, repairs) every user; returns the exit status: 0 when
    nothing diverged, 1 when something did. ReconcileError when PostgreSQL is unusable."""
    conninfo = database_url(settings)
    sink = Sink(conninfo, min_size=1, max_size=CONCURRENCY, name="reconcile")
    try:
        try:
            await sink.attach()
        except EtlError as e:
            raise ReconcileError(str(e)) from e
        users, skipped = walk(settings.data_dir)
        report = await check(sink, users, page_size=page_size, progress=progress)
        report.skipped[:0] = skipped
        report.orphans = await _orphans(sink, settings.data_dir, users)
        print(format_report(report, settings.data_dir), file=out, flush=True)
        if not repair_ or not (report.behind or report.diverged):
            return 1 if report.has_divergence else 0
        stats = await repair(sink, users, report, page_size=page_size, progress=progress)
        print(
            f"repair: {stats.users} users: {stats.shipped} rows shipped, {stats.overwritten} "
            f"rows overwritten, {stats.dropped} rows removed, {stats.accounts_fixed} "
            "account rows fixed", file=out, flush=True)
        again = {v.user for v in (*report.behind, *report.diverged)}
        recheck = await check(sink, [db for db in users if db.user in again],
                              page_size=page_size, progress=progress)
        recheck.checked += report.in_sync
        recheck.in_sync += report.in_sync
        recheck.skipped = report.skipped
        recheck.orphans = report.orphans
        print(format_report(recheck, settings.data_dir, title="after repair"), file=out,
              flush=True)
        return 1 if recheck.has_divergence else 0
    except EtlError as e:
        raise ReconcileError(str(e)) from e
    finally:
        await sink.close()


def main(*, repair: bool = False) -> int:
    """`upw reconcile`: 0 = nothing diverged, 1 = something diverged, 2 = could not check."""
    try:
        settings = from_env()
    except ConfigError as e:
        print(f"upw reconcile: {e}", file=sys.stderr)
        return 2
    logs.setup("reconcile", settings.log_level)
    try:
        return asyncio.run(reconcile(settings, repair_=repair))
    except ReconcileError as e:
        print(f"upw reconcile: {e}", file=sys.stderr)
        return 2
