"""The indicator worker on real servers: every stored value equals TA-Lib over the whole
stored series, through a crash and restart and a late correction."""

from __future__ import annotations

import asyncio
import contextlib
from itertools import islice

import pytest

import core_io
from candles import TF_MS, Candle, datetime_to_ms
from feed_and_aggregate import CandleIntake
from indicators_main import IndicatorOptions, IndicatorWorker
from infra import load_settings, system_event_log
from market_data import read_archive
from tests.indicator_reference import COMMON_CASES, assert_values_match_talib, close_enough, configure, stored_series

SYMBOL = "LINKUSDT"
TFS = ("m1", "m5", "m15")


class Running:
    """A worker's tasks, as the daemon runs them."""

    def __init__(self, pool, redis, **options) -> None:
        settings = load_settings()
        self.worker = IndicatorWorker(settings, pool, redis, IndicatorOptions(block_ms=50, **options))
        self.tasks = [asyncio.create_task(fn()) for fn in (self.worker.run, self.worker.run_persister)]

    async def settle(self, redis, timeout: float = 60.0) -> None:
        """Until every candle event is acknowledged and every value persisted."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            for task in self.tasks:
                if task.done():
                    task.result()
            busy = bool(self.worker.pending) or not self.worker.ready.is_set()
            for stream in core_io.CANDLE_STREAMS.values():
                for group in await redis.xinfo_groups(stream):
                    busy |= bool(group["pending"]) or bool(group.get("lag"))
            if not busy:
                return
            assert asyncio.get_running_loop().time() < deadline, "worker did not settle"
            await asyncio.sleep(0.05)

    async def crash(self) -> None:
        """Gone without a flush: values not yet in PostgreSQL are lost."""
        self.worker.pending.clear()
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.worker.close()


async def store_in_chunks(intake: CandleIntake, candles: list[Candle], size: int) -> None:
    for start in range(0, len(candles), size):
        await intake.store_m1(candles[start : start + size])


@pytest.mark.timeout(300)
async def test_values_equal_talib_across_a_crash_a_restart_and_a_late_correction(pool, redis):
    await configure(pool, COMMON_CASES)
    await core_io.enable_symbols(pool, [SYMBOL])
    m1 = list(islice(read_archive(SYMBOL), 4200))
    store = core_io.make_candle_store(redis, True, 250)
    intake = CandleIntake(pool, redis, store, stream_maxlen=100_000)

    await store_in_chunks(intake, m1[:1500], 500)  # history before the worker ever ran
    running = Running(pool, redis)
    await running.settle(redis)
    await store_in_chunks(intake, m1[1500:2400], 30)
    await running.settle(redis)
    await store_in_chunks(intake, m1[2400:2460], 1)
    await running.crash()

    await store_in_chunks(intake, m1[2460:3000], 60)  # while it is down
    running = Running(pool, redis)
    await running.settle(redis)
    late = m1[2990]
    corrected = Candle(
        late.symbol, "m1", late.open_time, late.open, late.high * 2, late.low, late.close * 2, late.volume * 3
    )
    await intake.store_m1([corrected])  # a late correction of a bar 10 minutes back
    await store_in_chunks(intake, m1[3000:4200], 120)
    await running.settle(redis)
    assert running.worker.stats["corrections"] >= 3  # the M1 and the rebuilt M5 and M15
    # A re-announcement of bars already processed (as the feed's boot reconciliation
    # makes after a Redis wipe) is recognised: no recomputation, no new values.
    corrections, opened = running.worker.stats["corrections"], running.worker.stats["opened"]
    repeated = await core_io.fetch_candles(pool, SYMBOL, "m1", m1[4100].open_time, m1[-1].open_time)
    await core_io.publish(redis, core_io.CANDLE_STREAMS["m1"], [core_io.candle_event(c) for c in repeated], 100_000)
    await running.settle(redis)
    assert (running.worker.stats["corrections"], running.worker.stats["opened"]) == (corrections, opened)
    await running.crash()

    checked = await assert_values_match_talib(pool, [SYMBOL])
    assert checked > 100_000
    # The bars announced after the first start all have values, on every timeframe.
    for tf in TFS:
        count = await pool.fetchval(
            "SELECT count(DISTINCT open_time) FROM indicator_values_v4 v JOIN indicator_instances_v4 i "
            "ON i.id = v.instance_id WHERE i.timeframe = $1 AND i.indicator = 'ema'",
            tf,
        )
        bars = (4200 - 1500) // (TF_MS[tf] // 60_000)
        assert count >= bars, (tf, count, bars)
    latest = await redis.hgetall(core_io.indicator_key(SYMBOL, "m1"))
    assert int(latest["open_time"]) == m1[-1].open_time


async def wait_for(predicate, timeout: float = 60.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.05)


async def system_log(pool, text: str) -> list[str]:
    await system_event_log.flush(pool)
    rows = await pool.fetch("SELECT message FROM system_log_v4 WHERE message LIKE $1", f"%{text}%")
    return [r["message"] for r in rows]


@pytest.mark.timeout(180)
async def test_bad_config_is_skipped_pandas_ta_runs_aside_and_new_instances_join_while_running(pool, redis):
    import pandas as pd
    import pandas_ta
    import talib

    await pool.execute("DELETE FROM indicator_instances_v4")
    ids = {}
    for key, indicator, params in (
        ("ema", "ema", {"length": "9"}),
        ("unknown", "nope", {}),
        ("bad_param", "rsi", {"length": "abc"}),
        ("misspelt", "hma", {"lenght": "20"}),
        ("hma", "hma", {"length": "20"}),
    ):
        ids[key] = await pool.fetchval(
            "INSERT INTO indicator_instances_v4 (indicator, timeframe) VALUES ($1, 'm1') RETURNING id", indicator
        )
        for name, value in params.items():
            await pool.execute("INSERT INTO indicator_parameters_v4 VALUES ($1, $2, $3)", ids[key], name, value)
    await core_io.enable_symbols(pool, [SYMBOL])
    m1 = list(islice(read_archive(SYMBOL), 420))
    intake = CandleIntake(pool, redis, core_io.make_candle_store(redis, True, 250), stream_maxlen=100_000)
    await store_in_chunks(intake, m1[:400], 100)
    running = Running(pool, redis, reload_s=0.2)
    running.tasks.append(asyncio.create_task(running.worker.run_slow()))
    try:
        await running.settle(redis)
        await store_in_chunks(intake, m1[400:405], 1)
        await redis.xadd(core_io.CANDLE_STREAMS["m1"], {"symbol": SYMBOL, "tf": "m1", "open_time": "1", "close": "x"})

        async def hma_done() -> bool:
            count = await pool.fetchval("SELECT count(*) FROM indicator_values_v4 WHERE instance_id = $1", ids["hma"])
            return count >= 6 and not running.worker.pending

        await wait_for(hma_done)
        await running.settle(redis)
        for key in ("unknown", "bad_param", "misspelt"):
            assert len(await system_log(pool, f"indicator instance {ids[key]} ")) == 1, key
        assert len(await system_log(pool, "malformed candle event")) == 1

        bars = await stored_series(pool, "m1")
        closes = pd.Series(bars.close)
        for t, value in await pool.fetch(
            "SELECT open_time, value FROM indicator_values_v4 WHERE instance_id = $1", ids["hma"]
        ):
            end = list(bars.open_time).index(datetime_to_ms(t)) + 1
            window = closes.iloc[max(0, end - 250) : end].reset_index(drop=True)
            assert len(window) == 250
            assert value == pandas_ta.hma(window, length=20).iloc[-1]

        # A new instance, added while running: warmed from history, values from the next bar on.
        new_id = await pool.fetchval(
            "INSERT INTO indicator_instances_v4 (indicator, timeframe) VALUES ('sma', 'm1') RETURNING id"
        )
        await pool.execute("INSERT INTO indicator_parameters_v4 VALUES ($1, 'length', '10')", new_id)

        async def reloaded() -> bool:
            return any(i.id == new_id for i in running.worker.layouts["m1"].instances)

        await wait_for(reloaded)
        await store_in_chunks(intake, m1[405:408], 1)
        await running.settle(redis)
        bars = await stored_series(pool, "m1")
        reference = talib.SMA(bars.close, 10)
        stored = await pool.fetch(
            "SELECT open_time, value FROM indicator_values_v4 WHERE instance_id = $1 ORDER BY open_time", new_id
        )
        assert [datetime_to_ms(r["open_time"]) for r in stored] == [c.open_time for c in m1[405:408]]
        for r in stored:
            assert close_enough(r["value"], reference[list(bars.open_time).index(datetime_to_ms(r["open_time"]))])
        latest = await redis.hgetall(core_io.indicator_key(SYMBOL, "m1"))
        assert latest["SMA_10"] and latest["EMA_9"] and int(latest["open_time"]) == m1[407].open_time
        assert len(await system_log(pool, f"indicator instance {ids['unknown']} ")) == 1  # not repeated on reload
    finally:
        await running.crash()


async def test_old_values_are_pruned_in_batches_counted_from_the_newest_bar(pool):
    m1 = list(islice(read_archive(SYMBOL), 1))
    await core_io.upsert_candles(pool, m1)
    newest = m1[0].open_time
    day = 86_400_000
    times = [newest - 20 * day, newest - 15 * day, newest - 13 * day, newest]
    await core_io.upsert_indicator_rows(pool, [1] * 4, [SYMBOL] * 4, times, ["EMA_9"] * 4, [1.0, 2.0, 3.0, 4.0])
    assert await core_io.prune_indicator_values(pool, 14 * day, batch=1) == 1
    assert await core_io.prune_indicator_values(pool, 14 * day, batch=10) == 1
    assert await core_io.prune_indicator_values(pool, 14 * day, batch=10) == 0
    left = await pool.fetch("SELECT value FROM indicator_values_v4 ORDER BY open_time")
    assert [r["value"] for r in left] == [3.0, 4.0]
