"""The indicator worker on real servers: every stored value equals TA-Lib over the whole
stored series, through a crash and restart and a late correction."""

from __future__ import annotations

import asyncio
import contextlib
from itertools import islice

import pytest

import core_io
from candles import TF_MS, Candle, datetime_to_ms, ms_to_datetime
from feed_and_aggregate import CandleIntake
from indicators_main import IndicatorOptions, IndicatorWorker
from infra import load_settings, system_event_log
from market_data import read_archive
from tests.indicator_reference import COMMON_CASES, assert_values_match_talib, close_enough, configure, stored_series

SYMBOL = "LINKUSDT"
TFS = ("m1", "m5", "m15")


class Running:
    """A worker's tasks, as the daemon runs them."""

    def __init__(self, pool, redis, persist: bool = True, **options) -> None:
        settings = load_settings()
        self.worker = IndicatorWorker(settings, pool, redis, IndicatorOptions(block_ms=50, **options))
        tasks = (self.worker.run, self.worker.run_persister) if persist else (self.worker.run,)
        self.tasks = [asyncio.create_task(fn()) for fn in tasks]

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
        await crash(self.worker, self.tasks)


async def crash(worker: IndicatorWorker, tasks: list[asyncio.Task]) -> None:
    """Gone without a flush: values not yet in PostgreSQL are lost."""
    worker.pending.clear()
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    worker.close()


async def worker_after_history(pool, redis, minutes: int) -> tuple[list[Candle], CandleIntake, Running]:
    """`minutes` real M1 candles; the first 1,500 stored before a worker starts and settles."""
    await configure(pool, COMMON_CASES)
    await core_io.enable_symbols(pool, [SYMBOL])
    m1 = list(islice(read_archive(SYMBOL), minutes))
    intake = CandleIntake(pool, redis, core_io.make_candle_store(redis, True, 250), stream_maxlen=100_000)
    await store_in_chunks(intake, m1[:1500], 500)
    running = Running(pool, redis)
    await running.settle(redis)
    return m1, intake, running


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


@pytest.mark.timeout(180)
async def test_a_backfill_the_previous_run_never_folded_in_is_computed_after_a_restart(pool, redis):
    """Bars that came in (stored and announced) after the values around them were
    computed, with the worker gone before it folded them in: the next run finds the bars
    without values and writes every value from the first of them again."""
    m1, intake, running = await worker_after_history(pool, redis, 1600)
    hole = m1[1520:1527]  # a gap: the feed backfills it later
    await store_in_chunks(intake, [*m1[1500:1520], *m1[1527:1600]], 10)
    await running.settle(redis)  # the values after the gap are computed without it, and persisted
    await running.crash()
    await intake.store_m1(hole)  # the backfill, stored and announced while no worker runs
    running = Running(pool, redis)
    await running.settle(redis)
    await running.crash()
    assert await assert_values_match_talib(pool, [SYMBOL]) > 4_000
    for tf in TFS:  # and every bar, the backfilled ones too, has its values
        have = await pool.fetchval(
            "SELECT count(DISTINCT open_time) FROM indicator_values_v4 v JOIN indicator_instances_v4 i "
            "ON i.id = v.instance_id WHERE i.timeframe = $1 AND i.indicator = 'ema' AND v.open_time >= $2",
            tf,
            ms_to_datetime(m1[1500].open_time),
        )
        assert have >= 100 // (TF_MS[tf] // 60_000), (tf, have)


@pytest.mark.timeout(180)
async def test_a_backfill_stored_while_the_restarted_worker_opens_its_series_is_written(pool, redis, monkeypatch):
    """The same backfill, landing while the next run opens its series: after it looked
    for bars without values and before it fetched the history. The history holds the
    bars, so their events find them held; the values after them must still be written
    again from the first of them (seen in a replay with a kill: stale values stayed)."""
    m1, intake, running = await worker_after_history(pool, redis, 1600)
    hole = m1[1520:1527]
    await store_in_chunks(intake, [*m1[1500:1520], *m1[1527:1600]], 10)
    await running.settle(redis)
    await running.crash()
    looked = core_io.first_value_holes
    landed: list[bool] = []

    async def backfill_lands_after_the_look(*args, **kwargs):
        found = await looked(*args, **kwargs)
        if not landed:
            landed.append(True)
            await intake.store_m1(hole)
        return found

    monkeypatch.setattr(core_io, "first_value_holes", backfill_lands_after_the_look)
    running = Running(pool, redis)
    await running.settle(redis)
    await running.crash()
    assert landed
    assert await assert_values_match_talib(pool, [SYMBOL]) > 4_000


