"""Retention by whole pieces (storage.partitions.drop_before): every chunk or partition of
these tables that ends at or before `now − keep` is dropped; a catalogue change, no row
scanned or deleted, no vacuum debt. The piece across the cut-off stays whole until it is
wholly past: up to one piece more than asked is kept."""

from __future__ import annotations

from collections.abc import Iterable

import asyncpg

from storage.partitions import drop_before


async def drop_expired(pool: asyncpg.Pool, tables: Iterable[str], keep_ms: int, now_ms: int) -> list[str]:
    """The pieces dropped (their names)."""
    dropped: list[str] = []
    for table in tables:
        dropped += await drop_before(pool, table, now_ms - keep_ms)
    return dropped
