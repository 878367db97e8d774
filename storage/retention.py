"""Retention by whole chunks where a table is a hypertable: `drop_chunks` removes every
chunk that ends before the cut-off (a catalogue change: milliseconds, no row scanned,
no vacuum debt); the rows of the chunk that straddles it are left to the caller's
batched DELETE. On plain tables this does nothing."""

from __future__ import annotations

from datetime import datetime

import asyncpg


async def drop_old_chunks(pool: asyncpg.Pool, table: str, older_than: datetime) -> list[str]:
    """The chunks of `table` dropped (their names), none when it is no hypertable."""
    if not await pool.fetchval("SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb')"):
        return []
    if not await pool.fetchval(
        "SELECT EXISTS (SELECT 1 FROM timescaledb_information.hypertables WHERE hypertable_name = $1)", table
    ):
        return []
    rows = await pool.fetch(
        "SELECT drop_chunks($1::regclass, older_than => $2::timestamptz)::text AS name", table, older_than
    )
    return [r["name"] for r in rows]
