"""Brings a database to its storage mode: TimescaleDB created where the server loads it,
the growing tables made hypertables (their rows moved into chunks once) or, on plain
PostgreSQL, the ones with a retention made natively partitioned; on the full edition,
older chunks compressed by policy.

Runs after the SQL migrations, at boot and in `migrate`, under the migrations' advisory
lock, so two processes booting at once do it once. Every step is idempotent.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import asyncpg

from infra import ConfigError, log_system_event
from migrations import ADVISORY_LOCK_KEY
from storage import partitions
from storage.aggregates import make_rollups
from storage.compression import compress_by_policy
from storage.convert import hypertable_from_partitions, partition_in_place
from storage.detect import read_facts
from storage.layout import TIME_TABLES, TimeTable
from storage.modes import StorageMode, classify

CHOICES = ("auto", "off")
# Time indexes the schema makes itself (sql/013): kept in every mode.
SCHEMA_TIME_INDEXES = {"ohlcv4_m1"}


def timescaledb_setting(env: Mapping[str, str]) -> str:
    """TIMESCALEDB: auto (use it where the server loads it) or off (plain tables)."""
    raw = env.get("TIMESCALEDB", "").strip().lower() or "auto"
    if raw not in CHOICES:
        raise ConfigError(f"TIMESCALEDB={raw[:40]!r} is not one of {', '.join(CHOICES)}")
    return raw


async def apply_storage(pool: asyncpg.Pool, choice: str = "auto") -> StorageMode:
    """The extension (when wanted and loadable), the tables' pieces; returns the mode. A
    role that does not own the tables (a runtime role beside the one that migrates) runs
    with them as they are, with a WARNING."""
    try:
        return await _apply(pool, choice)
    except asyncpg.InsufficientPrivilegeError as exc:
        log_system_event("WARNING", "STORAGE", f"storage left as it is (this role may not change it): {exc}")
        return classify(await read_facts(pool))
    finally:
        partitions.forget(pool)


async def _apply(pool: asyncpg.Pool, choice: str) -> StorageMode:
    async with pool.acquire() as conn:
        facts = await read_facts(conn)
        timescale = choice != "off" and (facts.installed or (facts.available and facts.preloaded))
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", ADVISORY_LOCK_KEY)
            if timescale and not facts.installed:
                try:
                    async with conn.transaction():
                        await conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
                except asyncpg.PostgresError as exc:  # e.g. not allowed to create it
                    log_system_event("WARNING", "STORAGE", f"TimescaleDB not created, tables stay plain: {exc}")
                    timescale = False
                else:
                    log_system_event("INFO", "STORAGE", "created the timescaledb extension")
            for table in TIME_TABLES:
                await _cut(conn, table, timescale)
                if timescale:
                    await _drop_default_index(conn, table)
            mode = classify(await read_facts(conn))
            if mode.full:
                await compress_by_policy(conn)
            for name in await make_rollups(conn, mode.full):
                log_system_event("INFO", "STORAGE", f"{name} made ({'continuous aggregate' if mode.full else 'view'})")
    return mode


async def _drop_default_index(conn: asyncpg.Connection, table: TimeTable) -> None:
    """The time index TimescaleDB used to add to each hypertable, dropped where it is not
    one of the schema's own (sql/): every query names the symbol and finds its rows by
    the primary key, as on plain PostgreSQL, and the extra index cost every row written
    one more index insert (the aggTrades import ran ~25% faster without it) and bytes."""
    name = f"{table.table}_{table.time_column}_idx"
    if table.table in SCHEMA_TIME_INDEXES:
        return
    definition = await conn.fetchval("SELECT pg_get_indexdef(to_regclass(quote_ident($1)))", name)
    if definition is not None and definition.endswith(f"USING btree ({table.time_column} DESC)"):
        await conn.execute(f'DROP INDEX "{name}"')
        log_system_event("INFO", "STORAGE", f"{name} dropped (TimescaleDB's default time index; the key serves)")


async def _cut(conn: asyncpg.Connection, table: TimeTable, timescale: bool) -> None:
    """One table to its mode's shape, if it is not there yet."""
    kind = await partitions.table_kind(conn, table.table)
    started = time.monotonic()
    if timescale and kind == partitions.SINGLE:
        rows = await conn.fetchval(f"SELECT count(*) FROM {table.table}")
        await conn.execute(
            "SELECT create_hypertable($1::regclass, by_range($2::name, $3::text::interval), "
            "create_default_indexes => false, migrate_data => true)",
            table.table,
            table.time_column,
            table.chunk,
        )
        done = f"is a hypertable now ({table.chunk} chunks; {rows} rows moved"
    elif timescale and kind == partitions.NATIVE:
        rows = await hypertable_from_partitions(conn, table)
        done = f"is a hypertable now, from native partitions ({table.chunk} chunks; {rows} rows copied"
    elif not timescale and kind == partitions.SINGLE and table.partitioned_plain:
        rows = await partition_in_place(conn, table)
        done = f"is partitioned by {table.chunk} now ({rows} rows kept in place"
    else:
        return
    log_system_event(
        "INFO",
        "STORAGE",
        f"{table.table} {done} in {time.monotonic() - started:.2f} s)",
        {"table": table.table, "rows": rows},
    )
