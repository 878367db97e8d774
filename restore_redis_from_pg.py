"""Rebuilds the Redis cache from PostgreSQL (SPEC section 10).

For every enabled ticker and timeframe: the last REDIS_CANDLES candles and the latest
indicator values; plus the streams and consumer groups. Idempotent and safe while the
daemon runs: it only writes PostgreSQL's truth over Redis. An indicator hash becomes
PostgreSQL's newest bar of its series, whole (an output without a value on that bar is
absent, never an empty string), unless Redis holds a newer bar already.
Run alone as `python restore_redis_from_pg.py`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from dataclasses import dataclass

import asyncpg
from redis.asyncio import Redis

import core_io
from candles import TIMEFRAMES
from connections import connect_pg, connect_redis
from indicators import hashes
from infra import BootError, ConfigError, load_settings, setup_logging

log = logging.getLogger("RESTORE")

SYMBOLS_PER_QUERY = 100


@dataclass
class RestoreReport:
    symbols: int = 0
    candles: int = 0
    indicator_values: int = 0
    seconds: float = 0.0


async def _restore_candles(
    pool: asyncpg.Pool, store: core_io.CandleStore, symbols: list[str], tf: str, count: int
) -> int:
    columns = await core_io.fetch_last_columns_pg(pool, symbols, tf, count)
    await store.write_columns(columns)
    return sum(len(series.open_time) for series in columns.values())


async def _restore_indicators(pool: asyncpg.Pool, cache: hashes.IndicatorCache, symbols: list[str], tf: str) -> int:
    values = await core_io.fetch_latest_indicator_values(pool, symbols, tf)
    await cache.set_latest(values)
    return len(values)


async def restore_redis_from_pg(
    pool: asyncpg.Pool, redis: Redis, store: core_io.CandleStore, candles_per_series: int
) -> RestoreReport:
    """Copy PostgreSQL's newest candles and indicator values into Redis."""
    started = time.perf_counter()
    store.forget_created()  # restore is what follows a wipe: every series is created again
    await core_io.ensure_groups(redis)
    symbols = await core_io.enabled_symbols(pool)
    cache = hashes.IndicatorCache(redis)
    report = RestoreReport(symbols=len(symbols))
    chunks = [symbols[i : i + SYMBOLS_PER_QUERY] for i in range(0, len(symbols), SYMBOLS_PER_QUERY)]
    # Chunks of symbols run concurrently, candles and indicator values together:
    # PostgreSQL answers on several connections while Redis absorbs earlier pipelines.
    candles = [_restore_candles(pool, store, chunk, tf, candles_per_series) for tf in TIMEFRAMES for chunk in chunks]
    indicators = [_restore_indicators(pool, cache, chunk, tf) for tf in TIMEFRAMES for chunk in chunks]
    counts = await asyncio.gather(*candles, *indicators)
    report.candles, report.indicator_values = sum(counts[: len(candles)]), sum(counts[len(candles) :])
    report.seconds = time.perf_counter() - started
    await redis.set(core_io.RESTORED_KEY, int(time.time() * 1000))
    log.info(
        "restored %d candles and %d indicator values for %d symbols in %.2f s",
        report.candles,
        report.indicator_values,
        report.symbols,
        report.seconds,
    )
    return report


async def main() -> int:
    try:
        settings = load_settings()
        setup_logging(settings.debug_mode)
        pool = await connect_pg(settings)
        redis, use_ts = await connect_redis(settings)
    except (ConfigError, BootError) as exc:
        print(f"restore_redis_from_pg: {exc}", file=sys.stderr)
        return 2
    try:
        store = core_io.make_candle_store(redis, use_ts, settings.redis_candles)
        await restore_redis_from_pg(pool, redis, store, settings.redis_candles)
    finally:
        await redis.aclose()
        await pool.close()
    return 0


if __name__ == "__main__":
    argparse.ArgumentParser(
        prog="restore_redis_from_pg.py",
        description="Rebuild Redis from PostgreSQL (what `feed-v4 restore` and the daemon's boot do), then exit.",
    ).parse_args()  # --help prints and exits before anything connects
    sys.exit(asyncio.run(main()))
