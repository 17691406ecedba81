"""The ETL's own errors. psycopg and pgserver exceptions are translated into these where those
libraries are called (`sink.py`, `embedded.py`); the servicers turn them into gRPC status codes."""

from __future__ import annotations


class EtlError(Exception):
    """Base class of every error the ETL raises on purpose."""


class DatabaseUnavailable(EtlError):
    """PostgreSQL cannot be reached, or its schema is not created yet; retry later."""


class SinkError(EtlError):
    """PostgreSQL refused a statement for a reason other than being unreachable."""


class InvalidBatch(EtlError):
    """A change batch that breaks the replication contract (user name, entries, seq order)."""


class InvalidPage(EtlError):
    """A summary page that cannot be served: a negative size, or a token this ETL did not issue."""


class EmbeddedDatabaseError(EtlError):
    """The embedded PostgreSQL (pgserver) could not be started or stopped."""
