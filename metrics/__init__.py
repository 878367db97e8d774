"""Prometheus metrics of the daemon (METRICS_PORT): what is measured, and the endpoint."""
