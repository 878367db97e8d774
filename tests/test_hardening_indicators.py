"""Hardening of the indicator worker (issue 13): one bad instance, however bad, never
stops the others; no structure grows with the backlog. Each test failed before."""

from __future__ import annotations

import asyncio
from itertools import islice

import numpy as np
import pandas as pd
import pandas_ta
import pytest
from test_indicators_worker import SYMBOL, Running, store_in_chunks, wait_for

import core_io
import status_report
from candles import datetime_to_ms
from feed_and_aggregate import CandleIntake
from indicators import hashes, registry
from indicators.kernels import SourceKernel
from market_data import read_archive
from tests.indicator_reference import assert_values_match_talib, stored_series

M1 = list(islice(read_archive(SYMBOL), 600))


async def add_instance(pool, indicator: str, params: dict[str, str], tf: str = "m1") -> int:
    instance_id = await pool.fetchval(
        "INSERT INTO indicator_instances_v4 (indicator, timeframe) VALUES ($1, $2) RETURNING id", indicator, tf
    )
    for name, value in params.items():
        await pool.execute("INSERT INTO indicator_parameters_v4 VALUES ($1, $2, $3)", instance_id, name, value)
    return instance_id


class FailingKernel(SourceKernel):
    """An implementation that raises on its third step (what a TA-Lib error or a bug of
    ours would do once running), registered as the indicator `failing_ema`."""

    steps = 0

    def step(self, bar):
        FailingKernel.steps += 1
        if FailingKernel.steps == 3:
            raise RuntimeError("stream handle broke")
        return super().step(bar)


@pytest.fixture
def failing_indicator():
    registry.COMMON["failing_ema"] = registry.IndicatorSpec(
        {"length": registry.length(10)},
        registry._one("FAILEMA_{length}"),
        lambda n, p: FailingKernel(n[0], "EMA", "close", timeperiod=p["length"]),
        lambda p, _tf: 50,
    )
    FailingKernel.steps = 0
    yield "failing_ema"
    del registry.COMMON["failing_ema"]


@pytest.mark.timeout(180)
async def test_absurd_parameters_and_a_failing_kernel_never_stop_the_other_instances(pool, redis, failing_indicator):
    await pool.execute("DELETE FROM indicator_instances_v4")
    good = [await add_instance(pool, "ema", {"length": "9"}), await add_instance(pool, "rsi", {"length": "14"})]
    bad = {
        await add_instance(pool, "ema", {"length": "1000000"}): "must be at most 10000",
        await add_instance(pool, "rsi", {"length": "1e300"}): "must be at most 10000",
        await add_instance(pool, "bbands", {"lower_std": "1e300"}): "must be at most 1e+06",
        await add_instance(pool, "hma", {"length": "1e300"}): "beyond 1e+06",
        await add_instance(pool, "ema", {"length": "9"}, "m5"): None,  # runs
        await add_instance(pool, "ema", {"length": "9"}, "h1"): "timeframe h1 is not built here",  # TIMEFRAMES
        await add_instance(pool, failing_indicator, {"length": "5"}): "failed while computing",
    }
    await core_io.enable_symbols(pool, [SYMBOL])
    intake = CandleIntake(pool, redis, core_io.make_candle_store(redis, True, 250), stream_maxlen=100_000)
    await store_in_chunks(intake, M1[:300], 100)
    running = Running(pool, redis, reload_s=0.2)
    try:
        await running.settle(redis)
        await store_in_chunks(intake, M1[300:330], 1)  # the failing kernel raises on one of these
        await running.settle(redis)
        errors = dict(await pool.fetch("SELECT id, error FROM indicator_instances_v4 WHERE error IS NOT NULL"))
        assert {i for i, why in bad.items() if why} == set(errors)
        for instance_id, why in bad.items():
            if why:
                assert why in errors[instance_id], errors[instance_id]
        assert all(running.worker.layouts["m1"].names)
        latest = await redis.hgetall(core_io.indicator_key(SYMBOL, "m1"))
        assert int(latest["open_time"]) == M1[329].open_time and latest["EMA_9"] and latest["RSI_14"]
        assert "FAILEMA_5" not in latest or int(latest["open_time"]) > M1[302].open_time
        report = await status_report.collect_status(pool, redis)
        assert {i["id"] for i in report["skipped_instances"]} == set(errors)
        assert any("indicator instance(s) skipped" in w for w in report["warnings"])
        await pool.execute("DELETE FROM indicator_instances_v4 WHERE NOT (id = ANY($1))", good)
        assert await assert_values_match_talib(pool, [SYMBOL]) == 2 * 31  # EMA and RSI on the newest bar and 30 more
    finally:
        await running.crash()


