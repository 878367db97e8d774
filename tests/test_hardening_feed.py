"""Hardening of the feed (issue 13): a bad frame, a bad candle, a bad ticker or a bad
answer never stops the work for the others. Each test failed on the code before."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from decimal import Decimal
from itertools import islice

import asyncpg
import orjson
import pytest
import websockets
from aiohttp import web
from daemon import DaemonProcess, run_main
from replay import (
    HISTORY_M1,
    M1,
    START,
    assert_store_matches_source,
    complete,
    daemon_env,
    pause_mid_minute,
    until,
    until_sim,
)
from servers import free_port

import core_io
from backfill import Backfiller
from binance.clock import ExchangeClock
from binance.protocol import FrameError, parse_frame, parse_rest_kline
from binance.rest import MAX_BODY_BYTES, RestClient, RestError, WeightLimiter, retry_after_s
from binance.streams import StreamConnection, stream_url
from binance.symbols import Listing, TickerFilter, ticker_problem
from candles import Candle
from fake_exchange import ArchiveSource, FakeExchange
from fake_exchange.frames import kline_event, rest_row
from feed_and_aggregate import CandleIntake, Feed, FeedSettings
from infra import load_settings, make_redis, system_event_log
from market_data import read_archive

NEAR = list(islice(read_archive("NEARUSDT"), 4 * 60))  # from 2026-02-01 00:00
T0 = NEAR[0].open_time


def closing_frame(candle: Candle, event_ms: int | None = None, **k_overrides: object) -> bytes:
    """A combined-stream closing kline as Binance sends it, with fields overridden."""
    data = orjson.loads(kline_event(candle, event_ms or candle.open_time + 61_000, closed=True))
    data["k"].update(k_overrides)
    return orjson.dumps({"stream": f"{candle.symbol.lower()}@kline_1m", "data": data})


# --------------------------------------------------------------------------- row 2: the parser


@pytest.mark.parametrize(
    ("overrides", "event_ms", "reason"),
    [
        ({}, (T0 + 61_000) * 1000, "event time"),  # microseconds
        ({"t": T0 + 10 * 365 * 86_400_000}, None, "implausible"),  # far ahead of its own event time
        ({"t": 4_200_000_000_000}, 4_200_000_061_000, "between 2019 and 2100"),  # year 2103
        ({"n": 2**31}, None, "trade count"),
        ({"n": -1}, None, "trade count"),
        ({"v": "-1.5"}, None, "out of range"),
        ({"v": "NaN"}, None, "out of range"),
        ({"q": "1e999999"}, None, "out of range"),
        ({"c": "1" + "0" * 60}, None, "not a decimal string"),
        ({"h": "0.0001"}, None, "out of order"),  # high below low
        ({"l": "0"}, None, "not positive"),
        ({"V": "1000000"}, None, "taker buy volume"),
        ({"s": "NEAR USDT"}, None, "symbol"),
    ],
)
def test_an_implausible_closing_kline_is_refused_with_its_reason(overrides, event_ms, reason):
    with pytest.raises(FrameError, match=reason):
        parse_frame(closing_frame(NEAR[0], event_ms, **overrides))


def test_the_real_archive_and_rest_rows_pass_the_plausibility_checks():
    for candle in NEAR:
        assert parse_frame(closing_frame(candle)).candle == candle
        assert parse_rest_kline("NEARUSDT", orjson.loads(orjson.dumps(rest_row(candle))))[0] == candle


def test_the_exchange_clock_holds_what_it_cannot_judge_and_the_exchange_decides():
    clock = ExchangeClock(tolerance_ms=3_600_000)
    assert clock.plausible(0) and not clock.plausible(T0)  # nothing is trusted before the first sync
    clock.sync(T0)
    assert clock.plausible(T0 + 3_600_000) and not clock.plausible(T0 + 3_600_001)
    clock.advance(T0 + 60_000)
    assert clock.plausible(T0 + 3_660_000)
    clock.sync(T0 + 30_000)  # behind what the events said, within tolerance: kept
    assert clock.now_ms == T0 + 60_000
    clock.now_ms = T0 + 10 * 3_600_000  # trusted wrongly (never through advance, but say so)
    clock.sync(T0 + 90_000)  # the exchange's own time wins
    assert clock.now_ms == T0 + 90_000


async def _feed(pool, redis, exchange: FakeExchange | None, symbols: set[str], **feed_env: str) -> Feed:
    env = {
        "REDIS_URL": "redis://127.0.0.1:1/0",
        "POSTGRES_URL": "postgresql://x@127.0.0.1:1/x",
        **({"BINANCE_REST_URL": exchange.rest_url, "BINANCE_WS_URL": exchange.ws_url} if exchange else {}),
    }
    settings = load_settings(env)
    feed_settings = FeedSettings.from_env(settings, feed_env)
    feed = Feed(settings, feed_settings, pool, redis, core_io.make_candle_store(redis, True, 250))
    feed.symbols = await feed.ownership.claim(symbols)  # the leases first: a feed writes only those it holds
    return feed


async def test_bad_frames_for_one_symbol_never_hold_up_the_others(pool, redis):
    """One closing frame with µs time, one a decade ahead, one with 2^31 trades, one with
    a negative volume: the other symbol's candles are stored, bucketed and announced, the
    clock and the gap tracker stay sane, and the bad symbol gets only its good minutes."""
    link = list(islice(read_archive("LINKUSDT"), 15))
    exchange = FakeExchange(ArchiveSource(["NEARUSDT", "LINKUSDT"]), start_ms=T0 + 16 * M1, speed=1)
    await exchange.start()
    feed = await _feed(pool, redis, exchange, {"NEARUSDT", "LINKUSDT"})
    intake = feed.intake
    workers = [
        asyncio.create_task(w())
        for w in (feed.intake_loop, intake.run_aggregator, intake.run_publisher, intake.run_settler, feed.keep_clock)
    ]
    try:
        feed.handle_frame(closing_frame(link[0]))  # before any sync: held, not judged
        assert len(feed.ahead) == 1 and feed.closed.empty()
        await until(lambda: not feed.ahead, 10, "the clock's first sync")
        for good, near in zip(link[1:], NEAR[1:15]):
            feed.handle_frame(closing_frame(good))
            feed.handle_frame(closing_frame(near, (near.open_time + 61_000) * 1000))  # µs: refused
            feed.handle_frame(closing_frame(near, n=2**31))  # refused
            feed.handle_frame(closing_frame(near, v="-3"))  # refused
        feed.handle_frame(closing_frame(NEAR[0]))  # a good one of the bad symbol's
        far = T0 + 5 * 365 * 86_400_000
        feed.handle_frame(closing_frame(NEAR[0], far + 61_000, t=far))  # ahead of the exchange: held, then refused
        await until(lambda: feed.closed.empty() and not feed.batch and not feed.ahead, 10, "the intake")
        await until(lambda: not intake.buckets_due and not intake.aggregating and not intake.held, 10, "aggregation")
        assert await core_io.fetch_candles(pool, "LINKUSDT", "m1", T0, T0 + 15 * M1) == link
        assert await core_io.fetch_candles(pool, "NEARUSDT", "m1", T0, T0 + 15 * M1) == [NEAR[0]]
        m15 = await core_io.fetch_candles(pool, "LINKUSDT", "m15", T0, T0 + 15 * M1)
        assert [c.volume for c in m15] == [sum((c.volume for c in link), Decimal(0))]
        announced = await core_io.announced_candles(redis, core_io.CANDLE_STREAMS["m1"])
        assert {t for s, t in announced if s == "LINKUSDT"} == {c.open_time for c in link}
        assert feed.clock.now_ms < T0 + 86_400_000  # never moved by the bad times
        assert max(feed.tracker.newest.values()) < T0 + 86_400_000
        assert len(feed.new_gaps) < 20
        assert feed.stats.bad_frames == 3 * 14 + 1
        day_later = core_io.ms_to_datetime(T0 + 86_400_000)
        assert await pool.fetchval("SELECT count(*) FROM missing_m1_log_v4 WHERE open_time > $1", day_later) == 0
    finally:
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        await feed.rest.close()
        await exchange.stop()


async def test_a_close_the_fence_drops_for_a_symbol_still_followed_is_logged_as_a_gap(pool, redis):
    """Redis away past the lease: the fence drops the live closes of the symbols this
    process still follows. Unlogged, a lease that came back before the follower looked
    lost those minutes for good (a process's whole share, in the scale-out replay); a
    symbol no longer followed is its new owner's."""
    feed = await _feed(pool, redis, None, {"NEARUSDT", "LINKUSDT"})
    link = next(iter(read_archive("LINKUSDT")))
    feed.intake.may_write = lambda symbol: symbol == "LINKUSDT"  # NEARUSDT's lease lapsed
    for candle in (NEAR[0], link, dataclasses.replace(NEAR[0], symbol="BTCUSDT")):
        feed.closed.put_nowait(candle)
    loop = asyncio.create_task(feed.intake_loop())
    try:
        await until(lambda: feed.closed.empty() and not feed.batch, 10, "the intake")
        await feed._flush_gaps()
    finally:
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)
        await feed.rest.close()
    gaps = await pool.fetch("SELECT symbol, open_time, status FROM missing_m1_log_v4")
    assert [tuple(g) for g in gaps] == [("NEARUSDT", core_io.ms_to_datetime(T0), "missing")]
    assert await core_io.fetch_candles(pool, "LINKUSDT", "m1", T0, T0 + M1) == [link]
    assert await core_io.fetch_candles(pool, "NEARUSDT", "m1", T0, T0 + M1) == []


