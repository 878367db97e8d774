"""The raw tables and the bars PostgreSQL rolls up from them (storage/aggregates.py): the
same results in every mode (continuous aggregates on the full edition, partly
materialised, partly real time; plain views elsewhere), equal to a recomputation in
Python, and, with the daemon writing the raw events of a replay, equal to the daemon's
own one-second bars, candles, order flow and book minutes: two implementations that
share nothing but the exchange's events."""

from __future__ import annotations

import random
from collections import defaultdict
from decimal import Decimal

import asyncpg
import pytest
from daemon import DaemonProcess
from replay import HISTORY_M1, M1, START, daemon_env, until, until_sim
from servers import drop_database, recreate_database

from core_io import datetime_to_ms, ms_to_datetime
from fake_exchange import ArchiveSource, FakeExchange
from fake_exchange.book import BookConfig
from migrations import apply_migrations
from orderflow.fold import UNIT
from storage.modes import APACHE, FULL, PLAIN
from storage.raw import AGG_TRADES, BOOK_TICKERS, RawSettings, RawWriter
from storage.setup import apply_storage
from tests.test_storage_setup import SCRATCH, server_url

T0 = 1_721_347_200_000  # 2024-07-19 00:00 UTC
SECOND = 1_000


def synthetic_events(seed: int) -> tuple[list[tuple], list[tuple]]:
    """Five minutes of two symbols: trades in bursts that share a millisecond (so order is
    by id, not time), prices that revisit their highs and lows; book tickers likewise."""
    rng = random.Random(seed)
    trades, tickers = [], []
    for symbol, price in (("AAAUSDT", 6_000_000_000_000), ("BBBUSDT", 15_000_000_000)):
        agg_id, trade_id, update_id, now = 1000, 50_000, 7_000_000, T0
        while now < T0 + 5 * M1:
            for _ in range(rng.choice((1, 1, 2, 5))):  # several events in one millisecond
                price = max(1, price + rng.randint(-3, 3) * 10_000_000)
                count = rng.randint(1, 4)
                trades.append(
                    (
                        symbol,
                        now,
                        agg_id,
                        price,
                        rng.randint(1, 10**8),
                        trade_id,
                        trade_id + count - 1,
                        rng.random() < 0.5,
                    )
                )
                agg_id, trade_id = agg_id + 1, trade_id + count
                bid = price - rng.randint(1, 5) * 1_000_000
                tickers.append(
                    (
                        symbol,
                        now,
                        update_id,
                        bid,
                        rng.randint(0, 10**9),
                        bid + rng.randint(1, 9) * 1_000_000,
                        rng.randint(0, 10**9),
                    )
                )
                update_id += rng.randint(1, 3)
            now += rng.randint(1, 900)
    return trades, tickers  # fmt: skip


def recompute_trades(trades: list[tuple], width: int) -> dict[tuple[str, int], tuple]:
    buckets: dict[tuple[str, int], list[tuple]] = defaultdict(list)
    for t in trades:
        buckets[(t[0], t[1] - t[1] % width)].append(t)
    out = {}
    for key, group in buckets.items():
        group.sort(key=lambda t: t[2])
        buy = sum(t[4] for t in group if not t[7])
        sell = sum(t[4] for t in group if t[7])
        notional = sum(t[3] * t[4] for t in group)
        prices = [t[3] for t in group]
        out[key] = (prices[0], max(prices), min(prices), prices[-1], buy, sell, notional, len(group))
        out[key] += (sum(t[6] - t[5] + 1 for t in group),)
    return out


def recompute_tickers(tickers: list[tuple]) -> dict[tuple[str, int], tuple]:
    buckets: dict[tuple[str, int], list[tuple]] = defaultdict(list)
    for t in tickers:
        buckets[(t[0], t[1] - t[1] % M1)].append(t)
    out = {}
    for key, group in buckets.items():
        group.sort(key=lambda t: t[2])
        last = group[-1]
        out[key] = (len(group), sum(t[5] - t[3] for t in group), last[3], last[5], last[4], last[6], last[2])
    return out


def units(value: Decimal) -> int:
    return int(value * UNIT)


