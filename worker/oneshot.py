"""`python -m worker.oneshot`: one operation on one user's database, then exit.

    python -m worker.oneshot --user USER --data-dir DIR (create | deposit AMOUNT | show)

This is the original model of the product (a fresh `docker run` per request), kept as the
baseline of `make bench` (`bench/docker_run.py`): the same `Store` the gRPC worker uses, the
same image, and on stdout the same text answer as the dispatcher's `TextGateway`. It ships
nothing to the ETL: a written row stays above the watermark, with the unshipped marker beside
the database, until a real worker of that user runs.

Exit codes: 0 with the answer on stdout; 1 when the store refused the operation (unknown
account, invalid amount, overflow), the reason on stderr; 2 for a bad command line or user name.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from conventions import answers, users
from worker.errors import WorkerError
from worker.store import Store

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m worker.oneshot",
        description="Run one account operation on one user's database and print the answer.",
    )
    p.add_argument("--user", required=True, help="the user whose database to use")
    p.add_argument("--data-dir", required=True, type=Path, help="the UPW data directory")
    operations = p.add_subparsers(dest="operation", required=True)
    operations.add_parser("create", help="open the account (idempotent)")
    deposit = operations.add_parser("deposit", help="add AMOUNT yen")
    deposit.add_argument("amount", type=int)
    operations.add_parser("show", help="print the balance")
    return p


def answer(store: Store, operation: str, amount: int = 0) -> str:
    """The text answer of `operation`, the same as the dispatcher's TextGateway gives.
    Raises the store's WorkerError when the store refuses."""
    user = store.user
    if operation == "create":
        store.create()
        return answers.welcome(user)
    if operation == "deposit":
        store.deposit(amount)
        return answers.deposited(user, amount)
    if operation == "show":
        return answers.balance(user, store.account().balance)
    raise ValueError(f"unknown operation {operation!r}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        user = users.validate_user(args.user)
    except users.InvalidUserName as exc:
        sys.stderr.write(f"worker.oneshot: {exc}\n")
        return EXIT_USAGE
    store = Store.open(users.account_db(args.data_dir.absolute(), user), user=user)
    try:
        text = answer(store, args.operation, getattr(args, "amount", 0))
    except WorkerError as exc:
        sys.stderr.write(f"worker.oneshot: {exc}\n")
        return EXIT_REFUSED
    finally:
        store.close()
    sys.stdout.write(text)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
