"""Candle upserts into PostgreSQL: idempotent, exact, batch-safe."""

from __future__ import annotations

from dataclasses import replace
from decimal import Decimal
from itertools import islice

import core_io
from candles import Candle
from market_data import read_archive

T0 = 1_769_904_000_000  # 2026-02-01 00:00 UTC


def make_candle(symbol: str, tf: str, open_time: int, price: str = "83084.90", **extra) -> Candle:
    p = Decimal(price)
    fields = dict(
        symbol=symbol,
        tf=tf,
        open_time=open_time,
        open=p,
        high=p + Decimal("1.5"),
        low=p - Decimal("0.25"),
        close=p + Decimal("0.1"),
        volume=Decimal("13.551"),
        quote_volume=Decimal("1125714.73960"),
        trades=1027,
        taker_buy_volume=Decimal("6.426"),
        taker_buy_quote_volume=Decimal("533856.66860"),
        m1_count=None if tf == "m1" else 5,
    )
    fields.update(extra)
    return Candle(**fields)


async def test_same_batch_twice_gives_the_same_rows(pool):
    batch = list(islice(read_archive("LINKUSDT"), 500))
    first = await core_io.upsert_candles(pool, batch)
    before = await pool.fetch("SELECT * FROM ohlcv4_m1 ORDER BY open_time")
    second = await core_io.upsert_candles(pool, batch)
    after = await pool.fetch("SELECT * FROM ohlcv4_m1 ORDER BY open_time")
    assert len(first) == 500
    assert second == []  # nothing changed
    assert before == after
    assert len(after) == 500


async def test_decimals_round_trip_exactly(pool):
    candle = make_candle(
        "BTCUSDT",
        "m1",
        T0,
        price="0.000012345678901234567890",
        volume=Decimal("123456789012345.00000001"),
        quote_volume=Decimal("1.10"),
    )
    await core_io.upsert_candles(pool, [candle])
    [stored] = await core_io.fetch_candles(pool, "BTCUSDT", "m1", T0, T0 + 60_000)
    assert stored == candle
    assert str(stored.quote_volume) == "1.10"  # the exchange's scale is kept


async def test_archive_rows_round_trip_exactly(pool):
    batch = list(islice(read_archive("ALGOUSDT"), 1440))
    await core_io.upsert_candles(pool, batch)
    stored = await core_io.fetch_candles(pool, "ALGOUSDT", "m1", batch[0].open_time, batch[-1].open_time + 1)
    assert stored == batch


async def test_duplicates_inside_one_batch_keep_the_last(pool):
    first = make_candle("ETHUSDT", "m1", T0, price="100")
    corrected = replace(first, close=Decimal("101.5"))
    changed = await core_io.upsert_candles(pool, [first, make_candle("ETHUSDT", "m1", T0 + 60_000), corrected])
    assert len(changed) == 2
    [stored, _] = await core_io.fetch_candles(pool, "ETHUSDT", "m1", T0, T0 + 120_000)
    assert stored.close == Decimal("101.5")


async def test_a_corrected_candle_is_reported_changed(pool):
    candle = make_candle("ETHUSDT", "m5", T0, price="100")
    await core_io.upsert_candles(pool, [candle])
    changed = await core_io.upsert_candles(pool, [replace(candle, high=Decimal("150"), m1_count=5)])
    assert changed == [("ETHUSDT", "m5", T0)]
    [stored] = await core_io.fetch_candles(pool, "ETHUSDT", "m5", T0, T0 + 1)
    assert stored.high == Decimal("150")


async def test_mixed_timeframes_go_to_their_tables(pool):
    batch = [make_candle("SOLUSDT", tf, T0) for tf in ("m1", "m5", "m15")]
    await core_io.upsert_candles(pool, batch)
    for tf in ("m1", "m5", "m15"):
        assert await pool.fetchval(f"SELECT count(*) FROM ohlcv4_{tf}") == 1


async def test_read_last_bars_falls_back_to_postgres(pool, store):
    candles = list(islice(read_archive("DOTUSDT"), 300))
    await core_io.upsert_candles(pool, candles)
    await core_io.write_bars(store, {("DOTUSDT", "m1"): [c.to_bar() for c in candles[-10:]]})
    bars = await core_io.read_last_bars(store, pool, [("DOTUSDT", "m1")], 300)
    assert bars[("DOTUSDT", "m1")] == [c.to_bar() for c in candles]
    # Redis alone answers when it holds enough.
    only_redis = await core_io.read_last_bars(store, pool, [("DOTUSDT", "m1")], 10)
    assert only_redis[("DOTUSDT", "m1")] == [c.to_bar() for c in candles[-10:]]
