"""The daemon on a Redis Cluster (3 masters with a replica each): a real process with
order flow on, the fake exchange replaying real candles and trades, a kill -9 of the
daemon and of a Redis master mid-run. Every candle then equals the archive in
PostgreSQL and in Redis (under hash-tagged names), every indicator value TA-Lib's, and
each symbol's order flow reaches Redis and PostgreSQL."""

from __future__ import annotations

import asyncio
import json

import pytest
from daemon import DaemonProcess, run_main
from replay import (
    HISTORY_M1,
    M1,
    START,
    assert_every_candle_announced,
    assert_store_matches_source,
    daemon_env,
    flow_settled,
    pause_mid_minute,
    until,
    until_sim,
)
from servers import RedisCluster as ClusterOfServers

from fake_exchange import ArchiveSource, FakeExchange
from orderflow.store import orderflow_key
from shards.cluster import FeedRedisCluster  # closes what redis-py's aclose leaves open after a failover
from shards.keys import hash_tags, use_hash_tags
from tests.indicator_reference import COMMON_CASES, assert_values_match_talib, configure

SYMBOLS = ["LINKUSDT", "NEARUSDT", "ALGOUSDT", "DOTUSDT"]


@pytest.mark.timeout(300)
async def test_the_daemon_on_a_cluster_through_its_kill_and_a_master_failover(pool, pg_url):
    cluster = ClusterOfServers(masters=3, replicas=1)
    cluster.start()
    client = FeedRedisCluster.from_url(cluster.url, decode_responses=True)
    source = ArchiveSource(SYMBOLS, start_ms=START - (HISTORY_M1 + 30) * M1, end_ms=START + 90 * M1)
    exchange = FakeExchange(source, start_ms=START, speed=30, seed=11, trades_per_agg=10)
    await exchange.start()
    await configure(pool, COMMON_CASES)
    daemon = DaemonProcess(daemon_env(exchange, cluster.url, pg_url, SYMBOLS) | {"ORDERFLOW": "on"})
    tags_before = hash_tags()
    use_hash_tags(True)  # this process reads the keys as the daemon names them
    try:
        daemon.start()
        await until_sim(exchange, START + 8 * M1, daemon)
        daemon.kill()  # kill -9 mid-replay
        await asyncio.sleep(1.0)
        daemon.start()
        await until_sim(exchange, START + 14 * M1, daemon)
        await asyncio.to_thread(cluster.kill_master, 0)  # a replica takes its slots over
        await until_sim(exchange, START + 24 * M1, daemon)
        last_closed = await pause_mid_minute(exchange)
        try:
            await until(
                lambda: flow_settled(pool, SYMBOLS, last_closed), 90, "candles and order flow to settle on the cluster"
            )
        except AssertionError:
            print("\n".join(line for line in daemon.output().splitlines() if "WS0" not in line)[-6000:])
            raise
        await client.aclose()
        client = FeedRedisCluster.from_url(cluster.masters()[0].url, decode_responses=True)
        await assert_store_matches_source(pool, client, source, SYMBOLS, last_closed)
        await assert_every_candle_announced(pool, client)
        assert await assert_values_match_talib(pool, SYMBOLS) > 0
        for symbol in SYMBOLS:
            flow = await client.hgetall(orderflow_key(symbol, "m1"))
            assert int(flow["open_time"]) >= last_closed - M1, (symbol, flow)
            assert not await client.exists(f"orderflow:{symbol}:m1")  # no key under the single-Redis name
        status = run_main({"REDIS_URL": cluster.masters()[0].url, "POSTGRES_URL": pg_url}, "status", "--json")
        report = json.loads(status.stdout)
        (process,) = report["processes"]  # SPEC 17, read from the cluster
        assert process["alive"] and sorted(process["symbols"]) == sorted(SYMBOLS), report["processes"]
        assert {t["symbol"] for t in report["tickers"]} == set(SYMBOLS) and report["streams"], status.stderr
        log = daemon.output()
        assert "per-symbol keys carry a hash tag" in log and "Traceback" not in log, log[-3000:]
        assert daemon.terminate() == 0
    finally:
        use_hash_tags(tags_before)
        daemon.cleanup()
        await exchange.stop()
        await client.aclose()
        cluster.cleanup()
