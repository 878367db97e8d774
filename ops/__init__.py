"""Operator tooling: ticker management, the configuration report, progress of long work."""