async def read_rollups(pool: asyncpg.Pool) -> tuple[dict, dict, dict]:
    seconds = {
        (r["symbol"], datetime_to_ms(r["ts"])): (
            *(units(r[k]) for k in ("open", "high", "low", "close", "buy_volume", "sell_volume")),
            int(r["quote_volume"] * UNIT * UNIT),
            r["agg_trades"],
            r["trades"],
        )
        for r in await pool.fetch("SELECT * FROM raw_trades_1s_v4")
    }
    minutes = {
        (r["symbol"], datetime_to_ms(r["open_time"])): (
            *(units(r[k]) for k in ("open", "high", "low", "close", "taker_buy_volume", "taker_sell_volume")),
            int(r["quote_volume"] * UNIT * UNIT),
            r["agg_trades"],
            r["trades"],
        )
        for r in await pool.fetch("SELECT * FROM raw_trades_1m_v4")
    }
    quotes = {
        (r["symbol"], datetime_to_ms(r["open_time"])): (
            r["updates"],
            round(r["mean_spread"] * r["updates"] * UNIT),
            *(units(r[k]) for k in ("bid_close", "ask_close", "bid_qty_close", "ask_qty_close")),
            r["last_update_id"],
        )
        for r in await pool.fetch("SELECT * FROM raw_book_tickers_1m_v4")
    }
    return seconds, minutes, quotes


@pytest.mark.timeout(180)
async def test_the_rollups_equal_a_recomputation_in_every_mode():
    trades, tickers = synthetic_events(seed=5)
    shuffled = [*trades, *trades[:50]]  # arriving out of order, some twice
    random.Random(1).shuffle(shuffled)
    wanted = (recompute_trades(trades, SECOND), recompute_trades(trades, M1), recompute_tickers(tickers))
    results = {}
    for mode in (PLAIN, APACHE, FULL):
        url = await recreate_database(server_url(mode), SCRATCH)
        pool = await asyncpg.create_pool(url, min_size=1, max_size=3)
        try:
            await apply_migrations(pool)
            assert (await apply_storage(pool, "off" if mode == PLAIN else "auto")).mode == mode
            settings = RawSettings(trades=True, book_tickers=True)
            for table, rows in ((AGG_TRADES, shuffled), (BOOK_TICKERS, tickers)):
                writer = RawWriter(pool, table, settings)
                for start in range(0, len(rows), 700):  # a few flushes, as the daemon's
                    for row in rows[start : start + 700]:
                        writer.add(row)
                    assert await writer.flush() == len(rows[start : start + 700])
            assert await pool.fetchval("SELECT count(*) FROM agg_trades4") == len(trades)  # each stored once
            if mode == FULL:  # the first three minutes materialised, the rest read in real time
                kinds = await pool.fetch("SELECT view_name FROM timescaledb_information.continuous_aggregates")
                assert {r["view_name"] for r in kinds} == {"raw_trades_1s4", "raw_trades_1m4", "raw_book_tickers_1m4"}
                for name in ("raw_trades_1s4", "raw_trades_1m4", "raw_book_tickers_1m4"):
                    await pool.execute(
                        "CALL refresh_continuous_aggregate($1::regclass, $2::timestamptz, $3::timestamptz)",
                        name,
                        ms_to_datetime(T0),
                        ms_to_datetime(T0 + 3 * M1),
                    )
                table = await pool.fetchval(
                    "SELECT format('%I.%I', materialization_hypertable_schema, materialization_hypertable_name) "
                    "FROM timescaledb_information.continuous_aggregates WHERE view_name = 'raw_trades_1m4'"
                )
                assert await pool.fetchval(f"SELECT count(*) FROM {table}") == 2 * 3  # two symbols' first minutes
            results[mode] = await read_rollups(pool)
        finally:
            await pool.close()
            await drop_database(server_url(mode), SCRATCH)
    assert results[PLAIN] == results[APACHE] == results[FULL]
    seconds, minutes, quotes = results[PLAIN]
    assert seconds == wanted[0] and len(seconds) > 300
    assert minutes == wanted[1] and len(minutes) == 10
    assert quotes == wanted[2] and len(quotes) == 10


