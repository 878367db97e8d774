"""Fault scenarios for the feed: the whole daemon replays real data while the process is
killed, the WebSocket misbehaves in every way Binance's does, the route is the silent
legacy one, and REST answers 429/418, slowly or truncated. Nothing may be lost, doubled
or computed wrong (tests/faults.py compares everything with the archive and TA-Lib).

A recovery is timed from the end of a fault (for a kill: from the kill, so it includes the
restart) until the first minute that closed after it is stored, cached, announced and
computed for every symbol (at speed 60 a minute is a second: that is the resolution).
"""

from __future__ import annotations

import asyncio
import random
import time

import pytest
from faults import FaultRun, fault_run
from replay import M1, START, SYMBOLS, until, until_sim

from binance.protocol import kline_stream
from candles import datetime_to_ms
from fake_exchange.frames import UNKNOWN_KINDS

# ---------------------------------------------------------------------------- helpers


async def at_instant(run: FaultRun, sim_ms: int) -> None:
    """Wait for an exact exchange instant (about 0.1 s of sim time at speed 60), the daemon alive."""
    clock = run.exchange.clock
    while (now := clock.now_ms()) < sim_ms:
        assert run.daemon.alive(), run.daemon.output()[-3000:]
        ahead_s = (sim_ms - now) / 1000 / clock.speed
        await asyncio.sleep(0.05 if ahead_s > 0.2 else 0.002)


async def before_next_minute(run: FaultRun, seconds_before: float = 5) -> int:
    """Wait until `seconds_before` ahead of the next minute boundary; returns that boundary.

    A connection dropped then misses that minute's closes (they go out 0.2-2 s after it,
    the reconnect takes at least 0.5 s of real time = 30 s of sim time at speed 60), so the
    minute can only come from REST."""
    now = run.exchange.clock.now_ms()
    boundary = now - now % M1 + M1
    if boundary - now < seconds_before * 1000 + 2_000:
        boundary += M1
    await at_instant(run, boundary - int(seconds_before * 1000))
    return boundary


async def recovered_from(run: FaultRun, fault_sim_ms: int, since: float) -> float:
    """Recorded recovery: wait until the minute in progress at the fault can be required
    (its close went out after the fault), then until the daemon caught up."""
    minute = fault_sim_ms - fault_sim_ms % M1
    await until_sim(run.exchange, minute + M1 + 5_000 + 500, run.daemon)
    return await run.recovered(since=since)


async def logged(run: FaultRun, level: str, pattern: str) -> list[str]:
    rows = await run.pool.fetch(
        "SELECT message FROM system_log_v4 WHERE level = $1 AND message LIKE $2 ORDER BY id", level, pattern
    )
    return [r["message"] for r in rows]


async def crashes(run: FaultRun) -> list[str]:
    return await logged(run, "ERROR", "%worker crashed%")


def sim_label(sim_ms: int) -> str:
    offset = sim_ms - START
    return f"+{offset // M1}m{offset % M1 / 1000:04.1f}s"


def report(run: FaultRun, **extra: object) -> None:
    times = ", ".join(f"{t:.1f}" for t in run.recoveries)
    details = "".join(f"; {k}={v}" for k, v in extra.items())
    print(f"\n{run.name}: recoveries (s) [{times}]{details}")


# ---------------------------------------------------------------------------- 1. kill -9

KILLS = 5


@pytest.mark.storage_modes
@pytest.mark.timeout(240)
async def test_kill_9_at_five_random_moments_then_restart(pool, redis, redis_url, pg_url):
    rng = random.Random(2026)
    kinds = ["mid-minute", "mid-minute", "after a boundary", "after a boundary", "after a boundary"]
    rng.shuffle(kinds)
    async with fault_run("kill-9 x5", pool, redis, redis_url, pg_url, minutes=240) as run:
        run.daemon.start()
        await run.ready()
        base = run.exchange.clock.now_ms() // M1 * M1 + 2 * M1
        kills: list[int] = []
        for i, kind in enumerate(kinds):
            minute = base + (9 * i + rng.randint(0, 4)) * M1
            # Mid-minute: anywhere in the quiet part. After a boundary: while the previous
            # minute's closes arrive (0.2-2 s after it) and are being stored.
            offset = rng.randint(10_000, 50_000) if kind == "mid-minute" else rng.randint(200, 2_000)
            target = minute + offset
            while target < run.exchange.clock.now_ms() + 2_000:  # the previous recovery ran late
                target += M1
            await at_instant(run, target)
            killed_at, killed_sim = time.monotonic(), run.exchange.clock.now_ms()
            run.daemon.kill()
            kills.append(killed_sim)
            run.inject(f"kill -9 at {sim_label(killed_sim)} ({kind})")
            run.daemon.start()
            await recovered_from(run, killed_sim, killed_at)
        await run.finish()

    assert run.daemon.starts == KILLS + 1
    started = await logged(run, "INFO", "daemon started%")
    assert len(started) == KILLS + 1, started
    assert run.exchange.stats.connections_opened >= KILLS + 1
    # Each restart found the minutes missed while it was down and filled them over REST:
    # every close the exchange never sent (no one was connected; its own log says which
    # it sent) is a logged gap, backfilled. A restart quick enough to miss no close of a
    # symbol leaves that symbol no gap to find.
    gaps = {
        (g["symbol"], datetime_to_ms(g["open_time"])): g["status"]
        for g in await pool.fetch("SELECT symbol, open_time, status FROM missing_m1_log_v4")
    }
    sent = {(symbol, t) for symbol, t, _ in run.exchange.stats.close_log}
    newest_sent = max(t for _, t in sent)
    found = 0
    for killed_sim in kills:
        minute = killed_sim - killed_sim % M1
        for symbol in run.symbols:
            missed = [
                t for t in range(minute - M1, minute + 10 * M1, M1) if (symbol, t) not in sent and t < newest_sent
            ]
            for t in missed:
                assert gaps.get((symbol, t)) == "backfilled", f"{symbol} {sim_label(t)}: no gap found after a kill"
            found += len(missed)
    assert found, "no restart missed a close: the test no longer tests the gap search"
    assert set(gaps.values()) == {"backfilled"}
    assert not await crashes(run)
    report(run, kills=[sim_label(k) for k in kills], closes_missed_and_found=found)


