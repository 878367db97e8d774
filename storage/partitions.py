"""Time pieces of the growing tables at write and retention time, whatever the mode:
native partitions on plain PostgreSQL are made here on demand, ahead of the rows that
need them; TimescaleDB makes its chunks itself; a table that is neither is left alone.

A writer calls `write_through` with the times its batch holds. Pieces this process made
or found are remembered per pool, so the hot path costs no round trip; should one vanish
behind that memory (dropped by another process, a schema rebuilt), the insert fails as
"no partition", the memory of that table is dropped, and the batch is sent once more.
The piece after the newest is made too, with a short lock timeout (the DDL takes the
parent's lock for a moment; a long reader holding it must not stall the writer), so
that normally a piece exists before its first row arrives.

Retention (`drop_before`) drops whole pieces that end at or before a cut-off: partitions
by DROP TABLE, chunks by `drop_chunks`. No row is deleted; a piece across the cut-off is
kept whole until it is wholly past.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime

import asyncpg

from candles import datetime_to_ms, ms_to_datetime
from storage.layout import BY_NAME, TimeTable, piece_start

AHEAD_LOCK_TIMEOUT = "200ms"  # the next piece: tried again on the next write
DROP_LOCK_TIMEOUT = "2s"  # a DROP waiting for its lock holds up the inserts queued behind it
NATIVE, HYPERTABLE, SINGLE = "partitioned", "hypertable", "table"

_known: dict[tuple[int, str], set[int]] = {}  # (id(pool), table) -> piece starts made or found
_kinds: dict[tuple[int, str], str] = {}
_BOUND = re.compile(r"TO \('(?P<upper>[^']+)'\)")


def partition_name(table: str, start_ms: int) -> str:
    """`trades_1s4_p2026120600`: the table and its piece's start, UTC, to the hour."""
    return f"{table}_p{ms_to_datetime(start_ms):%Y%m%d%H}"


def partition_ddl(table: TimeTable, start_ms: int) -> str:
    """DDL takes no parameters; every part here is made from an int and our own names."""
    start, end = ms_to_datetime(start_ms), ms_to_datetime(start_ms + table.piece_ms)
    return (
        f"CREATE TABLE IF NOT EXISTS {partition_name(table.table, start_ms)} PARTITION OF {table.table} "
        f"FOR VALUES FROM ('{start.isoformat()}') TO ('{end.isoformat()}')"
    )


def upper_bound_ms(bound: str) -> int | None:
    """The end of a range partition from `pg_get_expr(relpartbound)`; None for MAXVALUE
    or a DEFAULT partition (never dropped by time)."""
    match = _BOUND.search(bound)
    if match is None:
        return None
    return datetime_to_ms(datetime.fromisoformat(match["upper"].replace(" ", "T")).astimezone(UTC))


async def table_kind(conn: asyncpg.Pool | asyncpg.Connection, table: str) -> str:
    """NATIVE, HYPERTABLE or SINGLE: how `table` is stored in this database now."""
    row = await conn.fetchrow(
        "SELECT c.relkind = 'p' AS native, EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb') AS ts "
        "FROM pg_class c WHERE c.oid = $1::regclass",
        table,
    )
    if row["native"]:
        return NATIVE
    if row["ts"] and await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM timescaledb_information.hypertables "
        "WHERE hypertable_name = $1 AND hypertable_schema = current_schema())",
        table,
    ):
        return HYPERTABLE
    return SINGLE


def forget(pool: asyncpg.Pool, table: str | None = None) -> None:
    """Drop what this process remembers of a table's pieces (all tables: None)."""
    for key in [k for k in _known if k[0] == id(pool) and table in (None, k[1])]:
        _known.pop(key, None)
        _kinds.pop(key, None)


async def ensure(pool: asyncpg.Pool, table_name: str, times_ms: Iterable[int], ahead: bool = True) -> None:
    """The pieces of `table_name` holding these times made where they are missing."""
    table = BY_NAME[table_name]
    key = (id(pool), table_name)
    known = _known.setdefault(key, set())
    starts = {piece_start(table, t) for t in times_ms}
    wanted = starts - known
    if wanted:
        await _make(pool, table, wanted)
    if ahead and starts:
        following = max(starts) + table.piece_ms
        if following not in known:
            await _make(pool, table, {following}, AHEAD_LOCK_TIMEOUT)


