"""Stream events through consumer groups: publish, read, ack, reclaim."""

from __future__ import annotations

import asyncio

import core_io
from indicators import hashes
from tests.test_candles_pg import make_candle

STREAM = core_io.CANDLE_STREAMS["m1"]
GROUP = core_io.INDICATOR_GROUP
WITH_GROUP = {STREAM: (GROUP,)}


async def test_published_candle_events_are_read_and_acked(redis):
    await core_io.ensure_groups(redis, WITH_GROUP)
    candles = [make_candle("BTCUSDT", "m1", 1_769_904_000_000 + i * 60_000) for i in range(3)]
    await core_io.publish(redis, STREAM, [core_io.candle_event(c) for c in candles], maxlen=1000)
    entries = await core_io.read_group(redis, GROUP, "worker-1", [STREAM], count=10, block_ms=100)
    assert [e[2]["open_time"] for e in entries] == [str(c.open_time) for c in candles]
    assert entries[0][2]["close"] == "83085.00"
    assert (await redis.xpending(STREAM, GROUP))["pending"] == 3
    await core_io.ack(redis, GROUP, [(s, i) for s, i, _ in entries])
    assert (await redis.xpending(STREAM, GROUP))["pending"] == 0


async def test_streams_are_trimmed(redis):
    events = [{"symbol": "X", "n": str(i)} for i in range(5000)]
    await core_io.publish(redis, "trim_test", events, maxlen=500)
    length = await redis.xlen("trim_test")
    assert 500 <= length < 1500


async def test_entry_left_pending_by_a_dead_consumer_is_reclaimed(redis):
    await core_io.ensure_groups(redis, WITH_GROUP)
    await core_io.publish(redis, STREAM, [{"symbol": "A", "open_time": "1"}, {"symbol": "B", "open_time": "2"}], 100)
    taken = await core_io.read_group(redis, GROUP, "crashed-worker", [STREAM], count=10, block_ms=100)
    assert len(taken) == 2  # ... and it dies without acking
    assert await core_io.reclaim_stale(redis, STREAM, GROUP, "survivor", min_idle_ms=60_000) == []
    await asyncio.sleep(0.15)
    reclaimed = await core_io.reclaim_stale(redis, STREAM, GROUP, "survivor", min_idle_ms=100)
    assert [e[2]["symbol"] for e in reclaimed] == ["A", "B"]
    consumers = {c["name"]: c["pending"] for c in await redis.xinfo_consumers(STREAM, GROUP)}
    assert consumers["survivor"] == 2
    assert consumers.get("crashed-worker", 0) == 0


async def test_reclaim_acks_entries_trimmed_away(redis):
    await core_io.ensure_groups(redis, WITH_GROUP)
    await core_io.publish(redis, STREAM, [{"symbol": "A"}], 100)
    [(_, entry_id, _)] = await core_io.read_group(redis, GROUP, "crashed", [STREAM], block_ms=100)
    await redis.xdel(STREAM, entry_id)
    await asyncio.sleep(0.05)
    assert await core_io.reclaim_stale(redis, STREAM, GROUP, "survivor", min_idle_ms=10) == []
    assert (await redis.xpending(STREAM, GROUP))["pending"] == 0


async def test_group_lost_to_a_flush_is_recreated(redis):
    await core_io.ensure_groups(redis, WITH_GROUP)
    await redis.flushall()
    assert await core_io.read_group(redis, GROUP, "w", [STREAM], block_ms=50) == []
    await core_io.publish(redis, STREAM, [{"symbol": "C"}], 100)
    entries = await core_io.read_group(redis, GROUP, "w", [STREAM], block_ms=50)
    assert [e[2]["symbol"] for e in entries] == ["C"]


async def test_ensure_groups_creates_every_stream(redis):
    await core_io.ensure_groups(redis)
    await core_io.ensure_groups(redis)  # twice is harmless
    for stream in core_io.CONSUMER_GROUPS:
        assert await redis.exists(stream)


async def test_mark_prices_round_trip(redis):
    await core_io.set_mark_prices(redis, {"BTCUSDT": "83084.30000000", "ETHUSDT": "3000.1"})
    assert await core_io.get_mark_prices(redis, ["BTCUSDT", "ETHUSDT", "NONE"]) == {
        "BTCUSDT": "83084.30000000",
        "ETHUSDT": "3000.1",
        "NONE": None,
    }


async def test_older_indicator_values_never_replace_newer(redis):
    cache = hashes.IndicatorCache(redis)
    newer = [core_io.IndicatorValue(1, "BTCUSDT", "m5", 2000, "EMA_9", 10.5)]
    older = [core_io.IndicatorValue(1, "BTCUSDT", "m5", 1000, "EMA_9", 9.5)]
    await cache.set_latest(newer)
    await cache.set_latest(older)
    assert await cache.get_latest("BTCUSDT", "m5") == {"open_time": "2000", "EMA_9": "10.5"}


async def test_indicator_values_upsert_in_one_batch(pool):
    values = [
        core_io.IndicatorValue(7, "BTCUSDT", "m1", 1_769_904_000_000 + i * 60_000, name, float(i))
        for i in range(100)
        for name in ("MACD_12_26_9", "MACDh_12_26_9")
    ]
    values.append(core_io.IndicatorValue(7, "BTCUSDT", "m1", 1_769_904_000_000, "MACD_12_26_9", None))
    assert await core_io.upsert_indicator_values(pool, values) == 200
    assert await core_io.upsert_indicator_values(pool, values) == 200
    assert await pool.fetchval("SELECT count(*) FROM indicator_values_v4") == 200
    assert (
        await pool.fetchval(
            "SELECT value FROM indicator_values_v4 WHERE param_name = 'MACD_12_26_9' ORDER BY open_time LIMIT 1"
        )
        is None
    )
