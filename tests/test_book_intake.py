"""The book intake (book/intake.py) against a real Redis and PostgreSQL, fed the real
2024-07-19 frames directly (the WebSocket side is tested end to end elsewhere): what a
reader finds in Redis and through the SQL views equals the pure one-second bars."""

from __future__ import annotations

import asyncio
import json
import time
from decimal import Decimal
from fractions import Fraction

import pytest

from binance.book import depth_snapshot_of
from binance.rest import RestClient, WeightLimiter
from binance.settings import FeedSettings
from book import store as book_store
from book.intake import BookIntake, BookSettings, public_url
from book.symbol import SymbolSeconds
from core_io import ms_to_datetime
from infra import system_event_log
from market_data import recorded_book_frames
from orderflow.fold import UNIT

SYMBOL = "BTCUSDT"


def frames() -> list[tuple[str, str]]:
    return list(recorded_book_frames(SYMBOL))


async def run_intake(pool, redis, settings: BookSettings | None = None) -> BookIntake:
    await pool.execute(
        "INSERT INTO tickers (symbol, trades, book_ticker, depth) VALUES ($1, false, true, true)", SYMBOL
    )
    rest = RestClient("http://127.0.0.1:9", WeightLimiter(2400, 60))  # the snapshot is handed over
    intake = BookIntake(
        pool, redis, rest, settings or BookSettings(write_every_s=0.2), "ws://127.0.0.1:9/public", FeedSettings(), 5000
    )
    intake.published = []
    await intake.follow(await intake.read_tickers())
    tasks = [asyncio.create_task(w()) for w in (intake.run_publisher, intake.run_writer, intake.run_depth_filter)]
    try:
        for kind, text in frames():
            if kind == "snapshot":
                intake.symbols[SYMBOL].on_snapshot(depth_snapshot_of(text))
            else:
                intake.on_frame(text)
        await intake.drain()
        await asyncio.sleep(0.5)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return intake


def pure_seconds():
    state = SymbolSeconds(SYMBOL, frozenset({"ticker", "depth"}), Fraction(1), None)
    out = []
    from binance.book import parse_book_ticker_frame, parse_depth_frame

    clock = 0
    for kind, text in frames():
        if kind == "snapshot":
            state.on_snapshot(depth_snapshot_of(text))
            continue
        event = parse_book_ticker_frame(text)[1] if kind == "bookTicker" else parse_depth_frame(text)[1]
        state.on_tick(event) if kind == "bookTicker" else state.on_diff(event)
        clock = max(clock, event.event_ms)
        out += state.close_through(clock)
    return out


def units(value: Decimal) -> int:
    return int(value * UNIT)


async def test_seconds_reach_the_views_and_redis_as_computed(pool, redis):
    intake = await run_intake(pool, redis)
    expected = pure_seconds()
    assert intake.stats["bad"] == 0 and intake.stats["ticks"] > 50_000
    rows = await pool.fetch("SELECT * FROM book_ticker_1s_v4 WHERE symbol = $1 ORDER BY ts", SYMBOL)
    tickers = [s.ticker for s in expected if s.ticker is not None]
    assert len(rows) == len(tickers) > 400  # every finished second once
    for row, bar in zip(rows, tickers, strict=True):
        assert row["ts"] == ms_to_datetime(bar.ts)
        assert (units(row["bid_open"]), units(row["bid_close"]), units(row["ask_high"])) == (
            bar.bid_open,
            bar.bid_close,
            bar.ask_high,
        )
        assert (row["updates"], row["last_update_id"]) == (bar.updates, bar.last_update_id)
        assert row["microprice_close"] == pytest.approx(bar.microprice_close(), rel=1e-15)
    depth = await pool.fetch("SELECT * FROM depth_1s_v4 WHERE symbol = $1 ORDER BY ts", SYMBOL)
    bars = [s.depth for s in expected if s.depth is not None]
    assert [(units(r["ofi_l1"]), r["imbalance_10"], units(r["bid_depth_in_range"])) for r in depth] == [
        (b.ofi_l1, b.imbalance_10, b.bid_depth_in_range) for b in bars
    ]
    features = await pool.fetch("SELECT * FROM features_1s_v4 WHERE symbol = $1 ORDER BY ts", SYMBOL)
    assert len(features) == sum(1 for s in expected if s.features is not None)
    newest = [s.features for s in expected if s.features is not None][-1]
    cached = await redis.hgetall(book_store.features_key(SYMBOL))
    assert int(cached["ts"]) == newest.ts and float(cached["microprice"]) == newest.microprice
    assert "" not in cached.values() and "vpin" not in cached  # no volume history: no VPIN, never ""
    assert await redis.xlen(book_store.FEATURES_STREAM) == len(features)
    minutes = await pool.fetch("SELECT * FROM book_m1_v4 WHERE symbol = $1 ORDER BY open_time", SYMBOL)
    with_seconds = await pool.fetchval("SELECT count(DISTINCT date_trunc('minute', ts)) FROM book_ticker_1s_v4")
    assert len(minutes) == with_seconds >= 8  # the last one, still open, written at the drain
    assert all(m["seconds"] <= 60 for m in minutes)
    assert sum(m["book_ticker_updates"] for m in minutes) <= sum(r["updates"] for r in rows)


