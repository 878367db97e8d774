"""Fixtures: real Redis (with and without TimeSeries) and a scratch PostgreSQL database."""

from __future__ import annotations

import asyncio
import gc
import os
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest
from redis.asyncio import Redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from hosted import PrivateCA, RestrictedRedisServer, SslPostgresServer, TlsRedisServer
from servers import PostgresServer, RedisCluster, RedisServer, drop_database, recreate_database, setting

import core_io
from infra import make_redis
from migrations import apply_migrations
from storage.setup import apply_storage

TEST_DATABASE = f"feed_v4_test_{os.getpid()}"  # parallel runs never share one

DATA_TABLES = (
    "tickers",
    "archive_imports_v4",
    "ohlcv4_m1",
    "ohlcv4_m5",
    "ohlcv4_m15",
    "ohlcv4_h1",
    "ohlcv4_h4",
    "ohlcv4_d1",
    "orderflow4",
    "orderflow_rows4",
    "trade_gaps_v4",
    "trades_1s4",
    "book_ticker_1s4",
    "depth_1s4",
    "features_1s4",
    "agg_trades4",
    "book_tickers4",
    "book_m1_4",
    "indicator_values_v4",
    "missing_m1_log_v4",
    "system_log_v4",
    "signal_log_entries_v2",
    "signals_v2_log",
    "strategy_signals",
    "strategies",
    "signal_phrases",
)


@pytest.fixture(scope="session")
def redis_stack_server() -> Iterator[RedisServer]:
    server = RedisServer(with_timeseries=True)
    server.start()
    yield server
    server.cleanup()


@pytest.fixture(scope="session")
def redis_cluster_server() -> Iterator[RedisCluster]:
    """3 masters with a replica each, started once for the session when a test asks."""
    cluster = RedisCluster(masters=3, replicas=1)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.cleanup()


@pytest.fixture(scope="session")
def plain_redis_server() -> Iterator[RedisServer]:
    server = RedisServer(with_timeseries=False)
    server.start()
    yield server
    server.cleanup()


# FEED_TEST_STORAGE picks the server of `pg_url` (and so the storage mode every test on it
# runs in): `make test` runs the suites marked `storage_modes` once more per TimescaleDB
# edition.
STORAGE_SERVERS = {
    "postgresql": "POSTGRES_URL",
    "timescaledb-apache": "TIMESCALEDB_APACHE_URL",
    "timescaledb-full": "TIMESCALEDB_URL",
}


def storage_server() -> str:
    mode = os.environ.get("FEED_TEST_STORAGE", "postgresql")
    if mode not in STORAGE_SERVERS:
        raise pytest.UsageError(f"FEED_TEST_STORAGE={mode!r} is not one of {', '.join(STORAGE_SERVERS)}")
    return setting(STORAGE_SERVERS[mode])


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh database on the PostgreSQL that `make services` found or started."""
    server = storage_server()
    yield asyncio.run(recreate_database(server, TEST_DATABASE))
    asyncio.run(drop_database(server, TEST_DATABASE))


@pytest.fixture
async def pool(pg_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(pg_url, min_size=1, max_size=6)
    await apply_migrations(pool)
    await apply_storage(pool)  # the tables in their production shape (plain: partitions)
    await pool.execute(f"TRUNCATE {', '.join(DATA_TABLES)} RESTART IDENTITY CASCADE")
    yield pool
    await pool.close()


@pytest.fixture
async def redis(redis_stack_server: RedisServer) -> AsyncIterator[Redis]:
    client = make_redis(redis_stack_server.url)
    await client.flushall()
    yield client
    await client.aclose()


@pytest.fixture
async def redis_url(redis_stack_server: RedisServer) -> str:
    """The Redis Stack server's URL, flushed, for a daemon process to use."""
    client = make_redis(redis_stack_server.url)
    await client.flushall()
    await client.aclose()
    return redis_stack_server.url


@pytest.fixture
async def plain_redis(plain_redis_server: RedisServer) -> AsyncIterator[Redis]:
    client = make_redis(plain_redis_server.url)
    await client.flushall()
    yield client
    await client.aclose()


# Hosted-style servers (tests/hosted.py), shared by the hosted-server suites.


@pytest.fixture(scope="session")
def ca() -> Iterator[PrivateCA]:
    with PrivateCA() as made:
        yield made


@pytest.fixture(scope="session")
def tls_redis(ca: PrivateCA) -> Iterator[TlsRedisServer]:
    with TlsRedisServer(ca) as server:
        yield server


@pytest.fixture(scope="session")
def restricted_redis() -> Iterator[RestrictedRedisServer]:
    with RestrictedRedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def ssl_pg(ca: PrivateCA) -> Iterator[SslPostgresServer]:
    with SslPostgresServer(ca) as server:
        yield server


@pytest.fixture(scope="session")
def plain_pg() -> Iterator[PostgresServer]:
    """A private cluster without SSL (the shared one may have Debian's snakeoil SSL on)."""
    server = PostgresServer()
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


@pytest.fixture(params=["timeseries", "zset"])
async def store(
    request, redis_stack_server: RedisServer, plain_redis_server: RedisServer
) -> AsyncIterator[core_io.CandleStore]:
    """Each candle store on the kind of server it is made for."""
    use_ts = request.param == "timeseries"
    server = redis_stack_server if use_ts else plain_redis_server
    client = make_redis(server.url)
    await client.flushall()
    yield core_io.make_candle_store(client, use_ts, bars_kept=250)
    await client.aclose()


@pytest.fixture(autouse=True)
def _collect_garbage_after_each_test() -> Iterator[None]:
    """A leaked client or transport is reported by the test that leaked it, not by
    whichever later test the collector happens to run in."""
    yield
    gc.collect()


LIVE_PACE_RUN = pytest.StashKey[object]()


def pytest_collection_finish(session) -> None:
    """The real-speed run starts as soon as its test is collected and goes on while the
    rest of the suite runs (it needs minutes of wall time, not CPU)."""
    if any(item.path.name == "test_live_pace.py" for item in session.items):
        from live_pace import LivePaceRun

        run = LivePaceRun()
        session.config.stash[LIVE_PACE_RUN] = run
        run.start()


def pytest_sessionfinish(session) -> None:
    run = session.config.stash.get(LIVE_PACE_RUN, None)
    if run is not None:
        run.cleanup()


@pytest.fixture(scope="session")
def live_pace_run(request):
    return request.config.stash[LIVE_PACE_RUN]


def pytest_terminal_summary(terminalreporter) -> None:
    """The fault scenarios' table: what was done to the daemon and what it kept."""
    from faults import SUMMARY, summary_lines

    if SUMMARY:
        terminalreporter.section("fault scenarios")
        for line in summary_lines():
            terminalreporter.write_line(line)
