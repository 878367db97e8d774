"""The storage mode applied on real servers: a database filled by the plain schema is
moved to TimescaleDB's Apache and full editions with no row lost or changed, and the
same candles and indicator work stores the same rows in all three modes."""

from __future__ import annotations

from dataclasses import replace
from datetime import date
from itertools import islice

import asyncpg
import pytest
from daemon import DaemonProcess
from replay import (
    HISTORY_M1,
    M1,
    START,
    SYMBOLS,
    assert_store_matches_source,
    complete,
    daemon_env,
    pause_mid_minute,
    until,
    until_sim,
)
from servers import drop_database, recreate_database, setting

import core_io
from archive.files import day_start_ms
from candles import ALL_TIMEFRAMES
from fake_exchange import ArchiveSource, FakeExchange
from feed_and_aggregate import CandleIntake
from infra import ConfigError, system_event_log
from market_data import read_archive
from migrations import apply_migrations
from storage import partitions
from storage.compression import COMPRESSED, compress_all
from storage.layout import DAY_MS, HOUR_MS, TIME_TABLES, piece_start
from storage.modes import APACHE, FULL, PLAIN
from storage.retention import drop_expired
from storage.setup import apply_storage, timescaledb_setting
from tests.indicator_reference import COMMON_CASES, assert_values_match_talib, configure
from tests.test_indicators_worker import Running

SYMBOL = "LINKUSDT"
SERVERS = {PLAIN: "POSTGRES_URL", APACHE: "TIMESCALEDB_APACHE_URL", FULL: "TIMESCALEDB_URL"}
SCRATCH = "feed_v4_storage_setup"
# Every stored row of the tables the modes change, in a fixed order (numeric as text: exact).
SNAPSHOT_SQL = {
    table.table: "SELECT coalesce(md5(string_agg(t::text, '|' ORDER BY t::text)), '') || ':' || count(*) "
    f"FROM {table.table} t"
    for table in TIME_TABLES
}


# The growing tables' indexes in every mode: their keys and the one time index sql/013 makes.
TIME_INDEXES_SQL = """
SELECT t.relname AS table_name, i.relname AS index_name, split_part(pg_get_indexdef(x.indexrelid), ' USING ', 2) AS how
FROM pg_index x JOIN pg_class t ON t.oid = x.indrelid JOIN pg_class i ON i.oid = x.indexrelid
WHERE t.relname = ANY($1::text[]) AND t.relnamespace = 'public'::regnamespace ORDER BY 1, 2
"""


async def time_indexes(pool: asyncpg.Pool) -> list[tuple[str, str, str]]:
    return [tuple(r) for r in await pool.fetch(TIME_INDEXES_SQL, [t.table for t in TIME_TABLES])]


def server_url(mode: str) -> str:
    try:
        return setting(SERVERS[mode])
    except RuntimeError:
        pytest.fail(f"{SERVERS[mode]} is unknown: `make services` builds TimescaleDB from ../shared/vendor")


async def snapshot(pool: asyncpg.Pool) -> dict[str, str]:
    return {table: await pool.fetchval(sql) for table, sql in SNAPSHOT_SQL.items()}


async def hypertables(pool: asyncpg.Pool) -> set[str]:
    rows = await pool.fetch("SELECT hypertable_name FROM timescaledb_information.hypertables")
    return {r["hypertable_name"] for r in rows}


async def fill(pool: asyncpg.Pool, redis, minutes: slice, first: bool = False) -> None:
    """Candles (M1, and the M5 to D1 built from them) stored while the indicator worker runs:
    each bar's values, for the default indicators."""
    if first:
        await configure(pool, COMMON_CASES)
        await core_io.enable_symbols(pool, [SYMBOL])
    store = core_io.make_candle_store(redis, True, 250)
    intake = CandleIntake(pool, redis, store, stream_maxlen=100_000, aggregated=ALL_TIMEFRAMES[1:])
    m1 = list(islice(read_archive(SYMBOL), minutes.stop))[minutes]
    await core_io.ensure_groups(redis)
    running = Running(pool, redis)
    await running.settle(redis)
    for start in range(0, len(m1), 20):
        await intake.store_m1(m1[start : start + 20])
    await running.settle(redis)
    await running.crash()


