"""H1, H4 and D1 (TIMEFRAMES): built from M15 → H1 → H4 → D1 by the candle intake,
exact, stored, cached and announced like M5/M15, through a restart, a late minute and
an unfillable one; and the configuration's rules."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from itertools import islice

import pytest
from replay import until

import core_io
from aggregation import SOURCE_TF, affected_buckets, aggregate, bucket_parts, buildable
from candles import ALL_TIMEFRAMES, DAY_MS, M1_PER_BUCKET, TF_MS, Candle, parse_timeframes
from feed_and_aggregate import CandleIntake
from market_data import read_archive

SYMBOL = "NEARUSDT"
T0 = 1_769_904_000_000  # 2026-02-01 00:00 UTC: the archive's first minute, a day boundary
M1 = 60_000
HIGHER = ("h1", "h4", "d1")


def test_timeframes_from_the_environment():
    assert parse_timeframes(None) == parse_timeframes("") == ("m1", "m5", "m15")
    assert parse_timeframes("m1,m5,m15") == ("m1", "m5", "m15")
    assert parse_timeframes(" H4 ") == ("m1", "m5", "m15", "h1", "h4"), "H4 is built from H1"
    assert parse_timeframes("m1,d1") == ALL_TIMEFRAMES
    with pytest.raises(ValueError, match=r"unknown timeframe\(s\) h2, w1"):
        parse_timeframes("m1,h2,w1")


def test_a_higher_bucket_is_the_aggregate_of_its_parts_and_counts_their_minutes():
    m1 = list(islice(read_archive(SYMBOL), 60))
    quarters = [aggregate("m15", T0 + i * 900_000, m1[i * 15 : (i + 1) * 15]) for i in range(4)]
    assert aggregate("h1", T0, quarters) == aggregate("h1", T0, m1)
    assert aggregate("h1", T0, quarters).m1_count == 60
    assert aggregate("h1", T0, quarters[:3]).m1_count == 45


def test_a_higher_bucket_waits_for_each_part_unless_all_its_minutes_are_unfillable():
    parts = set(bucket_parts("h1", T0))
    assert len(parts) == 4 and SOURCE_TF["h1"] == "m15"
    assert buildable("h1", T0, parts, set())
    last = T0 + 45 * M1
    assert not buildable("h1", T0, parts - {last}, {last}), "one unfillable minute: its M15 is still built"
    assert buildable("h1", T0, parts - {last}, {last + i * M1 for i in range(15)})
    assert not buildable("h1", T0, set(), {T0 + i * M1 for i in range(60)}), "nothing to build from"
    assert affected_buckets([(SYMBOL, T0 + 61 * M1)], ("m5", "d1")) == {
        (SYMBOL, "m5", T0 + 60 * M1),
        (SYMBOL, "d1", T0),
    }


def expected(m1: list[Candle], tf: str, lost: set[int]) -> dict[int, Candle]:
    """Each whole bucket of `tf` straight from its minutes (not through the lower
    timeframes, as the intake builds it): an independent reckoning."""
    by_time = {c.open_time: c for c in m1}
    size = TF_MS[tf]
    out = {}
    for start in range(m1[0].open_time, m1[-1].open_time + M1 - size + 1, size):
        minutes = range(start, start + size, M1)
        if all(t in by_time or t in lost for t in minutes):
            out[start] = aggregate(tf, start, [by_time[t] for t in minutes if t in by_time])
    return out


async def settled(intake: CandleIntake) -> None:
    await until(lambda: not intake.buckets_due and not intake.aggregating, 60, "the aggregator", interval=0.02)


@pytest.mark.timeout(300)
async def test_three_days_of_minutes_make_every_h1_h4_and_d1_exactly_through_a_restart_and_late_data(pool, redis):
    minutes = list(islice(read_archive(SYMBOL), 3 * 1440))
    late = T0 + 1440 * M1 + 7 * 60 * M1 + 13 * M1  # day 2, 07:13: held back until its day ended
    fixed = T0 + 22 * 60 * M1 + 30 * M1  # day 1, 22:30: stored, then corrected on day 3
    lost = T0 + 2 * 1440 * M1 + 3 * 60 * M1 + 59 * M1  # day 3, 03:59: the last minute of an H1, never served
    live = [c for c in minutes if c.open_time not in (late, lost)]
    by_time = {c.open_time: c for c in minutes}
    correction = replace(by_time[fixed], volume=by_time[fixed].volume + 1, trades=by_time[fixed].trades + 1)
    store = core_io.make_candle_store(redis, True, 250)
    aggregated = ("m5", "m15", *HIGHER)

    def new_intake() -> tuple[CandleIntake, asyncio.Task]:
        intake = CandleIntake(pool, redis, store, 1_000_000, defer_aggregation=True, aggregated=aggregated)
        return intake, asyncio.create_task(intake.run_aggregator())

    intake, aggregator = new_intake()
    try:
        restart_at = T0 + 1440 * M1 + 13 * 60 * M1 + 37 * M1  # day 2, 13:37: memory lost mid-H4
        for candle in live:
            if candle.open_time == restart_at:
                await settled(intake)
                aggregator.cancel()
                intake, aggregator = new_intake()
            await intake.store_m1([candle])
            if candle.open_time == T0 + 2 * 1440 * M1:  # day 3 has begun: the late minute arrives
                await intake.store_m1([by_time[late]])
                await intake.store_m1([correction])
        await settled(intake)
        # The backfill gives up on the lost minute: its buckets are built without it.
        await core_io.log_missing_m1(pool, [(SYMBOL, lost)])
        await core_io.set_missing_status(pool, [(SYMBOL, lost)], "unfillable")
        await intake.aggregate(affected_buckets([(SYMBOL, lost)], aggregated))
        await settled(intake)
    finally:
        aggregator.cancel()

    stored_minutes = [correction if c.open_time == fixed else c for c in minutes if c.open_time != lost]
    for tf in ("m15", *HIGHER):
        want = expected(stored_minutes, tf, {lost})
        got = {c.open_time: c for c in await core_io.fetch_candles(pool, SYMBOL, tf, T0, T0 + 3 * DAY_MS)}
        assert got == want, tf
        assert len(got) == 3 * DAY_MS // TF_MS[tf]
        lacking = {t for t, c in got.items() if c.m1_count != M1_PER_BUCKET[tf]}
        assert lacking == {lost - lost % TF_MS[tf]}, f"{tf}: only the bucket of the unfillable minute lacks one"
        # Announced, the last announcement of each bar being what PostgreSQL holds.
        events = await redis.xrange(core_io.candle_stream(tf))
        last_told = {int(f["open_time"]): f for _, f in events if f["symbol"] == SYMBOL}
        assert set(last_told) == set(got), tf
        assert all(float(last_told[t]["close"]) == float(c.close) for t, c in got.items())
        cached = (await store.read_last_many([(SYMBOL, tf)], 250))[(SYMBOL, tf)]
        assert cached == [c.to_bar() for c in sorted(got.values(), key=lambda c: c.open_time)][-250:], tf
    for tf in HIGHER:
        told = [int(f["open_time"]) for _, f in await redis.xrange(core_io.candle_stream(tf))]
        assert told.count(fixed - fixed % TF_MS[tf]) == 2, f"{tf}: the corrected bar was announced again"
        assert told.count(late - late % TF_MS[tf]) == 1, f"{tf}: the held-back bar waited for its minute"
    assert max(len(parts) for parts in intake.recent.parts.values()) <= 12, "memory: two higher buckets' parts"