@pytest.mark.timeout(180)
async def test_history_stored_by_a_run_that_died_before_announcing_it_is_folded_in(pool, redis):
    """Values computed on a series with no history (the first live minutes came before
    the warm-up history), then the history stored by a run that died before announcing
    it (or whose announcement a Redis failover lost): no event ever says it came. The
    next run opens the series with the history, finds the stored values differ from the
    ones it gives, and writes them again (seen in the scale-out run: stale OBV, VWAP and
    PSAR after a `kill -9`)."""
    await configure(pool, COMMON_CASES)
    await core_io.enable_symbols(pool, [SYMBOL])
    m1 = list(islice(read_archive(SYMBOL), 1600))
    intake = CandleIntake(pool, redis, core_io.make_candle_store(redis, True, 250), stream_maxlen=100_000)
    running = Running(pool, redis)
    await store_in_chunks(intake, m1[1500:1520], 1)  # live minutes, no history yet
    await running.settle(redis)
    await running.crash()

    async def dies_before_announcing(*_args, **_kwargs) -> None:
        return None

    silent = CandleIntake(pool, redis, core_io.make_candle_store(redis, True, 250), stream_maxlen=100_000)
    silent._cache_and_announce = dies_before_announcing  # type: ignore[method-assign]
    await store_in_chunks(silent, m1[:1500], 500)  # the history: stored, never announced
    running = Running(pool, redis)
    await running.settle(redis)
    await store_in_chunks(intake, m1[1520:1600], 10)
    await running.settle(redis)
    await running.crash()
    assert running.worker.stats["stale_rewritten"] == len(TFS)
    assert await assert_values_match_talib(pool, [SYMBOL]) > 1_000
    assert await system_log(pool, "differ from the ones their stored history gives")


def changed(candle: Candle) -> Candle:
    """The bar as a late correction has it."""
    return Candle(
        candle.symbol,
        "m1",
        candle.open_time,
        candle.open,
        candle.high * 2,
        candle.low,
        candle.close * 2,
        candle.volume * 3,
    )


@pytest.mark.timeout(180)
async def test_a_correction_computed_but_not_yet_written_when_the_worker_died_is_written_after_the_restart(pool, redis):
    """A late correction (the M1 and the rebuilt M5 and M15) whose values were computed
    but not yet written when the worker died, and one that came in while no worker ran:
    PostgreSQL holds the changed bars and the values of the old ones. The events stay
    unacknowledged until the values are written, and the next run writes the series
    again from the oldest of them."""
    m1, intake, running = await worker_after_history(pool, redis, 1600)
    await store_in_chunks(intake, m1[1500:1560], 10)
    await running.settle(redis)
    await running.crash()
    running = Running(pool, redis, persist=False)  # computes, never writes
    await wait_for(lambda: asyncio.sleep(0, running.worker.ready.is_set()))
    await intake.store_m1([changed(m1[1550])])
    await wait_for(lambda: asyncio.sleep(0, running.worker.pending.held() >= 3))
    assert running.worker.stats["corrections"] >= 3
    unacknowledged = 0
    for stream in core_io.CANDLE_STREAMS.values():
        unacknowledged += sum(group["pending"] for group in await redis.xinfo_groups(stream))
    assert unacknowledged >= 3  # held: their values are not in PostgreSQL
    await running.crash()
    await intake.store_m1([changed(m1[1535])])  # while no worker runs
    running = Running(pool, redis)
    await running.settle(redis)
    await running.crash()
    assert await assert_values_match_talib(pool, [SYMBOL]) > 2_500


@pytest.mark.timeout(120)
async def test_a_bar_stored_behind_the_series_is_written_when_a_later_correction_reopens_it(pool, redis):
    """A minute skipped (not stored when the next one came), then stored, and a later
    correction reopening the series before the skipped minute's own event is read: the
    reopened series holds the minute, so its event changes nothing; the values after
    it must be written again from it by the reopening itself."""
    m1, intake, running = await worker_after_history(pool, redis, 1510)
    await intake.store_m1([m1[1500]])
    await intake.store_m1([m1[1502]])  # 1501 is not stored yet: its values are computed without it
    await intake.store_m1([m1[1503]])
    await running.settle(redis)
    await core_io.upsert_candles(pool, [m1[1501]])  # stored, its event still on its way
    await intake.store_m1([changed(m1[1503])])  # a correction reopens the series from 1503
    await running.settle(redis)
    stream = core_io.CANDLE_STREAMS["m1"]
    await core_io.publish(redis, stream, [core_io.candle_event(m1[1501])], 100_000)  # the late event
    await store_in_chunks(intake, m1[1504:1510], 1)
    await running.settle(redis)
    await running.crash()
    assert await assert_values_match_talib(pool, [SYMBOL]) > 500


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


async def test_old_values_are_dropped_by_whole_pieces_counted_from_the_newest_bar(pool):
    m1 = list(islice(read_archive(SYMBOL), 1))
    await core_io.upsert_candles(pool, m1)
    newest = m1[0].open_time
    day = 86_400_000
    hour = 3_600_000
    keep = 14 * day - 3 * hour  # the cut-off 3 hours into a 6-hour piece
    times = [newest - 20 * day, newest - 15 * day, newest - 14 * day - 1, newest - 14 * day + hour, newest]
    values = [1.0, 2.0, 3.0, 4.0, 5.0]
    await core_io.upsert_indicator_rows(pool, [1] * 5, [SYMBOL] * 5, times, ["EMA_9"] * 5, values)
    dropped = await core_io.prune_indicator_values(pool, keep)
    assert len(dropped) == 3 and all(name.startswith("indicator_values_v4_p") for name in dropped)
    assert await core_io.prune_indicator_values(pool, keep) == []
    left = await pool.fetch("SELECT value FROM indicator_values_v4 ORDER BY open_time")
    # 4.0 is older than the cut-off but in the piece across it: kept whole, no row DELETE
    assert [r["value"] for r in left] == [4.0, 5.0]
