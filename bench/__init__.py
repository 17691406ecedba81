"""`make bench`: measures the real stack (Envoy, dispatcher, workers, ETL, PostgreSQL) and writes
a Markdown report with latency plots. It asserts no timing; the numbers are the product."""
