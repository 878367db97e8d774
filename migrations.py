"""Applies the numbered SQL files in `sql/`, once each, recorded in `schema_migrations`.

Each migration runs in its own transaction that first takes a transaction-level
advisory lock, so concurrent runners (two daemons booting at once) apply each file
once: the second waits, then finds it applied. Transaction-level, not session-level:
behind PgBouncer/Supavisor in transaction mode a session lock would be taken on one
server connection and released on another.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

SQL_DIR = Path(__file__).resolve().parent / "sql"
ADVISORY_LOCK_KEY = 0x4645_4544_5634  # "FEEDV4"
_FILE_PATTERN = re.compile(r"^(\d{3,})_[\w-]+\.sql$")

log = logging.getLogger("MIGRATIONS")


@dataclass(frozen=True)
class Migration:
    version: str
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def discover(sql_dir: Path = SQL_DIR) -> list[Migration]:
    """The migration files in version order; a duplicate version is a packaging bug."""
    found: dict[str, Migration] = {}
    for path in sorted(sql_dir.glob("*.sql")):
        match = _FILE_PATTERN.match(path.name)
        if not match:
            raise ValueError(f"migration file {path.name!r} is not named NNN_name.sql")
        version = match.group(1)
        if version in found:
            raise ValueError(f"two migrations share version {version}: {found[version].name}, {path.name}")
        found[version] = Migration(version, path.name, path.read_text())
    return [found[v] for v in sorted(found, key=int)]


async def apply_migrations(pool_or_conn: asyncpg.Pool | asyncpg.Connection, sql_dir: Path = SQL_DIR) -> list[str]:
    """Apply the pending migrations; return the names of those applied now."""
    migrations = discover(sql_dir)
    if isinstance(pool_or_conn, asyncpg.Pool):
        async with pool_or_conn.acquire() as conn:
            return await _apply(conn, migrations)
    return await _apply(pool_or_conn, migrations)


async def migration_status(pool: asyncpg.Pool, sql_dir: Path = SQL_DIR) -> list[tuple[str, Any]]:
    """Each migration's name and when it was applied (None: pending), in order. Reads only."""
    applied: dict[str, Any] = {}
    if await pool.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL"):
        applied = {
            r["version"]: r["applied_at"] for r in await pool.fetch("SELECT version, applied_at FROM schema_migrations")
        }
    return [(m.name, applied.get(m.version)) for m in discover(sql_dir)]


async def pending_migrations(pool: asyncpg.Pool, sql_dir: Path = SQL_DIR) -> list[str]:
    """The migrations not applied yet (all of them on a database without the table)."""
    return [name for name, applied_at in await migration_status(pool, sql_dir) if applied_at is None]


_CREATE_TABLE_SQL = """CREATE TABLE IF NOT EXISTS schema_migrations (
    version    text PRIMARY KEY,
    name       text NOT NULL,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now())"""


async def _apply(conn: asyncpg.Connection, migrations: list[Migration]) -> list[str]:
    applied_now: list[str] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", ADVISORY_LOCK_KEY)
        await conn.execute(_CREATE_TABLE_SQL)
    for migration in migrations:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", ADVISORY_LOCK_KEY)
            done = await conn.fetchrow("SELECT checksum FROM schema_migrations WHERE version = $1", migration.version)
            if done is not None:
                if done["checksum"] != migration.checksum:
                    log.warning("migration %s changed after it was applied; not re-run", migration.name)
                continue
            await conn.execute(migration.sql)
            await conn.execute(
                "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                migration.version,
                migration.name,
                migration.checksum,
            )
        log.info("applied migration %s", migration.name)
        applied_now.append(migration.name)
    return applied_now
