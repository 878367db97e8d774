"""Redis Cluster under the daemon's own I/O (shards/cluster.py, shards/keys.py): a
bulk round split by owning node and through a master's kill -9, key names with hash
tags and their one-time move, and the boot recognising a cluster from the server."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import TimeoutError as RedisTimeoutError
from servers import RedisCluster as ClusterOfServers

import core_io
from candle_stores import CANDLE_FIELDS, Columns, TimeSeriesCandleStore, execute_checked, execute_packed
from connections import connect_redis
from infra import load_settings, make_cluster_redis, make_redis
from shards.cluster import KEY_SCHEME_KEY, FeedRedisCluster, migrate_key_names
from shards.coordinator import LeaseStore, lease_key
from shards.keys import hash_tags, renamed_key, use_hash_tags
from shards.leases import LeaseTimes
from shards.ownership import Ownership

SYMBOLS = [f"S{i:03d}USDT" for i in range(60)]


@pytest.fixture
def tagged() -> Iterator[None]:
    """This test's process names keys as a cluster does (and is put back after)."""
    before = hash_tags()
    use_hash_tags(True)
    yield
    use_hash_tags(before)


def columns(start: int, count: int, base: float) -> Columns:
    times = [start + i * 60_000 for i in range(count)]
    values = [base + i for i in range(count)]
    return Columns(times, values, [v + 1 for v in values], [v - 1 for v in values], values, values)


def test_a_symbols_keys_share_one_slot_with_tags_and_not_without():
    use_hash_tags(True)
    try:
        slots = {key_slot(k.encode()) for k in (core_io.price_key("BTCUSDT"), core_io.indicator_key("BTCUSDT", "m5"))}
        slots |= {key_slot(core_io.candle_series_key("BTCUSDT", "m1", f).encode()) for f in CANDLE_FIELDS}
        assert len(slots) == 1 and core_io.candle_series_key("BTCUSDT", "m1", "c") == "ohlcv:{BTCUSDT}:m1:c"
    finally:
        use_hash_tags(False)
    assert core_io.candle_series_key("BTCUSDT", "m1", "c") == "ohlcv:BTCUSDT:m1:c"  # SPEC 5's names on one Redis
    assert renamed_key("footprint:BTCUSDT:m1:forming", True) == "footprint:{BTCUSDT}:m1:forming"
    assert renamed_key("footprint:{BTCUSDT}:m1:forming", False) == "footprint:BTCUSDT:m1:forming"
    assert renamed_key("ohlcv_m1_ready", True) is None and renamed_key("price:{X}", True) is None


async def test_a_bulk_round_reaches_every_node_in_order_and_survives_a_master_kill(tagged):
    """The candle store's packed round on a cluster of its own (a master is killed)."""
    cluster = ClusterOfServers(masters=3, replicas=1)
    cluster.start()
    client = FeedRedisCluster.from_url(cluster.url, decode_responses=True)
    try:
        store = TimeSeriesCandleStore(client, 250)
        items = {(s, "m1"): columns(60_000, 20, 100.0 + i) for i, s in enumerate(SYMBOLS)}
        await store.write_columns(items)  # TS.CREATE + a packed TS.MADD per series, every node
        nodes = {client.get_node_from_key(core_io.candle_series_key(s, "m1", "c")).name for s in SYMBOLS}
        assert len(nodes) == 3
        read = await store.read_last_many(list(items), 20)
        for i, symbol in enumerate(SYMBOLS):
            assert [b.close for b in read[(symbol, "m1")]] == [100.0 + i + k for k in range(20)]
        # Replies come back in the round's order, whichever node answered them.
        replies = await execute_packed(client, [["SET", core_io.price_key(s), str(i)] for i, s in enumerate(SYMBOLS)])
        replies += await execute_packed(client, [["GET", core_io.price_key(s)] for s in SYMBOLS])
        assert replies == ["OK"] * len(SYMBOLS) + [str(i) for i in range(len(SYMBOLS))]

        # A replica is promoted (once it has what the master took: Redis replicates
        # asynchronously, and this test is about the client, not that); the client still
        # has the old map.
        cluster.kill_master(0, replicated=True)
        more = {(s, "m1"): columns(60_000 + 20 * 60_000, 5, 500.0) for s in SYMBOLS}
        await store.write_columns(more)
        read = await store.read_last_many(list(items), 25)
        assert all(len(bars) == 25 and bars[-1].close == 504.0 for bars in read.values())
        assert await core_io.get_mark_prices(client, SYMBOLS[:3]) == {s: str(i) for i, s in enumerate(SYMBOLS[:3])}
    finally:
        await client.aclose()
        cluster.cleanup()


