"""The book domain's storage (real PostgreSQL and Redis Stack): migration 009 gives the
SPEC section 14 views, a flush reads back exactly through them, retries are harmless,
hourly partitions come on demand and go whole; the Redis keys and stream; and the pure
per-minute rollup (book/minutes.py)."""

from __future__ import annotations

import asyncio
import json
import math
import random
from datetime import UTC, datetime
from decimal import Decimal

import asyncpg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from binance.book import BookTick
from book import store
from book.minutes import MINUTE_MS, MinuteRollup, MinuteRow
from book.per_second import Features, FeatureState
from book.seconds import DepthSecond, TickerSecond, TradeSecond
from book.vpin import Vpin
from candles import datetime_to_ms, ms_to_datetime
from core_io import execute_checked
from orderflow.fold import UNIT, AggTrade, units_decimal
from storage import partitions
from storage.layout import HOUR_MS, ONE_SECOND_TABLES
from storage.retention import drop_expired

HOUR = HOUR_MS
T0 = 1_721_347_200_000  # 2024-07-19 00:00 UTC

Second = tuple[TradeSecond | None, TickerSecond | None, DepthSecond | None, Features | None]

SECTION_14_VIEWS = {
    "trades_1s_v4": {"open", "high", "low", "close", "volume", "buy_volume", "sell_volume", "vwap", "agg_trades"},
    "book_ticker_1s_v4": {
        "bid_open",
        "bid_high",
        "bid_low",
        "bid_close",
        "ask_open",
        "ask_high",
        "ask_low",
        "ask_close",
        "bid_qty_close",
        "ask_qty_close",
        "microprice_close",
        "updates",
        "last_update_id",
    },
    "depth_1s_v4": {
        "ofi_l1",
        "ofi_l10",
        "imbalance_1",
        "imbalance_5",
        "imbalance_10",
        "bid_depth_in_range",
        "ask_depth_in_range",
        "last_update_id",
    },
    "features_1s_v4": {
        "microprice",
        "i1",
        "i10",
        "ofi",
        "volume_imbalance",
        "vpin",
        "vpin_bulk",
        "volatility",
        "log_return",
    },
}


def simulate(start_ms: int, seconds: int, seed: int = 1, kinds: str = "tbd") -> list[Second]:
    """A symbol's seconds from random events through the real bar classes: trades (t),
    book ticker (b), depth (d); some seconds lack a kind, some have none at all."""
    rng = random.Random(seed)
    state = FeatureState(Vpin(40 * UNIT, window=5), window=10)
    bid, before, update_id, agg_id = 60_000 * UNIT + rng.randrange(10**6), None, 1_000, 1
    out: list[Second] = []
    for k in range(seconds):
        ts = start_ms + k * 1000
        trades = ticker = depth = None
        if "t" in kinds and rng.random() < 0.8:
            trades = TradeSecond(ts)
            for _ in range(rng.randrange(1, 6)):
                price, qty, sold = bid + rng.randrange(-50, 50) * 10**6, rng.randrange(1, 5 * UNIT), rng.random() < 0.5
                trades.add(AggTrade(agg_id, price, qty, agg_id, agg_id, ts + rng.randrange(1000), sold))
                state.vpin.add(price, qty, not sold)
                agg_id += 1
        if "b" in kinds and rng.random() < 0.7:
            ticker = TickerSecond(ts)
            for _ in range(rng.randrange(1, 8)):
                bid += rng.randrange(-3, 4) * 10**6
                update_id += rng.randrange(1, 20)
                tick = BookTick(update_id, bid, rng.randrange(1, 10**9), bid + rng.randrange(1, 5) * 10**6, 0, ts, ts)
                tick = tick._replace(ask_qty=rng.randrange(1, 10**9))
                ticker.add(tick, before)
                before = tick
        if "d" in kinds and rng.random() < 0.6:
            update_id += rng.randrange(1, 20)
            depth = DepthSecond(
                ts,
                ofi_l1=rng.randrange(-(10**10), 10**10),
                ofi_l10=rng.randrange(-(10**11), 10**11),
                imbalance_1=rng.uniform(-1, 1),
                imbalance_5=rng.uniform(-1, 1),
                imbalance_10=rng.uniform(-1, 1),
                bid_depth_in_range=rng.randrange(10**12),
                ask_depth_in_range=rng.randrange(10**12),
                last_update_id=update_id,
                diffs=rng.randrange(1, 11),
            )
        quote = (bid, 10**8, bid + 10**6, 2 * 10**8) if depth is not None and ticker is None else None
        features = state.second(ts, trades, ticker, depth, quote)
        out.append((trades, ticker, depth, features))
    return out


