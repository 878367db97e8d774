"""`feed-v4 import` on real servers: the fake exchange's archive tree over HTTP (and the
same files in a folder) into PostgreSQL, checked against the exchange's candles; a
damaged file, a resumed run, gaps the archive fills, and the indicator values after
history arrives behind them."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from datetime import date, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from replay import SYMBOLS, assert_store_matches_source

import core_io
from archive.files import daily_path, day_start_ms, days, file_name
from archive.importer import ArchiveReader, Importer
from candles import datetime_to_ms, ms_to_datetime
from fake_exchange import ArchiveSource, FakeExchange
from feed_and_aggregate import CandleIntake
from infra import system_event_log
from orderflow.store import ORDERFLOW_COLUMNS
from tests.indicator_reference import COMMON_CASES, assert_values_match_talib, configure
from tests.test_indicators_worker import Running
from tests.test_orderflow_e2e import recompute

pytestmark = pytest.mark.storage_modes  # run again on each TimescaleDB edition by `make test`

FIRST, LAST = date(2026, 2, 1), date(2026, 2, 3)
PAIR = SYMBOLS[:2]
DAY_MS = 86_400_000
PROJECT = Path(__file__).resolve().parents[1]


@pytest.fixture
async def exchange():
    """Clock on 2026-02-06: the archive has every day of February before it."""
    source = ArchiveSource(PAIR, start_ms=day_start_ms(FIRST), end_ms=day_start_ms(date(2026, 2, 6)) - 60_000)
    exchange = FakeExchange(source, start_ms=day_start_ms(date(2026, 2, 6)), speed=1, seed=3)
    await exchange.start()
    yield exchange
    await exchange.stop()


@pytest.fixture
async def importer():
    """Importers reading from a base URL or folder; their HTTP sessions closed after."""
    made: list[Importer] = []

    def make(pool, redis, source: str) -> Importer:
        store = core_io.make_candle_store(redis, True, 250)
        made.append(Importer(pool, redis, store, ArchiveReader(source), 250, 100_000))
        return made[-1]

    yield make
    for run in made:
        await run.reader.close()


async def test_days_of_two_symbols_come_in_exactly_once(pool, redis, exchange, importer):
    run = importer(pool, redis, exchange.archive_url)
    outcomes = await run.run("klines", PAIR, FIRST, LAST)
    assert [o.status for o in outcomes] == ["imported"] * 6
    assert all(o.rows == 1440 and o.rejected == 0 and o.size > 10_000 for o in outcomes)
    last_closed = day_start_ms(LAST) + DAY_MS - 60_000
    assert await assert_store_matches_source(pool, redis, exchange.source, PAIR, last_closed) == 2 * 3 * (
        1440 + 288 + 96
    )
    recorded = await pool.fetch("SELECT symbol, day, rows, changed FROM archive_imports_v4 ORDER BY symbol, day")
    assert [(r["symbol"], r["day"], r["rows"], r["changed"]) for r in recorded] == [
        (s, d, 1440, 1440 + 288 + 96) for s in PAIR for d in days(FIRST, LAST)
    ]
    events = await redis.xrange(core_io.CANDLE_STREAMS["m15"])
    assert events and all(fields.get(core_io.HISTORY_FIELD) == "1" for _, fields in events)
    # Once per series for what is older than the cache: 250 M15 cached and announced, one more.
    assert len([f for _, f in events if f["symbol"] == PAIR[0]]) == 251
    again = await run.run("klines", PAIR, FIRST, LAST)
    assert [o.status for o in again] == ["skipped"] * 6  # by the .CHECKSUM alone
    assert await redis.xlen(core_io.CANDLE_STREAMS["m15"]) == len(events)  # nothing changed, nothing told


async def test_days_of_agg_trades_come_in_once_and_give_their_order_flow(pool, redis, exchange, importer):
    """Two days (one file with a header line, one without) into the raw trades by COPY:
    every trade the exchange made, once; the minutes PostgreSQL rolls up from them (a
    continuous aggregate on the full edition, materialised by the import) equal the
    klines they were made from; the order flow rebuilt from them equals a recomputation
    from the exchange's trades, an unfillable gap among them is filled; a second run
    takes nothing."""
    run = importer(pool, redis, exchange.archive_url)
    symbol, second_day = PAIR[0], FIRST + timedelta(days=1)
    assert [o.status for o in await run.run("klines", [symbol], FIRST, second_day)] == ["imported"] * 2
    gap = day_start_ms(second_day) + 600 * 60_000
    await pool.execute(
        "INSERT INTO trade_gaps_v4 (symbol, open_time, status, reason) VALUES ($1, $2, 'unfillable', 'too old')",
        symbol,
        ms_to_datetime(gap),
    )
    outcomes = await run.run("aggTrades", [symbol], FIRST, second_day)
    assert [o.status for o in outcomes] == ["imported"] * 2 and all(o.rejected == 0 for o in outcomes)
    minutes = range(day_start_ms(FIRST), day_start_ms(second_day) + DAY_MS, 60_000)
    sent = [r for t in minutes for r in exchange.trades.minute(symbol, t)]
    stored = await pool.fetch(
        "SELECT agg_id, price, quantity, first_id, last_id, ts, buyer_maker FROM agg_trades_v4 ORDER BY agg_id"
    )
    assert [(r["agg_id"], r["price"], r["quantity"], r["first_id"], r["last_id"]) for r in stored] == [
        (t["a"], Decimal(t["p"]), Decimal(t["q"]), t["f"], t["l"]) for t in sent
    ]
    assert [(core_io.datetime_to_ms(r["ts"]), r["buyer_maker"]) for r in stored] == [(t["T"], t["m"]) for t in sent]
    assert sum(o.rows for o in outcomes) == len(sent) > 10_000
    rolled = {
        core_io.datetime_to_ms(r["open_time"]): r
        for r in await pool.fetch("SELECT * FROM raw_trades_1m_v4 WHERE symbol = $1", symbol)
    }
    assert len(rolled) == len(minutes)
    for t in minutes:
        candle = exchange.source.candle(symbol, t)
        row = rolled[t]
        got = tuple(row[k] for k in ("open", "high", "low", "close", "volume", "taker_buy_volume", "trades"))
        wanted = (candle.open, candle.high, candle.low, candle.close, candle.volume, candle.taker_buy_volume)
        assert got == (*wanted, candle.trades), t
    flows = await pool.fetch(f"SELECT {', '.join(ORDERFLOW_COLUMNS)} FROM orderflow4 WHERE symbol = $1", symbol)
    stored = {(r["tf"], datetime_to_ms(r["open_time"])): r for r in flows}
    expected = recompute(exchange, symbol, stored, minutes[0], minutes[-1])
    assert set(stored) == set(expected) and len(expected) == 2 * (1440 + 288 + 96)
    assert all(tuple(stored[key]) == record for key, record in expected.items())
    rules = await pool.fetch("SELECT day, rule FROM orderflow_rows4 WHERE symbol = $1 ORDER BY day", symbol)
    assert [r["rule"] for r in rules] == ["price", "atr"]  # no day before the first: its first price decides
    assert await pool.fetchval("SELECT status FROM trade_gaps_v4 WHERE open_time = $1", ms_to_datetime(gap)) == "filled"
    events = [f for _, f in await redis.xrange("orderflow_ready") if f.get("history") == "1"]
    assert sorted(f["tf"] for f in events) == ["m1", "m15", "m5"] and {f["open_time"] for f in events} == {
        str(minutes[0])
    }
    again = await run.run("aggTrades", [symbol], FIRST, second_day)
    assert [o.status for o in again] == ["skipped"] * 2
    await pool.execute("DELETE FROM archive_imports_v4")  # the files taken again: every trade is there already
    taken = await run.run("aggTrades", [symbol], FIRST, second_day)
    assert [(o.status, o.changed) for o in taken] == [("imported", 0)] * 2
    assert await pool.fetchval("SELECT count(*) FROM agg_trades4") == len(sent)


async def test_a_damaged_file_fails_alone_and_a_second_run_takes_only_it(pool, redis, exchange, importer):
    broken = file_name("klines", PAIR[1], date(2026, 2, 2))
    exchange.faults.archive_corrupt = {broken}
    run = importer(pool, redis, exchange.archive_url)
    first = await run.run("klines", PAIR, FIRST, LAST)
    failed = [o for o in first if o.status == "failed"]
    assert [(o.symbol, o.day) for o in failed] == [(PAIR[1], date(2026, 2, 2))]
    assert "differs from its .CHECKSUM" in failed[0].reason
    await system_event_log.flush(pool)
    logged = await pool.fetchval("SELECT count(*) FROM system_log_v4 WHERE message LIKE $1", f"not imported: {broken}%")
    assert logged == 1
    assert await pool.fetchval("SELECT count(*) FROM archive_imports_v4") == 5
    exchange.faults.archive_corrupt = set()
    second = await run.run("klines", PAIR, FIRST, date(2026, 2, 4))
    assert {(o.symbol, o.day): o.status for o in second if o.status != "skipped"} == {
        (PAIR[1], date(2026, 2, 2)): "imported",
        (PAIR[0], date(2026, 2, 4)): "imported",
        (PAIR[1], date(2026, 2, 4)): "imported",
    }
    last_closed = day_start_ms(date(2026, 2, 4)) + DAY_MS - 60_000
    await assert_store_matches_source(pool, redis, exchange.source, PAIR, last_closed)
    absent = await run.run("klines", PAIR, date(2026, 2, 6), date(2026, 2, 6))  # not published yet
    assert [o.status for o in absent] == ["absent", "absent"]


async def test_minutes_rest_never_had_are_filled_and_their_gaps_closed(pool, redis, exchange, importer):
    """What the feed stored before: a day with two minutes REST never had ('unfillable',
    their M15 built short) and one candle that differs from the exchange's record."""
    symbol = PAIR[0]
    source = exchange.source
    day = day_start_ms(FIRST)
    holes = [day + 600 * 60_000, day + 601 * 60_000]
    odd = day + 700 * 60_000
    intake = CandleIntake(pool, redis, core_io.make_candle_store(redis, True, 250), stream_maxlen=100_000)
    minutes = [source.candle(symbol, t) for t in range(day, day + DAY_MS, 60_000) if t not in holes]
    wrong = source.candle(symbol, odd)
    await pool.executemany(
        "INSERT INTO missing_m1_log_v4 (symbol, open_time, status) VALUES ($1, $2, 'unfillable')",
        [(symbol, ms_to_datetime(t)) for t in holes],
    )
    await intake.store_m1(minutes, history=True)
    await intake.aggregate({(symbol, "m15", day + 600 * 60_000)})
    short = await pool.fetchval(
        "SELECT m1_count FROM ohlcv4_m15 WHERE symbol = $1 AND open_time = $2", symbol, ms_to_datetime(holes[0])
    )
    assert short == 13  # built without its two lost minutes
    changed = wrong.high if wrong.close != wrong.high else wrong.low
    await pool.execute(
        "UPDATE ohlcv4_m1 SET close = $3 WHERE symbol = $1 AND open_time = $2", symbol, ms_to_datetime(odd), changed
    )
    run = importer(pool, redis, exchange.archive_url)
    outcomes = await run.run("klines", [symbol], FIRST, FIRST)
    assert outcomes[0].status == "imported"
    # Two M1 filled and one replaced; the M5 and M15 the holes left short (the replaced
    # minute's were built before its change: right already).
    assert outcomes[0].changed == 2 + 1 + 1 + 1
    statuses = await pool.fetch("SELECT status FROM missing_m1_log_v4 WHERE symbol = $1", symbol)
    assert [r["status"] for r in statuses] == ["backfilled", "backfilled"]
    full = await pool.fetchval(
        "SELECT m1_count FROM ohlcv4_m15 WHERE symbol = $1 AND open_time = $2", symbol, ms_to_datetime(holes[0])
    )
    assert full == 15
    await system_event_log.flush(pool)
    replaced = await pool.fetchval(
        "SELECT count(*) FROM system_log_v4 WHERE message LIKE '%differed from the archive%'"
    )
    assert replaced == 1
    await assert_store_matches_source(pool, redis, source, [symbol], day + DAY_MS - 60_000)