@pytest.mark.parametrize("kind", ["single", "cluster"])
async def test_keys_under_the_other_names_move_once(kind, request, redis):
    client: Redis | RedisCluster = redis
    if kind == "cluster":
        client = RedisCluster.from_url(request.getfixturevalue("redis_cluster_server").url, decode_responses=True)
        await client.flushall(target_nodes=RedisCluster.PRIMARIES)

    def make_raw() -> Redis | RedisCluster:
        if kind == "single":
            return make_redis(request.getfixturevalue("redis_stack_server").url, decode_responses=False)
        return RedisCluster.from_url(request.getfixturevalue("redis_cluster_server").url)

    try:
        # Written under SPEC 5's names, as an earlier release did.
        await client.execute_command("TS.CREATE", "ohlcv:AUSDT:m1:c", "LABELS", "symbol", "AUSDT", "tf", "m1")
        await client.execute_command("TS.ADD", "ohlcv:AUSDT:m1:c", 60_000, 1.5)
        await client.hset("indicator:AUSDT:m5", mapping={"open_time": "300000", "EMA_9": "1.25"})
        await client.set("price:AUSDT", "1.5", px=600_000)
        await client.set("footprint:BUSDT:m1:forming", "{}")
        await client.set("price:BUSDT", "old")
        await client.set("price:{BUSDT}", "new")  # the newer one, under the new name, wins
        await client.xadd("ohlcv_m1_ready", {"symbol": "AUSDT"})

        assert await migrate_key_names(client, make_raw, tagged=True) == 4
        samples = await client.execute_command("TS.RANGE", "ohlcv:{AUSDT}:m1:c", "-", "+")
        assert [(int(t), float(v)) for t, v in samples] == [(60_000, 1.5)]
        info = await client.execute_command("TS.INFO", "ohlcv:{AUSDT}:m1:c")
        labels = info["labels"] if isinstance(info, dict) else info[info.index("labels") + 1]
        assert dict(labels) == {"symbol": "AUSDT", "tf": "m1"}
        assert await client.hgetall("indicator:{AUSDT}:m5") == {"open_time": "300000", "EMA_9": "1.25"}
        assert await client.get("price:{AUSDT}") == "1.5" and 0 < await client.pttl("price:{AUSDT}") <= 600_000
        assert await client.get("price:{BUSDT}") == "new" and await client.get("footprint:{BUSDT}:m1:forming") == "{}"
        for old in ("ohlcv:AUSDT:m1:c", "indicator:AUSDT:m5", "price:AUSDT", "price:BUSDT"):
            assert not await client.exists(old), old
        assert not await client.exists("footprint:BUSDT:m1:forming")
        assert await client.xlen("ohlcv_m1_ready") == 1  # not a per-symbol key
        assert await client.get(KEY_SCHEME_KEY) == "tagged"
        await client.set("price:CUSDT", "2")  # once moved, the names are not looked for again
        assert await migrate_key_names(client, make_raw, tagged=True) == 0
        assert await client.exists("price:CUSDT")
        # And back, for a deployment that leaves the tags (single Redis only).
        if kind == "single":
            assert await migrate_key_names(client, make_raw, tagged=False) == 5
            assert await client.get("price:AUSDT") == "1.5" and not await client.exists("price:{AUSDT}")
    finally:
        if kind == "cluster":
            await client.aclose()


async def test_the_boot_recognises_a_cluster_and_names_keys_with_tags(redis_cluster_server, redis_url):
    before = hash_tags()
    try:
        settings = load_settings({"REDIS_URL": redis_cluster_server.url, "POSTGRES_URL": "postgresql://x@127.0.0.1/x"})
        client, use_ts = await connect_redis(settings)
        try:
            assert isinstance(client, RedisCluster) and use_ts and hash_tags()
            await execute_checked(client, [["SET", core_io.price_key("BTCUSDT"), "1"]])
            assert await client.get("price:{BTCUSDT}") == "1"
        finally:
            await client.aclose()
        # A single Redis keeps SPEC 5's names, unless REDIS_HASH_TAGS=on.
        for env, expected in (({}, False), ({"REDIS_HASH_TAGS": "on"}, True)):
            settings = load_settings({"REDIS_URL": redis_url, "POSTGRES_URL": "postgresql://x@127.0.0.1/x"} | env)
            client, _ = await connect_redis(settings)
            await client.aclose()
            assert isinstance(client, Redis) and hash_tags() is expected
    finally:
        use_hash_tags(before)
        single = make_redis(redis_url)
        await single.delete(KEY_SCHEME_KEY)
        await single.aclose()


