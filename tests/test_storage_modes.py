"""Storage modes: read from plain PostgreSQL and from TimescaleDB's Apache and full
editions (real servers: `make services` builds and starts them), shown by status."""

from __future__ import annotations

import asyncpg
import pytest
from servers import drop_database, recreate_database, setting

import status_report
from migrations import apply_migrations
from storage.detect import detect_storage_mode
from storage.modes import APACHE, FULL, PLAIN, ServerFacts, classify

TS_VERSION = "2.28.3"  # scripts/timescaledb.sh


def facts(**changes) -> ServerFacts:
    base = {"server_version_num": 150020, "installed": None, "available": None, "preloaded": False, "license": None}
    return ServerFacts(**{**base, **changes})


def test_the_mode_is_what_this_database_uses_and_the_note_says_what_the_server_offers():
    assert classify(facts()).mode == PLAIN and classify(facts()).note == ""
    offered = classify(facts(available=TS_VERSION))
    assert offered.mode == PLAIN and "not in shared_preload_libraries" in offered.note
    loadable = classify(facts(available=TS_VERSION, preloaded=True, license="timescale"))
    assert loadable.mode == PLAIN and "not created in this database" in loadable.note
    full = classify(facts(installed=TS_VERSION, available=TS_VERSION, preloaded=True, license="timescale"))
    assert (full.mode, full.timescaledb_version, full.note, full.full) == (FULL, TS_VERSION, "", True)
    apache = classify(facts(installed=TS_VERSION, preloaded=True, license="apache"))
    assert (apache.mode, apache.full) == (APACHE, False)
    assert apache.describe() == f"{APACHE} {TS_VERSION}"
    old = classify(facts(server_version_num=140011))
    assert old.mode == PLAIN and "PostgreSQL 14 is older than the 15" in old.note


def timescale_url(key: str) -> str:
    try:
        return setting(key)
    except RuntimeError:
        pytest.fail(f"{key} is unknown: `make services` builds TimescaleDB from ../shared/vendor and records it")


@pytest.mark.parametrize(
    ("url_key", "mode"),
    [("POSTGRES_URL", PLAIN), ("TIMESCALEDB_APACHE_URL", APACHE), ("TIMESCALEDB_URL", FULL)],
)
async def test_each_server_is_read_as_its_mode_once_the_extension_is_created(url_key, mode):
    url = await recreate_database(timescale_url(url_key), "feed_v4_storage_mode")
    try:
        conn = await asyncpg.connect(url)
        try:
            before = await detect_storage_mode(conn)
            assert before.mode == PLAIN
            if mode == PLAIN:
                return
            assert "not created in this database" in before.note
            await conn.execute("CREATE EXTENSION timescaledb")
            after = await detect_storage_mode(conn)
            assert (after.mode, after.timescaledb_version) == (mode, TS_VERSION)
        finally:
            await conn.close()
    finally:
        await drop_database(timescale_url(url_key), "feed_v4_storage_mode")


async def test_status_shows_the_storage_mode(redis):
    url = await recreate_database(timescale_url("TIMESCALEDB_URL"), "feed_v4_storage_status")
    pool = await asyncpg.create_pool(url, min_size=1, max_size=3)
    try:
        await pool.execute("CREATE EXTENSION timescaledb")
        await apply_migrations(pool)
        report = await status_report.collect_status(pool, redis)
        assert report["storage_mode"] == FULL
        assert report["storage"]["timescaledb_version"] == TS_VERSION
        assert f"storage  {FULL} {TS_VERSION}" in status_report.render_status(report, colour=False)
    finally:
        await pool.close()
        await drop_database(timescale_url("TIMESCALEDB_URL"), "feed_v4_storage_status")
