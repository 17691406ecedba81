"""`python -m etl`: serve until SIGTERM or SIGINT, configured by `conventions.config`."""

from etl.server import main

main()
