"""Replaying real market data through the daemon: its settings, waits and the exact
checks of what it stored against the exchange's archive (shared by the end-to-end tests)."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Callable

from daemon import DaemonProcess

import core_io
from aggregation import aggregate
from candles import TF_MS, Candle, datetime_to_ms
from fake_exchange import ArchiveSource, FakeExchange

M1 = 60_000
START = 1_770_163_200_000  # 2026-02-04 00:00 UTC
HISTORY_M1 = 300
SYMBOLS = ["ALGOUSDT", "AVAXUSDT", "DOTUSDT", "FILUSDT", "LINKUSDT", "LTCUSDT", "NEARUSDT"]


def daemon_env(exchange: FakeExchange, redis_url: str, pg_url: str, symbols: list[str]) -> dict[str, str]:
    return {
        "REDIS_URL": redis_url,
        "POSTGRES_URL": pg_url,
        "BINANCE_WS_URL": exchange.ws_url,
        "BINANCE_REST_URL": exchange.rest_url,
        "SYMBOLS": ",".join(symbols),
        "INITIAL_HISTORY_M1": str(HISTORY_M1),
        "WS_SILENCE_S": "2",
        "WS_FIRST_DATA_TIMEOUT_S": "3",
        "WS_BACKOFF_MAX_S": "1",
        "TICKER_REFRESH_S": "0.3",
        "BOOT_WAIT_S": "10",
    }


async def until(predicate: Callable, timeout: float, what: str, interval: float = 0.25) -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(interval)


async def until_sim(exchange: FakeExchange, sim_ms: int, daemon: DaemonProcess | None = None) -> None:
    while exchange.clock.now_ms() < sim_ms:
        if daemon is not None:
            assert daemon.alive(), daemon.output()[-3000:]
        await asyncio.sleep(0.05)


def archive_m1(source: ArchiveSource, symbol: str, first: int, last: int) -> list[Candle]:
    return [c for t in range(first, last + M1, M1) if (c := source.candle(symbol, t)) is not None]


async def complete(pool, symbols: list[str], last_closed: int) -> bool:
    rows = await pool.fetch(
        "SELECT symbol, count(*) AS n, min(open_time) AS first, max(open_time) AS last FROM ohlcv4_m1 GROUP BY symbol"
    )
    done = {r["symbol"]: r for r in rows}
    if any(s not in done or datetime_to_ms(done[s]["last"]) < last_closed for s in symbols):
        return False
    open_gaps = await pool.fetchval("SELECT count(*) FROM missing_m1_log_v4 WHERE status = 'missing'")
    return open_gaps == 0


async def diagnose(pool, daemon: DaemonProcess, last_closed: int) -> str:
    rows = await pool.fetch("SELECT symbol, count(*), min(open_time), max(open_time) FROM ohlcv4_m1 GROUP BY 1")
    gaps = await pool.fetch("SELECT status, count(*), min(open_time), max(open_time) FROM missing_m1_log_v4 GROUP BY 1")
    logs = await pool.fetch(
        "SELECT level, module, message FROM system_log_v4 WHERE level <> 'INFO' ORDER BY id DESC LIMIT 15"
    )
    return "\n".join(
        [f"last_closed={last_closed}", *map(str, rows), *map(str, gaps), *map(str, logs), daemon.output()[-4000:]]
    )


async def assert_store_matches_source(pool, redis, source, symbols: list[str], last_closed: int) -> int:
    """Every stored candle equals the exchange's archive; M5/M15 equal their M1s exactly."""
    checked = 0
    for symbol in symbols:
        first = await pool.fetchval("SELECT min(open_time) FROM ohlcv4_m1 WHERE symbol = $1", symbol)
        first_ms = datetime_to_ms(first)
        stored = await core_io.fetch_candles(pool, symbol, "m1", first_ms, last_closed + M1)
        expected = archive_m1(source, symbol, first_ms, last_closed)
        assert stored == expected, f"{symbol}: M1 table differs from the archive"
        assert (last_closed - first_ms) // M1 + 1 == len(stored), f"{symbol}: holes"
        checked += len(stored)
        by_time = {c.open_time: c for c in stored}
        for tf in ("m5", "m15"):
            size = TF_MS[tf]
            buckets = await core_io.fetch_candles(pool, symbol, tf, first_ms, last_closed + M1)
            full = range(
                first_ms - first_ms % size + (size if first_ms % size else 0), last_closed + M1 - size + 1, size
            )
            assert [b.open_time for b in buckets if b.open_time in full] == list(full), f"{symbol} {tf} missing"
            for bucket in buckets:
                members = [by_time[t] for t in range(bucket.open_time, bucket.open_time + size, M1) if t in by_time]
                assert bucket == aggregate(tf, bucket.open_time, members), f"{symbol} {tf} {bucket.open_time}"
                assert bucket.m1_count == size // M1
            checked += len(buckets)
            cached = (await core_io.TimeSeriesCandleStore(redis, 250).read_last_many([(symbol, tf)], 250))[(symbol, tf)]
            assert cached == [b.to_bar() for b in buckets[-250:]], f"{symbol} {tf}: Redis differs"
        cached_m1 = (await core_io.TimeSeriesCandleStore(redis, 250).read_last_many([(symbol, "m1")], 250))[
            (symbol, "m1")
        ]
        assert cached_m1 == [c.to_bar() for c in stored[-250:]]
    return checked


async def assert_every_candle_announced(pool, redis) -> None:
    for tf, stream in core_io.CANDLE_STREAMS.items():
        announced = defaultdict(set)
        for _, fields in await redis.xrange(stream):
            announced[fields["symbol"]].add(int(fields["open_time"]))
        rows = await pool.fetch(f"SELECT symbol, open_time FROM {core_io.candle_table(tf)}")
        for row in rows:
            assert datetime_to_ms(row["open_time"]) in announced[row["symbol"]], f"{tf} {row['symbol']} not announced"


async def pause_mid_minute(exchange: FakeExchange) -> int:
    """Pause the exchange 21-50 s into a minute and return the newest closed minute.

    Every close of that minute is out by then (they go out at most 2 s after it), and
    the kline updates 19.3 s in have carried the event time past its end plus the gap
    grace, so a close held back by a fault is already a detected gap. Pausing at a random instant could freeze the clock
    between a minute's end and its close: never sent, never overdue.
    """
    while not 21_000 <= exchange.clock.now_ms() % M1 <= 50_000:
        await asyncio.sleep(0.002)
    exchange.clock.pause()
    return (exchange.clock.now_ms() - M1) // M1 * M1