async def test_history_imported_behind_a_running_series_rewrites_its_values(pool, redis, exchange, importer):
    """Days already stored with their indicator values, then the days before them
    imported: the oldest changed bar's event makes the worker write the series again,
    and every value equals TA-Lib over the whole stored series."""
    symbol = PAIR[0]
    await configure(pool, COMMON_CASES)
    await core_io.enable_symbols(pool, [symbol])
    await core_io.ensure_groups(redis)
    intake = CandleIntake(pool, redis, core_io.make_candle_store(redis, True, 250), stream_maxlen=100_000)
    running = Running(pool, redis)
    await running.settle(redis)
    start = day_start_ms(date(2026, 2, 3))
    later = [exchange.source.candle(symbol, t) for t in range(start, start + 300 * 60_000, 60_000)]
    for i in range(0, len(later), 30):
        await intake.store_m1(later[i : i + 30])
    await running.settle(redis)
    run = importer(pool, redis, exchange.archive_url)
    assert [o.status for o in await run.run("klines", [symbol], FIRST, date(2026, 2, 2))] == ["imported"] * 2
    await running.settle(redis)
    await running.crash()
    assert running.worker.stats["corrections"] >= 3  # M1, M5, M15: once each
    assert await assert_values_match_talib(pool, [symbol]) > 10_000
    oldest = await pool.fetchval("SELECT min(open_time) FROM indicator_values_v4")
    assert datetime_to_ms(oldest) < start  # values now reach into the imported days


