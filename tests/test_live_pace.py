"""The daemon at real speed for at least five minutes (issue 13, row 1): closes come once
a minute, all symbols together, and that alone must raise no ERROR and set off no REST
catch-up (a fallback timer shorter than a minute once did both, every minute)."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest
from replay import M1, START, SYMBOLS, assert_store_matches_source, until

from infra import make_redis

LIVE_RUN_S = 5 * 60  # real seconds of the run at least...
LIVE_BOUNDARIES = 5  # ...and this many minutes closed after the start


def last_closed(run) -> int:
    """The newest minute every close of which is out (closes come at most 2 s late)."""
    return (run.sim_now_ms() - M1 - 3_000) // M1 * M1


async def pause_mid_minute(run) -> int:
    """As replay.pause_mid_minute: the clock stops 21-50 s into a minute, every close of
    the minute before is out, and nothing newer will be stored."""
    while not 21_000 <= run.sim_now_ms() % M1 <= 45_000:
        await asyncio.sleep(0.05)
    run.pause()
    return (run.sim_now_ms() - M1) // M1 * M1


@pytest.mark.timeout(LIVE_RUN_S + 420)
async def test_five_real_minutes_raise_no_error_and_no_rest_catch_up(live_pace_run):
    run = live_pace_run
    while time.monotonic() - run.started_at < LIVE_RUN_S or last_closed(run) < START + LIVE_BOUNDARIES * M1:
        assert run.error is None, repr(run.error)
        assert run.daemon.alive(), run.daemon.output()[-3000:]
        await asyncio.sleep(1.0)
    newest = await pause_mid_minute(run)
    pool = await asyncpg.create_pool(run.pg_url, min_size=1, max_size=2)
    redis = make_redis(run.redis.url)
    try:

        async def stored_to_last_closed() -> bool:
            rows = await pool.fetch("SELECT symbol, max(open_time) AS last FROM ohlcv4_m1 GROUP BY symbol")
            return len(rows) == len(SYMBOLS) and all(r["last"].timestamp() * 1000 >= newest for r in rows)

        await until(stored_to_last_closed, 30, "every symbol's newest minute")
        assert run.stop() == 0
        problems = await pool.fetch(
            "SELECT level, module, message FROM system_log_v4 WHERE level IN ('ERROR', 'CRITICAL') ORDER BY id"
        )
        assert not problems, [tuple(p) for p in problems]
        assert run.klines_after_boot is not None, "boot's history never completed"
        assert run.rest_klines() == run.klines_after_boot, "REST klines were fetched after boot: a live catch-up"
        fallback = await pool.fetch("SELECT message FROM system_log_v4 WHERE message LIKE '%REST fallback%'")
        assert not fallback
        gaps = await pool.fetchval("SELECT count(*) FROM missing_m1_log_v4")
        assert gaps == 0
        await assert_store_matches_source(pool, redis, run.source, SYMBOLS, newest)
    finally:
        await redis.aclose()
        await pool.close()