def test_the_timescaledb_setting_is_auto_or_off():
    assert timescaledb_setting({}) == "auto"
    assert timescaledb_setting({"TIMESCALEDB": " OFF "}) == "off"
    with pytest.raises(ConfigError, match="TIMESCALEDB='yes' is not one of auto, off"):
        timescaledb_setting({"TIMESCALEDB": "yes"})


async def kinds(pool: asyncpg.Pool) -> dict[str, str]:
    return {t.table: await partitions.table_kind(pool, t.table) for t in TIME_TABLES}


def expected_kinds(mode: str) -> dict[str, str]:
    if mode != PLAIN:
        return {t.table: partitions.HYPERTABLE for t in TIME_TABLES}
    return {t.table: partitions.NATIVE if t.partitioned_plain else partitions.SINGLE for t in TIME_TABLES}


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    ("mode", "through_partitions"), [(PLAIN, False), (APACHE, False), (FULL, False), (APACHE, True), (FULL, True)]
)
async def test_a_database_filled_by_todays_schema_moves_to_each_mode_with_every_row_kept(
    mode, through_partitions, redis
):
    """Today's schema (plain tables) to each mode; and plain partitions (what the plain
    mode makes) on to TimescaleDB, as a user who adds it later."""
    url = await recreate_database(server_url(mode), SCRATCH)
    pool = await asyncpg.create_pool(url, min_size=1, max_size=6)
    try:
        await apply_migrations(pool)  # no storage step: the tables as this release found them
        if through_partitions:
            assert (await apply_storage(pool, "off")).mode == PLAIN
            assert await kinds(pool) == expected_kinds(PLAIN)
        if mode != PLAIN and not through_partitions:  # a hypertable as an earlier release made it
            await pool.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
            await pool.execute("SELECT create_hypertable('ohlcv4_m5', by_range('open_time', interval '7 days'))")
            assert ("ohlcv4_m5", "ohlcv4_m5_open_time_idx", "btree (open_time DESC)") in await time_indexes(pool)
        await fill(pool, redis, slice(0, 1500), first=True)
        await fill(pool, redis, slice(1500, 1600))
        before = await snapshot(pool)
        empty = {table for table, value in before.items() if value.endswith(":0")}
        assert empty == {"orderflow4", "book_m1_4", "trades_1s4", "book_ticker_1s4", "depth_1s4", "features_1s4"} | {
            "agg_trades4",
            "book_tickers4",
        }  # no trades, no book here: candles and values
        moved = await apply_storage(pool, "off" if mode == PLAIN else "auto")
        assert moved.mode == mode
        assert await kinds(pool) == expected_kinds(mode)
        assert await snapshot(pool) == before
        indexes = await time_indexes(pool)
        assert {
            (table, how) for table, _, how in indexes if not how.startswith(("btree (symbol", "btree (instance_id"))
        } == {
            ("indicator_values_v4", "btree (open_time)"),
            ("ohlcv4_m1", "btree (open_time DESC)"),
        }  # TimescaleDB's default time indexes gone: every table keeps its key, M1 its time index
        if mode != PLAIN:
            chunks = await pool.fetchval(
                "SELECT count(*) FROM timescaledb_information.chunks WHERE hypertable_name = 'ohlcv4_m1'"
            )
            assert chunks == 2  # 1,600 minutes from midnight: two 1-day chunks
        else:  # the values stay where they were, in one partition up to the end of their last piece
            kept = await pool.fetchval("SELECT count(*) FROM ONLY indicator_values_v4_before")
            assert before["indicator_values_v4"].endswith(f":{kept}") and kept > 8_000
        assert (await apply_storage(pool, "off" if mode == PLAIN else "auto")).mode == mode  # again: nothing to do
        assert await snapshot(pool) == before
        await fill(pool, redis, slice(1600, 1700))  # and the daemon's writes go on, into the new pieces
        assert await assert_values_match_talib(pool, [SYMBOL]) > 8_000
        for view in ("orderflow_v4", "footprint_v4", "trades_1s_v4", "features_1s_v4"):  # made again over the new table
            assert await pool.fetchval(f"SELECT count(*) FROM {view}") == 0
    finally:
        await pool.close()
        await drop_database(server_url(mode), SCRATCH)