async def test_a_candle_postgresql_refuses_is_set_aside_and_the_batch_is_stored(pool, redis):
    intake = CandleIntake(pool, redis, core_io.make_candle_store(redis, True, 250), 10_000)
    poison = dataclasses.replace(NEAR[7], trades=2**31)  # past PostgreSQL's integer
    rejected: list[Candle] = []
    fresh = await intake.store_m1([*NEAR[:7], poison, *NEAR[8:15]], rejected)
    assert rejected == [poison]
    assert len(fresh) == 14
    stored = await core_io.fetch_candles(pool, "NEARUSDT", "m1", T0, T0 + 15 * M1)
    assert [c.open_time for c in stored] == [c.open_time for c in NEAR[:15] if c is not NEAR[7]]
    assert intake.recent.parts_in_memory(("NEARUSDT", "m15", T0), {}) is None  # never bucketed from memory
    errors = await until_logged(pool, "PostgreSQL refused the m1 candle NEARUSDT")
    assert errors


async def until_logged(pool, fragment: str) -> list[str]:
    await system_event_log.flush(pool)
    rows = await pool.fetch("SELECT message FROM system_log_v4 WHERE message LIKE $1", f"%{fragment}%")
    return [r["message"] for r in rows]


# --------------------------------------------------------------------------- rows 5 and 6: tickers