def batch(symbols_seconds: dict[str, list[Second]]) -> tuple[list, list, list, list]:
    """The four per-kind lists `write_seconds` takes."""
    lists: tuple[list, list, list, list] = ([], [], [], [])
    for symbol, seconds in symbols_seconds.items():
        for second in seconds:
            for target, part in zip(lists, second):
                if part is not None:
                    target.append((symbol, part))
    return lists


def rollup(symbol: str, seconds: list[Second]) -> list[MinuteRow]:
    rollup = MinuteRollup(symbol)
    rows = [row for second in seconds if (row := rollup.add(*second)) is not None]
    last = rollup.flush()
    return rows + ([last] if last is not None else [])


# --------------------------------------------------------------------------- schema


async def test_migration_makes_the_section_14_views_over_hourly_partitioned_tables(pool):
    rows = await pool.fetch(
        "SELECT table_name, column_name, data_type FROM information_schema.columns WHERE table_schema = 'public' "
        "AND table_name = ANY($1::text[])",
        [*SECTION_14_VIEWS, "book_m1_v4"],
    )
    columns: dict[str, dict[str, str]] = {}
    for row in rows:
        columns.setdefault(row["table_name"], {})[row["column_name"]] = row["data_type"]
    for view, required in SECTION_14_VIEWS.items():
        assert {"symbol", "ts"} | required <= set(columns[view]), view
    for view in ("trades_1s_v4", "book_ticker_1s_v4", "depth_1s_v4"):  # prices and quantities exact
        for name, kind in columns[view].items():
            exact = name.endswith(("open", "high", "low", "close", "volume", "vwap", "depth_in_range")) or "ofi" in name
            if exact and not name.startswith("microprice"):  # the weighted mid is derived
                assert kind == "numeric", (view, name)
    assert {columns["features_1s_v4"][c] for c in SECTION_14_VIEWS["features_1s_v4"]} == {"double precision"}
    assert {"open_time", "ofi", "ofi_l1", "ofi_l10", "mean_spread", "vpin", "vpin_bulk", "seconds"} <= set(
        columns["book_m1_v4"]
    )
    partitioned = await pool.fetch(
        "SELECT c.relname, p.partstrat::text, p.partdefid::int8, a.attname::text FROM pg_partitioned_table p "
        "JOIN pg_class c ON c.oid = p.partrelid "
        "JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = p.partattrs[0] "
        "WHERE c.relname = ANY($1::text[]) ORDER BY c.relname",
        list(ONE_SECOND_TABLES),
    )
    assert [tuple(r) for r in partitioned] == [
        (table, "r", 0, "ts") for table in sorted(ONE_SECOND_TABLES)
    ]  # by range on ts, no DEFAULT partition
    for table in (*ONE_SECOND_TABLES, "book_m1_4"):
        key = await pool.fetch(
            "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid "
            "AND a.attnum = ANY(i.indkey) WHERE i.indrelid = $1::regclass AND i.indisprimary "
            "ORDER BY array_position(i.indkey, a.attnum)",
            table,
        )
        assert [r["attname"] for r in key] == ["symbol", "open_time" if table == "book_m1_4" else "ts"]


# --------------------------------------------------------------------------- seconds


