"""Errors of the dispatcher; `dispatcher.service` turns them into gRPC status codes."""


class DispatcherError(Exception):
    """Base class of the dispatcher's own errors."""


class WorkerUnavailable(DispatcherError):
    """The user's worker could not be started, or stopped answering."""


class WorkerCapReached(DispatcherError):
    """Every worker slot is busy and none was freed in time."""


class SummaryUnavailable(DispatcherError):
    """The ETL, which answers the account summary, did not answer."""
