"""The indicator engine: pure logic, no I/O (see registry.py for the entry points)."""
