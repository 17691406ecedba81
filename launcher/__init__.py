"""Starts, watches and stops the whole product: ETL (with its PostgreSQL), dispatcher, Envoy."""
