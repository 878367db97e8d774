"""The feed end to end: fake exchange over real sockets, the daemon as a real process,
real Redis Stack and PostgreSQL; real February 2026 candles replayed fast with faults."""

from __future__ import annotations

import asyncio

import pytest
from daemon import DaemonProcess
from replay import (
    HISTORY_M1,
    M1,
    START,
    SYMBOLS,
    assert_every_candle_announced,
    assert_store_matches_source,
    complete,
    daemon_env,
    diagnose,
    pause_mid_minute,
    until,
    until_sim,
)

import core_io
from candles import datetime_to_ms
from fake_exchange import ArchiveSource, FakeExchange
from tests.indicator_reference import COMMON_CASES, assert_values_match_talib, configure


@pytest.mark.storage_modes
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
        last_closed = await pause_mid_minute(exchange)
        try:
            await until(lambda: complete(pool, SYMBOLS, last_closed, redis), 90, "the daemon to catch up")
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

        async def newest_computed() -> bool:  # in the hashes: what the clean stop must persist
            times = [await redis.hget(core_io.indicator_key(s, "m1"), "open_time") for s in SYMBOLS]
            return all(int(t or 0) >= last_closed for t in times)

        # Not waited for, a slow machine (TimescaleDB busy) could stop it before the newest
        # bar was computed at all: that is not a computed value lost.
        await until(newest_computed, 60, "the indicators of the newest bar")
        assert daemon.terminate() == 0  # a clean stop persists every computed value
        assert "Unclosed client session" not in daemon.output()  # every HTTP session closed
        # Every indicator value, through gaps, late bars and the kill, equals TA-Lib over the stored series.
        assert await assert_values_match_talib(pool, SYMBOLS) > len(SYMBOLS) * hours * 60 * 40
        for symbol in SYMBOLS:
            latest = await redis.hgetall(core_io.indicator_key(symbol, "m1"))
            assert int(latest["open_time"]) >= last_closed, symbol
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
