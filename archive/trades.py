"""A daily aggTrades file into `agg_trades4` (the raw trades, storage/raw.py), at the
server's speed: the zip's CSV goes to PostgreSQL as it is, one COPY into a temporary
table that parses it (no Python per row: a busy symbol's day is millions of rows), then
one INSERT that checks each row, converts it to the table's units and keeps each trade
once (`ON CONFLICT DO NOTHING`: a file taken again, or trades the daemon stored live).
Rows that fail the checks are counted and a few quoted, never stored.

On the full edition the trade rollups of the day are then materialised
(`refresh_continuous_aggregate`): their policy looks back two hours only, and what they
materialise outlives the raw rows' retention.
"""

from __future__ import annotations

import zipfile
from datetime import date

import asyncpg

from archive.files import ArchiveError, csv_member, day_start_ms
from candles import DAY_MS, ms_to_datetime
from storage import partitions
from storage.layout import HOUR_MS

_STAGE_SQL = (
    "CREATE TEMP TABLE IF NOT EXISTS archive_trades (agg_id int8, price numeric, quantity numeric, "
    "first_id int8, last_id int8, t int8, buyer_maker boolean) ON COMMIT DELETE ROWS"
)
_CSV_COLUMNS = ["agg_id", "price", "quantity", "first_id", "last_id", "t", "buyer_maker"]
# What a row must be to be stored: a positive price and a quantity of whole units (1e-8),
# ids in order, a time inside the file's day.
_VALID = (
    "price > 0 AND quantity >= 0 AND price * 100000000 = trunc(price * 100000000) "
    "AND quantity * 100000000 = trunc(quantity * 100000000) AND price < 92233720368 AND quantity < 92233720368 "
    "AND last_id >= first_id AND agg_id >= 0 AND t >= $2 AND t < $3"
)
_INSERT_SQL = (
    "INSERT INTO agg_trades4 (symbol, ts, agg_id, price_units, qty_units, first_id, last_id, buyer_maker) "
    "SELECT $1, 'epoch'::timestamptz + t * interval '1 millisecond', agg_id, (price * 100000000)::int8, "
    f"(quantity * 100000000)::int8, first_id, last_id, buyer_maker FROM archive_trades WHERE {_VALID} "
    "ON CONFLICT DO NOTHING"
)
_VALID_COUNT_SQL = f"SELECT count(*) FROM archive_trades WHERE $1::text IS NOT NULL AND {_VALID}"
_REJECTED_SQL = (
    f"SELECT $1::text AS symbol, agg_id, price, quantity, first_id, last_id, t FROM archive_trades "
    f"WHERE NOT ({_VALID}) LIMIT 3"
)
TRADE_ROLLUPS = ("raw_trades_1s4", "raw_trades_1m4")


async def store_trades(
    pool: asyncpg.Pool, symbol: str, day: date, data: bytes, name: str
) -> tuple[int, int, int, list]:
    """The file's trades stored: (rows in the file, rows refused, rows new, a few refused)."""
    archive, member, header = csv_member(data, name)
    first = day_start_ms(day)
    await partitions.ensure(pool, "agg_trades4", range(first, first + DAY_MS, HOUR_MS))
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(_STAGE_SQL)
        try:
            with archive.open(member) as csv_file:
                await conn.copy_to_table(
                    "archive_trades", source=csv_file, columns=_CSV_COLUMNS, format="csv", header=header
                )
        except (asyncpg.DataError, zipfile.BadZipFile, EOFError) as exc:  # a field COPY cannot read
            raise ArchiveError(f"{name}: not a readable aggTrades CSV ({exc})") from exc
        total = int(await conn.fetchval("SELECT count(*) FROM archive_trades"))
        stored = int((await conn.execute(_INSERT_SQL, symbol, first, first + DAY_MS)).split()[-1])
        # Every row new: none refused (the common case; no second pass over the file's rows).
        valid = total if stored == total else await conn.fetchval(_VALID_COUNT_SQL, symbol, first, first + DAY_MS)
        refused = await conn.fetch(_REJECTED_SQL, symbol, first, first + DAY_MS) if valid < total else []
    return total, total - valid, stored, [tuple(r) for r in refused]


async def refresh_rollups(pool: asyncpg.Pool, day: date) -> None:
    """On the full edition, the day's trade rollups materialised (elsewhere they are views)."""
    if not await pool.fetchval("SELECT to_regclass('timescaledb_information.continuous_aggregates') IS NOT NULL"):
        return
    continuous = {
        r["view_name"] for r in await pool.fetch("SELECT view_name FROM timescaledb_information.continuous_aggregates")
    }
    first = day_start_ms(day)
    for name in TRADE_ROLLUPS:
        if name in continuous:
            # One batch for the day: in TimescaleDB's default batches the 1-second rollup of a
            # day of one symbol took 18 s here, in one 1.4 s.
            await pool.execute(
                "CALL refresh_continuous_aggregate($1::regclass, $2::timestamptz, $3::timestamptz, "
                "options => '{\"buckets_per_batch\": 0}')",
                name,
                ms_to_datetime(first),
                ms_to_datetime(first + DAY_MS),
            )
