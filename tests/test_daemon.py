"""The whole daemon as traders run it: one process, every worker, real servers, the
fake exchange replaying real February 2026 candles; supervision, watchdog, shutdown."""

from __future__ import annotations

import asyncio
import json
import signal
import time

import pytest
from daemon import DaemonProcess, run_main
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
from servers import FakeTelegram

import core_io
import infra
from candles import TF_MS, datetime_to_ms
from fake_exchange import ArchiveSource, FakeExchange
from feed_v4_main import EXIT_STALE_FEED, Daemon, DaemonOptions, boot
from indicators.groups import group_of, is_indicator_group
from infra import load_settings, system_event_log
from orderflow import store
from orderflow.fold import merge
from orderflow.rows import TF_ROW_MULTIPLE
from tests.indicator_reference import COMMON_CASES, assert_values_match_talib, configure

FAR = core_io.FAR_FUTURE_MS


def archive(symbols: list[str], minutes: int) -> ArchiveSource:
    return ArchiveSource(symbols, start_ms=START - (HISTORY_M1 + 30) * M1, end_ms=START + minutes * M1)


async def logged(pool, level: str, module: str) -> list[str]:
    rows = await pool.fetch("SELECT message FROM system_log_v4 WHERE level = $1 AND module = $2", level, module)
    return [r["message"] for r in rows]


@pytest.mark.timeout(120)
async def test_a_raising_worker_is_restarted_while_the_others_go_on(pool, redis, redis_url, pg_url):
    symbols = ["LINKUSDT", "NEARUSDT"]
    exchange = FakeExchange(archive(symbols, 120), start_ms=START, speed=120, seed=4)
    await exchange.start()
    await configure(pool, COMMON_CASES[:6])
    env = {**daemon_env(exchange, redis_url, pg_url, symbols), "WORKER_RETRY_S": "2"}
    settings = load_settings(env)
    system_event_log.pending.clear()  # what earlier in-process tests left unwritten
    runtime = await boot(settings)
    daemon = Daemon(runtime, DaemonOptions.from_env(settings, env))
    assert daemon.feed and daemon.indicators
    handle = daemon.indicators.handle
    calls: list[int] = []  # M1 candles stored when INDICATORS crashed, and when it ran again

    async def handle_raising_once(entries):
        if len(calls) < 2:
            calls.append(daemon.feed.intake.stored_m1)
            if len(calls) == 1:
                raise RuntimeError("injected fault")
        return await handle(entries)

    daemon.indicators.handle = handle_raising_once
    try:
        daemon.start()
        await until(lambda: len(calls) == 2, 60, "the indicator worker to crash and come back")
        assert calls[1] > calls[0], "the feed stopped while the indicator worker was down"
        newest = int((await redis.hgetall(core_io.indicator_key("LINKUSDT", "m1")))["open_time"])
        await until(
            lambda: _indicators_at(redis, ["LINKUSDT"], newest + M1),
            20,
            "indicator values newer than the crash",
            interval=0.1,
        )
        assert not daemon.stop_requested.is_set()
    finally:
        await daemon.shutdown()
        await exchange.stop()
    crashes = await logged(pool, "ERROR", "INDICATORS")
    assert len(crashes) == 1 and "worker crashed: RuntimeError: injected fault" in crashes[0]
    assert await assert_values_match_talib(pool, symbols) > 0


