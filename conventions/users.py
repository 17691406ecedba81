"""User names and the paths they become.

A user name becomes a directory name, so it is checked here, and again by every component
that turns a name into a path (each one calls `user_dir` or `validate_user` itself).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

# Lowercase only, so two names never share one file on a case-insensitive disk.
USER_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
USER_NAME_RULE = "1 to 63 characters of a-z, 0-9, '_' and '-', starting with a letter or a digit"


class InvalidUserName(ValueError):
    """A user name that does not match USER_NAME."""

    def __init__(self, name: str) -> None:
        shown = name if len(name) <= 80 else name[:80] + "..."
        super().__init__(f"user name {shown!r} is invalid: use {USER_NAME_RULE}")
        self.name = name


def validate_user(name: str) -> str:
    """Returns the name unchanged, or raises InvalidUserName."""
    if not USER_NAME.fullmatch(name):
        raise InvalidUserName(name)
    return name


def shard_of(user: str) -> str:
    """Three hex digits of the name's SHA-256: 4096 directories, so a million users put about
    250 entries in each."""
    return hashlib.sha256(validate_user(user).encode()).hexdigest()[:3]


def user_dir(data_dir: Path, user: str) -> Path:
    """`<data dir>/users/<shard>/<user>`: everything of one user, and nothing else, lives here."""
    return data_dir / "users" / shard_of(user) / validate_user(user)


def account_db(data_dir: Path, user: str) -> Path:
    return user_dir(data_dir, user) / "account.db"


# The worker of a user keeps this empty file beside account.db while the ledger may hold rows
# the ETL has not acknowledged; the dispatcher drains users whose stopped worker left it.
UNSHIPPED_MARKER = "unshipped"


def unshipped_marker(data_dir: Path, user: str) -> Path:
    """`<user dir>/unshipped`: present while the user may have changes not yet in PostgreSQL."""
    return user_dir(data_dir, user) / UNSHIPPED_MARKER
