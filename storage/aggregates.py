"""Bars rolled up from the raw tables (agg_trades4, book_tickers4) by PostgreSQL itself:
an implementation independent of the daemon's, so the two can be checked against each
other (tests/test_storage_aggregates.py), and the seed's `trade_1s` / `market_data_1s`.

Same names and results in every mode (readers use the `*_v4` views). On the full edition
the inner relations are continuous aggregates (materialised by a policy, real time on
top: `materialized_only = false`), so they are cheap to read and outlive the raw rows
they came from (raw retention is hours; the aggregates keep what they materialised). The
Apache edition has no continuous aggregates and plain PostgreSQL no TimescaleDB: there
they are plain views over the raw rows, computed when read and gone with them.

Open and close are the first and last by `agg_id` / `update_id` (the exchange's order;
several events share a millisecond); sums are exact (units, integers).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import asyncpg

Pick = Callable[[str, str], str]  # (value, ordering id) -> the SQL of the first or last value


@dataclass(frozen=True)
class Rollup:
    name: str  # the inner relation: a continuous aggregate (full edition) or a view
    source: str
    width: str  # the bucket, a PostgreSQL interval
    columns: Callable[[Pick, Pick], str]  # the SELECT list after symbol and bucket
    refresh_start: str  # how far back the policy re-materialises (inside the raw retention)
    refresh_end: str


def _trades(first: Pick, last: Pick) -> str:
    return (
        f"{first('price_units', 'agg_id')} AS open_units, max(price_units) AS high_units, "
        f"min(price_units) AS low_units, {last('price_units', 'agg_id')} AS close_units, "
        "sum(CASE WHEN buyer_maker THEN 0 ELSE qty_units END) AS buy_units, "
        "sum(CASE WHEN buyer_maker THEN qty_units ELSE 0 END) AS sell_units, "
        "sum(price_units::numeric * qty_units) AS notional, count(*) AS agg_trades, "
        "sum(last_id - first_id + 1) AS trades, min(agg_id) AS first_agg_id, max(agg_id) AS last_agg_id"
    )


def _tickers(first: Pick, last: Pick) -> str:
    return (
        "count(*) AS updates, sum(ask_units - bid_units) AS spread_units, "
        f"{last('bid_units', 'update_id')} AS bid_close_units, {last('ask_units', 'update_id')} AS ask_close_units, "
        f"{last('bid_qty', 'update_id')} AS bid_qty_close, {last('ask_qty', 'update_id')} AS ask_qty_close, "
        "max(update_id) AS last_update_id"
    )


ROLLUPS: tuple[Rollup, ...] = (
    Rollup("raw_trades_1s4", "agg_trades4", "1 second", _trades, "2 hours", "2 seconds"),
    Rollup("raw_trades_1m4", "agg_trades4", "1 minute", _trades, "2 hours", "1 minute"),
    Rollup("raw_book_tickers_1m4", "book_tickers4", "1 minute", _tickers, "2 hours", "1 minute"),
)


# What readers use: exact decimals, the daemon's column names (trades_1s_v4, ohlcv4_m1).
VIEWS_SQL = """
CREATE OR REPLACE VIEW raw_trades_1s_v4 AS
SELECT symbol, bucket AS ts,
       open_units * 0.00000001 AS open, high_units * 0.00000001 AS high,
       low_units * 0.00000001 AS low, close_units * 0.00000001 AS close,
       (buy_units + sell_units) * 0.00000001 AS volume,
       buy_units * 0.00000001 AS buy_volume, sell_units * 0.00000001 AS sell_volume,
       notional * 0.0000000000000001 AS quote_volume, agg_trades, trades, first_agg_id, last_agg_id
FROM raw_trades_1s4;

CREATE OR REPLACE VIEW raw_trades_1m_v4 AS
SELECT symbol, bucket AS open_time,
       open_units * 0.00000001 AS open, high_units * 0.00000001 AS high,
       low_units * 0.00000001 AS low, close_units * 0.00000001 AS close,
       (buy_units + sell_units) * 0.00000001 AS volume,
       notional * 0.0000000000000001 AS quote_volume, trades,
       buy_units * 0.00000001 AS taker_buy_volume,
       sell_units * 0.00000001 AS taker_sell_volume, agg_trades, first_agg_id, last_agg_id
FROM raw_trades_1m4;