async def test_a_flush_reads_back_exactly_through_the_views(pool):
    start = T0 + 59 * 60_000  # 00:59: the batch spans two hours
    seconds = {"BTCUSDT": simulate(start, 150, seed=1), "ETHUSDT": simulate(start, 150, seed=2, kinds="tb")}
    trades, tickers, depths, features = batch(seconds)
    minutes = [row for symbol, s in seconds.items() for row in rollup(symbol, s)]
    await store.write_seconds(pool, trades, tickers, depths, features, minutes)

    rows = {(r["symbol"], datetime_to_ms(r["ts"])): r for r in await pool.fetch("SELECT * FROM trades_1s_v4")}
    assert len(rows) == len(trades)
    for symbol, t in trades:
        r = rows[(symbol, t.ts)]
        assert (r["open"], r["high"], r["low"], r["close"]) == tuple(
            units_decimal(v) for v in (t.open, t.high, t.low, t.close)
        )
        assert r["buy_volume"] == units_decimal(t.buy_volume) and r["sell_volume"] == units_decimal(t.sell_volume)
        assert r["volume"] == units_decimal(t.volume) and r["vwap"] == t.vwap() and r["agg_trades"] == t.agg_trades
        assert r["quote_volume"] == Decimal(t.notional).scaleb(-16)

    rows = {(r["symbol"], datetime_to_ms(r["ts"])): r for r in await pool.fetch("SELECT * FROM book_ticker_1s_v4")}
    assert len(rows) == len(tickers)
    for symbol, t in tickers:
        r = rows[(symbol, t.ts)]
        for name in ("bid_open", "bid_high", "bid_low", "bid_close", "ask_open", "ask_high", "ask_low", "ask_close"):
            assert r[name] == units_decimal(getattr(t, name)), name
        assert (r["bid_qty_close"], r["ask_qty_close"]) == (
            units_decimal(t.bid_qty_close),
            units_decimal(t.ask_qty_close),
        )
        assert r["microprice_close"] == t.microprice_close() and r["ofi"] == units_decimal(t.ofi)
        assert (r["updates"], r["last_update_id"]) == (t.updates, t.last_update_id)
        assert math.isclose(r["mean_spread"], t.mean_spread(), rel_tol=1e-15)

    rows = {(r["symbol"], datetime_to_ms(r["ts"])): r for r in await pool.fetch("SELECT * FROM depth_1s_v4")}
    assert len(rows) == len(depths) and all(s == "BTCUSDT" for s, _ in depths)
    for symbol, d in depths:
        r = rows[(symbol, d.ts)]
        for name in ("ofi_l1", "ofi_l10", "bid_depth_in_range", "ask_depth_in_range"):
            assert r[name] == units_decimal(getattr(d, name)), name
        for name in ("imbalance_1", "imbalance_5", "imbalance_10", "last_update_id", "diffs"):
            assert r[name] == getattr(d, name), name

    rows = {(r["symbol"], datetime_to_ms(r["ts"])): r for r in await pool.fetch("SELECT * FROM features_1s_v4")}
    assert len(rows) == len(features)
    for symbol, f in features:
        r = rows[(symbol, f.ts)]
        assert all(r[name] == getattr(f, name) for name in store.FEATURE_NAMES)  # None is NULL, floats bit-exact
    assert any(r["vpin"] is None for r in rows.values()) and any(r["vpin"] is not None for r in rows.values())

    stored = await pool.fetch("SELECT * FROM book_m1_v4 ORDER BY symbol, open_time")
    assert len(stored) == len(minutes) == 2 * 3  # 00:59, 01:00, 01:01 (its first 30 s)
    for r, m in zip(stored, sorted(minutes, key=lambda m: (m.symbol, m.open_time))):
        assert (r["symbol"], datetime_to_ms(r["open_time"]), r["seconds"]) == (m.symbol, m.open_time, m.seconds)
        assert r["ofi"] == (None if m.ofi is None else units_decimal(m.ofi))
        assert r["ofi_l1"] == (None if m.ofi_l1 is None else units_decimal(m.ofi_l1))
        assert (r["mean_spread"], r["vpin"], r["volatility"]) == (m.mean_spread, m.vpin, m.volatility)
    eth = [r for r in stored if r["symbol"] == "ETHUSDT"]
    assert all(r["ofi_l10"] is None and r["depth_diffs"] == 0 for r in eth)


