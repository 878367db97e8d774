"""Storage in each mode (issue 17): plain PostgreSQL, TimescaleDB Apache and full edition.

Per mode, on a scratch database of that server (the servers `make services` started):
- the archive import: February 2026's daily kline files of the 7 real symbols (189 files,
  272,160 rows), from a folder, rows/s and MB/s;
- bytes per symbol per day of the candle tables after it, H1/H4/D1 included (the bench
  builds every timeframe; hypertable_size under TimescaleDB: chunks and their indexes);
- the last 1,000 M1 of a symbol, and one day of its M1: median of 30 reads (server side);
- one-second trade bars of 789 symbols written as the daemon writes them (book/store.py,
  10 s a flush): sustained rows/s against the live rate (789 rows/s a table; budget 10x);
- one day of one-second features of a symbol (20 symbols' day stored) and the footprint
  of one M15 bar (a month of 20 symbols' M15 footprints, 40 rows each): median of 30;
- retention of indicator values: a week of hourly values of 789 symbols, two days kept:
  the whole pieces dropped (chunks or partitions; no row DELETE);
- full edition: bytes before and after compressing every chunk, per table.

- aggTrades import: a busy symbol's day (2,000,000 rows, one zip) into agg_trades4 by
  archive/trades.py, rows/s (budget 500k): the converted binary COPY (a day with nothing
  stored yet), and the exact path (the same file again, every row there already).

Prints; asserts nothing.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from datetime import date
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TIMEFRAMES", "m1,m5,m15,h1,h4,d1")  # read when candles.py is imported

import core_io
from archive.files import daily_path, day_start_ms, days
from archive.importer import ArchiveReader, Importer
from archive.trades import store_trades
from book import store as book_store
from book.seconds import TradeSecond
from candles import TIMEFRAMES
from fake_exchange import ArchiveSource
from fake_exchange.archive import AGG_TRADE_HEADER, ArchiveTree, zipped
from infra import make_redis
from market_data import read_archive
from migrations import apply_migrations
from storage import partitions
from storage.compression import compress_all
from storage.layout import HOUR_MS
from storage.modes import APACHE, FULL, PLAIN
from storage.setup import apply_storage
from tests.servers import RedisServer, drop_database, recreate_database, setting

SERVERS = {PLAIN: "POSTGRES_URL", APACHE: "TIMESCALEDB_APACHE_URL", FULL: "TIMESCALEDB_URL"}
FIRST, LAST = date(2026, 2, 1), date(2026, 2, 27)
SCRATCH = "feed_v4_storage_bench"
LIVE_SYMBOLS = 789
SECONDS = 120
FLUSH_S = 10
DEFAULT_OUTPUTS = 27  # sql/002's set: 28 output names, 27 with a value on a bar (one SuperTrend line)


def write_tree(folder: Path) -> tuple[list[str], int]:
    source = ArchiveSource(start_ms=day_start_ms(FIRST), end_ms=day_start_ms(LAST) + 86_399_999)
    tree = ArchiveTree(
        source.symbols, source.first_open_time, source.last_open_time, source.candle, lambda s, t: [], lambda: 2**62
    )
    size = 0
    for symbol in source.symbols:
        for day in days(FIRST, LAST):
            for suffix in ("", ".CHECKSUM"):
                path = daily_path("klines", symbol, day) + suffix
                data = tree.file(path)
                assert data is not None, path
                (folder / path).parent.mkdir(parents=True, exist_ok=True)
                (folder / path).write_bytes(data)
                size += len(data) if not suffix else 0
    return list(source.symbols), size


async def median_ms(pool: asyncpg.Pool, sql: str, *args: object) -> float:
    """The server's part: the rows are read and counted there (decoding 1,000 candles'
    numerics in asyncpg costs ~30 ms more, the same in every mode)."""
    times = []
    for _ in range(30):
        started = time.perf_counter()
        await pool.fetchval(f"SELECT count(*) FROM ({sql}) AS q", *args)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


async def table_bytes(pool: asyncpg.Pool, table: str) -> int:
    """Rows and indexes, whatever the pieces: chunks (compressed ones as stored) or partitions."""
    kind = await partitions.table_kind(pool, table)
    if kind == partitions.HYPERTABLE:
        return await pool.fetchval("SELECT hypertable_size($1::regclass)", table)
    if kind == partitions.SINGLE:
        return await pool.fetchval("SELECT pg_total_relation_size($1::regclass)", table)
    return await pool.fetchval(
        "SELECT sum(pg_total_relation_size(relid))::bigint FROM pg_partition_tree($1::regclass) WHERE isleaf", table
    )


async def compressed(pool: asyncpg.Pool, tables: list[str]) -> str:
    """Each table's bytes before and after every chunk of it is compressed."""
    sizes = []
    for table in tables:
        before = await table_bytes(pool, table)
        await compress_all(pool, table)
        sizes.append(f"{table} {before / 1e3:,.0f} -> {await table_bytes(pool, table) / 1e3:,.0f} kB")
    return ", ".join(sizes)


