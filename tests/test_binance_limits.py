"""Binance's per-IP limits shared by the processes of a deployment (binance/limits.py),
on a real Redis and on the test cluster: connection attempts over a sliding window,
REST weight per minute, a 429's block, and a Redis that is away."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from binance.limits import AttemptLimiter, SharedLimits
from binance.rest import WeightLimiter
from infra import make_redis


@pytest.fixture(params=["single", "cluster"])
async def any_redis(request, redis) -> AsyncIterator[Redis | RedisCluster]:
    if request.param == "single":
        yield redis
        return
    client = RedisCluster.from_url(request.getfixturevalue("redis_cluster_server").url, decode_responses=True)
    await client.flushall(target_nodes=RedisCluster.PRIMARIES)
    yield client
    await client.aclose()


def process(redis: Redis | RedisCluster, group: str, limit: int, window_s: float) -> AttemptLimiter:
    """One process's attempt limiter, sharing `group`'s count."""
    attempts = AttemptLimiter(limit=1_000, window_s=window_s)  # the shared count is the binding one here
    attempts.shared = SharedLimits(redis, group, 2400, connect_limit=limit, connect_window_s=window_s)
    return attempts


async def test_processes_of_one_ip_share_its_connection_attempts_and_other_ips_do_not(any_redis):
    window = 1.5
    first, second = process(any_redis, "ip-a", 4, window), process(any_redis, "ip-a", 4, window)
    elsewhere = process(any_redis, "ip-b", 4, window)
    started = time.monotonic()
    made: list[tuple[str, float]] = []

    async def connect(name: str, limiter: AttemptLimiter) -> None:
        await limiter.acquire()
        made.append((name, time.monotonic() - started))

    await asyncio.gather(
        *(connect("a1", first) for _ in range(4)),
        *(connect("a2", second) for _ in range(4)),
        *(connect("b", elsewhere) for _ in range(4)),
    )
    same_ip = sorted(t for name, t in made if name != "b")
    assert len(same_ip) == 8
    # Never more than 4 attempts of ip-a in any window: the 5th waits for the 1st to age out.
    for i in range(4, 8):
        assert same_ip[i] - same_ip[i - 4] >= window - 0.05, same_ip
    assert max(t for name, t in made if name == "b") < window / 2  # its own IP, its own limit
    assert first.total + second.total == 8


async def test_the_weight_of_a_minute_is_shared_and_a_429_blocks_everyone(any_redis):
    one = SharedLimits(any_redis, "ip-w", weight_limit=100)
    other = SharedLimits(any_redis, "ip-w", weight_limit=100)
    now_in_minute = time.time() % 60
    if now_in_minute > 55:  # not across a minute's end: the count starts again there
        await asyncio.sleep(61 - now_in_minute)
    assert await one.weight_wait_s(60) == 0
    wait_s = await other.weight_wait_s(60)  # 120 > 100: until the next minute
    assert 0 < wait_s <= 60
    assert await other.weight_wait_s(40) == 0  # exactly the limit
    assert await SharedLimits(any_redis, "ip-x", weight_limit=100).weight_wait_s(100) == 0  # another IP
    await one.seen(100)  # the exchange's own count never lowers ours
    assert await other.weight_wait_s(1) > 0
    await one.block(2.0)  # HTTP 429 with Retry-After: 2 seen by one process
    assert 1.5 < await SharedLimits(any_redis, "ip-w", weight_limit=100).weight_wait_s(1) <= 2.0


async def test_a_weight_limiter_waits_for_the_other_processes_share(redis, caplog):
    limiters = [WeightLimiter(1_000, 60.0) for _ in range(2)]
    for limiter in limiters:
        limiter.shared = SharedLimits(redis, "ip-r", weight_limit=50)
    now_in_minute = time.time() % 60
    if now_in_minute > 50:
        await asyncio.sleep(61 - now_in_minute)
    await limiters[0].acquire(40)
    waiting = asyncio.create_task(limiters[1].acquire(20))
    await asyncio.sleep(0.5)
    assert not waiting.done()  # locally free, but the IP's minute is spent
    held = [r.getMessage() for r in caplog.records if "REST weight of this IP's minute is spent" in r.getMessage()]
    assert len(held) == 1 and "this process used 0" in held[0]  # said once, not per retry
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    await limiters[1].acquire(10)  # what is left of the minute
    assert [limiter.total for limiter in limiters] == [40, 10]


async def test_a_redis_that_is_away_leaves_each_process_its_own_count(caplog):
    away = make_redis("redis://127.0.0.1:9/0", socket_connect_timeout=0.2)
    try:
        attempts = AttemptLimiter(limit=2, window_s=0.5)
        attempts.shared = SharedLimits(away, "ip-z", 2400)
        started = time.monotonic()
        for _ in range(3):
            await attempts.acquire()
        assert time.monotonic() - started >= 0.45  # the local window still holds
        assert sum("not readable in Redis" in r.getMessage() for r in caplog.records) == 1  # logged once
    finally:
        await away.aclose()