async def test_a_retried_flush_neither_fails_nor_duplicates(pool):
    seconds = {"BTCUSDT": simulate(T0 + 2 * HOUR, 90, seed=3)}
    lists = batch(seconds)
    minutes = rollup("BTCUSDT", seconds["BTCUSDT"])
    await store.write_seconds(pool, *lists, minutes)
    counts = [await pool.fetchval(f"SELECT count(*) FROM {t}") for t in (*ONE_SECOND_TABLES, "book_m1_4")]
    written = await pool.fetch("SELECT open_time, written_at FROM book_m1_4 ORDER BY open_time")
    await store.write_seconds(pool, *lists, minutes)  # the reply was lost: the same batch again
    more = batch({"BTCUSDT": simulate(T0 + 2 * HOUR + 90_000, 10, seed=4)})
    await store.write_seconds(pool, *(a + b for a, b in zip(lists, more)), minutes)  # and merged with the next
    again = [await pool.fetchval(f"SELECT count(*) FROM {t}") for t in (*ONE_SECOND_TABLES, "book_m1_4")]
    assert again == [n + len(new) for n, new in zip(counts, more)] + [counts[-1]]
    assert await pool.fetch("SELECT open_time, written_at FROM book_m1_4 ORDER BY open_time") == written


async def test_a_minute_rolled_up_again_keeps_the_row_that_saw_more_of_it(pool):
    seconds = simulate(T0 + 3 * HOUR, 60, seed=5)
    (full,) = rollup("BTCUSDT", seconds)
    (tail,) = rollup("BTCUSDT", seconds[40:])  # after a restart: the minute's last 20 s only
    assert tail.seconds < full.seconds
    await store.write_seconds(pool, [], [], [], [], [full])
    await store.write_seconds(pool, [], [], [], [], [tail])
    assert await pool.fetchval("SELECT seconds FROM book_m1_v4") == full.seconds
    await pool.execute("DELETE FROM book_m1_4")
    await store.write_seconds(pool, [], [], [], [], [tail, full, tail])  # one statement, the same minute thrice
    assert await pool.fetchval("SELECT seconds FROM book_m1_v4") == full.seconds
    await pool.execute("DELETE FROM book_m1_4")
    await store.write_seconds(pool, [], [], [], [], [tail])
    await store.write_seconds(pool, [], [], [], [], [full])
    row = await pool.fetchrow("SELECT * FROM book_m1_v4")
    assert (row["seconds"], row["vpin"], row["mean_spread"]) == (full.seconds, full.vpin, full.mean_spread)


async def _partitions(pool) -> set[str]:
    rows = await pool.fetch(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = ANY($1::regclass[])",
        list(ONE_SECOND_TABLES),
    )
    return {r["relname"] for r in rows}


async def test_partitions_are_made_on_demand_for_every_hour_a_batch_spans(pool):
    base = T0 + 10 * HOUR
    parts = [simulate(base + hour * HOUR + HOUR - 5_000, 2, seed=hour) for hour in (0, 3)]  # hours 10, 13
    await store.write_seconds(pool, *batch({"BTCUSDT": parts[0] + parts[1]}), [])
    names = await _partitions(pool)
    for hour in (10, 13, 14):  # the batch's hours and the one after its newest
        for table in ONE_SECOND_TABLES:
            assert f"{table}_p20240719{hour:02d}" in names
    assert not any(n.endswith(("p2024071911", "p2024071912")) for n in names)  # none for hours without rows
    assert partitions.partition_name("trades_1s4", base + 123) == "trades_1s4_p2024071910"
    routed = await pool.fetch("SELECT tableoid::regclass::text AS part, ts FROM trades_1s4 ORDER BY ts")
    assert all(r["part"] == partitions.partition_name("trades_1s4", datetime_to_ms(r["ts"])) for r in routed)


async def test_processes_racing_to_make_a_partition_both_succeed(pool):
    hour = T0 + 20 * HOUR
    await asyncio.gather(
        *(partitions.ensure(pool, t, [hour], ahead=False) for t in ONE_SECOND_TABLES for _ in range(5))
    )
    assert {partitions.partition_name(t, hour) for t in ONE_SECOND_TABLES} <= await _partitions(pool)


