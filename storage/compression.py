"""Columnstore compression on TimescaleDB's full edition: a chunk older than its table's
`after` is rewritten by the job scheduler into compressed columns, segmented by what
readers filter on (a symbol's rows stay together) and ordered by time within a segment.

Chosen per table so that a chunk is compressed once the daemon has stopped changing it:
late corrections (a backfilled minute, an archive import) still reach compressed chunks
(TimescaleDB writes through them), only slower. The Apache edition and plain PostgreSQL
have no compression: their bytes per day are the uncompressed ones (README).
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg


@dataclass(frozen=True)
class Compression:
    table: str
    segment_by: str
    order_by: str
    after: str  # a PostgreSQL interval: chunks older than this are compressed


COMPRESSED: tuple[Compression, ...] = (
    Compression("ohlcv4_m1", "symbol", "open_time DESC", "7 days"),
    Compression("ohlcv4_m5", "symbol", "open_time DESC", "14 days"),
    Compression("ohlcv4_m15", "symbol", "open_time DESC", "60 days"),
    Compression("ohlcv4_h1", "symbol", "open_time DESC", "180 days"),
    Compression("ohlcv4_h4", "symbol", "open_time DESC", "365 days"),
    Compression("ohlcv4_d1", "symbol", "open_time DESC", "365 days"),
    Compression("indicator_values_v4", "symbol, instance_id", "param_name, open_time DESC", "1 day"),
    Compression("orderflow4", "symbol, tf", "open_time DESC", "2 days"),
    Compression("book_m1_4", "symbol", "open_time DESC", "7 days"),
    Compression("trades_1s4", "symbol", "ts DESC", "3 hours"),
    Compression("book_ticker_1s4", "symbol", "ts DESC", "3 hours"),
    Compression("depth_1s4", "symbol", "ts DESC", "3 hours"),
    Compression("features_1s4", "symbol", "ts DESC", "3 hours"),
    Compression("agg_trades4", "symbol", "agg_id DESC", "3 hours"),
    Compression("book_tickers4", "symbol", "update_id DESC", "3 hours"),
)


async def compress_by_policy(conn: asyncpg.Connection) -> None:
    """Compression settings and a policy on each table that has none yet."""
    enabled = {
        r["hypertable_name"]
        for r in await conn.fetch(
            "SELECT hypertable_name FROM timescaledb_information.hypertables "
            "WHERE hypertable_schema = current_schema() AND compression_enabled"
        )
    }
    for item in COMPRESSED:
        if item.table not in enabled:
            # Storage parameters take literals only; these are our own constants.
            await conn.execute(
                f"ALTER TABLE {item.table} SET (timescaledb.compress, "
                f"timescaledb.compress_segmentby = '{item.segment_by}', "
                f"timescaledb.compress_orderby = '{item.order_by}')"
            )
        await conn.execute(
            "SELECT add_compression_policy($1::regclass, compress_after => $2::text::interval, if_not_exists => true)",
            item.table,
            item.after,
        )


async def compress_all(pool: asyncpg.Pool, table: str) -> int:
    """Every chunk of `table` compressed now (tests and the bench; the daemon leaves it to
    the policy). Returns how many were compressed."""
    rows = await pool.fetch(
        "SELECT compress_chunk(c, if_not_compressed => true) FROM show_chunks($1::regclass) c", table
    )
    return len(rows)
