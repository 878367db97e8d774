"""Candle intake on real servers: a crashed run's unfinished work is completed at boot."""

from __future__ import annotations

from itertools import islice

import core_io
from aggregation import aggregate
from feed_and_aggregate import CandleIntake
from market_data import read_archive

T0 = 1_769_904_000_000  # 2026-02-01 00:00 UTC, aligned to M15


async def test_reconcile_builds_and_announces_what_a_killed_run_left_undone(pool, redis):
    m1 = list(islice(read_archive("NEARUSDT"), 30))
    await core_io.upsert_candles(pool, m1)  # committed, then "killed" before Redis and aggregation
    store = core_io.make_candle_store(redis, True, 250)
    intake = CandleIntake(pool, redis, store, stream_maxlen=10_000)
    await core_io.publish(redis, core_io.CANDLE_STREAMS["m1"], [core_io.candle_event(c) for c in m1[:10]], 10_000)

    await intake.reconcile(window_ms=60 * 60_000)

    m15 = await core_io.fetch_candles(pool, "NEARUSDT", "m15", T0, T0 + 30 * 60_000)
    assert m15 == [aggregate("m15", T0, m1[:15]), aggregate("m15", T0 + 900_000, m1[15:])]
    assert len(await core_io.fetch_candles(pool, "NEARUSDT", "m5", T0, T0 + 30 * 60_000)) == 6
    for tf, expected in (("m1", 30), ("m5", 6), ("m15", 2)):
        announced = await core_io.announced_candles(redis, core_io.CANDLE_STREAMS[tf])
        assert len(announced) == expected, tf
    assert await redis.xlen(core_io.CANDLE_STREAMS["m1"]) == 30  # the 10 already announced are not repeated
    await intake.reconcile(window_ms=60 * 60_000)  # a second boot finds nothing to do
    assert await redis.xlen(core_io.CANDLE_STREAMS["m1"]) == 30
    assert await redis.xlen(core_io.CANDLE_STREAMS["m15"]) == 2