CREATE OR REPLACE VIEW raw_book_tickers_1m_v4 AS
SELECT symbol, bucket AS open_time, updates,
       (spread_units::numeric / updates * 0.00000001)::double precision AS mean_spread,
       bid_close_units * 0.00000001 AS bid_close, ask_close_units * 0.00000001 AS ask_close,
       bid_qty_close * 0.00000001 AS bid_qty_close, ask_qty_close * 0.00000001 AS ask_qty_close,
       last_update_id
FROM raw_book_tickers_1m4;

-- The per-minute market view (the seed's market_data_1s idea): trades and the best
-- quotes of each minute side by side, from the raw events alone.
CREATE OR REPLACE VIEW market_1m_v4 AS
SELECT coalesce(t.symbol, b.symbol) AS symbol, coalesce(t.open_time, b.open_time) AS open_time,
       t.open, t.high, t.low, t.close, t.volume, t.quote_volume, t.trades, t.taker_buy_volume,
       t.taker_buy_volume - t.taker_sell_volume AS delta, t.agg_trades,
       b.updates AS book_ticker_updates, b.mean_spread, b.bid_close, b.ask_close, b.bid_qty_close, b.ask_qty_close
FROM raw_trades_1m_v4 t FULL JOIN raw_book_tickers_1m_v4 b ON b.symbol = t.symbol AND b.open_time = t.open_time;
"""


def rollup_sql(rollup: Rollup, continuous: bool) -> str:
    """The inner relation's definition: a continuous aggregate (TimescaleDB's first/last
    and time_bucket) or a plain view (PostgreSQL's own: ordered array_agg, date_bin)."""
    if continuous:
        columns = rollup.columns(lambda v, o: f"first({v}, {o})", lambda v, o: f"last({v}, {o})")
        return (
            f"CREATE MATERIALIZED VIEW {rollup.name} WITH (timescaledb.continuous, "
            f"timescaledb.materialized_only = false) AS "
            f"SELECT symbol, time_bucket(INTERVAL '{rollup.width}', ts) AS bucket, {columns} "
            f"FROM {rollup.source} GROUP BY symbol, bucket WITH NO DATA"
        )
    columns = rollup.columns(
        lambda v, o: f"(array_agg({v} ORDER BY {o}))[1]", lambda v, o: f"(array_agg({v} ORDER BY {o} DESC))[1]"
    )
    return (
        f"CREATE OR REPLACE VIEW {rollup.name} AS "
        f"SELECT symbol, date_bin(INTERVAL '{rollup.width}', ts, 'epoch') AS bucket, {columns} "
        f"FROM {rollup.source} GROUP BY symbol, bucket"
    )


async def continuous_aggregates(conn: asyncpg.Connection | asyncpg.Pool) -> set[str]:
    """The names of this database's continuous aggregates (none without TimescaleDB)."""
    if not await conn.fetchval("SELECT to_regclass('timescaledb_information.continuous_aggregates') IS NOT NULL"):
        return set()
    rows = await conn.fetch("SELECT view_name FROM timescaledb_information.continuous_aggregates")
    return {r["view_name"] for r in rows}


async def make_rollups(conn: asyncpg.Connection, continuous: bool) -> list[str]:
    """The rollups in this mode's form, and the reader views over them; the names made
    or changed. A plain view left by a plain or Apache past becomes a continuous
    aggregate (the views over it are made again after)."""
    made = []
    materialised = await continuous_aggregates(conn) if continuous else set()
    for rollup in ROLLUPS:
        if continuous:
            if rollup.name in materialised:
                continue
            await conn.execute(f"DROP VIEW IF EXISTS {rollup.name} CASCADE")  # the reader views come back below
            await conn.execute(rollup_sql(rollup, True))
            await conn.execute(
                "SELECT add_continuous_aggregate_policy($1::regclass, start_offset => $2::text::interval, "
                "end_offset => $3::text::interval, schedule_interval => INTERVAL '1 minute', if_not_exists => true)",
                rollup.name,
                rollup.refresh_start,
                rollup.refresh_end,
            )
            made.append(rollup.name)
        elif not await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", rollup.name):
            await conn.execute(rollup_sql(rollup, False))
            made.append(rollup.name)
    readers = ("raw_trades_1s_v4", "raw_trades_1m_v4", "raw_book_tickers_1m_v4", "market_1m_v4")
    present = await conn.fetchval("SELECT count(*) FROM unnest($1::text[]) n WHERE to_regclass(n) IS NOT NULL", readers)
    if made or present < len(readers):  # only then: replacing a view is for its owner
        await conn.execute(VIEWS_SQL)
    return made
