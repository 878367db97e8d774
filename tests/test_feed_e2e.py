"""The feed end to end: fake exchange over real sockets, the daemon as a real process,
real Redis Stack and PostgreSQL; real February 2026 candles replayed fast with faults."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Callable

import pytest
from daemon import DaemonProcess

import core_io
from aggregation import aggregate
from candles import TF_MS, Candle, datetime_to_ms
from fake_exchange import ArchiveSource, FakeExchange
from infra import make_redis
from tests.indicator_reference import COMMON_CASES, assert_values_match_talib, configure

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


@pytest.fixture
async def redis_url(redis_stack_server):
    client = make_redis(redis_stack_server.url)
    await client.flushall()
    await client.aclose()
    return redis_stack_server.url


@pytest.mark.timeout(300)
async def test_replay_with_every_fault_and_a_kill_loses_nothing(pool, redis, redis_url, pg_url):
    hours = 3
    end = START + hours * 3_600_000
    source = ArchiveSource(SYMBOLS, start_ms=START - (HISTORY_M1 + 30) * M1, end_ms=end + 10 * M1)
    exchange = FakeExchange(source, start_ms=START, speed=600, seed=11)
    faults = exchange.faults
    faults.drop_missing_close = 0.02
    faults.duplicate_close = 0.03
    faults.late_close = 0.02
    faults.malformed_frame = 0.005
    await exchange.start()
    await configure(pool, COMMON_CASES)
    daemon = DaemonProcess(daemon_env(exchange, redis_url, pg_url, SYMBOLS))
    try:
        daemon.start()
        await until_sim(exchange, START + 20 * 60 * 1000, daemon)
        exchange.drop_all_connections()  # abrupt 1006
        await until_sim(exchange, START + 40 * 60 * 1000, daemon)
        faults.silent = True  # open but silent: must be noticed and replaced
        await asyncio.sleep(3)
        faults.silent = False
        await until_sim(exchange, START + 70 * 60 * 1000, daemon)
        await exchange.close_all_connections(1001, "24h")  # server-side cut
        faults.rest_429_count = 2
        faults.rest_418_after_429 = True
        faults.rest_truncate_count = 2
        await until_sim(exchange, START + 100 * 60 * 1000, daemon)
        daemon.kill()  # crash mid-replay...
        await asyncio.sleep(1.5)  # ...15 simulated minutes pass...
        daemon.start()  # ...and it comes back
        await until_sim(exchange, end + 30_000, daemon)  # the last closes (and grace) are out
        exchange.clock.pause()
        last_closed = (exchange.clock.now_ms() - M1) // M1 * M1
        try:
            await until(lambda: complete(pool, SYMBOLS, last_closed), 90, "the daemon to catch up")
        except AssertionError:
            print(await diagnose(pool, daemon, last_closed))
            raise
        assert exchange.stats.closes_dropped > 0 and exchange.stats.malformed_sent > 0
        checked = await assert_store_matches_source(pool, redis, source, SYMBOLS, last_closed)
        assert checked >= len(SYMBOLS) * (hours * 60 + HISTORY_M1)
        await assert_every_candle_announced(pool, redis)
        statuses = dict(await pool.fetch("SELECT status, count(*) FROM missing_m1_log_v4 GROUP BY status"))
        assert set(statuses) == {"backfilled"}
        gap_log = {
            (r["symbol"], datetime_to_ms(r["open_time"]))
            for r in await pool.fetch("SELECT symbol, open_time FROM missing_m1_log_v4 WHERE status = 'backfilled'")
        }
        injected = {gap for gap in exchange.stats.dropped_closes if START + 5 * M1 <= gap[1] <= last_closed}
        assert injected and injected <= gap_log  # every dropped close was logged and backfilled
        bad = await pool.fetchval("SELECT count(*) FROM system_log_v4 WHERE message LIKE 'skipped a bad frame%'")
        assert bad >= 1 and daemon.alive()
        assert daemon.terminate() == 0  # a clean stop persists every computed value
        # Every indicator value, through gaps, late bars and the kill, equals TA-Lib over the stored series.
        assert await assert_values_match_talib(pool, SYMBOLS) > len(SYMBOLS) * hours * 60 * 40
        for symbol in SYMBOLS:
            latest = await redis.hgetall(core_io.indicator_key(symbol, "m1"))
            assert int(latest["open_time"]) == last_closed, symbol
    finally:
        daemon.cleanup()
        await exchange.stop()


@pytest.mark.timeout(180)
async def test_enabling_and_disabling_a_ticker_while_running(pool, redis, redis_url, pg_url):
    source = ArchiveSource(["LINKUSDT", "NEARUSDT"], start_ms=START - (HISTORY_M1 + 30) * M1, end_ms=START + 120 * M1)
    exchange = FakeExchange(source, start_ms=START, speed=120, seed=5)
    await exchange.start()
    daemon = DaemonProcess(daemon_env(exchange, redis_url, pg_url, ["LINKUSDT"]))
    try:
        daemon.start()
        await until(
            lambda: pool.fetchval("SELECT count(*) FROM ohlcv4_m1 WHERE symbol = 'LINKUSDT'"), 60, "LINKUSDT candles"
        )
        assert not any("nearusdt@kline_1m" in subs for subs in exchange.subscriptions())
        await pool.execute("INSERT INTO tickers (symbol, status) VALUES ('NEARUSDT', 'enabled')")
        await until(
            lambda: any("nearusdt@kline_1m" in subs for subs in exchange.subscriptions()),
            30,
            "a live SUBSCRIBE for NEARUSDT",
        )
        await until(
            lambda: pool.fetchval("SELECT count(*) >= $1 FROM ohlcv4_m1 WHERE symbol = 'NEARUSDT'", HISTORY_M1),
            60,
            "NEARUSDT history backfilled",
        )
        connections_before = exchange.stats.connections_opened
        await pool.execute("UPDATE tickers SET status = 'disabled' WHERE symbol = 'NEARUSDT'")
        await until(
            lambda: not any("nearusdt@kline_1m" in subs for subs in exchange.subscriptions()),
            30,
            "an UNSUBSCRIBE for NEARUSDT",
        )
        assert exchange.stats.connections_opened == connections_before  # live, no reconnect
        assert daemon.alive()
    finally:
        daemon.cleanup()
        await exchange.stop()


@pytest.mark.timeout(120)
async def test_legacy_route_silence_is_reported_not_taken_for_a_quiet_market(pool, redis_url, pg_url):
    source = ArchiveSource(["LINKUSDT"], start_ms=START - (HISTORY_M1 + 30) * M1, end_ms=START + 60 * M1)
    exchange = FakeExchange(source, start_ms=START, speed=60, seed=2)
    await exchange.start()
    env = daemon_env(exchange, redis_url, pg_url, ["LINKUSDT"])
    env["BINANCE_WS_URL"] = exchange.ws_url.removesuffix("/market")  # the pre-2026 route: acks, then silence
    daemon = DaemonProcess(env)
    try:
        daemon.start()
        await until(
            lambda: pool.fetchval(
                "SELECT count(*) FROM system_log_v4 WHERE message LIKE '%is BINANCE_WS_URL the /market route?%'"
            ),
            30,
            "the silent legacy route to be reported",
        )
        assert daemon.alive()
    finally:
        daemon.cleanup()
        await exchange.stop()
