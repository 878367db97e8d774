"""The intake's writer and publisher on real servers: many symbols closing together are
written in chunks, every bar once, each symbol's bars announced in order, the M1 bars of
a boundary before its M5/M15."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import pytest

from binance.protocol import KlineUpdate
from binance.rest import RestClient, WeightLimiter
from candles import Candle
from orderflow import store
from orderflow.fold import AggTrade, units_text
from orderflow.intake import OrderFlowIntake
from orderflow.store import ORDERFLOW_READY_STREAM, bar_of_record, read_bars
from tests.replay import ms_to_datetime

M1 = 60_000
T0 = 1_721_347_200_000  # 2024-07-19 00:00 UTC: an M15 boundary
MINUTES = 5  # T0 .. T0+4: every minute's M1 and, at the last, the M5
PRICE, QTY = 6_394_410_000_000, 1_000_000  # 63944.1, 0.01


def minute_trades(symbol_index: int, minute_index: int) -> list[AggTrade]:
    """A few trades a minute, ids contiguous per symbol; the taker sells every other one."""
    count = 3 + symbol_index % 3
    base = 1_000 * symbol_index + count * minute_index
    at = T0 + minute_index * M1 + 1_000
    return [
        AggTrade(base + k, PRICE + k * 10_000_000, QTY * (k + 1), base + k, base + k, at + k, k % 2 == 0)
        for k in range(count)
    ]


def closing(symbol: str, minute: int, trades: list[AggTrade]) -> KlineUpdate:
    volume = sum(t.qty for t in trades)
    bought = sum(t.qty for t in trades if not t.buyer_maker)
    price, v, b = (Decimal(units_text(x)) for x in (PRICE, volume, bought))
    candle = Candle(symbol, "m1", minute, price, price, price, price, v, v * price, len(trades), b, b * price)
    return KlineUpdate(minute + M1, symbol, minute, True, candle, trades[0].first_trade_id, trades[-1].last_trade_id)


async def test_symbols_closing_together_are_written_in_chunks_and_announced_in_order(pool, redis):
    symbols = [f"S{i:02d}USDT" for i in range(7)]
    now = T0 + MINUTES * M1 + 500
    rest = RestClient("http://127.0.0.1:9", WeightLimiter(2400, 60))  # never asked
    intake = OrderFlowIntake(pool, redis, rest, 10_000, lambda: now)
    intake.WRITE_CHUNK = 3  # 7 symbols: three statements a minute
    await intake.follow(symbols)
    intake.refetch.clear()  # nothing before T0 is wanted here
    for minute_index in range(MINUTES):
        minute = T0 + minute_index * M1
        for i, symbol in enumerate(symbols):
            trades = minute_trades(i, minute_index)
            for trade in trades:
                intake.on_trade(symbol, trade)
            intake.on_close(closing(symbol, minute, trades))
    assert len(intake.finals) == len(symbols) * MINUTES
    workers = [asyncio.create_task(intake.run_writer()), asyncio.create_task(intake.run_publisher())]
    intake.write_wake.set()
    try:
        expected = len(symbols) * (MINUTES + 1)  # every M1, and one M5 each
        async with asyncio.timeout(30):
            while intake.stats["written"] < expected:
                await asyncio.sleep(0.05)
    finally:
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
    entries = [fields for _, fields in await redis.xrange(ORDERFLOW_READY_STREAM)]
    assert len(entries) == expected  # each bar announced once
    for i, symbol in enumerate(symbols):
        mine = [(e["tf"], int(e["open_time"])) for e in entries if e["symbol"] == symbol]
        assert mine == [("m1", T0 + m * M1) for m in range(MINUTES)] + [("m5", T0)]
        stored = await read_bars(pool, symbol, "m1", ms_to_datetime(T0), ms_to_datetime(T0 + MINUTES * M1))
        assert [r["agg_trades"] for r in stored] == [len(minute_trades(i, m)) for m in range(MINUTES)]
        m5 = await read_bars(pool, symbol, "m5", ms_to_datetime(T0), ms_to_datetime(T0 + M1))
        assert m5[0]["trades"] == sum(r["trades"] for r in stored)
    # every M1 of the boundary minute is announced before any M5
    first_m5 = next(n for n, e in enumerate(entries) if e["tf"] == "m5")
    last_m1 = max(n for n, e in enumerate(entries) if e["tf"] == "m1")
    assert last_m1 < first_m5


@pytest.mark.parametrize("lost_trades", [True, False])
async def test_minutes_lost_whole_with_a_connection_are_refetched_once_stale(pool, redis, lost_trades):
    """A connection lost across minutes 2-5: their trades (an id jump, or none: a quiet
    symbol) and closes never come. The chain waits at minute 2; once it is stale every
    minute up to the first one known is asked for, not only the one the jump lands in."""
    symbol, now = "S00USDT", T0 + 7 * M1
    rest = RestClient("http://127.0.0.1:9", WeightLimiter(2400, 60))  # never asked
    intake = OrderFlowIntake(pool, redis, rest, 10_000, lambda: now)
    await intake.follow([symbol])
    intake.refetch.clear()
    for minute_index in (0, 1, 6):
        trades = minute_trades(0, minute_index)
        if minute_index == 6 and not lost_trades:  # the ids go on: nothing traded in between
            shift = 12  # minutes 2-5 would have held 3 trades each
            trades = [
                t._replace(agg_id=t.agg_id - shift, first_trade_id=t.first_trade_id - shift,
                           last_trade_id=t.last_trade_id - shift)
                for t in trades
            ]  # fmt: skip
        if minute_index == 6:
            intake.resume([symbol])  # the new connection
        for trade in trades:
            intake.on_trade(symbol, trade)
        intake.on_close(closing(symbol, T0 + minute_index * M1, trades))
    intake._chain_finals(100)
    tape = intake.tapes[symbol]
    assert intake.chains[symbol].next_minute == T0 + 2 * M1
    intake._ask_unseen(symbol, tape, T0 + 2 * M1)  # not stale yet
    assert {m for _, m in intake.refetch} <= {T0 + 6 * M1}
    intake._ask_unseen(symbol, tape, now)
    assert {m for _, m in intake.refetch} >= {T0 + m * M1 for m in range(2, 6)}
    assert T0 + 7 * M1 not in {m for _, m in intake.refetch}


async def test_a_gap_another_process_logged_after_the_take_over_is_settled_by_the_owner(pool, redis):
    """The owner that lost a symbol (or one killed with the row on its way) logs a gap
    after the new owner has read the open ones: the sweep finds it. Its minute is behind
    the chain (published here): marked filled with no request; another symbol's stays."""
    symbol, now = "S00USDT", T0 + 4 * M1
    rest = RestClient("http://127.0.0.1:9", WeightLimiter(2400, 60))  # never asked
    intake = OrderFlowIntake(pool, redis, rest, 10_000, lambda: now)
    intake.GAP_SWEEP_S = 0.05
    await intake.follow([symbol])
    intake.refetch.clear()
    for minute_index in range(3):
        trades = minute_trades(0, minute_index)
        for trade in trades:
            intake.on_trade(symbol, trade)
        intake.on_close(closing(symbol, T0 + minute_index * M1, trades))
    intake._chain_finals(100)
    assert intake.chains[symbol].next_minute == T0 + 3 * M1
    await store.log_gaps(pool, [(symbol, T0 + M1, "the loser's"), ("S99USDT", T0 + M1, "not followed here")])
    workers = [asyncio.create_task(intake.run_gap_sweep()), asyncio.create_task(intake.run_refetcher())]
    status = "SELECT symbol, status FROM trade_gaps_v4 ORDER BY symbol"
    try:
        async with asyncio.timeout(10):
            while [tuple(r) for r in await pool.fetch(status)] != [(symbol, "filled"), ("S99USDT", "open")]:
                await asyncio.sleep(0.05)
    finally:
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
    assert not intake.refetch