async def one_second_rate(pool: asyncpg.Pool) -> float:
    symbols = [f"S{i:04d}USDT" for i in range(LIVE_SYMBOLS)]
    start = day_start_ms(date(2026, 3, 2))
    written, started = 0, time.perf_counter()
    for first in range(0, SECONDS, FLUSH_S):
        trades = [
            (s, TradeSecond(start + t * 1000, 100_000, 100_100, 99_900, 100_050, 7, 5, 1_200_000, 3))
            for t in range(first, first + FLUSH_S)
            for s in symbols
        ]
        await book_store.write_seconds(pool, trades, [], [], [], [])
        written += len(trades)
    return written / (time.perf_counter() - started)


async def retention_ms(pool: asyncpg.Pool) -> tuple[int, int, float]:
    """A week of hourly values of 789 symbols x 10 outputs, two days kept: (rows removed,
    pieces dropped, ms it took)."""
    start = day_start_ms(date(2026, 3, 2))
    hours = [start + h * 3_600_000 for h in range(7 * 24)]
    for name in (f"OUT_{i}" for i in range(10)):
        keys = [(s, t) for s in range(LIVE_SYMBOLS) for t in hours]
        await core_io.upsert_indicator_rows(
            pool, [1] * len(keys), [f"S{s:04d}USDT" for s, _ in keys], [t for _, t in keys], [name] * len(keys),
            [1.0] * len(keys),
        )  # fmt: skip
    await pool.execute("ANALYZE indicator_values_v4")
    before = await pool.fetchval("SELECT count(*) FROM indicator_values_v4")
    size = await table_bytes(pool, "indicator_values_v4")
    per_day = (1440 + 288 + 96) * DEFAULT_OUTPUTS  # rows a symbol a day with the default set
    print(
        f"{'':20} values      {size / before:.0f} bytes a value row: ~{size / before * per_day / 1e6:.1f} MB "
        f"a symbol a day with the default set ({DEFAULT_OUTPUTS} outputs on M1, M5, M15)"
    )
    await core_io.upsert_candles(pool, [replace(next(read_archive("LINKUSDT")), open_time=hours[-1])])  # the clock
    started = time.perf_counter()
    dropped = await core_io.prune_indicator_values(pool, 2 * 86_400_000)
    drop_ms = (time.perf_counter() - started) * 1000
    return before - await pool.fetchval("SELECT count(*) FROM indicator_values_v4"), len(dropped), drop_ms