@pytest.mark.timeout(240)
async def test_the_same_work_stores_the_same_rows_in_all_three_modes(redis):
    stored: dict[str, dict[str, str]] = {}
    indexes: dict[str, list] = {}
    for mode in (PLAIN, APACHE, FULL):
        await redis.flushall()
        url = await recreate_database(server_url(mode), SCRATCH)
        pool = await asyncpg.create_pool(url, min_size=1, max_size=6)
        try:
            await apply_migrations(pool)
            assert (await apply_storage(pool)).mode == mode
            await fill(pool, redis, slice(0, 1500), first=True)
            await fill(pool, redis, slice(1500, 1600))
            stored[mode] = await snapshot(pool)
            indexes[mode] = await time_indexes(pool)
        finally:
            await pool.close()
            await drop_database(server_url(mode), SCRATCH)
    assert stored[PLAIN] == stored[APACHE] == stored[FULL]
    assert indexes[PLAIN] == indexes[APACHE] == indexes[FULL]  # the same indexes: the same costs and plans
    assert len(indexes[PLAIN]) == len(TIME_TABLES) + 2  # each table's key, and two time indexes


@pytest.mark.timeout(240)
async def test_the_daemon_boots_on_the_full_edition_and_its_replay_matches_the_exchange(redis, redis_url):
    """A database with today's plain schema: the daemon makes it TimescaleDB at boot, says
    so, and replays with faults into hypertables exactly as into plain tables."""
    symbols = SYMBOLS[:3]
    url = await recreate_database(server_url(FULL), SCRATCH)
    pool = await asyncpg.create_pool(url, min_size=1, max_size=6)
    source = ArchiveSource(symbols, start_ms=START - (HISTORY_M1 + 30) * M1, end_ms=START + 50 * M1)
    exchange = FakeExchange(source, start_ms=START, speed=300, seed=7)
    exchange.faults.drop_missing_close = 0.02
    exchange.faults.duplicate_close = 0.03
    await exchange.start()
    daemon = DaemonProcess(daemon_env(exchange, redis_url, url, symbols))
    try:
        await apply_migrations(pool)
        await configure(pool, COMMON_CASES)
        daemon.start()
        await until_sim(exchange, START + 35 * M1, daemon)
        last_closed = await pause_mid_minute(exchange)
        await until(lambda: complete(pool, symbols, last_closed, redis), 90, "the daemon to catch up")
        assert await assert_store_matches_source(pool, redis, source, symbols, last_closed) > 0
        assert daemon.terminate() == 0
        assert f"storage: {FULL} 2.28.3" in daemon.output()
        assert await hypertables(pool) == {t.table for t in TIME_TABLES}
        assert await assert_values_match_talib(pool, symbols) > len(symbols) * 30 * 40
        logged = await pool.fetchval("SELECT count(*) FROM system_log_v4 WHERE message LIKE '%is a hypertable now%'")
        assert logged == len(TIME_TABLES)
    finally:
        daemon.cleanup()
        await exchange.stop()
        await pool.close()
        await drop_database(server_url(FULL), SCRATCH)