async def test_the_command_imports_from_a_folder_and_says_what_it_did(pool, exchange, tmp_path, pg_url, redis_url):
    """`feed-v4 import` as a trader runs it: a folder mirror, a summary, exit 0; a day
    whose file failed, exit 1; a bad range, exit 2 with one line."""
    for symbol in PAIR:
        for day in days(FIRST, LAST):
            for suffix in ("", ".CHECKSUM"):
                path = daily_path("klines", symbol, day) + suffix
                data = exchange.archive.file(path)
                assert data is not None
                (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
                (tmp_path / path).write_bytes(data)
    broken = tmp_path / daily_path("klines", PAIR[0], LAST)
    env = {**os.environ, "REDIS_URL": redis_url, "POSTGRES_URL": pg_url, "PROGRESS": "log"}

    def feed_v4(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "feed_v4_main.py", "import", *args]
        return subprocess.run(command, cwd=PROJECT, env=env, capture_output=True, text=True, timeout=120)

    spec = ["--from", str(FIRST), "--to", str(LAST), "--symbols", ",".join(PAIR).lower(), "--source", str(tmp_path)]
    broken.write_bytes(broken.read_bytes()[:-10])
    done = await asyncio.to_thread(feed_v4, *spec)
    assert done.returncode == 1, done.stderr
    assert "import done: 6 files (5 imported, 1 failed), 7,200 rows" in done.stdout
    assert f"failed: {PAIR[0]} {LAST}:" in done.stdout
    broken.write_bytes(exchange.archive.file(daily_path("klines", PAIR[0], LAST)))
    again = await asyncio.to_thread(feed_v4, *spec)
    assert again.returncode == 0, again.stderr
    assert "import done: 6 files (1 imported, 5 skipped), 1,440 rows" in again.stdout
    assert await pool.fetchval("SELECT count(*) FROM ohlcv4_m1") == 2 * 3 * 1440
    backwards = await asyncio.to_thread(feed_v4, "--from", str(LAST), "--to", str(FIRST))
    assert backwards.returncode == 2 and "is before --from" in backwards.stderr
    bad_day = await asyncio.to_thread(feed_v4, "--from", "2026-02-30", "--to", str(LAST))
    assert bad_day.returncode == 2 and "is not a day as YYYY-MM-DD" in bad_day.stderr
