"""Candle intake on real servers: a crashed run's unfinished work is completed at boot."""

from __future__ import annotations

import asyncio
from itertools import islice

from replay import until
from tcp_proxy import TcpProxy

import core_io
from aggregation import aggregate
from feed_and_aggregate import CandleIntake
from infra import make_redis
from market_data import read_archive

T0 = 1_769_904_000_000  # 2026-02-01 00:00 UTC, aligned to M15


async def test_reconcile_builds_and_announces_what_a_killed_run_left_undone(pool, redis):
    m1 = list(islice(read_archive("NEARUSDT"), 30))
    await core_io.upsert_candles(pool, m1)  # committed, then "killed" before Redis and aggregation
    store = core_io.make_candle_store(redis, True, 250)
    intake = CandleIntake(pool, redis, store, stream_maxlen=10_000)
    await core_io.publish(redis, core_io.CANDLE_STREAMS["m1"], [core_io.candle_event(c) for c in m1[:10]], 10_000)

    await intake.reconcile(60 * 60_000, {"LINKUSDT"})  # not this process's symbol: nothing done
    assert await redis.xlen(core_io.CANDLE_STREAMS["m1"]) == 10
    await intake.reconcile(60 * 60_000, {"NEARUSDT"})

    m15 = await core_io.fetch_candles(pool, "NEARUSDT", "m15", T0, T0 + 30 * 60_000)
    assert m15 == [aggregate("m15", T0, m1[:15]), aggregate("m15", T0 + 900_000, m1[15:])]
    assert len(await core_io.fetch_candles(pool, "NEARUSDT", "m5", T0, T0 + 30 * 60_000)) == 6
    for tf, expected in (("m1", 30), ("m5", 6), ("m15", 2)):
        announced = await core_io.announced_candles(redis, core_io.CANDLE_STREAMS[tf])
        assert len(announced) == expected, tf
    assert await redis.xlen(core_io.CANDLE_STREAMS["m1"]) == 30  # the 10 already announced are not repeated
    await intake.reconcile(60 * 60_000, {"NEARUSDT"})  # a second boot finds nothing to do
    assert await redis.xlen(core_io.CANDLE_STREAMS["m1"]) == 30
    assert await redis.xlen(core_io.CANDLE_STREAMS["m15"]) == 2


async def test_a_historys_older_buckets_left_by_a_process_that_lost_the_symbol_are_built_by_the_next(pool, redis):
    """A history's newest buckets are built from memory as its minutes are stored, the
    older ones left to the aggregator; the process loses the symbol before that runs,
    and its fence drops them. The next owner builds every missing bucket within the
    history's reach, not only those of its reconciliation's recent window."""
    m1 = list(islice(read_archive("NEARUSDT"), 300))
    store = core_io.make_candle_store(redis, True, 250)
    loser = CandleIntake(pool, redis, store, stream_maxlen=10_000, defer_aggregation=True)
    await loser.store_m1(m1, history=True)
    loser.may_write = lambda symbol: False  # lost before its aggregator ran
    aggregator = asyncio.create_task(loser.run_aggregator())
    await asyncio.sleep(0.5)
    aggregator.cancel()
    m5 = await core_io.fetch_candles(pool, "NEARUSDT", "m5", T0, T0 + 300 * 60_000)
    assert 0 < len(m5) < 60  # only those memory held: the rest was dropped

    successor = CandleIntake(pool, redis, store, stream_maxlen=10_000)
    await successor.reconcile(120 * 60_000, {"NEARUSDT"})
    await successor.build_missing(300 * 60_000, {"NEARUSDT"})
    for tf, minutes in (("m5", 5), ("m15", 15)):
        stored = await core_io.fetch_candles(pool, "NEARUSDT", tf, T0, T0 + 300 * 60_000)
        starts = range(0, 300, minutes)
        assert stored == [aggregate(tf, T0 + i * 60_000, m1[i : i + minutes]) for i in starts]
    assert len(await core_io.announced_candles(redis, core_io.CANDLE_STREAMS["m5"])) == 60


async def test_a_repeated_close_that_completes_a_bucket_announces_the_bucket(pool, redis):
    """After a restart the last minute of an M5 came live before the backfill brought
    the others; the build they queued had not run when the exchange sent that close
    again. The repeat changes no minute but completes the bucket in memory: it is stored
    and must be cached and announced like any bucket."""
    m1 = list(islice(read_archive("NEARUSDT"), 5))
    intake = CandleIntake(pool, redis, core_io.make_candle_store(redis, True, 250), 10_000, defer_aggregation=True)
    assert await intake.store_m1(m1[4:]) == m1[4:]  # its bucket cannot be built yet
    assert await intake.store_m1(m1[:4]) == m1[:4]  # the build is queued (no aggregator runs here)
    assert await intake.store_m1(m1[4:]) == []  # the repeat: no minute changes

    m5 = aggregate("m5", T0, m1)
    assert await core_io.fetch_candles(pool, "NEARUSDT", "m5", T0, T0 + 300_000) == [m5]
    assert await core_io.announced_candles(redis, core_io.CANDLE_STREAMS["m5"]) == {("NEARUSDT", T0)}
    cached = await core_io.TimeSeriesCandleStore(redis, 250).read_last_many([("NEARUSDT", "m5")], 10)
    assert cached[("NEARUSDT", "m5")] == [m5.to_bar()]


async def test_candles_stored_while_redis_is_away_are_held_bounded_and_published_in_order(
    pool, redis, redis_stack_server
):
    m1 = list(islice(read_archive("NEARUSDT"), 60))
    proxy = await TcpProxy("127.0.0.1", redis_stack_server.port).start()
    client = make_redis(f"redis://127.0.0.1:{proxy.port}/0")
    intake = CandleIntake(pool, client, core_io.make_candle_store(client, True, 250), 10_000, held_max=25)
    publisher = asyncio.create_task(intake.run_publisher())
    try:
        await intake.store_m1(m1[:10])
        proxy.set_mode("down")
        for start in range(10, 60, 10):
            await intake.store_m1(m1[start : start + 10])  # PostgreSQL takes them; Redis is away
        assert await core_io.fetch_candles(pool, "NEARUSDT", "m1", T0, T0 + 60 * 60_000) == m1
        assert intake.redis_outage.active
        assert intake.held_candles <= 25 + 10  # bounded: the oldest were let go...
        assert ("m1", "NEARUSDT") in intake.let_go  # ...to be re-read from PostgreSQL
        held_m1 = [c.open_time for tf, batch in intake.held if tf == "m1" for c in batch]
        assert held_m1 and held_m1 == sorted(held_m1)
        proxy.set_mode("pass")
        intake.publish_wake.set()
        await until(lambda: not intake.held and not intake.let_go, 30, "the held candles published")
        events = [int(f["open_time"]) for _, f in await redis.xrange(core_io.CANDLE_STREAMS["m1"])]
        assert set(events) == {c.open_time for c in m1}  # every candle announced, none lost
        first_held = events.index(held_m1[0])
        assert events[first_held : first_held + len(held_m1)] == held_m1  # what was held went out in order...
        assert set(events[first_held + len(held_m1) :]) <= {c.open_time for c in m1[10:50]}  # ...then the rest
        cached = await core_io.TimeSeriesCandleStore(redis, 250).read_last_many([("NEARUSDT", "m1")], 250)
        assert cached[("NEARUSDT", "m1")] == [c.to_bar() for c in m1]
        assert not intake.redis_outage.active
    finally:
        publisher.cancel()
        await asyncio.gather(publisher, return_exceptions=True)
        await client.aclose()
        await proxy.close()