async def test_the_next_hour_is_made_ahead_unless_a_long_reader_holds_the_table(pool, pg_url):
    hour = T0 + 60 * HOUR
    for table in ONE_SECOND_TABLES:
        await partitions.ensure(pool, table, [hour], ahead=False)
    reader = await asyncpg.connect(pg_url)
    try:
        async with reader.transaction():
            await reader.execute("LOCK TABLE trades_1s4 IN ACCESS SHARE MODE")  # a long SELECT
            began = asyncio.get_running_loop().time()
            await store.write_seconds(pool, *batch({"BTCUSDT": simulate(hour, 2, seed=31)}), [])
            assert asyncio.get_running_loop().time() - began < 2  # the flush went on without it
            assert partitions.partition_name("trades_1s4", hour + HOUR) not in await _partitions(pool)
    finally:
        await reader.close()
    await store.write_seconds(pool, *batch({"BTCUSDT": simulate(hour + 2000, 2, seed=32)}), [])
    assert partitions.partition_name("trades_1s4", hour + HOUR) in await _partitions(pool)


def _hour_of(partition: str) -> int:
    """'trades_1s4_p2026120600' -> that hour's start in ms."""
    return datetime_to_ms(datetime.strptime(partition[-10:], "%Y%m%d%H").replace(tzinfo=UTC))


async def test_drop_expired_drops_only_whole_old_hours_and_the_views_go_on(pool):
    base = T0 + 30 * HOUR
    hours = [base + k * HOUR for k in range(5)]
    await store.write_seconds(pool, *batch({"BTCUSDT": [s for h in hours for s in simulate(h, 3, seed=h)]}), [])
    now = hours[4] + 1_800_000  # 30 min into the last hour
    dropped = await drop_expired(pool, ONE_SECOND_TABLES, 2 * HOUR, now)  # keeps what ended after hours[2]
    expired = {partitions.partition_name(t, h) for t in ONE_SECOND_TABLES for h in hours[:2]}
    assert expired <= set(dropped)
    assert all(_hour_of(n) + HOUR <= now - 2 * HOUR for n in dropped)
    left = await _partitions(pool)
    assert not expired & left and {partitions.partition_name("depth_1s4", h) for h in hours[2:]} <= left
    for view in SECTION_14_VIEWS:
        stamps = [datetime_to_ms(r["ts"]) for r in await pool.fetch(f"SELECT ts FROM {view}")]
        assert stamps and min(stamps) >= hours[2], view
    assert await drop_expired(pool, ONE_SECOND_TABLES, 2 * HOUR, now) == []
    # A late batch for a dropped hour makes its partition again rather than failing.
    await store.write_seconds(pool, *batch({"BTCUSDT": simulate(hours[0], 2, seed=9)}), [])
    assert await pool.fetchval("SELECT count(*) FROM features_1s_v4 WHERE ts < $1", ms_to_datetime(hours[1])) == 2


async def test_a_partition_gone_behind_the_cache_is_made_again(pool):
    hour = T0 + 40 * HOUR
    seconds = simulate(hour, 2, seed=7)
    await store.write_seconds(pool, *batch({"BTCUSDT": seconds}), [])
    for table in ONE_SECOND_TABLES:  # dropped by another process: this one still remembers the hour
        await pool.execute(f"DROP TABLE {partitions.partition_name(table, hour)}")
    await store.write_seconds(pool, *batch({"BTCUSDT": seconds}), [])
    assert await pool.fetchval("SELECT count(*) FROM features_1s_v4 WHERE ts >= $1", ms_to_datetime(hour)) == 2


