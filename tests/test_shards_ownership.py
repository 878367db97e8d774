"""A process's share of the symbols (shards/ownership.py) on a real Redis: two processes
split them; a process alone keeps writing through a Redis outage (nobody can take a
symbol without Redis) and keeps its share across a Redis wipe without a gap; two
processes both stop writing when Redis is away, before their leases could pass on."""

from __future__ import annotations

import asyncio

from servers import RedisServer
from tcp_proxy import TcpProxy

from infra import make_redis
from shards.leases import LeaseTimes
from shards.ownership import INDICATORS_LEAD, Ownership

FAST = LeaseTimes(ttl_ms=600, renew_every_ms=100, margin_ms=50)
SYMBOLS = {f"S{i:02d}USDT" for i in range(12)}


async def test_two_processes_split_the_symbols_and_one_leads_the_indicators(redis):
    first, second = Ownership(redis, FAST), Ownership(redis, FAST)
    for ownership in (first, second):
        ownership.roles = frozenset({INDICATORS_LEAD})
    changes: list[str] = []
    first.on_change.append(lambda: changes.append("first"))
    await first.claim(SYMBOLS)
    assert first.owned() == SYMBOLS and first.may_write(INDICATORS_LEAD)  # alone: everything
    await second.claim(SYMBOLS)  # joins; the first hands over on its next rounds
    for _ in range(10):
        await first.claim(SYMBOLS)
        await second.claim(SYMBOLS)
        await asyncio.sleep(0.1)
    assert first.owned().isdisjoint(second.owned()) and first.owned() | second.owned() == SYMBOLS
    assert first.owned() and second.owned() and "first" in changes
    assert first.may_write(INDICATORS_LEAD) != second.may_write(INDICATORS_LEAD)  # one leads
    assert INDICATORS_LEAD not in first.owned() | second.owned()  # a role, not a symbol
    await first.leave()
    await second.claim(SYMBOLS)
    assert second.owned() == SYMBOLS and second.may_write(INDICATORS_LEAD)


async def test_a_drained_process_stops_writing_at_once_and_the_other_takes_everything(redis):
    first, second = Ownership(redis, FAST), Ownership(redis, FAST)
    for ownership in (first, second):
        ownership.roles = frozenset({INDICATORS_LEAD})
    told: list[frozenset] = []
    first.on_change.append(lambda: told.append(first.held))
    for _ in range(10):
        await first.claim(SYMBOLS)
        await second.claim(SYMBOLS)
        await asyncio.sleep(0.1)
    assert first.owned() and second.owned()
    await first.drain()
    assert first.owned() == set() and not any(first.may_write(s) for s in [*SYMBOLS, INDICATORS_LEAD])
    assert told[-1] == frozenset()  # its feed is told to unsubscribe
    assert await first.claim(SYMBOLS) == set()  # claims nothing while draining
    await second.claim(SYMBOLS)  # its next round: the drained member is gone, its leases free
    assert second.owned() == SYMBOLS and second.may_write(INDICATORS_LEAD)
    first.resume()
    for _ in range(10):
        await first.claim(SYMBOLS)
        await second.claim(SYMBOLS)
        await asyncio.sleep(0.1)
    assert first.owned() and first.owned() | second.owned() == SYMBOLS
    assert first.owned().isdisjoint(second.owned())


async def test_a_process_alone_writes_through_a_redis_outage_and_a_wipe():
    server = RedisServer(with_timeseries=False)
    server.start()
    client = make_redis(server.url, socket_connect_timeout=0.2, socket_timeout=0.5)
    try:
        alone = Ownership(client, FAST)
        changes: list[frozenset] = []
        alone.on_change.append(lambda: changes.append(alone.held))
        away_for: list[float] = []
        alone.on_back.append(away_for.append)
        assert await alone.claim(SYMBOLS) == SYMBOLS
        server.stop()  # Redis away, longer than a lease
        for _ in range(8):
            await alone.claim(SYMBOLS)
            await asyncio.sleep(0.1)
        assert alone.outage.active and alone.owned() == SYMBOLS
        assert all(alone.may_write(s) for s in SYMBOLS) and len(changes) == 1
        server.start()  # back, empty: its leases are gone with the data
        await alone.claim(SYMBOLS)
        assert not alone.outage.active and alone.owned() == SYMBOLS and len(changes) == 1  # taken again at once
        assert all(alone.member.may_write(s) for s in SYMBOLS)  # under real leases again
        assert len(away_for) == 1 and away_for[0] >= 0.7  # told once, with how long Redis was away
    finally:
        await client.aclose()
        server.cleanup()


async def test_processes_that_are_not_alone_stop_writing_when_redis_is_away():
    server = RedisServer(with_timeseries=False)
    server.start()
    client = make_redis(server.url, socket_connect_timeout=0.2, socket_timeout=0.5)
    try:
        first, second = Ownership(client, FAST), Ownership(client, FAST)
        for _ in range(6):
            await first.claim(SYMBOLS)
            await second.claim(SYMBOLS)
            await asyncio.sleep(0.1)
        mine = first.owned()
        assert mine and mine != SYMBOLS
        server.stop()
        await asyncio.sleep(FAST.valid_for() / 1000 + 0.05)  # past what a lease is valid for here
        await first.claim(SYMBOLS)
        assert first.outage.active and first.owned() == set() and not any(first.may_write(s) for s in mine)
    finally:
        await client.aclose()
        server.cleanup()


async def test_a_process_alone_keeps_writing_while_redis_is_black_holed(redis_stack_server):
    """Connections accepted, nothing answered: a round fails only at the socket timeout,
    long after the leases' validity. Alone, the process writes on meanwhile."""
    proxy = await TcpProxy("127.0.0.1", redis_stack_server.port).start()
    client = make_redis(f"redis://127.0.0.1:{proxy.port}/0", socket_timeout=3.0)
    try:
        alone = Ownership(client, FAST)
        assert await alone.claim(SYMBOLS) == SYMBOLS
        proxy.set_mode("blackhole")
        hanging = asyncio.create_task(alone.claim(SYMBOLS))
        await asyncio.sleep(FAST.valid_for() / 1000 + 0.3)  # the leases' validity is over, the round hangs
        assert not hanging.done() and all(alone.may_write(s) for s in SYMBOLS)
        proxy.set_mode("pass")
        hanging.cancel()
        await asyncio.gather(hanging, return_exceptions=True)
    finally:
        await client.aclose()
        await proxy.close()
