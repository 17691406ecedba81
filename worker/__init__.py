"""The worker: serves `upw.account.v1.AccountService` for exactly one user over a unix socket,
on that user's own SQLite database, and ships the user's ledger rows to the ETL.

One module per concept: `store` owns the database, `service` translates protobuf to store
calls, `shipper` streams the ledger to the ETL, `server` wires them to a gRPC server, and
`__main__` is the worker's command line (`python -m worker --help`), which a container runs
and `forkserver` calls in each process it forks for the process runtime.
"""