FEATURES_DAY_SQL = """
INSERT INTO features_1s4 (symbol, ts, microprice, i1, i10, ofi, volume_imbalance, vpin, vpin_bulk, volatility,
    log_return)
SELECT 'S' || lpad(s::text, 4, '0') || 'USDT', $1::timestamptz + t * interval '1 second',
       60000 + random(), random(), random(), random(), random(), random(), random(), random(), random()
FROM generate_series(0, 19) s, generate_series(0, 86399) t
"""
FOOTPRINTS_SQL = """
INSERT INTO orderflow4 (symbol, tf, open_time, buy_units, sell_units, delta_min, delta_max, cvd, cvd_day,
    agg_trades, trades, buy_trades, sell_trades, max_trade_qty, row_size, row_index, bid_units, ask_units,
    bid_trades, ask_trades)
SELECT 'S' || lpad(s::text, 4, '0') || 'USDT', 'm15', $1::timestamptz + b * interval '15 minutes',
       1000, 900, -50, 80, 100, 100, 400, 600, 200, 200, 30, 1000000,
       array(SELECT 6000000 + r FROM generate_series(1, 40) r),
       array(SELECT (random() * 1e8)::bigint FROM generate_series(1, 40)),
       array(SELECT (random() * 1e8)::bigint FROM generate_series(1, 40)),
       array(SELECT (random() * 50)::int FROM generate_series(1, 40)),
       array(SELECT (random() * 50)::int FROM generate_series(1, 40))
FROM generate_series(0, 19) s, generate_series(0, 30 * 96 - 1) b
"""


async def fine_reads(pool: asyncpg.Pool) -> tuple[float, float]:
    """(ms for a day of a symbol's one-second features, ms for one M15 bar's footprint)."""
    day = day_start_ms(date(2026, 3, 10))
    await partitions.ensure(pool, "features_1s4", range(day, day + 86_400_000, HOUR_MS))
    await pool.execute(FEATURES_DAY_SQL, core_io.ms_to_datetime(day))
    month = day_start_ms(date(2026, 1, 1))
    await partitions.ensure(pool, "orderflow4", range(month, month + 31 * 86_400_000, 86_400_000))
    await pool.execute(FOOTPRINTS_SQL, core_io.ms_to_datetime(month))
    await pool.execute("ANALYZE features_1s4; ANALYZE orderflow4")
    features = await median_ms(
        pool,
        "SELECT * FROM features_1s_v4 WHERE symbol = $1 AND ts >= $2 AND ts < $2 + interval '1 day'",
        "S0007USDT",
        core_io.ms_to_datetime(day),
    )
    footprint = await median_ms(
        pool,
        "SELECT * FROM footprint_v4 WHERE symbol = $1 AND tf = 'm15' AND open_time = $2",
        "S0007USDT",
        core_io.ms_to_datetime(month + 14 * 86_400_000),
    )
    return features, footprint


TRADE_ROWS = 2_000_000


def trades_zip(day: date) -> bytes:
    """A made-up day of one busy symbol's aggTrades, as the archive zips them."""
    start, step = day_start_ms(day), 86_400_000 // TRADE_ROWS
    lines = [
        f"{a},{60000 + (a % 997) / 10:.1f},{(a % 89) / 1000 + 0.001:.3f},{3 * a},{3 * a + 2},{start + a * step},"
        f"{'true' if a % 3 else 'false'}"
        for a in range(TRADE_ROWS)
    ]
    return zipped("BENCHUSDT-aggTrades.zip", lines, AGG_TRADE_HEADER)


async def trade_import_rate(pool: asyncpg.Pool, data: bytes, day: date, new: int) -> float:
    started = time.perf_counter()
    rows, refused, stored, _ = await store_trades(pool, "BENCHUSDT", day, data, "BENCHUSDT-aggTrades.zip")
    elapsed = time.perf_counter() - started
    assert rows == TRADE_ROWS and stored == new and refused == 0, (rows, refused, stored)
    return rows / elapsed