def test_ticker_problems_name_the_fix():
    listing = {"NEARUSDT": Listing("TRADING", "PERPETUAL"), "BTCUSDT": Listing("TRADING", "PERPETUAL")}
    listing["OLDUSDT"] = Listing("SETTLING", "PERPETUAL")
    assert ticker_problem("NEARUSDT", listing) is None
    assert ticker_problem("NOPEUSDT", listing) == "not listed by the exchange"
    assert ticker_problem("NEARUSTD", listing) == "not listed by the exchange (did you mean NEARUSDT?)"
    assert ticker_problem("nearusdt", listing) == "not a valid symbol name (did you mean NEARUSDT?)"
    assert ticker_problem("BTC/USDT:USDT", listing) == "not a valid symbol name (did you mean BTCUSDT?)"
    assert ticker_problem("OLDUSDT", listing) == "not trading on the exchange (status SETTLING)"
    for bad in ("NEAR USDT", "A#B", "A/B", "A@B", "X" * 41, ""):
        assert ticker_problem(bad, None).startswith("not a valid symbol name")
    filtered = TickerFilter(3600)
    filtered.update(listing, 0.0)
    filtered.refused("BTCUSDT")
    followed, problems = filtered.split(["NEARUSDT", "BTCUSDT", "A#B"])
    assert followed == {"NEARUSDT"} and set(problems) == {"BTCUSDT", "A#B"}


