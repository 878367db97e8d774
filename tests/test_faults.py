"""Fault scenarios: the whole daemon replays real data while its servers fail; nothing
may be lost, doubled or computed wrong (see tests/faults.py for the checks)."""

from __future__ import annotations

import pytest
from faults import fault_run
from replay import flushed_redis_url

OUTAGE_S = 60


@pytest.fixture
async def redis_url(redis_stack_server):
    return await flushed_redis_url(redis_stack_server)


@pytest.mark.timeout(300)
async def test_redis_black_holed_for_a_minute(pool, redis, redis_url, pg_url):
    async with fault_run("redis-blackhole", pool, redis, redis_url, pg_url, minutes=240) as run:
        run.daemon.start()
        await run.ready()
        run.redis_proxy.set_mode("blackhole")
        run.inject(f"Redis black-holed {OUTAGE_S} s")
        await run.sleep(OUTAGE_S)
        run.redis_proxy.set_mode("pass")
        await run.recovered()
        await run.finish()


@pytest.mark.timeout(300)
async def test_postgres_black_holed_for_a_minute(pool, redis, redis_url, pg_url):
    async with fault_run("pg-blackhole", pool, redis, redis_url, pg_url, minutes=240) as run:
        run.daemon.start()
        await run.ready()
        run.pg_proxy.set_mode("blackhole")
        run.inject(f"PostgreSQL black-holed {OUTAGE_S} s")
        await run.sleep(OUTAGE_S)
        run.pg_proxy.set_mode("pass")
        await run.recovered()
        await run.finish()