async def test_a_hash_takes_more_outputs_than_lua_can_unpack(redis):
    cache = hashes.IndicatorCache(redis)
    names = [f"EMA_{n}" for n in range(1, 5001)]
    await cache.write([("BTCUSDT", "m1", 60_000, [(name, float(i)) for i, name in enumerate(names)])])
    stored = await redis.hgetall(core_io.indicator_key("BTCUSDT", "m1"))
    assert len(stored) == 5001 and stored["EMA_5000"] == "4999.0" and stored["open_time"] == "60000"
    await cache.write([("BTCUSDT", "m1", 0, [("EMA_1", 7.0)])])  # older: refused as before
    assert (await redis.hget(core_io.indicator_key("BTCUSDT", "m1"), "EMA_1")) == "0.0"


@pytest.mark.timeout(240)
async def test_a_pandas_ta_backlog_is_one_range_per_series_and_every_bar_gets_its_value(pool, redis):
    await pool.execute("DELETE FROM indicator_instances_v4")
    hma = await add_instance(pool, "hma", {"length": "10"})
    await core_io.enable_symbols(pool, [SYMBOL])
    intake = CandleIntake(pool, redis, core_io.make_candle_store(redis, True, 250), stream_maxlen=100_000)
    await store_in_chunks(intake, M1[:200], 100)
    running = Running(pool, redis, slow_window=60)
    worker = running.worker
    seen_due: list[int] = []
    handle = worker.handle

    async def watched(entries):
        await handle(entries)
        seen_due.append(len(worker.slow_due))

    worker.handle = watched
    try:
        await running.settle(redis)
        await store_in_chunks(intake, M1[200:600], 400)  # a backfill: 400 bars in one batch
        await running.settle(redis)
        assert seen_due and max(seen_due) <= 1  # one range for the one M1 series, not one job per bar
        running.tasks.append(asyncio.create_task(worker.run_slow()))

        async def all_values() -> bool:
            count = await pool.fetchval(
                "SELECT count(DISTINCT open_time) FROM indicator_values_v4 WHERE instance_id = $1", hma
            )
            return count >= 401 and not worker.pending and not worker.slow_due

        await wait_for(all_values, 120)
        bars = await stored_series(pool, "m1")
        closes = pd.Series(bars.close)
        rows = await pool.fetch("SELECT open_time, value FROM indicator_values_v4 WHERE instance_id = $1", hma)
        for t, value in rows[::25]:
            end = int(np.searchsorted(bars.open_time, datetime_to_ms(t))) + 1
            window = closes.iloc[max(0, end - 60) : end].reset_index(drop=True)
            assert value == pandas_ta.hma(window, length=10).iloc[-1]
    finally:
        await running.crash()


async def test_the_series_of_a_disabled_ticker_are_dropped(pool, redis):
    await pool.execute("DELETE FROM indicator_instances_v4")
    await add_instance(pool, "ema", {"length": "9"})
    other = "NEARUSDT"
    await core_io.enable_symbols(pool, [SYMBOL, other])
    intake = CandleIntake(pool, redis, core_io.make_candle_store(redis, True, 250), stream_maxlen=100_000)
    await store_in_chunks(intake, [*M1[:50], *islice(read_archive(other), 50)], 100)
    running = Running(pool, redis, reload_s=0.2)
    try:
        await running.settle(redis)
        assert (other, "m1") in running.worker.series
        await pool.execute("UPDATE tickers SET status = 'disabled' WHERE symbol = $1", other)

        async def dropped() -> bool:
            return not any(symbol == other for symbol, _ in running.worker.series)

        await wait_for(dropped, 10)
        assert (SYMBOL, "m1") in running.worker.series
    finally:
        await running.crash()


def test_parameters_are_bounded_and_donchian_of_one_bar_goes_to_pandas_ta():
    for params in ({"length": "10001"}, {"length": "1e300"}, {"length": "inf"}, {"length": "-5"}):
        with pytest.raises(registry.IndicatorConfigError):
            registry.parse_common(1, "ema", "m1", 1, params)
    assert registry.parse_common(1, "ema", "m1", 1, {"length": "10000"}).names == ("EMA_10000",)
    assert registry.parse_common(1, "donchian", "m1", 1, {"lower_length": "1", "upper_length": "2"}) is None