async def bench_mode(mode: str, folder: Path, symbols: list[str], redis_url: str) -> None:
    url = await recreate_database(setting(SERVERS[mode]), SCRATCH)
    pool = await asyncpg.create_pool(url, min_size=1, max_size=4)
    redis = make_redis(redis_url)
    try:
        await apply_migrations(pool)
        assert (await apply_storage(pool)).mode == mode
        importer = Importer(
            pool, redis, core_io.make_candle_store(redis, True, 250), ArchiveReader(str(folder)), 250, 100_000
        )
        started = time.perf_counter()
        outcomes = await importer.run("klines", symbols, FIRST, LAST)
        elapsed = time.perf_counter() - started
        rows = sum(o.rows for o in outcomes)
        size = sum(o.size for o in outcomes)
        print(
            f"{mode:20} import      {rows:,} kline rows, {len(outcomes)} files in {elapsed:.1f} s: "
            f"{rows / elapsed:,.0f} rows/s, {size / 1e6 / elapsed:.2f} MB/s"
        )
        symbol_days = len(symbols) * len(days(FIRST, LAST))
        sizes = []
        for table in map(core_io.candle_table, TIMEFRAMES):
            sizes.append(f"{table} {await table_bytes(pool, table) / symbol_days:,.0f}")
        print(f"{mode:20} bytes/symbol/day  {', '.join(sizes)}")
        last = await median_ms(
            pool, "SELECT * FROM ohlcv4_m1 WHERE symbol = $1 ORDER BY open_time DESC LIMIT 1000", symbols[0]
        )
        day = await median_ms(
            pool,
            "SELECT * FROM ohlcv4_m1 WHERE symbol = $1 AND open_time >= $2 AND open_time < $2 + interval '1 day'",
            symbols[0],
            core_io.ms_to_datetime(day_start_ms(date(2026, 2, 14))),
        )
        print(f"{mode:20} reads       last 1,000 M1 {last:.2f} ms, one day of M1 {day:.2f} ms (median of 30)")
        rate = await one_second_rate(pool)
        print(
            f"{mode:20} 1 s bars    {rate:,.0f} rows/s for {LIVE_SYMBOLS} symbols "
            f"({rate / LIVE_SYMBOLS:.0f}x the live rate; budget 10x)"
        )
        trades = trades_zip(date(2026, 3, 20))
        rate = await trade_import_rate(pool, trades, date(2026, 3, 20), TRADE_ROWS)
        again = await trade_import_rate(pool, trades, date(2026, 3, 20), 0)
        print(
            f"{mode:20} import      aggTrades: {TRADE_ROWS:,} rows of a day, {rate:,.0f} rows/s (budget 500k); "
            f"the same file again by the exact path {again:,.0f} rows/s"
        )
        features, footprint = await fine_reads(pool)
        print(
            f"{mode:20} reads       a day of a symbol's 1 s features {features:.1f} ms, "
            f"one M15 footprint {footprint:.2f} ms (median of 30)"
        )
        removed, pieces, drop_ms = await retention_ms(pool)
        print(
            f"{mode:20} retention   a week of values, 2 days kept: {removed:,} rows gone with {pieces} "
            f"whole pieces in {drop_ms:.1f} ms (no row DELETE)"
        )
        if mode == FULL:
            tables = [*map(core_io.candle_table, TIMEFRAMES), "indicator_values_v4", "features_1s4", "orderflow4"]
            print(f"{mode:20} compressed  {await compressed(pool, tables)}")
        await importer.reader.close()
    finally:
        await redis.aclose()
        await pool.close()
        await drop_database(setting(SERVERS[mode]), SCRATCH)


async def main() -> None:
    redis = RedisServer(with_timeseries=True)
    redis.start()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            symbols, size = write_tree(Path(tmp))
            print(f"archive tree: {len(symbols)} symbols x {len(days(FIRST, LAST))} days, {size / 1e6:.1f} MB of zips")
            for mode in (PLAIN, APACHE, FULL):
                await bench_mode(mode, Path(tmp), symbols, redis.url)
    finally:
        redis.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