async def test_the_newest_stored_second_of_each_symbol(pool):
    await store.write_seconds(pool, *batch({"BTCUSDT": simulate(T0 + 50 * HOUR - 3_000, 6, seed=21)}), [])
    await store.write_seconds(pool, *batch({"ETHUSDT": simulate(T0 + 50 * HOUR, 2, seed=22, kinds="t")}), [])
    newest = await store.newest_seconds(pool, ["BTCUSDT", "ETHUSDT", "SOLUSDT"])
    btc = await pool.fetchval("SELECT max(ts) FROM features_1s_v4 WHERE symbol = 'BTCUSDT'")
    assert newest["BTCUSDT"] == datetime_to_ms(btc) >= T0 + 50 * HOUR and "SOLUSDT" not in newest
    assert newest["ETHUSDT"] <= T0 + 50 * HOUR + 1000


# --------------------------------------------------------------------------- Redis


def _features(ts: int, **values: float | None) -> Features:
    return Features(ts, *(values.get(name) for name in store.FEATURE_NAMES))


async def test_redis_gets_the_newest_features_a_bounded_stream_and_the_book(redis):
    first = _features(T0, microprice=64000.5, i1=0.25, vpin=0.4, volatility=1e-5)
    second = _features(T0 + 1000, microprice=64001.25, i1=-0.5, log_return=float("nan"))
    other = _features(T0 + 1000, ofi=-3.5)
    bids = [(64000 * UNIT, 150_000_000), (63999 * UNIT + 5 * 10**7, 2 * UNIT)]
    columns = ([p for p, _ in bids], [q for _, q in bids], [64001 * UNIT], [1])
    book = store.book_document(*columns, 987654321012, T0 + 1234)
    commands = store.redis_commands(
        [("BTCUSDT", first), ("BTCUSDT", second), ("ETHUSDT", other)], [("BTCUSDT", book)], 50
    )
    await execute_checked(redis, commands)

    fields = await redis.hgetall(store.features_key("BTCUSDT"))
    assert fields == {"ts": str(T0 + 1000), "microprice": "64001.25", "i1": "-0.5"}  # vpin of the older second gone
    assert await redis.hgetall(store.features_key("ETHUSDT")) == {"ts": str(T0 + 1000), "ofi": "-3.5"}
    entries = await redis.xrange(store.FEATURES_STREAM)
    assert [e["symbol"] for _, e in entries] == ["BTCUSDT", "BTCUSDT", "ETHUSDT"]
    assert entries[0][1] == {
        "symbol": "BTCUSDT",
        "ts": str(T0),
        "microprice": "64000.5",
        "i1": "0.25",
        "vpin": "0.4",
    } | {"volatility": "1e-05"}
    assert all("" not in e.values() for _, e in entries)
    document = json.loads(await redis.get(store.book_key("BTCUSDT")))
    assert document == {
        "bids": [["64000", "1.5"], ["63999.5", "2"]],
        "asks": [["64001", "0.00000001"]],
        "update_id": 987654321012,
        "time": T0 + 1234,
        "bid_depth": "3.5",
        "ask_depth": "0.00000001",
    }

    many = [("BTCUSDT", _features(T0 + 2000 + k * 1000, i1=0.0)) for k in range(1_000)]
    await execute_checked(redis, store.redis_commands(many, [], stream_maxlen=100))
    assert 100 <= await redis.xlen(store.FEATURES_STREAM) < 400  # approximate trimming
    assert (await redis.hgetall(store.features_key("BTCUSDT")))["ts"] == str(many[-1][1].ts)


def test_no_commands_for_nothing():
    assert store.redis_commands([], [], 10) == []


# --------------------------------------------------------------------------- minute rollup (pure)