# ---------------------------------------------------------------------------- 2. WebSocket


@pytest.mark.timeout(240)
async def test_websocket_drops_silence_1008_24h_cut_and_bad_frames(pool, redis, redis_url, pg_url):
    followed, added = SYMBOLS[:6], SYMBOLS[6]
    env = {"SYMBOLS": ",".join(followed)}
    async with fault_run("websocket", pool, redis, redis_url, pg_url, minutes=240, env=env) as run:
        exchange, faults, stats = run.exchange, run.exchange.faults, run.exchange.stats
        run.symbols = list(followed)
        run.daemon.start()
        await run.ready()

        # Abrupt drop: no close frame, the daemon sees 1006.
        opened = stats.connections_opened
        await before_next_minute(run)
        fault_sim, since = exchange.clock.now_ms(), time.monotonic()
        exchange.drop_all_connections()
        run.inject("abrupt drop (1006)")
        await recovered_from(run, fault_sim, since)
        assert stats.connections_opened > opened

        # Open but silent (pings answered, no data) for 5 s: noticed and replaced.
        opened = stats.connections_opened
        faults.silent = True
        run.inject("silence without close 5 s")
        await run.sleep(5)
        faults.silent = False
        fault_sim, since = exchange.clock.now_ms(), time.monotonic()
        silent_reconnects = stats.connections_opened - opened
        assert silent_reconnects >= 1, "a silent connection was not replaced"
        await recovered_from(run, fault_sim, since)

        # A ticker added live is subscribed with SUBSCRIBE, which is answered with 1008.
        rejected = stats.rate_limit_closes
        faults.reject_subscribe_1008 = True
        await pool.execute("INSERT INTO tickers (symbol, status) VALUES ($1, 'enabled')", added)
        run.inject(f"SUBSCRIBE closed with 1008 ({added} added live)")
        await until(lambda: stats.rate_limit_closes > rejected, 30, "a SUBSCRIBE to be answered with 1008")
        await run.sleep(2)
        faults.reject_subscribe_1008 = False
        fault_sim, since = exchange.clock.now_ms(), time.monotonic()
        await until(
            lambda: any(kline_stream(added) in subs for subs in exchange.subscriptions()),
            30,
            f"{added} to be subscribed after the 1008",
        )
        run.symbols.append(added)
        await recovered_from(run, fault_sim, since)

        # Binance's 24-hour cut: a clean close with 1001.
        opened = stats.connections_opened
        await before_next_minute(run)
        fault_sim, since = exchange.clock.now_ms(), time.monotonic()
        await exchange.close_all_connections(1001, "24h")
        run.inject('server close 1001 "24h"')
        await recovered_from(run, fault_sim, since)
        assert stats.connections_opened > opened

        # Garbage and valid-but-unknown frames among the klines for 8 s.
        faults.malformed_frame = faults.unknown_frame = 0.08
        run.inject("malformed + unknown frames 8% of kline frames, 8 s")
        await run.sleep(8)
        faults.malformed_frame = faults.unknown_frame = 0.0
        fault_sim, since = exchange.clock.now_ms(), time.monotonic()
        await recovered_from(run, fault_sim, since)
        await run.finish()

    assert stats.rate_limit_closes > rejected
    assert stats.malformed_sent >= 5 and stats.unknown_sent >= 5, (stats.malformed_sent, stats.unknown_sent)
    assert len(stats.unknown_kinds) >= 4 and set(stats.unknown_kinds) <= set(UNKNOWN_KINDS), stats.unknown_kinds
    assert await logged(run, "WARNING", "skipped a bad frame%")
    stored_symbols = {r["symbol"] for r in await pool.fetch("SELECT DISTINCT symbol FROM ohlcv4_m1")}
    assert stored_symbols == set(run.symbols), "a kline for a symbol not followed was stored"
    assert await logged(run, "WARNING", "%1008%"), "the 1008 close was not logged"
    assert await logged(run, "WARNING", "%1001%"), "the 24-hour cut was not logged"
    assert run.daemon.starts == 1 and len(await logged(run, "INFO", "daemon started%")) == 1
    assert not await crashes(run)
    report(run, silent_reconnects=silent_reconnects, unknown=dict(stats.unknown_kinds))