async def test_a_user_who_may_not_create_the_extension_runs_plain_with_a_warning():
    """Hosted PostgreSQL gives no superuser: the storage mode must still be read (not
    from shared_preload_libraries, which only superusers may see) and the daemon run.
    TimescaleDB is a trusted extension (a user with CREATE on the database may create
    it): this user has the schema but not CREATE on the database."""
    role = "feed_v4_storage_user"
    url = await recreate_database(server_url(FULL), SCRATCH)
    admin = await asyncpg.connect(url)
    try:
        await admin.execute(f'DROP ROLE IF EXISTS "{role}"')
        await admin.execute(f'CREATE ROLE "{role}" LOGIN')
        await admin.execute(f'GRANT CONNECT, TEMPORARY ON DATABASE "{SCRATCH}" TO "{role}"')
        await admin.execute(f'GRANT ALL ON SCHEMA public TO "{role}"')
        pool = await asyncpg.create_pool(url.replace("postgresql://postgres@", f"postgresql://{role}@", 1))
        try:
            await apply_migrations(pool)
            mode = await apply_storage(pool)
            assert mode.mode == PLAIN and "not created in this database" in mode.note
            await system_event_log.flush(pool)
            warned = await pool.fetchval("SELECT message FROM system_log_v4 WHERE level = 'WARNING'")
            assert warned.startswith("TimescaleDB not created, tables stay plain:")
        finally:
            await pool.close()
    finally:
        await admin.close()
        await drop_database(server_url(FULL), SCRATCH)
        conn = await asyncpg.connect(server_url(FULL))
        await conn.execute(f'DROP ROLE IF EXISTS "{role}"')
        await conn.close()


ORDERFLOW_ROWS_SQL = """
INSERT INTO orderflow4 (symbol, tf, open_time, buy_units, sell_units, delta_min, delta_max, cvd, cvd_day,
    agg_trades, trades, buy_trades, sell_trades, max_trade_qty, row_size, row_index, bid_units, ask_units,
    bid_trades, ask_trades)
SELECT $1, 'm1', t, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, '{}', '{}', '{}', '{}', '{}' FROM unnest($2::timestamptz[]) t
"""
TRADE_SECONDS_SQL = """
INSERT INTO trades_1s4 (symbol, ts, open, high, low, close, buy_volume, sell_volume, quote_volume, agg_trades)
SELECT $1, t, 1, 1, 1, 1, 0, 0, 0, 1 FROM unnest($2::timestamptz[]) t
"""


async def pieces(pool: asyncpg.Pool, table: str) -> list[int]:
    """The starts of a table's pieces (ms): chunks or partitions."""
    if await partitions.table_kind(pool, table) == partitions.HYPERTABLE:
        rows = await pool.fetch(
            "SELECT range_start AS start FROM timescaledb_information.chunks WHERE hypertable_name = $1", table
        )
    else:
        rows = await pool.fetch(
            "SELECT (regexp_match(pg_get_expr(c.relpartbound, c.oid), 'FROM \\(''([^'']+)''\\)'))[1]::timestamptz "
            "AS start FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = $1::regclass",
            table,
        )
    return sorted(core_io.datetime_to_ms(r["start"]) for r in rows)


