"""Order flow end to end: the daemon (a real process, ORDERFLOW=on) follows aggTrades
from the fake exchange over real sockets, with dropped, duplicated, reordered and late
trades and a kill -9 in the middle; every stored M1/M5/M15 bar then equals a
from-scratch recomputation over the exchange's complete trade list, every minute's
volume, taker buy volume and trade count equal its stored kline, and no gap is open."""

from __future__ import annotations

import asyncio
from itertools import groupby

import pytest
from daemon import DaemonProcess
from replay import HISTORY_M1, M1, START, daemon_env, pause_mid_minute, until, until_sim

from binance.trades import agg_trades_of
from candles import TF_MS, bucket_start, datetime_to_ms
from fake_exchange import ArchiveSource, FakeExchange
from orderflow.fold import fold, merge, to_units
from orderflow.output import CvdChain, FinalBar
from orderflow.profile import ImbalanceRules
from orderflow.rows import TF_ROW_MULTIPLE
from orderflow.store import ORDERFLOW_COLUMNS

pytestmark = pytest.mark.storage_modes  # run again on each TimescaleDB edition by `make test`

SYMBOLS = ["LINKUSDT", "NEARUSDT", "ALGOUSDT"]


async def settled(pool, last_closed: int) -> bool:
    """Every symbol has order flow up to `last_closed` and nothing is being refetched."""
    newest = dict(await pool.fetch("SELECT symbol, max(open_time) FROM orderflow4 WHERE tf = 'm1' GROUP BY symbol"))
    if any(s not in newest or datetime_to_ms(newest[s]) < last_closed for s in SYMBOLS):
        return False
    return not await pool.fetchval("SELECT count(*) FROM trade_gaps_v4 WHERE status = 'open'")


def recompute(exchange: FakeExchange, symbol: str, stored: dict, first: int, last: int) -> dict[tuple, tuple]:
    """Every bar from `first` to `last` as the exchange's trades give it, with the stored
    M1 row size of each minute (deterministic from stored candles; checked elsewhere)."""
    chains = {tf: CvdChain() for tf in TF_MS}
    out: dict[tuple, tuple] = {}
    m1_bars = {}
    for minute in range(first, last + M1, M1):
        row = stored[("m1", minute)]["row_size"]
        bar = fold(minute, row, agg_trades_of(exchange.trades.minute(symbol, minute)))
        m1_bars[minute] = bar
        out[("m1", minute)] = FinalBar.of(symbol, "m1", bar, chains["m1"], ImbalanceRules()).record()
        for tf in ("m5", "m15"):
            start = bucket_start(minute, tf)
            if minute == start + TF_MS[tf] - M1 and start >= first:
                parts = [m1_bars[t] for t in range(start, minute + M1, M1)]
                merged = merge(start, parts[0].row_size * TF_ROW_MULTIPLE[tf], parts)
                out[(tf, start)] = FinalBar.of(symbol, tf, merged, chains[tf], ImbalanceRules()).record()
    return out


async def assert_order_flow_equals_the_trades(pool, exchange: FakeExchange) -> tuple[int, dict[str, dict]]:
    """Every stored order-flow bar (M1/M5/M15: footprint, delta, CVD) equals the one
    recomputed from the exchange's complete trades, M1 without holes; returns how many
    were checked and each symbol's stored rows by (tf, open time)."""
    rows = await pool.fetch(f"SELECT {', '.join(ORDERFLOW_COLUMNS)} FROM orderflow4 ORDER BY symbol, tf, open_time")
    checked = 0
    by_symbol: dict[str, dict] = {}
    for symbol, group in groupby(rows, key=lambda r: r["symbol"]):
        stored = by_symbol[symbol] = {(r["tf"], datetime_to_ms(r["open_time"])): r for r in group}
        m1_times = sorted(t for tf, t in stored if tf == "m1")
        first, last = m1_times[0], m1_times[-1]
        assert m1_times == list(range(first, last + M1, M1)), f"{symbol}: M1 order flow has holes"
        expected = recompute(exchange, symbol, stored, first, last)
        assert set(expected) == set(stored), f"{symbol}: bars {sorted(set(expected) ^ set(stored))[:5]}"
        for key, record in expected.items():
            assert tuple(stored[key]) == record, (symbol, key)
            checked += 1
    return checked, by_symbol


@pytest.mark.timeout(300)
async def test_order_flow_through_trade_faults_and_a_kill_equals_a_recomputation(pool, redis, redis_url, pg_url):
    source = ArchiveSource(SYMBOLS, start_ms=START - (HISTORY_M1 + 30) * M1, end_ms=START + 90 * M1)
    exchange = FakeExchange(source, start_ms=START, speed=30, seed=5, trades_per_agg=10)
    faults = exchange.faults
    faults.drop_trade = faults.duplicate_trade = faults.reorder_trade = faults.late_trade = 0.002
    await exchange.start()
    env = daemon_env(exchange, redis_url, pg_url, SYMBOLS) | {"ORDERFLOW": "on"}
    daemon = DaemonProcess(env)
    try:
        daemon.start()
        await until_sim(exchange, START + 12 * M1, daemon)
        daemon.kill()  # kill -9 mid-replay
        await asyncio.sleep(2.0)
        daemon.start()
        await until_sim(exchange, START + 30 * M1, daemon)
        last_closed = await pause_mid_minute(exchange)
        try:
            await until(lambda: settled(pool, last_closed), 60, "the order flow to settle")
        except AssertionError:
            print("last_closed", last_closed)
            for query in (
                "SELECT symbol, tf, count(*), min(open_time), max(open_time) FROM orderflow4 GROUP BY 1, 2",
                "SELECT symbol, status, count(*), min(open_time), max(reason) FROM trade_gaps_v4 GROUP BY 1, 2",
                "SELECT module, message FROM system_log_v4 WHERE module = 'ORDERFLOW' ORDER BY id DESC LIMIT 20",
            ):
                print(*await pool.fetch(query), sep="\n")
            print("\n".join(line for line in daemon.output().splitlines() if "WS0" not in line)[-5000:])
            raise
        stats = exchange.stats
        assert stats.dropped_trades and stats.trades_duplicated and stats.trades_reordered
        checked, stored_rows = await assert_order_flow_equals_the_trades(pool, exchange)
        for symbol, stored in stored_rows.items():
            candles = await pool.fetch(
                "SELECT open_time, volume, taker_buy_volume, trades FROM ohlcv4_m1 WHERE symbol = $1", symbol
            )
            for c in candles:
                row = stored.get(("m1", datetime_to_ms(c["open_time"])))
                if row is not None:
                    assert row["buy_units"] + row["sell_units"] == to_units(str(c["volume"]))
                    assert row["buy_units"] == to_units(str(c["taker_buy_volume"])) and row["trades"] == c["trades"]
        assert checked >= len(SYMBOLS) * 20 * 1.2
        filled = await pool.fetchval("SELECT count(*) FROM trade_gaps_v4 WHERE status = 'filled'")
        assert filled >= len(SYMBOLS)  # at least the minutes the kill missed
    finally:
        daemon.cleanup()
        await exchange.stop()