# ---------------------------------------------------------------------------- 3. legacy route


@pytest.mark.timeout(240)
async def test_legacy_route_silence_is_an_error_and_every_candle_still_arrives(pool, redis, redis_url, pg_url):
    """The pre-2026 `/stream` route acknowledges and sends nothing. The daemon must say so
    (ERROR) and still store every closed minute, over REST."""
    env = {"REST_FALLBACK_S": "1"}  # the fallback's poll (30 s by default), scaled down for speed 60
    async with fault_run("legacy-route", pool, redis, redis_url, pg_url, minutes=240, env=env) as run:
        legacy_url = run.exchange.ws_url.removesuffix("/market")
        run.daemon.env["BINANCE_WS_URL"] = legacy_url  # (the exchange's port is known only now)
        run.inject("BINANCE_WS_URL on the legacy route (acks, never sends data)")
        since = time.monotonic()
        run.daemon.start()
        await run.ready(timeout=60)  # the first history (REST, at boot)
        # Minutes that closed after boot can only come from the REST fallback.
        booted = run.exchange.clock.now_ms()
        try:
            await recovered_from(run, booted + M1, since)  # timed from the start
        except AssertionError:
            errors = await logged(run, "ERROR", "%")
            raise AssertionError(f"not keeping up over the legacy route; ERROR rows: {errors[:5]}") from None
        await run.sleep(10)
        await run.finish()

    stats = run.exchange.stats
    assert stats.connections_opened >= 1 and stats.kline_events == 0 and not stats.closes_sent
    assert stats.rest_klines > 0  # every candle came over REST
    errors = [m for m in await logged(run, "ERROR", "%") if "/market" in m or "BINANCE_WS_URL" in m]
    assert errors, "no ERROR naming the /market route or BINANCE_WS_URL"
    assert not await crashes(run)
    report(run, error=errors[0], rest_klines=stats.rest_klines)


# ---------------------------------------------------------------------------- 4. REST


@pytest.mark.timeout(240)
async def test_rest_429_418_slow_and_truncated_while_the_websocket_drops(pool, redis, redis_url, pg_url):
    async with fault_run("rest", pool, redis, redis_url, pg_url, minutes=240) as run:
        exchange, faults, stats = run.exchange, run.exchange.faults, run.exchange.stats
        run.daemon.start()
        await run.ready()

        # 429 twice (Retry-After 1 s), then 418 (Retry-After 2 s), on the catch-up after a drop.
        faults.rest_429_count, faults.rest_418_after_429 = 2, True
        await before_next_minute(run)
        fault_sim, since, klines = exchange.clock.now_ms(), time.monotonic(), stats.rest_klines
        exchange.drop_all_connections()
        run.inject("WS drop; klines 429 x2 then 418")
        await until(lambda: stats.rest_418 >= 1, 30, "the catch-up to run into the 418")
        await recovered_from(run, fault_sim, since)
        assert stats.rest_429 >= 2 and stats.rest_418 >= 1 and stats.rest_klines >= klines + 4

        # Slow REST (1.5 s a response) across two drops.
        faults.rest_delay_s = 1.5
        for _ in range(2):
            await before_next_minute(run)
            fault_sim, since, klines = exchange.clock.now_ms(), time.monotonic(), stats.rest_klines
            exchange.drop_all_connections()
            run.inject("WS drop; REST answers after 1.5 s")
            await recovered_from(run, fault_sim, since)
            assert stats.rest_klines > klines, "the slow catch-up did not use REST"
        faults.rest_delay_s = 0.0

        # Bodies cut in half (Content-Length promised, connection closed).
        faults.rest_truncate_count = 3
        await before_next_minute(run)
        fault_sim, since, klines = exchange.clock.now_ms(), time.monotonic(), stats.rest_klines
        exchange.drop_all_connections()
        run.inject("WS drop; 3 REST bodies truncated")
        await until(lambda: faults.rest_truncate_count == 0, 30, "three truncated REST responses")
        await recovered_from(run, fault_sim, since)
        assert stats.rest_truncated == 3 and stats.rest_klines > klines
        await run.finish()

    assert await logged(run, "WARNING", "HTTP 429%"), "the 429 was not logged"
    assert await logged(run, "WARNING", "HTTP 418%"), "the 418 was not logged"
    backfilled = await pool.fetchval("SELECT count(*) FROM missing_m1_log_v4 WHERE status = 'backfilled'")
    assert backfilled >= 4 * len(run.symbols)  # every drop cost each symbol at least one minute
    assert run.daemon.starts == 1 and not await crashes(run)
    report(run, rest_429=stats.rest_429, rest_418=stats.rest_418, truncated=stats.rest_truncated)