async def replica_asleep(port: int) -> None:
    """Returns once the node stops answering (its DEBUG SLEEP began): the command runs
    in a subprocess, late on a loaded machine."""
    probe = Redis(port=port, socket_timeout=0.1, retry=Retry(NoBackoff(), 0))
    try:
        for _ in range(50):
            try:
                await probe.ping()
            except RedisTimeoutError:
                return
            await asyncio.sleep(0.02)
        raise AssertionError("the replica never went to sleep")
    finally:
        await probe.aclose()


async def test_a_lease_counts_only_once_a_replica_has_it(redis_cluster_server):
    """A take its master acknowledged but no replica has yet could vanish in a failover:
    it is not counted (no writing under it) until a replica has it too."""
    client = FeedRedisCluster.from_url(redis_cluster_server.url, decode_responses=True)
    try:
        await client.flushall(target_nodes=RedisCluster.PRIMARIES)
        await client.initialize()
        store = LeaseStore(client, LeaseTimes())
        replica = next(n for n in redis_cluster_server.nodes if "role:slave" in redis_cluster_server.cli(n, "INFO"))
        master_port = int(redis_cluster_server.cli(replica, "INFO", "replication").split("master_port:")[1].split()[0])
        symbols = [f"L{i:02d}USDT" for i in range(30)]
        behind = {s for s in symbols if client.get_node_from_key(lease_key(s)).port == master_port}
        assert behind and behind != set(symbols)
        sleeping = asyncio.create_task(asyncio.to_thread(redis_cluster_server.cli, replica, "DEBUG", "SLEEP", "2"))
        await replica_asleep(replica.port)  # it is not answering its master now
        taken = await store.take("m1", symbols)
        assert not set(taken) & behind  # granted by the master, not yet on a replica: not counted
        # (the others count once their replica acknowledged within 250 ms: on a loaded
        # machine that may take a round more, which the next take shows)
        await sleeping
        again = await store.take("m1", symbols)  # held in Redis all along: the same token, now replicated
        assert set(again) == set(symbols) and all(again[s] == taken[s] for s in taken)
        assert await store.renew("m1", again) == set(symbols)
    finally:
        await client.aclose()


async def test_a_cluster_without_replicas_counts_a_lease_at_once():
    cluster = ClusterOfServers(masters=3, replicas=0)
    cluster.start()
    client = FeedRedisCluster.from_url(cluster.url, decode_responses=True)
    try:
        taken = await LeaseStore(client, LeaseTimes()).take("m1", [f"L{i:02d}USDT" for i in range(10)])
        assert len(taken) == 10 and set(taken.values()) == {1}
    finally:
        await client.aclose()
        cluster.cleanup()


async def test_a_cluster_that_is_down_is_an_outage_for_the_leases_not_a_crash():
    """A master lost with no replica to take over: the other nodes answer CLUSTERDOWN.
    A process's lease round counts it as Redis away (alone, it keeps writing what it
    held; sharing, its leases run out by themselves) rather than raise: raised, it ended
    the round's worker, restarted 5 s later, and every lease of the process lapsed."""
    cluster = ClusterOfServers(masters=3, replicas=0, with_timeseries=False)
    cluster.start()
    client = make_cluster_redis(cluster.url, socket_connect_timeout=0.2, socket_timeout=0.5)
    try:
        ownership = Ownership(client, LeaseTimes(ttl_ms=600, renew_every_ms=100, margin_ms=50))
        assert await ownership.claim(set(SYMBOLS)) == set(SYMBOLS)
        victim = cluster.masters()[2]
        victim.process.kill()
        victim.process.wait(10)
        victim.process = None
        await asyncio.sleep(3.0)  # past the node timeout (1.5 s): the cluster's state is fail
        for _ in range(3):
            await ownership.claim(set(SYMBOLS))
        assert ownership.outage.active and ownership.owned() == set(SYMBOLS)  # alone: it keeps writing
    finally:
        await client.aclose()
        cluster.cleanup()
    # redis-py's own aclose() closes nothing while the client awaits its re-initialization
    # (a CLUSTERDOWN ends in that state), though its nodes hold connections: CI, stop 35.
    nodes = [*client.nodes_manager.nodes_cache.values(), *client.nodes_manager.startup_nodes.values()]
    assert not [c for node in nodes for c in node._connections if c.is_connected]