@pytest.mark.timeout(90)
async def test_the_watchdog_ends_the_process_when_the_feed_goes_silent_and_telegram_is_told(pool, redis_url, pg_url):
    exchange = FakeExchange(archive(["LINKUSDT"], 600), start_ms=START, speed=60, seed=6)
    await exchange.start()
    telegram = FakeTelegram()
    await telegram.start()
    env = {
        **daemon_env(exchange, redis_url, pg_url, ["LINKUSDT"]),
        "WATCHDOG_STALE_S": "4",
        "WS_SILENCE_S": "1",
        "TELEGRAM_BOT_TOKEN": "42:token",
        "TELEGRAM_CHAT_ID": "-1001",
        "TELEGRAM_API_URL": telegram.url,
    }
    daemon = DaemonProcess(env)
    try:
        daemon.start()
        await until(lambda: pool.fetchval("SELECT count(*) > $1 FROM ohlcv4_m1", HISTORY_M1), 60, "candles")
        await asyncio.sleep(6)  # longer than the limit while data flows: no false alarm
        assert daemon.alive(), daemon.output()[-2000:]
        exchange.faults.silent = True  # connections stay open, answer pings, send nothing
        exchange.faults.rest_429_count = 10**6  # and REST gives nothing either
        silenced = time.monotonic()
        await until(lambda: not daemon.alive(), 30, "the watchdog to end the daemon")
        assert daemon.process.returncode == EXIT_STALE_FEED, daemon.output()[-3000:]
        assert 4 <= time.monotonic() - silenced < 20
        critical = await logged(pool, "CRITICAL", "WATCHDOG")
        assert any("no closed kline stored (WebSocket or REST) for" in m for m in critical)
        watchdog_alerts = [t for t in telegram.texts if t.startswith("CRITICAL | WATCHDOG")]
        assert len(watchdog_alerts) == 1 and "no closed kline stored (WebSocket" in watchdog_alerts[0], telegram.texts
        assert {r["path"] for r in telegram.requests} == {"/bot42:token/sendMessage"}
        assert {r["json"]["chat_id"] for r in telegram.requests} == {"-1001"}
    finally:
        daemon.cleanup()
        await exchange.stop()
        await telegram.stop()


@pytest.mark.timeout(180)
async def test_sigterm_in_the_middle_of_a_burst_loses_nothing(pool, redis, redis_url, pg_url):
    source = archive(SYMBOLS, 600)
    exchange = FakeExchange(source, start_ms=START, speed=300, seed=8)
    await exchange.start()
    await configure(pool, COMMON_CASES)
    daemon = DaemonProcess(daemon_env(exchange, redis_url, pg_url, SYMBOLS))
    try:
        daemon.start()
        await until_sim(exchange, START + 30 * M1, daemon)
        await until(lambda: _indicators_at(redis, SYMBOLS, START), 60, "the daemon to be up and computing")
        exchange.clock.set_speed(6000)  # a burst: 100 minutes of closes a second
        await asyncio.sleep(2.0)
        backlog = await redis.xinfo_groups(core_io.CANDLE_STREAMS["m1"])
        signalled_at = exchange.clock.now_ms()
        stopped = time.monotonic()
        daemon.process.send_signal(signal.SIGTERM)
        exchange.clock.pause()  # nothing more is sent; what the daemon got, it must keep
        assert daemon.process.wait(15) == 0, daemon.output()[-3000:]
        took = time.monotonic() - stopped
        assert took < 10, f"shutdown took {took:.1f}s"
        print(f"indicator group at SIGTERM: {backlog}; shutdown took {took:.2f}s")
        print(await pool.fetchval("SELECT details::text FROM system_log_v4 WHERE message LIKE 'daemon stopped%'"))
        # Without a restart: every close stored is bucketed, announced, computed and persisted.
        stored = await pool.fetch("SELECT symbol, max(open_time) AS last FROM ohlcv4_m1 GROUP BY symbol")
        last_closed = min(datetime_to_ms(r["last"]) for r in stored)
        # (How far it got depends on the machine: what was still in the exchange's send
        # queues or the socket when the connections closed is the restart's to fetch.)
        assert len(stored) == len(SYMBOLS) and last_closed > START + 30 * M1, (stored, signalled_at)
        await assert_store_matches_source(pool, redis, source, SYMBOLS, last_closed)
        await assert_every_candle_announced(pool, redis)
        for group in await redis.xinfo_groups(core_io.CANDLE_STREAMS["m1"]):
            assert group["pending"] == 0 and group["lag"] == 0, group
        assert await assert_values_match_talib(pool, SYMBOLS) > 0
        # And after a restart, every minute up to the pause equals the archive.
        daemon.start()
        paused_closed = (exchange.clock.now_ms() - 2_000 - M1) // M1 * M1
        await until(lambda: complete(pool, SYMBOLS, paused_closed, redis), 60, "the restarted daemon to catch up")
        await until(lambda: infra.read_heartbeats(redis), 30, "the restarted daemon's heartbeat")
        await assert_store_matches_source(pool, redis, source, SYMBOLS, paused_closed)
        assert daemon.terminate() == 0
    finally:
        daemon.cleanup()
        await exchange.stop()