async def _make(pool: asyncpg.Pool, table: TimeTable, starts: set[int], lock_timeout: str | None = None) -> None:
    """One look-up of what exists, then a statement per missing partition. Two processes
    may race: IF NOT EXISTS covers the usual case; the loser of an exact tie gets a
    duplicate error from the catalogue, which means the partition is there. With
    `lock_timeout`, gives up (nothing remembered) rather than wait for the parent's lock."""
    key = (id(pool), table.table)
    if key not in _kinds:
        _kinds[key] = await table_kind(pool, table.table)
    if _kinds[key] == NATIVE:
        names = {partition_name(table.table, start): start for start in starts}
        existing = await pool.fetch(
            "SELECT n FROM unnest($1::text[]) AS n WHERE to_regclass(quote_ident(n)) IS NOT NULL", list(names)
        )
        for name in sorted(set(names) - {r["n"] for r in existing}):
            try:
                async with pool.acquire() as conn, conn.transaction():
                    if lock_timeout is not None:
                        await conn.execute(f"SET LOCAL lock_timeout = '{lock_timeout}'")
                    await conn.execute(partition_ddl(table, names[name]))
            except (asyncpg.DuplicateTableError, asyncpg.UniqueViolationError):
                pass
            except asyncpg.LockNotAvailableError:
                return
            except asyncpg.InvalidObjectDefinitionError:
                pass  # the range is covered already (the partition a conversion kept)
    _known.setdefault(key, set()).update(starts)


async def write_through[T](
    pool: asyncpg.Pool, times_by_table: dict[str, Iterable[int]], send: Callable[[], Awaitable[T]]
) -> T:
    """`send()` (one statement writing these tables' rows), with their pieces made first."""
    times = {name: list(values) for name, values in times_by_table.items()}
    for name, values in times.items():
        await ensure(pool, name, values)
    try:
        return await send()
    except asyncpg.CheckViolationError as error:
        if "no partition" not in str(error):
            raise
    for name, values in times.items():  # remembered, but gone: looked up and made again
        forget(pool, name)
        await ensure(pool, name, values, ahead=False)
    return await send()


async def drop_before(pool: asyncpg.Pool, table_name: str, cutoff_ms: int) -> list[str]:
    """Drop the pieces of `table_name` that end at or before `cutoff_ms`; their names.
    A partition whose lock is not had within DROP_LOCK_TIMEOUT is left for the next run."""
    kind = await table_kind(pool, table_name)
    if kind == HYPERTABLE:
        rows = await pool.fetch(
            "SELECT drop_chunks($1::regclass, older_than => $2::timestamptz)::text AS name",
            table_name,
            ms_to_datetime(cutoff_ms),
        )
        return [r["name"] for r in rows]
    if kind != NATIVE:
        return []
    rows = await pool.fetch(
        "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) AS bound FROM pg_inherits i "
        "JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = $1::regclass ORDER BY c.relname",
        table_name,
    )
    dropped: list[str] = []
    for row in rows:
        upper = upper_bound_ms(row["bound"])
        if upper is None or upper > cutoff_ms:
            continue
        try:
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute(f"SET LOCAL lock_timeout = '{DROP_LOCK_TIMEOUT}'")
                await conn.execute(f'DROP TABLE IF EXISTS "{row["relname"]}"')
        except asyncpg.LockNotAvailableError:
            continue
        dropped.append(row["relname"])
    if dropped:
        forget(pool, table_name)
    return dropped


async def newest_time(pool: asyncpg.Pool, table_name: str) -> int | None:
    """The newest stored time of a table: the exchange's clock as that table knows it."""
    table = BY_NAME[table_name]
    newest = await pool.fetchval(f"SELECT max({table.time_column}) FROM {table.table}")
    return None if newest is None else datetime_to_ms(newest)
