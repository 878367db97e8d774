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
from fake_exchange import ArchiveSource, FakeExchange
from feed_and_aggregate import CandleIntake
from infra import ConfigError, system_event_log
from market_data import read_archive
from migrations import apply_migrations
from storage.layout import HYPERTABLES
from storage.modes import APACHE, FULL, PLAIN
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
    for table in HYPERTABLES
}


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
    """Candles (M1, and the M5/M15 built from them) stored while the indicator worker runs:
    each bar's values, for the default indicators."""
    if first:
        await configure(pool, COMMON_CASES)
        await core_io.enable_symbols(pool, [SYMBOL])
    intake = CandleIntake(pool, redis, core_io.make_candle_store(redis, True, 250), stream_maxlen=100_000)
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


@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", [APACHE, FULL])
async def test_a_plain_database_moves_to_timescaledb_in_place_with_every_row_kept(mode, redis):
    url = await recreate_database(server_url(mode), SCRATCH)
    pool = await asyncpg.create_pool(url, min_size=1, max_size=6)
    try:
        await apply_migrations(pool)
        assert (await apply_storage(pool, "off")).mode == PLAIN  # TIMESCALEDB=off: today's plain schema
        await fill(pool, redis, slice(0, 1500), first=True)
        await fill(pool, redis, slice(1500, 1600))
        before = await snapshot(pool)
        empty = {table for table, value in before.items() if value.endswith(":0")}
        assert empty == {"orderflow4", "book_m1_4"}  # no trades, no book here: candles and values
        moved = await apply_storage(pool)
        assert moved.mode == mode and moved.timescaledb_version
        assert await hypertables(pool) == {t.table for t in HYPERTABLES}
        assert await snapshot(pool) == before
        chunks = await pool.fetchval(
            "SELECT count(*) FROM timescaledb_information.chunks WHERE hypertable_name = 'ohlcv4_m1'"
        )
        assert chunks == 2  # 1,600 minutes from midnight: two 1-day chunks
        assert (await apply_storage(pool)).mode == mode  # again: nothing to do
        await fill(pool, redis, slice(1600, 1700))  # and the daemon's writes go on, into the chunks
        assert await assert_values_match_talib(pool, [SYMBOL]) > 8_000
    finally:
        await pool.close()
        await drop_database(server_url(mode), SCRATCH)


@pytest.mark.timeout(240)
async def test_the_same_work_stores_the_same_rows_in_all_three_modes(redis):
    stored: dict[str, dict[str, str]] = {}
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
        finally:
            await pool.close()
            await drop_database(server_url(mode), SCRATCH)
    assert stored[PLAIN] == stored[APACHE] == stored[FULL]


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
        assert await hypertables(pool) == {t.table for t in HYPERTABLES}
        assert await assert_values_match_talib(pool, symbols) > len(symbols) * 30 * 40
        logged = await pool.fetchval("SELECT count(*) FROM system_log_v4 WHERE message LIKE '%is a hypertable now%'")
        assert logged == len(HYPERTABLES)
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


@pytest.mark.parametrize("mode", [PLAIN, FULL])
async def test_a_week_of_values_with_two_days_kept_ends_with_exactly_those_chunks(mode):
    """Hourly values for a week (6-hour chunks under TimescaleDB), two days kept counted
    from the newest candle: the chunks wholly before the cut-off are dropped, the one
    across it loses its older rows by the batched DELETE, and the rest stays."""
    url = await recreate_database(server_url(mode), SCRATCH)
    pool = await asyncpg.create_pool(url, min_size=1, max_size=3)
    try:
        await apply_migrations(pool)
        assert (await apply_storage(pool)).mode == mode
        start = day_start_ms(date(2026, 2, 1))
        hours = [start + h * 3_600_000 for h in range(7 * 24)]
        newest = hours[-1]
        await core_io.upsert_candles(pool, [replace(next(read_archive(SYMBOL)), open_time=newest)])  # the clock
        await core_io.upsert_indicator_rows(
            pool, [1] * len(hours), [SYMBOL] * len(hours), hours, ["EMA_9"] * len(hours), [1.0] * len(hours)
        )
        await core_io.prune_indicator_round(pool, 2 * 86_400_000, batch=10, pause_s=0)
        kept = [core_io.datetime_to_ms(r[0]) for r in await pool.fetch("SELECT open_time FROM indicator_values_v4")]
        assert sorted(kept) == [t for t in hours if t >= newest - 2 * 86_400_000]  # 49 hours
        if mode == FULL:
            chunks = await pool.fetch(
                "SELECT range_start FROM timescaledb_information.chunks "
                "WHERE hypertable_name = 'indicator_values_v4' ORDER BY range_start"
            )
            first_kept = newest - 2 * 86_400_000
            first_kept -= first_kept % (6 * 3_600_000)  # the chunk across the cut-off
            assert [core_io.datetime_to_ms(r[0]) for r in chunks] == list(range(first_kept, newest + 1, 6 * 3_600_000))
            assert len(chunks) == 9
    finally:
        await pool.close()
        await drop_database(server_url(mode), SCRATCH)