@pytest.mark.storage_modes
@pytest.mark.timeout(480)
async def test_a_day_of_real_data_with_faults_then_status(pool, redis, redis_url, pg_url):
    day = 24 * 60
    end = START + day * M1
    source = archive(SYMBOLS, day + 10)
    exchange = FakeExchange(source, start_ms=START, speed=1200, seed=13)
    faults = exchange.faults
    faults.drop_missing_close = 0.01
    faults.duplicate_close = 0.02
    faults.late_close = 0.01
    faults.malformed_frame = 0.002
    await exchange.start()
    await configure(pool, COMMON_CASES, ("m1", "m5", "m15", "h1", "h4"))
    env = daemon_env(exchange, redis_url, pg_url, SYMBOLS)
    daemon = DaemonProcess(env)
    hour = 60 * M1
    try:
        daemon.start()
        await until_sim(exchange, START + 3 * hour, daemon)
        exchange.drop_all_connections()  # abrupt 1006
        await until_sim(exchange, START + 7 * hour, daemon)
        faults.silent = True  # open but silent: noticed and replaced
        await asyncio.sleep(3)
        faults.silent = False
        await until_sim(exchange, START + 11 * hour, daemon)
        await exchange.close_all_connections(1001, "24h")
        faults.rest_429_count = 2
        faults.rest_418_after_429 = True
        faults.rest_truncate_count = 2
        await until_sim(exchange, START + 16 * hour, daemon)
        faults.rest_delay_s = 0.5  # slow REST while connections drop again
        exchange.drop_all_connections()
        await until_sim(exchange, START + 18 * hour, daemon)
        faults.rest_delay_s = 0.0
        await until_sim(exchange, end + 30_000, daemon)
        last_closed = await pause_mid_minute(exchange)
        try:
            await until(lambda: complete(pool, SYMBOLS, last_closed, redis), 120, "the daemon to catch up")
            await until(lambda: _indicators_at(redis, SYMBOLS, last_closed), 30, "the last indicators")
        except AssertionError:
            print(await diagnose(pool, daemon, last_closed))
            raise
        await asyncio.sleep(3)  # a heartbeat carries the final exchange time

        async def m1_acknowledged() -> bool:  # the values are in Redis before the batch's ack
            groups = [
                g for g in await redis.xinfo_groups(core_io.CANDLE_STREAMS["m1"]) if is_indicator_group(g["name"])
            ]
            return len(groups) == 1 and groups[0]["pending"] == 0  # the daemon's own group

        await until(m1_acknowledged, 60, "the indicator worker to acknowledge its last M1 batch")
        status = run_main(env, "status", "--json")
        assert status.returncode == 0, status.stdout + status.stderr
        report = json.loads(status.stdout)
        assert report["healthy"] and report["now_source"] == "exchange", report["unhealthy"]
        assert len(report["daemons"]) == 1 and report["daemons"][0]["candles_stored"] > 0
        assert {t["symbol"] for t in report["tickers"]} == set(SYMBOLS)
        for ticker in report["tickers"]:
            assert ticker["m1"]["open_time_ms"] >= last_closed, ticker
            assert ticker["m1"]["lag_s"] < 120 and ticker["open_gaps"] == 0, ticker
            newest = ticker["m1"]["open_time_ms"]
            assert ticker["indicators"]["m1"]["open_time_ms"] == newest, ticker
            for tf in ("m15", "h1", "h4", "d1"):  # the newest whole bucket of each
                assert ticker[tf]["open_time_ms"] == (newest + M1) // TF_MS[tf] * TF_MS[tf] - TF_MS[tf], ticker
        assert report["gaps"]["missing"] == 0 and report["gaps"]["backfilled"] >= exchange.stats.closes_dropped > 0
        m1_stream = report["streams"][core_io.CANDLE_STREAMS["m1"]]
        own_group = group_of(report["daemons"][0]["member"])
        assert m1_stream["length"] > 0 and m1_stream["groups"][own_group]["pending"] == 0
        text = run_main(env, "status")
        assert text.returncode == 0 and "HEALTHY" in text.stdout and all(s in text.stdout for s in SYMBOLS)

        stopped = time.monotonic()
        assert daemon.terminate() == 0
        assert time.monotonic() - stopped < 10
        checked = await assert_store_matches_source(pool, redis, source, SYMBOLS, last_closed)
        assert checked >= len(SYMBOLS) * (day + HISTORY_M1)
        for tf, whole in (("h1", 24), ("h4", 6), ("d1", 1)):  # the replayed day, at least
            stored = await pool.fetchval(f"SELECT count(*) FROM {core_io.candle_table(tf)}")
            assert stored >= len(SYMBOLS) * whole, tf
        await assert_every_candle_announced(pool, redis)
        gap_log = {
            (r["symbol"], datetime_to_ms(r["open_time"]))
            for r in await pool.fetch("SELECT symbol, open_time FROM missing_m1_log_v4 WHERE status = 'backfilled'")
        }
        injected = {gap for gap in exchange.stats.dropped_closes if START + 5 * M1 <= gap[1] <= last_closed}
        assert injected and injected <= gap_log
        assert await assert_values_match_talib(pool, SYMBOLS) > len(SYMBOLS) * day * 40
        # Order flow catches up behind the candles at 1,200x (its refetches are REST-bound):
        # whole hours past the 03:00 drop show it went on (it stopped there before).
        assert await assert_higher_order_flow_merges_its_minutes(pool, SYMBOLS) >= 4 * len(SYMBOLS)

        after = run_main(env, "status", "--json")  # the daemon is gone: its heartbeat with it
        assert after.returncode == 1 and any("heartbeat" in r for r in json.loads(after.stdout)["unhealthy"])
    finally:
        daemon.cleanup()
        await exchange.stop()


