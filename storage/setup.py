"""Brings a database to its storage mode: TimescaleDB created where the server loads it,
and the growing tables made hypertables in place (their rows copied into chunks once).

Runs after the SQL migrations, at boot and in `migrate`, under the migrations' advisory
lock, so two processes booting at once do it once. Every step is idempotent.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import asyncpg

from infra import ConfigError, log_system_event
from migrations import ADVISORY_LOCK_KEY
from storage.detect import read_facts
from storage.layout import HYPERTABLES
from storage.modes import StorageMode, classify

CHOICES = ("auto", "off")


def timescaledb_setting(env: Mapping[str, str]) -> str:
    """TIMESCALEDB: auto (use it where the server loads it) or off (plain tables)."""
    raw = env.get("TIMESCALEDB", "").strip().lower() or "auto"
    if raw not in CHOICES:
        raise ConfigError(f"TIMESCALEDB={raw[:40]!r} is not one of {', '.join(CHOICES)}")
    return raw


async def apply_storage(pool: asyncpg.Pool, choice: str = "auto") -> StorageMode:
    """The extension (when wanted and loadable) and the hypertables; returns the mode."""
    async with pool.acquire() as conn:
        facts = await read_facts(conn)
        if choice == "off" or not (facts.installed or (facts.available and facts.preloaded)):
            return classify(facts)
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", ADVISORY_LOCK_KEY)
            if not facts.installed:
                try:
                    async with conn.transaction():
                        await conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
                except asyncpg.PostgresError as exc:  # e.g. not allowed to create it
                    log_system_event("WARNING", "STORAGE", f"TimescaleDB not created, tables stay plain: {exc}")
                    return classify(facts)
                log_system_event("INFO", "STORAGE", "created the timescaledb extension")
            await _make_hypertables(conn)
        return classify(await read_facts(conn))


async def _make_hypertables(conn: asyncpg.Connection) -> None:
    done = {
        r["hypertable_name"]
        for r in await conn.fetch(
            "SELECT hypertable_name FROM timescaledb_information.hypertables WHERE hypertable_schema = 'public'"
        )
    }
    for table in HYPERTABLES:
        if table.table in done:
            continue
        started = time.monotonic()
        rows = await conn.fetchval(f"SELECT count(*) FROM {table.table}")
        await conn.execute(
            "SELECT create_hypertable($1::regclass, by_range($2::name, $3::text::interval), migrate_data => true)",
            table.table,
            table.time_column,
            table.chunk,
        )
        log_system_event(
            "INFO",
            "STORAGE",
            f"{table.table} is a hypertable now ({table.chunk} chunks; {rows} rows moved in "
            f"{time.monotonic() - started:.2f} s)",
            {"table": table.table, "rows": rows},
        )