SYMBOLS = ["LINKUSDT", "NEARUSDT"]


@pytest.mark.storage_modes
@pytest.mark.timeout(240)
async def test_the_raw_rollups_equal_the_daemons_own_bars(pool, redis, redis_url, pg_url):
    """RAW_TRADES and RAW_BOOK_TICKERS on, a replay with trades and book tickers: every
    second, minute and book minute PostgreSQL rolls up from the raw events equals what the
    daemon built from the same frames."""
    end = START + 6 * M1
    source = ArchiveSource(SYMBOLS, start_ms=START - (HISTORY_M1 + 30) * M1, end_ms=end + 10 * M1)
    exchange = FakeExchange(source, start_ms=START, speed=20, seed=8, book=BookConfig(seed=8))
    await exchange.start()
    await pool.executemany(
        "INSERT INTO tickers (symbol, trades, book_ticker) VALUES ($1, true, true)", [(s,) for s in SYMBOLS]
    )
    env = daemon_env(exchange, redis_url, pg_url, SYMBOLS)
    env |= {"RAW_TRADES": "on", "RAW_BOOK_TICKERS": "on", "TRADE_SECOND_GRACE_MS": "2000"}
    daemon = DaemonProcess(env)
    try:
        daemon.start()
        await until_sim(exchange, end, daemon)
        await until(
            lambda: pool.fetchval("SELECT count(*) FROM orderflow4 WHERE tf = 'm1'"), 30, "order flow of a minute"
        )
        assert daemon.terminate() == 0
    finally:
        daemon.cleanup()
        await exchange.stop()
    seconds, minutes, quotes = await read_rollups(pool)
    daemon_seconds = await pool.fetch("SELECT * FROM trades_1s_v4")
    assert len(daemon_seconds) > 100
    for r in daemon_seconds:
        got = (*(units(r[k]) for k in ("open", "high", "low", "close", "buy_volume", "sell_volume")),)
        got += (int(r["quote_volume"] * UNIT * UNIT), r["agg_trades"])
        assert seconds[(r["symbol"], datetime_to_ms(r["ts"]))][:8] == got, r
    flows = await pool.fetch(
        "SELECT f.symbol, f.open_time, f.low, f.high, f.buy_units, f.sell_units, f.notional, f.agg_trades, f.trades, "
        "c.volume, c.taker_buy_volume, c.trades AS kline_trades "
        "FROM orderflow4 f JOIN ohlcv4_m1 c USING (symbol, open_time) WHERE f.tf = 'm1'"
    )
    assert len(flows) >= 2 * len(SYMBOLS)
    for r in flows:  # a minute the daemon's order flow holds whole: the raw minute is the same, and the kline's
        key = (r["symbol"], datetime_to_ms(r["open_time"]))
        _, high, low, _, buy, sell, notional, agg_trades, trades = minutes[key]
        assert (low, high, buy, sell, notional, agg_trades, trades) == (
            r["low"], r["high"], r["buy_units"], r["sell_units"], int(r["notional"]), r["agg_trades"], r["trades"]
        ), key  # fmt: skip
        assert (buy + sell, buy, trades) == (units(r["volume"]), units(r["taker_buy_volume"]), r["kline_trades"])
    book_minutes = await pool.fetch(
        "SELECT symbol, open_time, book_ticker_updates, mean_spread, seconds FROM book_m1_v4 ORDER BY symbol, open_time"
    )
    whole = [r for r in book_minutes if r["seconds"] == 60]  # the first and last minutes the daemon saw in part
    assert len(whole) >= 2 * len(SYMBOLS), book_minutes
    for r in whole:
        updates, spread_units, *_ = quotes[(r["symbol"], datetime_to_ms(r["open_time"]))]
        assert updates == r["book_ticker_updates"], r
        assert spread_units == round(r["mean_spread"] * updates * UNIT)
    market = await pool.fetchval("SELECT count(*) FROM market_1m_v4 WHERE trades > 0 AND book_ticker_updates > 0")
    assert market >= len(flows)