@pytest.mark.parametrize("mode", [PLAIN, APACHE, FULL])
async def test_a_week_with_two_days_kept_ends_with_exactly_the_pieces_across_and_after_the_cutoff(mode):
    """A week of hourly rows in the fine tables (indicator values in 6-hour pieces, order
    flow in days, one-second bars in hours), two days kept counted from the newest: every
    piece wholly before the cut-off is dropped, no row of the others is deleted, and
    the writes that follow make their pieces again."""
    url = await recreate_database(server_url(mode), SCRATCH)
    pool = await asyncpg.create_pool(url, min_size=1, max_size=3)
    try:
        await apply_migrations(pool)
        assert (await apply_storage(pool, "off" if mode == PLAIN else "auto")).mode == mode
        start = day_start_ms(date(2026, 2, 1))
        hours = [start + h * HOUR_MS + 1_800_000 for h in range(7 * 24)]  # half past each hour
        newest = hours[-1]
        stamps = [core_io.ms_to_datetime(t) for t in hours]
        await core_io.upsert_candles(pool, [replace(next(read_archive(SYMBOL)), open_time=newest)])  # the clock
        await core_io.upsert_indicator_rows(
            pool, [1] * len(hours), [SYMBOL] * len(hours), hours, ["EMA_9"] * len(hours), [1.0] * len(hours)
        )
        for table, sql in (("orderflow4", ORDERFLOW_ROWS_SQL), ("trades_1s4", TRADE_SECONDS_SQL)):
            await partitions.write_through(pool, {table: hours}, lambda sql=sql: pool.execute(sql, SYMBOL, stamps))
        keep = 2 * DAY_MS
        cutoff = newest - keep
        dropped = await core_io.prune_indicator_values(pool, keep)
        dropped += await drop_expired(pool, ["orderflow4", "trades_1s4"], keep, newest)
        for table in ("indicator_values_v4", "orderflow4", "trades_1s4"):
            spec = next(t for t in TIME_TABLES if t.table == table)
            first_kept = piece_start(spec, cutoff)  # the piece across the cut-off and every one after
            wanted = list(range(first_kept, newest + 1, spec.piece_ms))
            if mode == PLAIN:
                wanted.append(wanted[-1] + spec.piece_ms)  # made ahead of the rows
            assert await pieces(pool, table) == wanted, table
            kept = [core_io.datetime_to_ms(r[0]) for r in await pool.fetch(f"SELECT {spec.time_column} FROM {table}")]
            assert sorted(kept) == [t for t in hours if t >= first_kept], table
        assert (
            len(dropped) == (cutoff - start) // (6 * HOUR_MS) + (cutoff - start) // DAY_MS + (cutoff - start) // HOUR_MS
        )
        assert await drop_expired(pool, ["indicator_values_v4", "orderflow4", "trades_1s4"], keep, newest) == []
        # A late value for a dropped piece makes it again rather than failing.
        await core_io.upsert_indicator_rows(pool, [1], [SYMBOL], [hours[0]], ["EMA_9"], [2.0])
        assert await pool.fetchval("SELECT value FROM indicator_values_v4 WHERE open_time = $1", stamps[0]) == 2.0
    finally:
        await pool.close()
        await drop_database(server_url(mode), SCRATCH)


@pytest.mark.timeout(180)
async def test_compressed_chunks_read_the_same_and_take_corrections(redis):
    """The full edition compresses older chunks by policy; here every chunk at once: the
    rows read back unchanged, a corrected candle and new values still reach them."""
    url = await recreate_database(server_url(FULL), SCRATCH)
    pool = await asyncpg.create_pool(url, min_size=1, max_size=6)
    try:
        await apply_migrations(pool)
        assert (await apply_storage(pool)).mode == FULL
        policies = await pool.fetch(
            "SELECT hypertable_name, config->>'compress_after' AS after FROM timescaledb_information.jobs "
            "WHERE proc_name = 'policy_compression'"
        )
        assert {r["hypertable_name"] for r in policies} == {c.table for c in COMPRESSED}
        await fill(pool, redis, slice(0, 1500), first=True)
        before = await snapshot(pool)
        for item in COMPRESSED:
            await compress_all(pool, item.table)
        compressed = await pool.fetchval(
            "SELECT count(*) FROM timescaledb_information.chunks WHERE is_compressed AND hypertable_name = 'ohlcv4_m1'"
        )
        assert compressed == 2
        assert await snapshot(pool) == before
        first = next(read_archive(SYMBOL))
        await core_io.upsert_candles(pool, [replace(first, close=first.close + 1)])  # a late correction
        stored = await pool.fetchval(
            "SELECT close FROM ohlcv4_m1 WHERE symbol = $1 AND open_time = $2",
            SYMBOL,
            core_io.ms_to_datetime(first.open_time),
        )
        assert stored == first.close + 1
        await core_io.upsert_candles(pool, [first])
        assert await snapshot(pool) == before
        await fill(pool, redis, slice(1500, 1600))  # values of the minutes after, next to compressed chunks
        assert await assert_values_match_talib(pool, [SYMBOL]) > 8_000
    finally:
        await pool.close()
        await drop_database(server_url(FULL), SCRATCH)