def test_the_rollup_finishes_a_minute_when_a_later_one_starts():
    seconds = simulate(T0 + 30_000, 150, seed=11)  # 00:00:30 .. 00:02:59
    rollup_ = MinuteRollup("BTCUSDT")
    finished = [(k, row) for k, s in enumerate(seconds) if (row := rollup_.add(*s)) is not None]
    assert [row.open_time for _, row in finished] == [T0, T0 + MINUTE_MS]
    for k, row in finished:  # handed out by the first second with data of a later minute
        minute_of = [next(p for p in s if p).ts // MINUTE_MS * MINUTE_MS if any(s) else None for s in seconds]
        assert minute_of[k] > row.open_time
        assert all(m is None or m <= row.open_time for m in minute_of[:k])
    last = rollup_.flush()
    assert last is not None and last.open_time == T0 + 2 * MINUTE_MS and rollup_.flush() is None
    assert sum(row.seconds for _, row in finished) + last.seconds == sum(1 for s in seconds if any(s))


def test_a_minute_row_follows_its_definitions():
    seconds = simulate(T0, 60, seed=12)
    (row,) = rollup("BTCUSDT", seconds)
    trades = [s[0] for s in seconds if s[0]]
    tickers = [s[1] for s in seconds if s[1]]
    depths = [s[2] for s in seconds if s[2]]
    features = [s[3] for s in seconds if s[3]]
    assert row.ofi == sum(t.ofi if t else d.ofi_l1 for _, t, d, _ in seconds if t or d)
    assert row.ofi == round(math.fsum(f.ofi for f in features if f.ofi is not None) * UNIT)
    assert (row.ofi_l1, row.ofi_l10) == (sum(d.ofi_l1 for d in depths), sum(d.ofi_l10 for d in depths))
    assert row.book_ticker_updates == sum(t.updates for t in tickers)
    assert row.depth_diffs == sum(d.diffs for d in depths)
    assert math.isclose(row.mean_spread, sum(t.spread_sum for t in tickers) / row.book_ticker_updates / UNIT)
    buy, sell = sum(t.buy_volume for t in trades), sum(t.sell_volume for t in trades)
    assert row.volume_imbalance == (buy - sell) / (buy + sell)
    i1 = [f.i1 for f in features if f.i1 is not None]
    assert math.isclose(row.i1_mean, sum(i1) / len(i1))
    for name in ("microprice", "vpin", "vpin_bulk", "volatility"):
        assert getattr(row, name) == [getattr(f, name) for f in features if getattr(f, name) is not None][-1]
    assert row.seconds == sum(1 for s in seconds if any(s))


def test_a_minute_without_a_kind_has_no_value_for_it():
    (row,) = rollup("BTCUSDT", simulate(T0, 60, seed=13, kinds="t"))
    assert row.ofi is row.ofi_l1 is row.ofi_l10 is row.mean_spread is row.microprice is row.i1_mean is None
    assert row.volume_imbalance is not None and (row.book_ticker_updates, row.depth_diffs) == (0, 0)


def test_a_late_second_is_left_out_and_mixed_seconds_are_refused():
    rollup_ = MinuteRollup("BTCUSDT")
    seconds = simulate(T0 + 50_000, 20, seed=14, kinds="b")
    rows = [row for s in seconds if (row := rollup_.add(*s)) is not None]
    assert len(rows) == 1
    assert rollup_.add(*simulate(T0 + 10_000, 1, seed=15, kinds="b")[0]) is None and rollup_.late == 1
    assert rollup_.add(None, None, None, None) is None
    with pytest.raises(ValueError):
        rollup_.add(TradeSecond(T0 + 70_000), TickerSecond(T0 + 71_000), None, None)


@settings(deadline=None)
@given(st.integers(min_value=1, max_value=400), st.integers(min_value=0, max_value=10**6), st.integers(0, 59))
def test_rolled_minutes_partition_the_seconds(count, seed, offset):
    """Whatever the seconds, every second with data lands in exactly the row of its
    minute, and the sums over the rows equal the sums over the seconds."""
    seconds = simulate(T0 + offset * 1000, count, seed=seed)
    rows = rollup("X", seconds)
    with_data = [s for s in seconds if any(s)]
    minutes = sorted({next(p for p in s if p).ts // MINUTE_MS * MINUTE_MS for s in with_data})
    assert [r.open_time for r in rows] == minutes
    assert sum(r.seconds for r in rows) == len(with_data)
    assert sum(r.depth_diffs for r in rows) == sum(s[2].diffs for s in with_data if s[2])
    assert sum(r.ofi_l10 or 0 for r in rows) == sum(s[2].ofi_l10 for s in with_data if s[2])
    assert sum(r.book_ticker_updates for r in rows) == sum(s[1].updates for s in with_data if s[1])