async def test_buckets_the_previous_owner_left_out_are_written_by_the_next_with_their_cvd(pool, redis):
    """The previous owner wrote the M1 bars of two boundaries (its writer sends them
    first) and lost the symbol before their M5 and M15: the next owner, following it,
    writes those buckets, each with the CVD the unbroken chain gives, before any newer."""
    symbol, minutes = "S00USDT", 15
    rest = RestClient("http://127.0.0.1:9", WeightLimiter(2400, 60))  # never asked
    loser = OrderFlowIntake(pool, redis, rest, 10_000, lambda: T0 + minutes * M1)
    await loser.follow([symbol])
    loser.refetch.clear()
    for minute_index in range(minutes):
        trades = minute_trades(0, minute_index)
        for trade in trades:
            loser.on_trade(symbol, trade)
        loser.on_close(closing(symbol, T0 + minute_index * M1, trades))
    loser._chain_finals(1_000)
    published = {(b.tf, b.bar.open_time): b for b in loser.to_write}
    assert sorted(k for k in published if k[0] != "m1") == [
        ("m15", T0),
        ("m5", T0),
        ("m5", T0 + 5 * M1),
        ("m5", T0 + 10 * M1),
    ]
    kept = [b for b in loser.to_write if b.tf == "m1" or (b.tf, b.bar.open_time) == ("m5", T0)]
    await store.upsert_bars(pool, kept)  # M5 10:05 and 10:10 and the M15 left out

    gainer = OrderFlowIntake(pool, redis, rest, 10_000, lambda: T0 + minutes * M1)
    await gainer.follow([symbol])
    while gainer.to_write:
        await gainer._write_chunk()
    for (tf, open_time), bar in published.items():
        row = await pool.fetchrow(
            "SELECT * FROM orderflow4 WHERE symbol = $1 AND tf = $2 AND open_time = $3",
            symbol,
            tf,
            ms_to_datetime(open_time),
        )
        assert bar_of_record(row) == bar.bar, (tf, open_time)
        assert (row["cvd"], row["cvd_day"]) == (bar.cvd, bar.cvd_day), (tf, open_time)
    assert gainer.stats["buckets_left_out"] == 3