async def test_the_depth_filter_publishes_the_synchronised_levels_within_range(pool, redis):
    intake = await run_intake(pool, redis, BookSettings(range_pct=Decimal("0.05"), write_every_s=0.2))
    assert intake._filtered_book(SYMBOL) is None  # nothing changed since the last publication
    book = json.loads(await redis.get(book_store.book_key(SYMBOL)))
    local = intake.symbols[SYMBOL].sync.book
    assert book["update_id"] <= local.update_id
    bids = [Decimal(p) for p, _ in book["bids"]]
    asks = [Decimal(p) for p, _ in book["asks"]]
    assert bids == sorted(bids, reverse=True) and asks == sorted(asks) and bids[0] < asks[0]
    mid = (bids[0] + asks[0]) / 2
    assert all(abs(p - mid) <= mid * Decimal("0.0005") for p in bids + asks)
    assert Decimal(book["bid_depth"]) == sum(Decimal(q) for _, q in book["bids"])


async def test_retention_runs_on_the_exchange_clock(pool, redis):
    """A replay of 2024 keeps its partitions: retention counts from the newest event."""
    intake = await run_intake(pool, redis, BookSettings(retention_h=1, write_every_s=0.2))
    task = asyncio.create_task(intake.run_retention())
    await asyncio.sleep(0.5)
    task.cancel()
    assert await pool.fetchval("SELECT count(*) FROM book_ticker_1s_v4") > 400


def test_the_public_route_is_the_market_routes_sibling():
    assert public_url("wss://fstream.binance.com/market", {}) == "wss://fstream.binance.com/public"
    assert public_url("ws://127.0.0.1:5/market/", {}) == "ws://127.0.0.1:5/public"
    assert public_url("wss://x/market", {"BINANCE_PUBLIC_WS_URL": "wss://y/public/"}) == "wss://y/public"


def test_book_settings_come_from_the_environment():
    settings = BookSettings.from_env({"BOOK_RANGE_PCT": "0.5", "FEATURES_RETENTION_H": "6", "BOOK_GRACE_MS": "40"})
    assert (settings.range_pct, settings.retention_h, settings.book_grace_ms) == (Decimal("0.5"), 6, 40)
    with pytest.raises(Exception, match="BOOK_RANGE_PCT"):
        BookSettings.from_env({"BOOK_RANGE_PCT": "500"})


async def test_a_frame_from_the_future_is_refused_and_the_clock_stays(pool, redis):
    intake = await run_intake(pool, redis)
    clock, bad = intake.clock_ms, intake.stats["bad"]
    ahead = int(time.time() * 1000) + 2 * 3_600_000
    frame = {"e": "bookTicker", "u": 1, "s": SYMBOL, "b": "1", "B": "1", "a": "2", "A": "1", "T": ahead, "E": ahead}
    intake.on_frame(json.dumps({"stream": "btcusdt@bookTicker", "data": frame}))
    assert intake.stats["bad"] == bad + 1 and intake.clock_ms == clock
    await system_event_log.flush(pool)
    assert await pool.fetchval("SELECT count(*) FROM system_log_v4 WHERE message LIKE '%is in the future%'") == 1
