"""Redis FLUSHALL, then restore: the cache comes back from PostgreSQL."""

from __future__ import annotations

from dataclasses import replace
from itertools import islice

import core_io
from candles import M1_PER_BUCKET, TF_MS, TIMEFRAMES, Candle
from indicators import hashes
from market_data import read_archive
from restore_redis_from_pg import restore_redis_from_pg

SYMBOLS = ("ALGOUSDT", "DOTUSDT", "LTCUSDT")
BARS = 250
T0 = 1_769_904_000_000


def _relabelled(m1: list[Candle], tf: str) -> list[Candle]:
    """Archive rows dressed as M5/M15 candles (aligned times): restore only copies them."""
    return [
        replace(c, tf=tf, open_time=m1[0].open_time + i * TF_MS[tf], m1_count=M1_PER_BUCKET[tf])
        for i, c in enumerate(m1)
    ]


async def _seed_postgres(pool) -> dict[str, list[Candle]]:
    """300 candles per symbol and timeframe, a disabled ticker, and RSI history."""
    await core_io.enable_symbols(pool, [*SYMBOLS, "FILUSDT"])
    await pool.execute("UPDATE tickers SET status = 'disabled' WHERE symbol = 'FILUSDT'")
    seeded: dict[str, list[Candle]] = {}
    for symbol in (*SYMBOLS, "FILUSDT"):
        m1 = list(islice(read_archive(symbol), 300))
        for tf in TIMEFRAMES:
            seeded[f"{symbol}:{tf}"] = m1 if tf == "m1" else _relabelled(m1, tf)
            await core_io.upsert_candles(pool, seeded[f"{symbol}:{tf}"])
    rsi_m1 = await pool.fetchval("SELECT id FROM indicator_instances_v4 WHERE indicator = 'rsi' AND timeframe = 'm1'")
    values = [
        core_io.IndicatorValue(rsi_m1, symbol, "m1", T0 + k * 60_000, "RSI_14", 40.0 + k)
        for symbol in SYMBOLS
        for k in range(3)
    ]
    await core_io.upsert_indicator_values(pool, values)
    return seeded


async def test_flushall_then_restore_gives_back_candles_and_indicators(pool, store):
    seeded = await _seed_postgres(pool)
    await restore_redis_from_pg(pool, store.redis, store, BARS)
    await store.redis.flushall()
    report = await restore_redis_from_pg(pool, store.redis, store, BARS)
    assert report.symbols == 3
    assert report.candles == 3 * 3 * BARS
    keys = [(symbol, tf) for symbol in SYMBOLS for tf in TIMEFRAMES]
    cached = await store.read_last_many(keys, BARS)
    for symbol, tf in keys:
        assert cached[(symbol, tf)] == [c.to_bar() for c in seeded[f"{symbol}:{tf}"][-BARS:]]
    assert (await store.read_last_many([("FILUSDT", "m1")], BARS))[("FILUSDT", "m1")] == []  # disabled
    latest = await hashes.IndicatorCache(store.redis).get_latest("DOTUSDT", "m1")
    assert latest == {"open_time": str(T0 + 2 * 60_000), "RSI_14": "42.0"}
    groups = await store.redis.xinfo_groups(core_io.SIGNALS_STREAM)
    assert [g["name"] for g in groups] == [core_io.SIGNAL_GROUP]


async def test_restore_is_idempotent_and_keeps_newer_live_values(pool, store):
    await _seed_postgres(pool)
    await restore_redis_from_pg(pool, store.redis, store, BARS)
    cache = hashes.IndicatorCache(store.redis)
    newer = T0 + 10 * 60_000
    await cache.set_latest([core_io.IndicatorValue(1, "ALGOUSDT", "m1", newer, "RSI_14", 55.5)])
    first = await store.read_last_many([(s, tf) for s in SYMBOLS for tf in TIMEFRAMES], BARS)
    await restore_redis_from_pg(pool, store.redis, store, BARS)
    second = await store.read_last_many([(s, tf) for s in SYMBOLS for tf in TIMEFRAMES], BARS)
    assert first == second
    assert (await cache.get_latest("ALGOUSDT", "m1"))["RSI_14"] == "55.5"
