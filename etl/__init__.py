"""The ETL: receives the workers' change streams, applies them to the global PostgreSQL database
idempotently, acknowledges each batch after commit, and serves the cross-user read model.

One module per concept: `sink.py` owns the connection pool and every SQL statement,
`replication.py` and `summary.py` are the gRPC servicers, `server.py` builds and runs the server,
`embedded.py` runs the embedded PostgreSQL, `errors.py` holds the ETL's own exceptions.
"""
