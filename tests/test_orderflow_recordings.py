"""The real 2024-07-19 recordings through the daemon: the fake exchange serves Binance's
own klines and the recorded trades as aggTrades (streams, REST), the daemon follows them
with ORDERFLOW=on; the seven complete minutes' order flow equals `klines_1m.csv`, and
every footprint row, delta extreme and VWAP equals a recomputation from the raw
`@trade` events in decimals, independent of the fold (the running delta's extremes are
taken after each aggTrade, as SPEC section 13 defines them: after each run of one taker
order's fills at one price)."""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Decimal

import pytest
from daemon import DaemonProcess
from replay import daemon_env, until, until_sim

from candles import ms_to_datetime
from fake_exchange import FakeExchange, RecordedTrades, RecordingSource
from market_data import read_recorded_trades

M1 = 60_000
COMPLETE = range(1_721_347_080_000, 1_721_347_500_000, M1)  # 2024-07-18 23:58 .. 2024-07-19 00:04


def from_raw_trades(symbol: str, minute: int, row: Decimal) -> dict:
    """A minute's order flow from the raw trades (MARKET only, as klines count them)."""
    trades = [t for t in read_recorded_trades(symbol) if t["X"] == "MARKET" and minute <= t["T"] < minute + M1]
    trades.sort(key=lambda t: (t["T"], t["t"]))
    buy = sell = notional = Decimal(0)
    low = high = None
    cells: dict[Decimal, list[Decimal]] = {}
    for i, t in enumerate(trades):
        price, qty = Decimal(t["p"]), Decimal(t["q"])
        edge = (price / row).to_integral_value(rounding="ROUND_FLOOR") * row
        cell = cells.setdefault(edge, [Decimal(0), Decimal(0)])
        if t["m"]:
            sell += qty
            cell[0] += qty
        else:
            buy += qty
            cell[1] += qty
        notional += price * qty
        after = trades[i + 1] if i + 1 < len(trades) else None
        if (
            after is not None
            and after["t"] == t["t"] + 1
            and (after["T"], after["p"], after["m"])
            == (
                t["T"],
                t["p"],
                t["m"],
            )
        ):
            continue  # the same taker order goes on: the running delta is taken after each aggTrade
        running = buy - sell
        low = running if low is None else min(low, running)
        high = running if high is None else max(high, running)
    return {
        "buy_volume": buy,
        "sell_volume": sell,
        "trades": len(trades),
        "delta_min": low,
        "delta_max": high,
        "vwap": (notional / (buy + sell)).quantize(Decimal("1e-8"), ROUND_HALF_EVEN),
        "rows": {edge.normalize(): (bid, ask) for edge, (bid, ask) in cells.items()},
    }


@pytest.mark.timeout(240)
async def test_the_recorded_trades_replayed_as_agg_trades_give_binances_klines_and_footprints(pool, redis_url, pg_url):
    source = RecordingSource()
    exchange = FakeExchange(source, start_ms=source.first_open_time, speed=20, trades=RecordedTrades(source))
    await exchange.start()
    daemon = DaemonProcess(daemon_env(exchange, redis_url, pg_url, source.symbols) | {"ORDERFLOW": "on"})
    try:
        daemon.start()
        await until_sim(exchange, COMPLETE[-1] + M1 + 20_000, daemon)

        async def all_written() -> bool:
            count = await pool.fetchval(
                "SELECT count(*) FROM orderflow4 WHERE tf = 'm1' AND open_time = ANY($1::timestamptz[])",
                [ms_to_datetime(t) for t in COMPLETE],
            )
            return count == len(COMPLETE) * len(source.symbols)

        try:
            await until(all_written, 60, "the seven complete minutes' order flow")
        except AssertionError:
            print(daemon.output()[-5000:])
            raise
        for symbol in source.symbols:
            for minute in COMPLETE:
                flow = await pool.fetchrow(
                    "SELECT * FROM orderflow_v4 WHERE symbol = $1 AND tf = 'm1' AND open_time = $2",
                    symbol,
                    ms_to_datetime(minute),
                )
                kline = source.candle(symbol, minute)
                assert flow["buy_volume"] + flow["sell_volume"] == kline.volume, (symbol, minute)
                assert flow["buy_volume"] == kline.taker_buy_volume and flow["trades"] == kline.trades
                raw = from_raw_trades(symbol, minute, flow["row_size"])
                for name in ("buy_volume", "sell_volume", "trades", "delta_min", "delta_max", "vwap"):
                    assert flow[name] == raw[name], (symbol, minute, name)
                rows = await pool.fetch(
                    "SELECT price, bid_volume, ask_volume FROM footprint_v4 "
                    "WHERE symbol = $1 AND tf = 'm1' AND open_time = $2",
                    symbol,
                    ms_to_datetime(minute),
                )
                assert {r["price"].normalize(): (r["bid_volume"], r["ask_volume"]) for r in rows} == raw["rows"]
            five = await pool.fetchrow(
                "SELECT buy_volume + sell_volume AS volume FROM orderflow_v4 "
                "WHERE symbol = $1 AND tf = 'm5' AND open_time = $2",
                symbol,
                ms_to_datetime(COMPLETE[2]),  # 00:00: its five minutes are all complete
            )
            assert five["volume"] == sum(source.candle(symbol, COMPLETE[2] + k * M1).volume for k in range(5))
    finally:
        daemon.cleanup()
        await exchange.stop()
