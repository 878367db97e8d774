"""A growing table changed in place to how its mode stores it, keeping every row, name,
index, constraint and the views over it. Run by storage.setup under the migrations'
advisory lock, each in the caller's transaction (all or nothing).

Plain table -> native partitions (plain PostgreSQL): no row is copied. The table is
renamed aside, a partitioned table with its name, columns, constraints and indexes takes
its place, and the old table is attached as one partition for everything up to the end
of the piece holding its newest row (`<table>_before`). A CHECK constraint proving that
range is added first, so the attach needs no second scan; the old indexes are adopted by
the parent's. Retention drops that partition once it is wholly past, like any other.

Native partitions -> hypertable (a move to TimescaleDB after running plain): TimescaleDB
cannot take a partitioned table, so the rows are copied into a new hypertable of the
same name (bounded: only tables with a retention are partitioned).

A view is bound to its table's identity, not its name: the views over the table are
read before and made again after, so they follow the name.
"""

from __future__ import annotations

import asyncpg

from candles import datetime_to_ms, ms_to_datetime
from storage.layout import TimeTable, piece_start

_VIEWS_SQL = """
SELECT DISTINCT v.oid::regclass::text AS name, pg_get_viewdef(v.oid) AS definition, v.oid
FROM pg_depend d JOIN pg_rewrite r ON r.oid = d.objid JOIN pg_class v ON v.oid = r.ev_class
WHERE d.classid = 'pg_rewrite'::regclass AND d.refobjid = $1::regclass AND v.oid <> $1::regclass
ORDER BY v.oid
"""
_CONSTRAINTS_SQL = """
SELECT conname, pg_get_constraintdef(oid) AS definition FROM pg_constraint
WHERE conrelid = $1::regclass AND contype IN ('p', 'u', 'f') ORDER BY contype, conname
"""
_INDEXES_SQL = """
SELECT c.relname, pg_get_indexdef(i.indexrelid) AS definition
FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
WHERE i.indrelid = $1::regclass
ORDER BY c.relname
"""


async def _shape(conn: asyncpg.Connection, table: str) -> tuple[list, list, list, set[str]]:
    """What must be made again on the new table: views, constraints, plain indexes."""
    views = await conn.fetch(_VIEWS_SQL, table)
    constraints = await conn.fetch(_CONSTRAINTS_SQL, table)
    indexes = await conn.fetch(_INDEXES_SQL, table)
    constraint_names = {r["conname"] for r in constraints}
    plain = [r for r in indexes if r["relname"] not in constraint_names]
    return views, constraints, plain, {r["relname"] for r in indexes}


async def _set_aside(conn: asyncpg.Connection, table: str, aside: str, index_names: set[str]) -> None:
    await conn.execute(f'ALTER TABLE "{table}" RENAME TO "{aside}"')
    for name in sorted(index_names):
        await conn.execute(f'ALTER INDEX "{name}" RENAME TO "{name[:55]}_{aside[-6:]}"')


async def _rebuild(conn: asyncpg.Connection, table: str, aside: str, partition_by: str | None, shape) -> None:
    """The new table in the old one's name: columns, checks, keys, indexes."""
    _, constraints, indexes, _ = shape
    partitioned = f" PARTITION BY RANGE ({partition_by})" if partition_by else ""
    await conn.execute(
        f'CREATE TABLE "{table}" (LIKE "{aside}" INCLUDING DEFAULTS INCLUDING CONSTRAINTS '
        f"INCLUDING STORAGE INCLUDING COMMENTS){partitioned}"
    )
    for row in constraints:
        await conn.execute(f'ALTER TABLE "{table}" ADD CONSTRAINT "{row["conname"]}" {row["definition"]}')
    for row in indexes:  # read before the rename: they name the new table
        await conn.execute(row["definition"].replace(" ON ONLY ", " ON ", 1))


async def _views_again(conn: asyncpg.Connection, views: list) -> None:
    for row in views:
        await conn.execute(f"CREATE OR REPLACE VIEW {row['name']} AS {row['definition']}")


async def partition_in_place(conn: asyncpg.Connection, table: TimeTable) -> int:
    """A plain table made range-partitioned on its time column; rows kept where they
    are (one partition). Returns the rows the kept partition holds."""
    shape = await _shape(conn, table.table)
    newest = await conn.fetchval(f"SELECT max({table.time_column}) FROM {table.table}")
    rows = await conn.fetchval(f"SELECT count(*) FROM {table.table}") if newest is not None else 0
    aside = f"{table.table}_before"
    await _set_aside(conn, table.table, aside, shape[3])
    await _rebuild(conn, table.table, aside, table.time_column, shape)
    await _views_again(conn, shape[0])
    if newest is None:
        await conn.execute(f'DROP TABLE "{aside}"')
    else:
        end = ms_to_datetime(piece_start(table, datetime_to_ms(newest)) + table.piece_ms).isoformat()
        await conn.execute(
            f'ALTER TABLE "{aside}" ADD CONSTRAINT "{aside}_range" CHECK ({table.time_column} < \'{end}\')'
        )
        await conn.execute(
            f'ALTER TABLE "{table.table}" ATTACH PARTITION "{aside}" FOR VALUES FROM (MINVALUE) TO (\'{end}\')'
        )
        await conn.execute(f'ALTER TABLE "{aside}" DROP CONSTRAINT "{aside}_range"')
    return rows


async def hypertable_from_partitions(conn: asyncpg.Connection, table: TimeTable) -> int:
    """A natively partitioned table made a hypertable of the same name, rows copied.
    Returns the rows copied."""
    shape = await _shape(conn, table.table)
    aside = f"{table.table}_parted"
    await _set_aside(conn, table.table, aside, shape[3])
    await _rebuild(conn, table.table, aside, None, shape)
    await conn.execute(
        "SELECT create_hypertable($1::regclass, by_range($2::name, $3::text::interval), "
        "create_default_indexes => false)",
        table.table,
        table.time_column,
        table.chunk,
    )
    status = await conn.execute(f'INSERT INTO "{table.table}" SELECT * FROM "{aside}"')
    await _views_again(conn, shape[0])
    await conn.execute(f'DROP TABLE "{aside}"')
    return int(status.split()[-1])