def test_stream_names_are_encoded():
    url = stream_url("wss://x/market", ["币安人生usdt@kline_1m", "nearusdt@kline_1m"])
    assert url == "wss://x/market/stream?streams=nearusdt@kline_1m/%E5%B8%81%E5%AE%89%E4%BA%BA%E7%94%9Fusdt@kline_1m"


async def test_symbols_setting_disables_what_it_no_longer_lists_and_nothing_else(pool):
    await core_io.apply_symbols_setting(pool, ["AUSDT", "BUSDT"])
    await core_io.enable_symbols(pool, ["HANDUSDT"])  # enabled by hand (SQL, CLI)
    assert await core_io.apply_symbols_setting(pool, ["AUSDT"]) == ["BUSDT"]
    assert await core_io.enabled_symbols(pool) == ["AUSDT", "HANDUSDT"]
    assert await core_io.apply_symbols_setting(pool, ["AUSDT", "BUSDT"]) == []
    assert await core_io.enabled_symbols(pool) == ["AUSDT", "BUSDT", "HANDUSDT"]


async def test_one_symbols_backlog_never_starves_the_others(pool):
    flood = [("AAAUSDT", T0 + i * M1) for i in range(60_000)]  # ~42 days of an unlisted ticker's gaps
    await core_io.log_missing_m1(pool, [*flood, ("ZZZUSDT", T0), ("ZZZUSDT", T0 + M1)])
    missing = await core_io.fetch_missing_m1(pool, ["AAAUSDT", "ZZZUSDT"], per_symbol=3000)
    assert ("ZZZUSDT", T0) in missing and ("ZZZUSDT", T0 + M1) in missing
    assert sum(1 for s, _ in missing if s == "AAAUSDT") == 3000
    assert await core_io.fetch_missing_m1(pool, ["ZZZUSDT"]) == [("ZZZUSDT", T0), ("ZZZUSDT", T0 + M1)]
    await core_io.close_missing_m1(pool, ["AAAUSDT"])
    assert await core_io.fetch_missing_m1(pool, ["AAAUSDT"]) == []


@pytest.mark.timeout(120)
async def test_enabled_tickers_the_exchange_cannot_serve_are_not_followed(pool, redis_url, pg_url):
    """An unlisted ticker, a lower-case one and names with a space, '#' and '/' are
    enabled beside two good ones: the good ones are stored exactly, the others get a
    `problem` (shown by status), no gap row, no REST request and no stream name."""
    good = ["NEARUSDT", "LINKUSDT"]
    bad = {
        "NOPEUSDT": "not listed by the exchange",
        "nearusdt": "not a valid symbol name (did you mean NEARUSDT?)",
        "NEAR USDT": "not a valid symbol name (did you mean NEARUSDT?)",
        "NEARUSDT#1": "not a valid symbol name (did you mean NEARUSDT?)",
        "LINK/USDT": "not a valid symbol name (did you mean LINKUSDT?)",
    }
    source = ArchiveSource(good, start_ms=START - (HISTORY_M1 + 30) * M1, end_ms=START + 60 * M1)
    exchange = FakeExchange(source, start_ms=START, speed=60, seed=5)
    await exchange.start()
    await core_io.enable_symbols(pool, list(bad))
    daemon = DaemonProcess({**daemon_env(exchange, redis_url, pg_url, good), "EXCHANGE_INFO_REFRESH_S": "60"})
    daemon.start()
    try:
        await until_sim(exchange, START + 12 * M1, daemon)

        async def problems() -> dict[str, str]:
            rows = await pool.fetch("SELECT symbol, problem FROM tickers WHERE problem IS NOT NULL")
            return {r["symbol"]: r["problem"] for r in rows}

        await until(lambda: problems(), 30, "the tickers' problems")
        assert await problems() == bad
        assert await pool.fetchval("SELECT count(*) FROM missing_m1_log_v4 WHERE symbol <> ALL($1)", good) == 0
        assert exchange.stats.rest_400 == 0  # nothing asked for a symbol the exchange does not have
        streams = set().union(*exchange.subscriptions())
        assert {s for s in streams if "@kline" in s} == {f"{s.lower()}@kline_1m" for s in good}
        last_closed = await pause_mid_minute(exchange)
        client = make_redis(redis_url)
        try:
            await until(lambda: complete(pool, good, last_closed, client), 30, "the good symbols' candles")
            await assert_store_matches_source(pool, client, source, good, last_closed)
        finally:
            await client.aclose()
        status = run_main({"REDIS_URL": redis_url, "POSTGRES_URL": pg_url}, "status", "--json")
        report = orjson.loads(status.stdout)
        assert {t["symbol"]: t["problem"] for t in report["not_followed"]} == bad
        assert {t["symbol"] for t in report["tickers"]} == set(good)
        assert not any(s in reason for reason in report["unhealthy"] for s in bad)
        assert report["warnings"] and "not followed" in report["warnings"][0]
        assert daemon.terminate() == 0
    finally:
        daemon.cleanup()
        await exchange.stop()


