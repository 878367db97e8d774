"""Storage in each mode (issue 17): plain PostgreSQL, TimescaleDB Apache and full edition.

Per mode, on a scratch database of that server (the servers `make services` started):
- the archive import: February 2026's daily kline files of the 7 real symbols (189 files,
  272,160 rows), from a folder, rows/s and MB/s;
- bytes per symbol per day of the candle tables after it (hypertable_size under
  TimescaleDB: chunks and their indexes);
- the last 1,000 M1 of a symbol, and one day of its M1: median of 30 reads (server side);
- one-second trade bars of 789 symbols written as the daemon writes them (book/store.py,
  10 s a flush): sustained rows/s against the live rate (789 rows/s a table; budget 10x);
- retention of indicator values: a week of hourly values of 789 symbols, two days kept:
  the whole chunks dropped (TimescaleDB) and the batched DELETE of what is left.

Not measured yet (issue 17 continues): compression, continuous aggregates, footprint
reads, aggTrades import (budget 500k rows/s). Prints; asserts nothing.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from datetime import date
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import core_io
from archive.files import daily_path, day_start_ms, days
from archive.importer import ArchiveReader, Importer
from book import store as book_store
from book.seconds import TradeSecond
from fake_exchange import ArchiveSource
from fake_exchange.archive import ArchiveTree
from infra import make_redis
from market_data import read_archive
from migrations import apply_migrations
from storage.layout import HYPERTABLES
from storage.modes import APACHE, FULL, PLAIN
from storage.retention import drop_old_chunks
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


async def table_bytes(pool: asyncpg.Pool, table: str, hypertables: set[str]) -> int:
    if table in hypertables:
        return await pool.fetchval("SELECT hypertable_size($1::regclass)", table)
    return await pool.fetchval("SELECT pg_total_relation_size($1::regclass)", table)


async def one_second_rate(pool: asyncpg.Pool) -> float:
    book_store._known_hours.clear()  # partitions of another database
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


async def retention_ms(pool: asyncpg.Pool) -> tuple[int, float, float]:
    """A week of hourly values of 789 symbols x 10 outputs, two days kept: (rows removed,
    ms for the whole chunks, ms for the batched DELETE that follows)."""
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
    hyper = (
        await pool.fetchval(
            "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb') AND EXISTS "
            "(SELECT 1 FROM timescaledb_information.hypertables WHERE hypertable_name = 'indicator_values_v4')"
        )
        if await pool.fetchval("SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb')")
        else False
    )
    size = await table_bytes(pool, "indicator_values_v4", {"indicator_values_v4"} if hyper else set())
    per_day = (1440 + 288 + 96) * DEFAULT_OUTPUTS  # rows a symbol a day with the default set
    print(
        f"{'':20} values      {size / before:.0f} bytes a value row: ~{size / before * per_day / 1e6:.1f} MB "
        f"a symbol a day with the default set ({DEFAULT_OUTPUTS} outputs on M1, M5, M15)"
    )
    await core_io.upsert_candles(pool, [replace(next(read_archive("LINKUSDT")), open_time=hours[-1])])  # the clock
    cutoff = core_io.ms_to_datetime(hours[-1] - 2 * 86_400_000)
    started = time.perf_counter()
    await drop_old_chunks(pool, "indicator_values_v4", cutoff)
    chunks_ms = (time.perf_counter() - started) * 1000
    started = time.perf_counter()
    await core_io.prune_indicator_round(pool, 2 * 86_400_000, 10_000, pause_s=0)  # what is left: batches
    delete_ms = (time.perf_counter() - started) * 1000
    return before - await pool.fetchval("SELECT count(*) FROM indicator_values_v4"), chunks_ms, delete_ms


async def bench_mode(mode: str, folder: Path, symbols: list[str], redis_url: str) -> None:
    url = await recreate_database(setting(SERVERS[mode]), SCRATCH)
    pool = await asyncpg.create_pool(url, min_size=1, max_size=4)
    redis = make_redis(redis_url)
    try:
        await apply_migrations(pool)
        assert (await apply_storage(pool)).mode == mode
        hypertables = {t.table for t in HYPERTABLES} if mode != PLAIN else set()
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
        for table in ("ohlcv4_m1", "ohlcv4_m5", "ohlcv4_m15"):
            sizes.append(f"{table} {await table_bytes(pool, table, hypertables) / symbol_days:,.0f}")
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
        removed, chunks, deleted = await retention_ms(pool)
        print(
            f"{mode:20} retention   a week of values, 2 days kept: {removed:,} rows gone; whole chunks "
            f"{chunks:.1f} ms, batched DELETE of the rest {deleted:.0f} ms"
        )
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
