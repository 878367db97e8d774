"""Order flow in PostgreSQL and Redis (real servers): the views give back exactly what the
fold computed, writes are idempotent, the Redis keys and the announcement."""

from __future__ import annotations

import json
from decimal import Decimal
from itertools import groupby

import pytest

from binance.trades import agg_trades_of
from candle_stores import execute_checked
from candles import datetime_to_ms, ms_to_datetime
from market_data import recorded_agg_trades
from orderflow import store
from orderflow.fold import BarFlow, fold, to_units, units_decimal
from orderflow.output import CvdChain, FinalBar
from orderflow.profile import ImbalanceRules
from orderflow.render import FootprintRenderer

M1 = 60_000
RULES = ImbalanceRules()


def recorded_minutes(symbol: str = "BTCUSDT", row: str = "1") -> list[BarFlow]:
    trades = agg_trades_of(list(recorded_agg_trades(symbol)))
    return [
        fold(minute, to_units(row), list(group))
        for minute, group in groupby(trades, key=lambda t: t.time_ms // M1 * M1)
    ][1:-1]


def finals(bars: list[BarFlow], symbol: str = "BTCUSDT", tf: str = "m1") -> list[FinalBar]:
    chain = CvdChain()
    return [FinalBar.of(symbol, tf, bar, chain, RULES) for bar in bars]


async def test_the_views_give_back_exactly_what_was_folded(pool):
    bars = finals(recorded_minutes())
    await store.upsert_bars(pool, bars)
    rows = await store.read_bars(pool, "BTCUSDT", "m1", ms_to_datetime(0), ms_to_datetime(2**42))
    assert len(rows) == len(bars) == 7
    day_start = None
    for row, final in zip(rows, bars):
        bar = final.bar
        assert row["buy_volume"] == units_decimal(bar.buy) and row["sell_volume"] == units_decimal(bar.sell)
        assert row["delta"] == units_decimal(bar.delta)
        assert (row["delta_min"], row["delta_max"]) == (units_decimal(bar.delta_min), units_decimal(bar.delta_max))
        assert (row["trades"], row["agg_trades"]) == (bar.trades, bar.agg_trades)
        assert (row["buy_trades"], row["sell_trades"]) == (bar.buy_trades, bar.sell_trades)
        assert row["vwap"] == bar.vwap() and row["max_trade_qty"] == units_decimal(bar.max_qty)
        assert row["poc"] == units_decimal(final.profile.poc * bar.row_size)
        assert row["val"] <= row["poc"] <= row["vah"]
        # 2024-07-18 23:58 .. 2024-07-19 00:04: cvd_day restarts at midnight, cvd runs on
        if bar.open_time % 86_400_000 == 0:
            day_start = row
            assert row["cvd_day"] == row["delta"]
        assert row["cvd"] == sum(r["delta"] for r in rows[: rows.index(row) + 1])
    assert day_start is not None
    footprint = await pool.fetch(
        "SELECT price, bid_volume, ask_volume, bid_trades, ask_trades FROM footprint_v4 "
        "WHERE symbol = 'BTCUSDT' AND tf = 'm1' AND open_time = $1 ORDER BY price",
        ms_to_datetime(bars[0].bar.open_time),
    )
    want = [
        (units_decimal(i * bars[0].bar.row_size), units_decimal(b), units_decimal(a), bn, an)
        for i, b, a, bn, an in bars[0].bar.footprint()
    ]
    assert [tuple(r) for r in footprint] == want
    assert sum(r["bid_volume"] + r["ask_volume"] for r in footprint) == rows[0]["buy_volume"] + rows[0]["sell_volume"]


async def test_writing_a_bar_again_changes_nothing_and_a_rebuilt_bar_replaces_it(pool):
    bars = finals(recorded_minutes()[:2])
    await store.upsert_bars(pool, bars)
    first = await pool.fetch("SELECT open_time, written_at FROM orderflow4 ORDER BY open_time")
    await store.upsert_bars(pool, bars)
    assert await pool.fetch("SELECT open_time, written_at FROM orderflow4 ORDER BY open_time") == first
    rebuilt = FinalBar("BTCUSDT", "m1", fold(bars[0].bar.open_time, bars[0].bar.row_size, []), 0, 0, None)
    await store.upsert_bars(pool, [rebuilt])
    row = await pool.fetchrow("SELECT * FROM orderflow_v4 WHERE open_time = $1", ms_to_datetime(bars[0].bar.open_time))
    assert row["trades"] == 0 and row["poc"] is None and row["vwap"] is None and row["buy_volume"] == 0
    assert await pool.fetchval("SELECT count(*) FROM footprint_v4 WHERE open_time = $1", row["open_time"]) == 0


async def test_redis_holds_the_newest_bar_and_every_bar_is_announced(redis):
    bars = finals(recorded_minutes())
    await execute_checked(redis, store.publish_commands(bars[:3], maxlen=1000))
    await execute_checked(redis, store.publish_commands([bars[1]], maxlen=1000))  # a rebuild of an older bar
    fields = await redis.hgetall(store.orderflow_key("BTCUSDT", "m1"))
    newest = bars[2]
    assert fields == newest.fields() and int(fields["open_time"]) == newest.bar.open_time
    assert Decimal(fields["buy_volume"]) + Decimal(fields["sell_volume"]) == units_decimal(newest.bar.volume)
    document = json.loads(await redis.get(store.footprint_key("BTCUSDT", "m1")))
    assert document["open_time"] == newest.bar.open_time and document["poc"] == fields["poc"]
    assert sum(Decimal(r["bid_volume"]) + Decimal(r["ask_volume"]) for r in document["rows"]) == units_decimal(
        newest.bar.volume
    )
    entries = await redis.xrange(store.ORDERFLOW_READY_STREAM)
    assert [int(f["open_time"]) for _, f in entries] == [b.bar.open_time for b in (*bars[:3], bars[1])]


async def test_forming_footprints_are_written_in_one_round(redis):
    bar = recorded_minutes()[0]
    renderer = FootprintRenderer()
    await store.set_forming(redis, {("BTCUSDT", tf): renderer.document(("BTCUSDT", tf), bar) for tf in ("m1", "m5")})
    for tf in ("m1", "m5"):
        document = json.loads(await redis.get(store.footprint_key("BTCUSDT", tf, forming=True)))
        assert len(document["rows"]) == len(bar.rows) and "poc" not in document


FOOTPRINT_COLUMNS = ("row_index", "bid_units", "ask_units", "bid_trades", "ask_trades")


async def test_one_statement_keeps_each_bars_footprint_apart_even_an_empty_one(pool):
    minutes = recorded_minutes()[:3]
    quiet = BarFlow(minutes[-1].open_time + M1, minutes[0].row_size)  # a minute without trades
    bars = finals([*minutes[:2], quiet, minutes[2]])
    await store.upsert_bars(pool, bars)
    stored = {
        datetime_to_ms(r["open_time"]): r
        for r in await pool.fetch(
            "SELECT open_time, row_index, bid_units, ask_units, bid_trades, ask_trades FROM orderflow4"
        )
    }
    for final in bars:
        rows = final.bar.footprint()
        record = stored[final.bar.open_time]
        assert [list(record[name]) for name in FOOTPRINT_COLUMNS] == [[r[i] for r in rows] for i in range(5)]
    assert stored[quiet.open_time]["row_index"] == []
    await store.upsert_bars(pool, bars)  # again: nothing changes
    assert await pool.fetchval("SELECT count(DISTINCT written_at) FROM orderflow4") == 1


@pytest.mark.parametrize("column", ["buy_units", "row_size", "agg_trades"])
async def test_postgresql_refuses_an_impossible_bar(pool, column):
    records = [list(bar.record()) for bar in finals(recorded_minutes()[:2])]
    records[1][store.ORDERFLOW_COLUMNS.index(column)] = -1
    with pytest.raises(Exception, match="check constraint"):
        await pool.execute(store._UPSERT_SQL, *store.upsert_params(records))
    assert await pool.fetchval("SELECT count(*) FROM orderflow4") == 0  # one statement: nothing half-written


async def test_a_stored_bar_comes_back_as_the_fold_left_it_and_the_newest_per_series(pool):
    """What a restart merges into M5/M15 from PostgreSQL is the bar itself, to the unit."""
    bars = finals(recorded_minutes("ETHUSDT", "0.5"), symbol="ETHUSDT")
    empty = FinalBar.of("ETHUSDT", "m1", BarFlow(bars[-1].bar.open_time + M1, to_units("0.5")), CvdChain(), RULES)
    await store.upsert_bars(pool, [*bars, empty])
    first, last = bars[0].bar.open_time, empty.bar.open_time
    loaded = (await store.bars_between(pool, [("ETHUSDT", first, last)], ["m1", "m5"]))["ETHUSDT"]
    assert loaded == {("m1", b.bar.open_time): b.bar for b in [*bars, empty]}
    newest = await store.newest_bars(pool, ["ETHUSDT", "NOSUCHUSDT"], ["m1", "m5", "m15"])
    assert set(newest) == {("ETHUSDT", "m1")} and newest[("ETHUSDT", "m1")]["open_time"] == ms_to_datetime(last)


async def test_a_days_row_is_decided_once_and_gaps_keep_their_first_state(pool):
    day = 1_721_347_200_000  # 2024-07-19
    assert await store.decide_row_sizes(pool, day, {"BTCUSDT": (1_000_000_000, "atr")}) == {"BTCUSDT": 1_000_000_000}
    # a second decision (other candles, another process) does not replace the first
    assert await store.decide_row_sizes(pool, day, {"BTCUSDT": (5, "default"), "ETHUSDT": (7, "default")}) == {
        "BTCUSDT": 1_000_000_000,
        "ETHUSDT": 7,
    }
    await store.resolve_gaps(pool, [("BTCUSDT", day)], "filled")  # settled before its log arrived
    await store.log_gaps(pool, [("BTCUSDT", day, "a gap in the aggTrade ids"), ("BTCUSDT", day + M1, "first minute")])
    assert await store.open_gaps(pool, ["BTCUSDT"]) == [("BTCUSDT", day + M1)]
    await store.resolve_gaps(pool, [("BTCUSDT", day + M1)], "unfillable", "older than the 48 hours served")
    rows = await pool.fetch("SELECT status, reason, attempts FROM trade_gaps_v4 ORDER BY open_time")
    assert [tuple(r) for r in rows] == [
        ("filled", "", 1),
        ("unfillable", "older than the 48 hours served", 1),
    ]