# --------------------------------------------------------------------------- REST and WebSocket answers


async def _server(handler) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}"


async def test_a_rest_answer_over_the_size_cap_is_an_error_not_memory():
    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        chunk = b"[" + b"0," * 500_000
        for _ in range(MAX_BODY_BYTES // len(chunk) + 2):
            await response.write(chunk)
        return response

    runner, url = await _server(endless)
    client = RestClient(url, WeightLimiter(2400, 60), attempts=1)
    try:
        with pytest.raises(RestError, match="cap"):
            await client.get("/fapi/v1/klines", {}, 1)
    finally:
        await client.close()
        await runner.cleanup()
    assert retry_after_s("abc") == 60.0 and retry_after_s("1e9") == 3600.0 and retry_after_s("5") == 5.0


async def test_a_binary_frame_is_parsed_like_a_text_one():
    frames = [closing_frame(NEAR[1]), closing_frame(NEAR[2]).decode(), b"\xff\xfe not json"]

    async def serve(ws) -> None:
        for frame in frames:
            await ws.send(frame)
        await asyncio.sleep(5)

    received: list[str | bytes] = []
    async with websockets.serve(serve, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        connection = StreamConnection(0, f"ws://127.0.0.1:{port}", FeedSettings(), received.append, lambda _s: None)
        connection.streams = {"nearusdt@kline_1m"}
        task = asyncio.create_task(connection.run())
        await until(lambda: len(received) == 3, 5, "three frames")
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert isinstance(received[0], bytes)
    assert parse_frame(received[0]).candle == NEAR[1]
    with pytest.raises(FrameError, match="not JSON"):
        parse_frame(received[2])


async def test_a_failed_backfill_round_leaves_no_request_running(pool, redis):
    exchange = FakeExchange(ArchiveSource(["NEARUSDT"]), start_ms=T0 + 200 * M1, speed=1)
    await exchange.start()
    feed = await _feed(pool, redis, exchange, {"NEARUSDT"})
    try:
        await core_io.log_missing_m1(pool, [("NEARUSDT", T0 + i * M1) for i in range(0, 180, 3)])  # 60 ranges
        exchange.faults.rest_delay_s = 0.3
        backfiller: Backfiller = feed.backfiller
        await feed.pool.close()  # PostgreSQL goes away in the middle of the round
        with pytest.raises(Exception):  # noqa: B017 (whatever the closed pool raises)
            await backfiller.fill_once()
        await asyncio.sleep(0.05)
        leftover = [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()]
        assert not [t for t in leftover if "_fetch" in repr(t.get_coro())]
    finally:
        await feed.rest.close()
        await exchange.stop()


async def test_a_catch_up_cut_short_by_an_outage_is_done_by_the_workers_restart(pool, redis):
    """Redis away (a failover) while the symbols just taken over are caught up: the worker
    fails, and its supervisor restarts it. What it had taken on stays queued for the
    restart; lost with the worker, the minutes missed before a take-over were never
    fetched, and those symbols' order flow waited on their klines for good."""
    exchange = FakeExchange(ArchiveSource(["NEARUSDT"]), start_ms=T0 + 16 * M1, speed=1)
    await exchange.start()
    feed = await _feed(pool, redis, exchange, {"NEARUSDT"})
    await core_io.upsert_candles(pool, NEAR[:5])
    dead = make_redis(f"redis://127.0.0.1:{free_port()}/0")
    try:
        feed.to_reconcile |= {"NEARUSDT", "LINKUSDT"}  # LINKUSDT: no longer followed by then
        feed.catch_up_pending |= {"NEARUSDT"}
        feed.catch_up_wake.set()
        feed.intake.redis = dead
        with pytest.raises(Exception):  # noqa: B017 (whatever the client raises for a dead server)
            await feed.catch_up()
        assert feed.to_reconcile == feed.catch_up_pending == {"NEARUSDT"} and feed.catch_up_wake.is_set()
        assert await pool.fetchval("SELECT count(*) FROM missing_m1_log_v4") == 0
        feed.intake.redis = redis  # back: the restarted worker
        restarted = asyncio.create_task(feed.catch_up())
        try:
            await until(lambda: not feed.catch_up_pending and not feed.to_reconcile, 10, "the catch-up")
            logged = lambda: pool.fetchval("SELECT count(*) FROM missing_m1_log_v4 WHERE symbol = 'NEARUSDT'")  # noqa: E731
            await until(lambda: logged(), 10, "the missed minutes logged")
            assert await logged() >= 10  # T0+5 .. the exchange's last closed minute (T0+15)
        finally:
            restarted.cancel()
            await asyncio.gather(restarted, return_exceptions=True)
    finally:
        await dead.aclose()
        await feed.rest.close()
        await exchange.stop()


async def test_redis_back_after_an_outage_announces_what_a_failover_lost(pool, redis):
    """A master's last acknowledged writes can die with it (Redis replicates
    asynchronously): candles stored in PostgreSQL whose announcement went that way are
    announced again once the lease round finds Redis back, over the outage and
    RECONCILE_WINDOW_M1 (120 min) before it, a history's older bars too; older ones
    are left alone."""
    feed = await _feed(pool, redis, None, {"NEARUSDT"})
    await core_io.upsert_candles(pool, NEAR[:5] + NEAR[200:220])  # the first five announced long ago (trimmed),
    await feed.intake._cache_and_announce(NEAR[210:217], "m1")  # these lately, the others of the window lost
    await feed.intake.publish_held()

    async def announced() -> set[tuple[str, int]]:
        return await core_io.announced_candles(redis, core_io.CANDLE_STREAMS["m1"])

    async def reannounced() -> bool:
        return not feed.reannounce_ms and len(await announced()) == 20

    feed._after_redis_outage(3.0)
    workers = [asyncio.create_task(feed.catch_up()), asyncio.create_task(feed.intake.run_publisher())]
    try:
        await until(reannounced, 10, "the reannouncement")
    finally:
        for worker in workers:
            worker.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        await feed.rest.close()
    assert {t for _, t in await announced()} == {c.open_time for c in NEAR[200:220]}


async def test_symbols_taken_on_while_postgresql_is_away_are_followed_on_the_retry(pool, redis, pg_url):
    """PostgreSQL away while a take-over is applied: the follower fails (its supervisor
    restarts it) and the symbols are not counted as followed, so the retry subscribes and
    catches them up; counted, the retry saw no change and they were never followed."""
    exchange = FakeExchange(ArchiveSource(["NEARUSDT"]), start_ms=T0 + 16 * M1, speed=1)
    await exchange.start()
    feed = await _feed(pool, redis, exchange, set())
    gone = await asyncpg.create_pool(pg_url, min_size=1, max_size=1)
    await gone.close()
    streams = asyncio.create_task(feed.streams.run())
    try:
        feed.pool = gone
        with pytest.raises(asyncpg.InterfaceError):
            await feed._follow({"NEARUSDT"})
        assert feed.symbols == set() and not feed.catch_up_pending
        feed.pool = pool
        await feed._follow({"NEARUSDT"})
        await feed._follow({"NEARUSDT"})  # nothing new: nothing subscribed again
        assert feed.symbols == feed.catch_up_pending == {"NEARUSDT"}
        assert [c.streams for c in feed.streams.connections] == [{"!markPrice@arr@1s", "nearusdt@kline_1m"}]
    finally:
        streams.cancel()
        await asyncio.gather(streams, return_exceptions=True)
        await feed.rest.close()
        await exchange.stop()


async def test_a_symbol_taken_on_before_its_first_history_ran_gets_it_from_its_next_owner(pool, redis):
    """A first history waits behind the live closes, which are stored first; the process
    lost the symbol (or died) before its history ran. The next owner finds candles, but
    they start after the history window: it fetches the history. A symbol whose history
    is whole is only caught up."""
    exchange = FakeExchange(ArchiveSource(["NEARUSDT", "LINKUSDT"]), start_ms=T0 + 16 * M1, speed=1)
    await exchange.start()
    link = list(islice(read_archive("LINKUSDT"), 15))
    await core_io.upsert_candles(pool, NEAR[13:15] + link)  # NEARUSDT: two live closes, no history
    feed = await _feed(pool, redis, exchange, set(), INITIAL_HISTORY_M1="15")
    streams = asyncio.create_task(feed.streams.run())
    try:
        await feed._follow({"NEARUSDT", "LINKUSDT"})
        await feed._catch_up(sorted(feed.catch_up_pending))
        assert list(feed.backfiller.history) == [("NEARUSDT", T0, T0 + 15 * M1)]  # the window, to now
        assert not feed.history_unsure and not feed.needs_history
        await feed._catch_up(["NEARUSDT", "LINKUSDT"])  # a reconnect's catch-up: not asked again
        assert len(feed.backfiller.history) == 1
    finally:
        streams.cancel()
        await asyncio.gather(streams, return_exceptions=True)
        await feed.rest.close()
        await exchange.stop()


# --------------------------------------------------------------------------- the watchdog


@pytest.mark.timeout(120)
async def test_the_watchdog_ends_a_feed_that_receives_but_cannot_store(pool, redis_url, pg_url):
    """PostgreSQL answers but refuses the inserts (revoked grants; a replica after a
    failover): closes keep arriving, none is stored, and the watchdog must notice."""
    role = f"feed_v4_limited_{int(time.time())}"
    await pool.execute(f'CREATE ROLE "{role}" LOGIN')
    database = pg_url.rsplit("/", 1)[1]
    for grant in (
        f'GRANT ALL ON DATABASE "{database}" TO "{role}"',
        f'GRANT ALL ON SCHEMA public TO "{role}"',
        f'GRANT ALL ON ALL TABLES IN SCHEMA public TO "{role}"',
        f'GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO "{role}"',
    ):
        await pool.execute(grant)
    symbols = ["NEARUSDT", "LINKUSDT"]
    source = ArchiveSource(symbols, start_ms=START - (HISTORY_M1 + 30) * M1, end_ms=START + 120 * M1)
    exchange = FakeExchange(source, start_ms=START, speed=30, seed=6)
    await exchange.start()
    limited_url = pg_url.replace("postgresql://postgres@", f"postgresql://{role}@", 1)
    daemon = DaemonProcess({**daemon_env(exchange, redis_url, limited_url, symbols), "WATCHDOG_STALE_S": "6"})
    daemon.start()
    try:
        await until(lambda: complete_to(pool, symbols, START), 40, "the first candles")
        await pool.execute(f'REVOKE INSERT, UPDATE ON ohlcv4_m1 FROM "{role}"')
        started = time.monotonic()
        await until(lambda: not daemon.alive(), 40, "the watchdog's exit")
        assert daemon.process.returncode == 3
        assert time.monotonic() - started < 30
        assert "no closed kline stored" in daemon.output()
        assert "PostgreSQL refused to store" in daemon.output()
    finally:
        daemon.cleanup()
        await exchange.stop()
        await pool.execute(f'REASSIGN OWNED BY "{role}" TO postgres')
        await pool.execute(f'DROP OWNED BY "{role}"')
        await pool.execute(f'DROP ROLE "{role}"')


async def complete_to(pool, symbols: list[str], open_time: int) -> bool:
    count = await pool.fetchval(
        "SELECT count(DISTINCT symbol) FROM ohlcv4_m1 WHERE symbol = ANY($1) AND open_time >= $2",
        symbols,
        core_io.ms_to_datetime(open_time),
    )
    return count == len(symbols)
