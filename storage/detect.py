"""Reads the storage mode from the server: one query, at boot and for status."""

from __future__ import annotations

import asyncpg

from storage.modes import ServerFacts, StorageMode, classify

FACTS_SQL = """
SELECT current_setting('server_version_num')::int AS server_version_num,
       (SELECT extversion FROM pg_extension WHERE extname = 'timescaledb') AS installed,
       (SELECT default_version FROM pg_available_extensions WHERE name = 'timescaledb') AS available,
       current_setting('timescaledb.license', true) AS license
"""
# Loaded (shared_preload_libraries) shows as its license setting being defined: readable by
# any user, where shared_preload_libraries itself is for superusers and pg_read_all_settings.


async def read_facts(pool: asyncpg.Pool | asyncpg.Connection) -> ServerFacts:
    row = await pool.fetchrow(FACTS_SQL)
    license = row["license"] or None
    return ServerFacts(row["server_version_num"], row["installed"], row["available"], license is not None, license)


async def detect_storage_mode(pool: asyncpg.Pool | asyncpg.Connection) -> StorageMode:
    return classify(await read_facts(pool))
