"""Fault scenarios: the whole daemon replays real data while its servers fail; nothing
may be lost, doubled or computed wrong (see tests/faults.py for the checks)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest
from faults import fault_run
from replay import M1, until
from servers import PostgresServer, recreate_database

from migrations import apply_migrations

OUTAGE_S = 60


@pytest.mark.timeout(300)
@pytest.mark.parametrize("server", ["Redis", "PostgreSQL"])
async def test_a_server_black_holed_for_a_minute(server, pool, redis, redis_url, pg_url):
    async with fault_run(f"{server.lower()}-blackhole", pool, redis, redis_url, pg_url, minutes=240) as run:
        proxy = run.redis_proxy if server == "Redis" else run.pg_proxy
        run.daemon.start()
        await run.ready()
        proxy.set_mode("blackhole")  # connections accepted, nothing answered: not refused
        run.inject(f"{server} black-holed {OUTAGE_S} s")
        await run.sleep(OUTAGE_S)
        proxy.set_mode("pass")
        await run.recovered()
        await run.finish()


@pytest.fixture
async def private_pg() -> AsyncIterator[tuple[PostgresServer, str, asyncpg.Pool]]:
    """A PostgreSQL cluster of its own, to stop and start; its database migrated."""
    server = PostgresServer()
    server.start()
    try:
        url = await recreate_database(server.url, "feed_v4_faults")
        pool = await asyncpg.create_pool(url, min_size=1, max_size=4)
        await apply_migrations(pool)
        yield server, url, pool
        await pool.close()
    finally:
        server.cleanup()


@pytest.mark.storage_modes
@pytest.mark.timeout(300)
async def test_redis_flushall_then_restart(pool, redis, redis_stack_server, redis_url, pg_url):
    async with fault_run("redis-flush-restart", pool, redis, redis_url, pg_url, minutes=240) as run:
        run.daemon.start()
        await run.ready()
        await run.sleep(5)
        await redis.flushall()
        run.inject("FLUSHALL")
        await run.recovered()
        await run.sleep(5)
        # The streams go with the data: what was announced before is not checked there.
        run.announced_since = run.exchange.clock.now_ms() // M1 * M1
        redis_stack_server.stop()  # no persistence: it comes back empty
        run.inject("Redis restarted (down 5 s)")
        await run.sleep(5)
        redis_stack_server.start()
        await run.recovered()

        async def refilled_twice() -> bool:
            # The guard looks every heartbeat and its log row is written behind: the
            # candles can be caught up (from PostgreSQL) before the second refill is logged.
            refills = await run.pool.fetchval(
                "SELECT count(*) FROM system_log_v4 WHERE message LIKE 'Redis refilled from PostgreSQL%'"
            )
            return refills >= 2

        await until(refilled_twice, 30, "the second refill of Redis")
        await run.finish()


@pytest.mark.timeout(300)
async def test_postgres_restarted_and_connections_killed(redis, redis_url, private_pg):
    server, url, pool = private_pg
    async with fault_run("pg-restart+kills", pool, redis, redis_url, url, minutes=240) as run:
        run.daemon.start()
        await run.ready()
        server.stop("immediate")  # a crash: recovery at the next start
        run.inject("PostgreSQL crashed and restarted (down 10 s)")
        await run.sleep(10)
        server.start()
        await run.recovered()
        for _ in range(3):
            await run.sleep(3)
            killed = await pool.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
            assert killed > 0
            await redis.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
            await run.sleep(1)
            await redis.execute_command("DEBUG", "SLEEP", "2")  # Redis frozen for 2 s
        run.inject("3x pg_terminate_backend + CLIENT KILL + DEBUG SLEEP 2")
        await run.recovered()
        await run.finish()
