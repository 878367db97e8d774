"""The intake's forming footprints on real servers: each timeframe's document is the
forming bar's, and a refresh cut short by final bars to write finishes on the next tick."""

from __future__ import annotations

from itertools import groupby

import orjson

from binance.rest import RestClient, WeightLimiter
from binance.trades import agg_trades_of
from market_data import recorded_agg_trades
from orderflow.intake import FORMING_EVERY, OrderFlowIntake
from orderflow.output import footprint_document
from orderflow.store import footprint_key

M1 = 60_000


def forming_minute() -> list:
    """A whole recorded BTCUSDT minute's trades: the bar being formed in these tests."""
    trades = agg_trades_of(list(recorded_agg_trades("BTCUSDT")))
    return [list(group) for _, group in groupby(trades, key=lambda t: t.time_ms // M1 * M1)][2]


async def intake_for(pool, redis, symbols: list[str], trades: list) -> OrderFlowIntake:
    now = trades[-1].time_ms
    intake = OrderFlowIntake(pool, redis, RestClient("http://127.0.0.1:9", WeightLimiter(2400, 60)), 1000, lambda: now)
    await intake.follow(symbols)
    for symbol in symbols:
        for trade in trades:
            intake.on_trade(symbol, trade)
    return intake


async def test_each_timeframes_forming_document_is_the_forming_bars(pool, redis):
    trades = forming_minute()
    intake = await intake_for(pool, redis, ["BTCUSDT"], trades)
    both = FORMING_EVERY["m5"] * FORMING_EVERY["m15"]  # a tick where every timeframe is due
    await intake._forming(both)
    tape, chain = intake.tapes["BTCUSDT"], intake.chains["BTCUSDT"]
    bar = tape.bars[tape.newest_minute]
    assert bar.agg_trades == len(trades)
    expected = {"m1": bar, "m5": chain.forming("m5", bar), "m15": chain.forming("m15", bar)}
    for tf, forming in expected.items():
        stored = await redis.get(footprint_key("BTCUSDT", tf, forming=True))
        assert stored == orjson.dumps(footprint_document(forming, None)).decode(), tf
    assert not intake.changed and not any(intake.changed_higher.values())
    await redis.delete(*(footprint_key("BTCUSDT", tf, forming=True) for tf in expected))
    await intake._forming(both)  # nothing traded since: nothing is sent again
    assert not await redis.exists(footprint_key("BTCUSDT", "m1", forming=True))


async def test_a_refresh_yields_to_final_bars_and_finishes_on_the_next_tick(pool, redis):
    symbols = [f"S{i:02d}USDT" for i in range(OrderFlowIntake.FORMING_SLICE + 5)]
    intake = await intake_for(pool, redis, symbols, forming_minute())
    intake.to_publish.append((0, []))  # the writer has bars: the refresh stops after a slice
    await intake._forming(1)
    keys = [footprint_key(s, "m1", forming=True) for s in symbols]
    sent = await redis.exists(*keys)
    assert sent == OrderFlowIntake.FORMING_SLICE and len(intake.changed) == 5
    intake.to_publish.clear()
    await intake._forming(2)
    assert await redis.exists(*keys) == len(symbols) and not intake.changed
