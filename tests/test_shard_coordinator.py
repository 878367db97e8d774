"""The leases in a real Redis: the Lua scripts answer exactly as the pure rules
(shards/leases.py) do, and processes sharing symbols through them end with each symbol
owned by one, take over a killed one's symbols in time, and hand symbols over on a drain."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

import candle_stores
from shards import coordinator
from shards.coordinator import RENEW_SHA, TAKE_SHA, LeaseStore, ShardMember, lease_key, token_key
from shards.leases import LeaseTable, LeaseTimes, assignment

SYMBOLS = [f"S{i:02d}USDT" for i in range(20)]
FAST = LeaseTimes(ttl_ms=600, renew_every_ms=100, margin_ms=50)


@pytest.fixture(params=["single", "cluster"])
async def any_redis(request, redis) -> AsyncIterator[Redis | RedisCluster]:
    """A single Redis, or a client of the test cluster (3 masters, a replica each)."""
    if request.param == "single":
        yield redis
        return
    cluster = request.getfixturevalue("redis_cluster_server")
    client = RedisCluster.from_url(cluster.url)
    await client.flushall(target_nodes=RedisCluster.PRIMARIES)
    yield client
    await client.aclose()


async def test_the_scripts_answer_as_the_rules_do(any_redis):
    redis = any_redis
    """300 random operations of 3 members on 4 symbols, none expiring: Redis and the pure
    table give the same answers and end with the same holders and tokens."""
    store = LeaseStore(redis, LeaseTimes(ttl_ms=60_000))
    table = LeaseTable()
    rng = random.Random(7)
    members, symbols = ["a:1", "b:2", "c:3"], ["AUSDT", "BUSDT", "CUSDT", "DUSDT"]
    for _ in range(300):
        member, symbol, token = rng.choice(members), rng.choice(symbols), rng.randint(1, 6)
        match rng.choice(["take", "renew", "release", "heartbeat"]):
            case "take":
                assert await store.take(member, [symbol]) == (
                    {symbol: t} if (t := table.take(0, symbol, member, 60_000)) is not None else {}
                )
            case "renew":
                renewed = await store.renew(member, {symbol: token})
                assert renewed == ({symbol} if table.renew(0, symbol, member, token, 60_000) else set())
            case "release":
                released = await store.release(member, {symbol: token})
                assert released == ({symbol} if table.release(0, symbol, member, token) else set())
            case "heartbeat":
                assert await store.heartbeat(member) == table.heartbeat(0, member, 60_000)
    held = await store.holders(symbols)
    assert held == {s: (lease.member, lease.token) for s, lease in table.leases.items()}
    assert {s: int(await redis.get(token_key(s)) or 0) for s in symbols} == {s: table.tokens.get(s, 0) for s in symbols}


async def test_a_lease_and_a_member_end_on_redis_clock(any_redis):
    redis = any_redis
    store = LeaseStore(redis, LeaseTimes(ttl_ms=150))
    assert await store.take("a:1", ["AUSDT"]) == {"AUSDT": 1}
    assert await store.heartbeat("a:1") == ["a:1"]
    assert await store.take("b:2", ["AUSDT"]) == {}
    await asyncio.sleep(0.2)
    assert await redis.get(lease_key("AUSDT")) is None
    assert await store.take("b:2", ["AUSDT"]) == {"AUSDT": 2}  # the token went up
    assert await store.heartbeat("b:2") == ["b:2"]  # a's heartbeat ended


async def test_scripts_go_by_hash_and_again_as_text_after_a_script_flush(any_redis):
    """Takes and renewals send EVALSHA; a node that forgot the scripts (a restart, a
    promoted replica: SCRIPT FLUSH here) answers NOSCRIPT and gets the text once, with
    the same answers as if it had known them."""
    redis = any_redis
    store = LeaseStore(redis, LeaseTimes(ttl_ms=60_000))
    await redis.script_flush()  # every master, on a cluster
    assert await store.take("a:1", SYMBOLS) == dict.fromkeys(SYMBOLS, 1)  # every node: NOSCRIPT, then EVAL
    cached = await redis.script_exists(TAKE_SHA, RENEW_SHA)
    assert cached[0] and not cached[1]
    assert await store.renew("a:1", dict.fromkeys(SYMBOLS, 1)) == set(SYMBOLS)
    await redis.script_flush()  # every master, on a cluster
    assert await store.renew("a:1", dict.fromkeys(SYMBOLS, 1)) == set(SYMBOLS)
    assert await store.renew("b:2", dict.fromkeys(SYMBOLS, 1)) == set()  # not b's
    assert await store.take("b:2", SYMBOLS[:3]) == {}
    assert await store.holders(SYMBOLS) == {s: ("a:1", 1) for s in SYMBOLS}
    commands = []
    sent = execute_packed_spy(commands)
    coordinator.execute_packed, original = sent, coordinator.execute_packed
    try:
        await store.renew("a:1", dict.fromkeys(SYMBOLS, 1))
    finally:
        coordinator.execute_packed = original
    assert {c[0] for c in commands} == {"EVALSHA"}  # cached now: no script text on the wire


def execute_packed_spy(seen: list):
    async def spy(redis, commands, wait=None):
        seen.extend(commands)
        return await candle_stores.execute_packed(redis, commands, wait)

    return spy


async def rounds(members: list[ShardMember], seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for member in members:
            await member.round(SYMBOLS)
        await asyncio.sleep(FAST.renew_every_ms / 1000)


def owners(members: list[ShardMember]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {s: [] for s in SYMBOLS}
    for member in members:
        for symbol in member.owned():
            out[symbol].append(member.member)
    return out


async def test_processes_share_the_symbols_take_over_a_dead_one_and_hand_over_on_a_drain(any_redis):
    redis = any_redis
    store = LeaseStore(redis, FAST)
    a, b, c = (ShardMember(store, name) for name in ("host:1:a", "host:2:b", "host:3:c"))
    await rounds([a, b, c], 0.5)
    want = assignment(SYMBOLS, [a.member, b.member, c.member])
    assert owners([a, b, c]) == {s: [want[s]] for s in SYMBOLS}  # each symbol once, where the hash says
    tokens = {s: m.token(s) for m in (a, b, c) for s in m.owned()}

    # c is killed: no release, no leave; its lease and heartbeat run out
    killed_at = time.monotonic()
    theirs = [s for s in SYMBOLS if want[s] == c.member]
    while any(not (a.may_write(s) or b.may_write(s)) for s in theirs):
        assert time.monotonic() - killed_at < FAST.takeover_ms(50) / 1000 + 0.5, owners([a, b])
        for member in (a, b):
            await member.round(SYMBOLS)
        assert not any(c.may_write(s) and (a.may_write(s) or b.may_write(s)) for s in SYMBOLS)
        await asyncio.sleep(FAST.renew_every_ms / 1000)
    assert not c.owned()  # its validity ended before theirs began
    after = {s: m.token(s) for m in (a, b) for s in m.owned()}
    assert all(after[s] > tokens[s] for s in theirs)  # fenced: new holders, higher tokens
    assert all(after[s] == tokens[s] for s in SYMBOLS if s not in theirs)  # nobody else moved

    # b drains: it stops and lets go at once; a takes everything on its next round
    await b.leave()
    assert not b.owned()
    await a.round(SYMBOLS)
    assert a.owned() == SYMBOLS
