"""The signal router on a Redis Cluster (3 masters with a replica each): the router
tests whose meaning does not depend on the server's kind, run again there. The marks
then live in their target streams' slots (signals_io.delivered_marks), so delivery is
still exactly once per target, through crashes, races and reclaims."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import test_signals_router as router_tests
from redis.asyncio.cluster import RedisCluster

import core_io
import infra
import signals_io
import signals_logic as sl


@pytest.fixture
async def hc(pool, redis_cluster_server, pg_url) -> AsyncIterator[router_tests.Harness]:
    client = RedisCluster.from_url(redis_cluster_server.url, decode_responses=True)
    await client.flushall(target_nodes=RedisCluster.PRIMARIES)
    await router_tests.seed_config(pool)
    await core_io.ensure_groups(client, {router_tests.STREAM: (router_tests.GROUP,)})
    infra.system_event_log.pending.clear()
    harness = router_tests.Harness(pool, client, redis_cluster_server, pg_url)
    yield harness
    await harness.stop_all()
    await client.aclose()


CASES = [
    router_tests.test_xadd_is_logged_delivered_and_acked,
    router_tests.test_repeated_uid_is_logged_duplicate_and_not_delivered,
    router_tests.test_two_routers_of_one_group_race_on_one_uid_and_the_database_decides,
    router_tests.test_four_routers_in_two_groups_on_shuffled_repeats,
    router_tests.test_entries_left_pending_by_a_dead_consumer_are_reclaimed,
    router_tests.test_a_router_down_longer_than_the_mark_ttl_still_sends_once,
]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__.removeprefix("test_") for c in CASES])
async def test_on_a_cluster(hc, case):
    await case(hc)


@pytest.mark.parametrize("crashing", [router_tests.CrashBeforeDelivery, router_tests.CrashBeforeAck])
async def test_a_crash_between_log_and_ack_delivers_exactly_once_on_a_cluster(hc, crashing):
    await router_tests.test_crash_between_log_and_ack_delivers_exactly_once(hc, crashing)


@pytest.mark.parametrize("mark", ["kept", "lost"])
async def test_a_recorded_delivery_is_never_sent_again_on_a_cluster(hc, mark):
    await router_tests.test_a_delivery_recorded_in_postgres_is_never_sent_again(hc, mark)


def test_a_marks_slot_is_its_target_streams():
    from redis.crc import key_slot

    delivery = sl.Delivery(7, "u" * 20, "BTCUSDT", "Buy", "open_long", 0, 0, (1, 2, 30))
    marks = signals_io.delivered_marks(delivery, clustered=True)
    assert marks[0] == "strategy_signals:sent:{strategy_signals:1}:7:" + "u" * 16
    for sid, mark in zip(delivery.strategy_ids, marks, strict=True):
        assert key_slot(mark.encode()) == key_slot(signals_io.strategy_stream(sid).encode())
    assert signals_io.delivered_marks(delivery, clustered=False) == [signals_io.delivered_mark(delivery)]