async def assert_higher_order_flow_merges_its_minutes(pool, symbols: list[str]) -> int:
    """Every H1, H4 and D1 order-flow bar is the merge of its 60, 240 or 1,440 stored M1
    bars, and every bucket whose minutes are all stored has its bar; returns how many."""
    checked = 0
    for symbol in symbols:
        stored = (await store.bars_between(pool, [(symbol, 0, FAR)], ["m1", "h1", "h4", "d1"])).get(symbol, {})
        minutes = {t: bar for (tf, t), bar in stored.items() if tf == "m1"}
        for tf in ("h1", "h4", "d1"):
            size = TF_MS[tf]
            got = {t: bar for (part, t), bar in stored.items() if part == tf}
            starts = {t - t % size for t in minutes}
            whole = {s for s in starts if all(s + k * M1 in minutes for k in range(size // M1))}
            assert set(got) == whole, (symbol, tf, sorted(set(got) ^ whole)[:5])
            for start, bar in got.items():
                parts = [minutes[start + k * M1] for k in range(size // M1)]
                assert bar == merge(start, parts[0].row_size * TF_ROW_MULTIPLE[tf], parts), (symbol, tf, start)
            checked += len(got)
    return checked


async def _indicators_at(redis, symbols: list[str], open_time: int) -> bool:
    for symbol in symbols:
        if int(await redis.hget(core_io.indicator_key(symbol, "m1"), "open_time") or 0) < open_time:
            return False
    return True
