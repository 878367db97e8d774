"""The signal router against real Redis and PostgreSQL: routing, dedup, races, faults.

Every test polls with a deadline; none uses a sleep as an assertion.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from tcp_proxy import TcpProxy

import core_io
import infra
import signals_io
import signals_logic as sl
from infra import ConfigError, load_settings
from signals_v4_main import RouterOptions, SignalRouter, load_router_options

STREAM = core_io.SIGNALS_STREAM
GROUP = core_io.SIGNAL_GROUP
BAR_MS = 1_769_904_000_000
PROJECT = Path(__file__).resolve().parents[1]

# Strategies: 1 active, 2 allow_open=false, 3 disabled, 4 archived. Phrases: 1 "Buy BTC"
# (open_long) and 2 "Close all" (close) -> all four; 3 "legacy" -> only 3 and 4;
# 4 "paused" is disabled.
STRATEGIES = [
    (1, "alpha", True, False, True),
    (2, "careful", True, False, False),
    (3, "off", False, False, True),
    (4, "retired", True, True, True),
]
PHRASES = [(1, "Buy BTC", "open_long", True), (2, "Close all", "close", True), (3, "legacy", "open_short", True)]
PHRASES += [(4, "paused", "close", False)]
MAPPINGS = [(s, p) for p in (1, 2, 4) for s in (1, 2, 3, 4)] + [(3, 3), (4, 3)]


async def seed_config(pool: asyncpg.Pool) -> None:
    await pool.executemany("INSERT INTO tickers (symbol, status) VALUES ($1, $2)", [("BTCUSDT", "enabled")])
    await pool.execute("INSERT INTO tickers (symbol, status) VALUES ('FILUSDT', 'disabled')")
    await pool.executemany(
        "INSERT INTO strategies (id, name, enabled, archived, allow_open) VALUES ($1, $2, $3, $4, $5)", STRATEGIES
    )
    await pool.executemany("INSERT INTO signal_phrases (id, phrase, action, enabled) VALUES ($1, $2, $3, $4)", PHRASES)
    await pool.executemany("INSERT INTO strategy_signals (strategy_id, phrase_id) VALUES ($1, $2)", MAPPINGS)
    await pool.execute("SELECT setval('strategies_id_seq', 100), setval('signal_phrases_id_seq', 100)")


def signal_fields(message: str = "Buy BTC", symbol: str = "BTCUSDT", bar: int = BAR_MS, **extra) -> dict:
    return {"symbol": symbol, "message": message, "bar_time": str(bar), "sent_at": str(bar + 1000), **extra}


async def until(predicate: Callable[[], Awaitable[bool]], timeout: float = 10.0, what: str = "condition") -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await predicate():
        if loop.time() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        await asyncio.sleep(0.02)


def fast_options(**overrides) -> RouterOptions:
    base = dict(block_ms=50, claim_every_s=0.2, claim_idle_ms=60_000, pg_timeout_s=3.0, consumer="r1")
    base.update(overrides)
    return RouterOptions(**base)


class Harness:
    """The servers, a seeded configuration and the routers of one test."""

    def __init__(self, pool, redis, server, pg_url) -> None:
        self.pool, self.redis, self.server, self.pg_url = pool, redis, server, pg_url
        self.settings = load_settings({"REDIS_URL": server.url, "POSTGRES_URL": pg_url, "STREAM_MAXLEN": "10000"})
        self.routers: list[tuple[SignalRouter, asyncio.Task]] = []

    async def start(self, router: SignalRouter) -> SignalRouter:
        task = asyncio.create_task(router.run())
        self.routers.append((router, task))
        await until(lambda: _ready(router, task), what="router start")
        return router

    @contextlib.asynccontextmanager
    async def router_behind_pg_proxy(self) -> AsyncIterator[tuple[SignalRouter, TcpProxy]]:
        """A router whose PostgreSQL goes through a proxy the test can cut; all stopped after."""
        parts = urlsplit(self.pg_url)
        proxy = await TcpProxy(parts.hostname, parts.port or 5432).start()
        proxied_url = urlunsplit(parts._replace(netloc=f"{parts.username}@127.0.0.1:{proxy.port}"))
        pool = await asyncpg.create_pool(proxied_url, min_size=1, max_size=3, timeout=2)
        try:
            settings = replace(self.settings, postgres_url=proxied_url)
            yield await self.run(pool=pool, settings=settings, pg_timeout_s=2.0), proxy
        finally:
            await self.stop_all()
            await pool.close()
            await proxy.close()

    async def run(self, cls=SignalRouter, group: str = GROUP, pool=None, settings=None, **options) -> SignalRouter:
        router = cls(settings or self.settings, pool or self.pool, fast_options(**options), group=group)
        return await self.start(router)

    async def stop_all(self) -> None:
        """Stop every router; a router that ended with an error fails the test."""
        routers, self.routers = self.routers, []
        for router, _ in routers:
            router.stop()
        results = await asyncio.gather(*(asyncio.wait_for(task, 10) for _, task in routers), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise errors[0]

    async def xadd(self, *entries: dict) -> list[str]:
        """XADD atomically (MULTI/EXEC): a waiting router reads all of them in one batch."""
        pipe = self.redis.pipeline(transaction=True)
        for fields in entries:
            pipe.xadd(STREAM, fields)
        return list(await pipe.execute())

    async def pending(self, group: str = GROUP) -> int:
        return (await self.redis.xpending(STREAM, group))["pending"]

    async def rows(self) -> list[asyncpg.Record]:
        return await self.pool.fetch("SELECT * FROM signals_v2_log ORDER BY id")

    async def entries(self) -> list[tuple[int, int, str, str | None]]:
        return [
            tuple(r)
            for r in await self.pool.fetch(
                "SELECT log_id, strategy_id, status, note FROM signal_log_entries_v2 ORDER BY log_id, strategy_id"
            )
        ]

    async def routed(self, strategy_id: int) -> list[dict[str, str]]:
        return [fields for _, fields in await self.redis.xrange(signals_io.strategy_stream(strategy_id))]

    async def settled(self, count: int, group: str = GROUP) -> bool:
        """`count` log rows exist and nothing is pending."""
        n = await self.pool.fetchval("SELECT count(*) FROM signals_v2_log")
        return n >= count and await self.pending(group) == 0


async def _ready(router: SignalRouter, task: asyncio.Task) -> bool:
    if task.done():
        task.result()  # raise the reason it ended
    return router.snapshot_version > 0 and router._started


@pytest.fixture
async def h(pool, redis, redis_stack_server, pg_url):
    await seed_config(pool)
    await core_io.ensure_groups(redis, {STREAM: (GROUP,)})
    infra.system_event_log.pending.clear()
    harness = Harness(pool, redis, redis_stack_server, pg_url)
    yield harness
    await harness.stop_all()


def events(module: str = "SIGNALS", level: str | None = None) -> list[str]:
    return [r[3] for r in infra.system_event_log.pending if r[2] == module and (level is None or r[1] == level)]


# --------------------------------------------------------------------------- routing


async def test_xadd_is_logged_delivered_and_acked(h):
    router = await h.run()
    [entry_id] = await h.xadd(signal_fields(extra="kept in raw"))
    await until(lambda: h.settled(1), what="signal logged")
    [row] = await h.rows()
    assert row["status"] == "new" and row["reason"] is None
    assert (row["symbol"], row["message"], row["action"], row["stream_id"]) == (
        "BTCUSDT",
        "Buy BTC",
        "open_long",
        entry_id,
    )
    assert sl.datetime_to_ms(row["bar_time"]) == BAR_MS and sl.datetime_to_ms(row["sent_at"]) == BAR_MS + 1000
    assert row["uid"] == sl.signal_uid("BTCUSDT", "Buy BTC", BAR_MS)
    assert '"extra": "kept in raw"' in row["raw"]
    assert await h.entries() == [(row["id"], 1, "delivered", None), (row["id"], 2, "skipped", sl.NOTE_ALLOW_OPEN)]
    assert await h.routed(1) == [
        {
            "strategy_id": "1",
            "log_id": str(row["id"]),
            "uid": row["uid"],
            "symbol": "BTCUSDT",
            "message": "Buy BTC",
            "action": "open_long",
            "bar_time": str(BAR_MS),
            "sent_at": str(BAR_MS + 1000),
        }
    ]
    assert await h.routed(2) == []
    assert router.stats["new"] == 1 and router.stats["sent"] == 1 and router.stats["skipped"] == 1
    # PostgreSQL records the delivery; only then does the mark get its expiry.
    assert row["delivered_at"] is not None
    assert 0 < await h.redis.pttl(mark_key(h, row)) <= RouterOptions().mark_ttl_s * 1000


async def test_archived_disabled_and_allow_open_strategies_are_filtered(h):
    await h.run()
    await h.xadd(signal_fields("Buy BTC"), signal_fields("Close all"), signal_fields("legacy"))
    await until(lambda: h.settled(3))
    buy, close, legacy = await h.rows()
    assert (buy["status"], close["status"]) == ("new", "new")
    assert (legacy["status"], legacy["reason"]) == ("ignored", sl.REASON_NO_STRATEGY)
    assert await h.entries() == [
        (buy["id"], 1, "delivered", None),
        (buy["id"], 2, "skipped", sl.NOTE_ALLOW_OPEN),
        (close["id"], 1, "delivered", None),
        (close["id"], 2, "delivered", None),
    ]
    assert [f["action"] for f in await h.routed(1)] == ["open_long", "close"]
    assert [f["action"] for f in await h.routed(2)] == ["close"]
    assert not await h.redis.exists(signals_io.strategy_stream(3), signals_io.strategy_stream(4))


async def test_repeated_uid_is_logged_duplicate_and_not_delivered(h):
    await h.run()
    [first] = await h.xadd(signal_fields())
    await until(lambda: h.settled(1))
    new_id = (await h.rows())[0]["id"]
    # Later batches: the same signal written differently (case, spacing, ISO bar time).
    await h.xadd(signal_fields("  buy   btc "), signal_fields(symbol="btcusdt", bar_time="2026-02-01T00:00:00Z"))
    await until(lambda: h.settled(3))
    # Within one batch: a fresh signal twice.
    await h.xadd(signal_fields("Close all"), signal_fields("CLOSE ALL"))
    await until(lambda: h.settled(5))
    rows = await h.rows()
    assert [r["status"] for r in rows] == ["new", "duplicate", "duplicate", "new", "duplicate"]
    assert rows[1]["reason"] == rows[2]["reason"] == f"{sl.REASON_REPEAT} {new_id}"
    assert rows[4]["reason"] == f"{sl.REASON_REPEAT} {rows[3]['id']}"
    assert len({r["uid"] for r in rows[:3]}) == 1
    assert {e[0] for e in await h.entries()} == {rows[0]["id"], rows[3]["id"]}
    assert [f["action"] for f in await h.routed(1)] == ["open_long", "close"]
    assert rows[0]["stream_id"] == first


async def test_malformed_entries_are_ignored_with_a_reason_and_acked(h):
    router = await h.run()
    cases = {
        "missing": ({"symbol": "BTCUSDT", "message": "Buy BTC", "bar_time": str(BAR_MS)}, "missing field sent_at"),
        "bad bar_time": (signal_fields(bar_time="half past nine"), "bad bar_time:"),
        "bad sent_at": (signal_fields(sent_at="1e99"), "bad sent_at:"),
        "non-utf8": (signal_fields(message=b"Buy \xff BTC"), "field message is not valid UTF-8"),
        "huge": (signal_fields(message="A" * 1_000_000), "message too long:"),
        "nul": (signal_fields(symbol="BTC\x00USDT"), "field symbol contains a NUL character"),
        "unknown phrase": (signal_fields("Sell the house"), sl.REASON_UNKNOWN_PHRASE),
        "disabled phrase": (signal_fields("paused"), sl.REASON_PHRASE_DISABLED),
        "unknown ticker": (signal_fields(symbol="DOGEUSDT"), sl.REASON_UNKNOWN_TICKER),
        "disabled ticker": (signal_fields(symbol="FILUSDT"), sl.REASON_TICKER_DISABLED),
        "no fields we know": ({"hello": "world"}, "missing field symbol"),
    }
    ids = await h.xadd(*(fields for fields, _ in cases.values()), signal_fields())
    await until(lambda: h.settled(len(ids)))
    by_entry = {r["stream_id"]: r for r in await h.rows()}
    for entry_id, (name, (_, reason)) in zip(ids, cases.items()):
        row = by_entry[entry_id]
        assert row["status"] == "ignored", name
        assert row["reason"].startswith(reason), (name, row["reason"])
    huge = by_entry[ids[4]]
    assert len(huge["message"]) == sl.MAX_MESSAGE_CHARS and len(huge["raw"]) < 10_000
    assert "\ufffd" in by_entry[ids[3]]["raw"]
    assert by_entry[ids[-1]]["status"] == "new"  # the router carried on
    assert len(await h.routed(1)) == 1 and router.stats["ignored"] == len(cases)


async def test_failed_delivery_is_logged_failed_and_the_rest_delivered(h):
    await h.redis.set(signals_io.strategy_stream(2), "not a stream")
    await h.run()
    await h.xadd(signal_fields("Close all"))
    await until(lambda: h.settled(1))
    [(_, _, ok, _), (_, _, failed, note)] = await h.entries()
    assert (ok, failed) == ("delivered", "failed") and "WRONGTYPE" in note
    assert len(await h.routed(1)) == 1
    assert any("to strategy 2 failed" in m for m in events(level="ERROR"))


async def test_a_value_postgres_refuses_is_isolated_and_logged_ignored(h):
    router = SignalRouter(h.settings, h.pool, fast_options())
    snapshot = await router.reload("test")
    good = sl.decide(
        "1-0", {"symbol": "BTCUSDT", "message": "Buy BTC", "bar_time": BAR_MS, "sent_at": BAR_MS}, snapshot
    )
    bad = replace(sl.decide("2-0", signal_fields("Close all"), snapshot), message="Close\x00all")
    batch = await router._commit([good, bad])
    rows = {r["stream_id"]: r for r in await h.rows()}
    assert rows["1-0"]["status"] == "new" and rows["2-0"]["status"] == "ignored"
    assert rows["2-0"]["reason"].startswith(sl.REASON_REJECTED)
    assert [d.log_id for d in batch.deliveries] == [rows["1-0"]["id"]]


# --------------------------------------------------------------------------- routing tables


async def test_routing_tables_load_and_a_change_is_seen_without_restart(h):
    router = await h.run()
    before = router.snapshot
    assert before.counts() == {"tickers": 1, "phrases": 3, "strategies": 2, "mappings": 14}
    async with h.pool.acquire() as conn, conn.transaction():
        await conn.execute("INSERT INTO tickers (symbol, status) VALUES ('ETHUSDT', 'enabled')")
        sid = await conn.fetchval("INSERT INTO strategies (name) VALUES ('fresh') RETURNING id")
        await conn.execute("INSERT INTO strategy_signals (strategy_id, phrase_id) VALUES ($1, 1)", sid)
        await conn.execute("UPDATE strategies SET archived = true WHERE id = 1")
    await until(lambda: _async(sid in router.snapshot.strategies and "ETHUSDT" in router.snapshot.tickers))
    assert "ETHUSDT" not in before.tickers and sid not in before.strategies  # swapped, not mutated
    await h.xadd(signal_fields(symbol="ETHUSDT"))
    await until(lambda: h.settled(1))
    assert [f["symbol"] for f in await h.routed(sid)] == ["ETHUSDT"]
    assert await h.routed(1) == []  # archived meanwhile
    await h.pool.execute("UPDATE tickers SET status = 'disabled' WHERE symbol = 'ETHUSDT'")
    await until(lambda: _async(not router.snapshot.tickers["ETHUSDT"]))
    await h.xadd(signal_fields(symbol="ETHUSDT", bar=BAR_MS + 60_000))
    await until(lambda: h.settled(2))
    assert (await h.rows())[1]["reason"] == sl.REASON_TICKER_DISABLED


async def test_periodic_reload_without_notification(h):
    await h.pool.execute("ALTER TABLE tickers DISABLE TRIGGER feed_v4_config_notify")
    try:
        router = await h.run(reload_s=0.3)
        version = router.snapshot_version
        await h.pool.execute("INSERT INTO tickers (symbol, status) VALUES ('XRPUSDT', 'enabled')")
        await until(lambda: _async("XRPUSDT" in router.snapshot.tickers), timeout=5)
        assert router.snapshot_version > version
    finally:
        await h.pool.execute("ALTER TABLE tickers ENABLE TRIGGER feed_v4_config_notify")


async def test_listen_connection_killed_is_reconnected(h):
    router = await h.run()

    async def listen_pids() -> list[int]:
        return [
            r["pid"]
            for r in await h.pool.fetch(
                "SELECT pid FROM pg_stat_activity WHERE application_name = 'feed_v4_signals_listen' "
                "AND datname = current_database()"
            )
        ]

    await until(lambda: _async_call(listen_pids, bool), what="LISTEN connection")
    [old] = await listen_pids()
    await h.pool.execute("SELECT pg_terminate_backend($1)", old)
    await until(lambda: _async_call(listen_pids, lambda pids: pids and old not in pids), what="LISTEN reconnect")
    await h.pool.execute("INSERT INTO tickers (symbol, status) VALUES ('ADAUSDT', 'enabled')")
    await until(lambda: _async("ADAUSDT" in router.snapshot.tickers))


# --------------------------------------------------------------------------- races and redelivery


async def waiting_on_locks(h, count: int) -> bool:
    """Exactly `count` sessions of this database are blocked on a lock."""
    n = await h.pool.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()"
    )
    return n == count


async def test_two_routers_of_one_group_race_on_one_uid_and_the_database_decides(h):
    """Two entries of one signal reach two consumers at once; both inserts wait on a
    transaction holding the uid, which then rolls back: exactly one wins."""
    uid = sl.signal_uid("BTCUSDT", "Close all", BAR_MS)
    blocker = await asyncpg.connect(h.pg_url)
    try:
        tx = blocker.transaction()
        await tx.start()
        await blocker.execute("INSERT INTO signals_v2_log (uid, status) VALUES ($1, 'new')", uid)
        await h.xadd(signal_fields("Close all"), signal_fields("close ALL"))
        a = await h.run(consumer="a", batch=1)
        b = await h.run(consumer="b", batch=1)

        await until(lambda: waiting_on_locks(h, 2), what="both routers blocked on the uid")
        await tx.rollback()
    finally:
        await blocker.close()
    await until(lambda: h.settled(2))
    rows = await h.rows()
    assert sorted(r["status"] for r in rows) == ["duplicate", "new"]
    new = next(r for r in rows if r["status"] == "new")
    assert next(r for r in rows if r["status"] == "duplicate")["reason"] == f"{sl.REASON_REPEAT} {new['id']}"
    assert (a.stats["entries"], b.stats["entries"]) == (1, 1)
    assert len(await h.routed(1)) == len(await h.routed(2)) == 1


async def test_a_second_group_reading_the_same_entry_logs_and_delivers_it_once(h):
    """Two groups get the same entry; both wait on a transaction holding its (entry,
    uid); the loser recognises the entry as logged and acks it without a second row."""
    [entry_id] = await h.xadd(signal_fields("Close all"))
    uid = sl.signal_uid("BTCUSDT", "Close all", BAR_MS)
    blocker = await asyncpg.connect(h.pg_url)
    try:
        tx = blocker.transaction()
        await tx.start()
        await blocker.execute(
            "INSERT INTO signals_v2_log (uid, status, stream_id) VALUES ($1, 'ignored', $2)", uid, entry_id
        )
        a = await h.run(consumer="a")
        b = await h.run(consumer="b", group="signal_processor_b")

        await until(lambda: waiting_on_locks(h, 2), what="both routers blocked on the entry")
        await tx.rollback()
    finally:
        await blocker.close()
    await until(lambda: h.settled(1, GROUP))
    await until(lambda: h.settled(1, "signal_processor_b"))
    [row] = await h.rows()
    assert row["status"] == "new"
    assert sorted([a.stats["replayed"], b.stats["replayed"]]) == [0, 1]
    assert len(await h.routed(1)) == len(await h.routed(2)) == 1


async def test_four_routers_in_two_groups_on_shuffled_repeats(h):
    signals = [signal_fields("Close all", bar=BAR_MS + i * 60_000) for i in range(60)]
    entries = signals * 3
    random.Random(4).shuffle(entries)
    await h.xadd(*entries)
    routers = [
        await h.run(consumer=f"{group[-1]}{n}", group=group, batch=7)
        for group in (GROUP, "signal_processor_b")
        for n in (1, 2)
    ]
    await until(lambda: h.settled(180, GROUP), timeout=20)
    await until(lambda: h.settled(180, "signal_processor_b"), timeout=20)
    rows = await h.rows()
    assert len(rows) == 180  # one row per entry, not one per entry and group
    assert sum(r["status"] == "new" for r in rows) == 60
    assert sum(r["status"] == "duplicate" for r in rows) == 120
    for strategy_id in (1, 2):
        routed = await h.routed(strategy_id)
        assert sorted(int(f["bar_time"]) for f in routed) == [BAR_MS + i * 60_000 for i in range(60)]
    assert sum(r.stats["entries"] for r in routers) == 360


async def test_batches_sharing_uids_in_opposite_orders_do_not_deadlock(h):
    """Two routers' batches hold repeats of the same signals in opposite stream orders and
    start inserting at the same instant (a transaction holding every uid rolls back):
    the rows go in in uid order, so neither batch is aborted as a deadlock. Log ids
    still follow the stream order."""
    router = SignalRouter(h.settings, h.pool, fast_options())
    snapshot = await router.reload("test")
    signals = [signal_fields("Close all", bar=BAR_MS + i * 60_000) for i in range(6)]
    first = sl.decide_batch([(f"1-{i}", fields) for i, fields in enumerate(signals)], snapshot)
    second = sl.decide_batch([(f"2-{i}", fields) for i, fields in enumerate(reversed(signals))], snapshot)
    blocker = await asyncpg.connect(h.pg_url)
    try:
        tx = blocker.transaction()
        await tx.start()
        await blocker.executemany(
            "INSERT INTO signals_v2_log (uid, status) VALUES ($1, 'new')", [(d.uid,) for d in first]
        )
        both = asyncio.gather(signals_io.commit_batch(h.pool, first, 10), signals_io.commit_batch(h.pool, second, 10))
        try:
            await until(lambda: waiting_on_locks(h, 2), what="both batches blocked")
        finally:
            await tx.rollback()
    finally:
        await blocker.close()
    logs = await asyncio.wait_for(both, 15)  # a deadlock would raise here
    rows = {entry_id: row for log in logs for entry_id, row in log.rows.items()}
    assert sorted(status for _, status in rows.values()) == ["duplicate"] * 6 + ["new"] * 6
    winner = next(log for log in logs if all(status == "new" for _, status in log.rows.values()))
    ids = [log_id for _, (log_id, _) in sorted(winner.rows.items(), key=lambda item: core_io.stream_id(item[0]))]
    assert ids == sorted(ids)


async def test_entries_left_pending_by_a_dead_consumer_are_reclaimed(h):
    ids = await h.xadd(signal_fields(), signal_fields("Close all"))
    taken = await h.redis.xreadgroup(GROUP, "dead", {STREAM: ">"}, count=10)
    assert len(taken[0][1]) == 2  # ... and "dead" never acknowledges them
    router = await h.run(claim_idle_ms=200, claim_every_s=0.1)
    await until(lambda: h.settled(2))
    assert [r["stream_id"] for r in await h.rows()] == ids
    consumers = {c["name"]: c["pending"] for c in await h.redis.xinfo_consumers(STREAM, GROUP)}
    assert consumers["dead"] == 0 and router.stats["new"] == 2


class SimulatedCrash(Exception):
    pass


class CrashBeforeDelivery(SignalRouter):
    async def _deliver(self, batch):
        raise SimulatedCrash("after the log was committed")


class CrashBeforeAck(SignalRouter):
    async def _ack(self, ids, *marks):
        raise SimulatedCrash("after delivery")


class CrashAfterDelivery(SignalRouter):
    """Dies right after the delivery script: the log committed and the strategy streams
    written, but the delivery neither recorded in PostgreSQL nor acknowledged."""

    async def _deliver(self, batch):
        await super()._deliver(batch)
        raise SimulatedCrash("after the delivery script")


def mark_key(h, row) -> str:
    """The delivery's mark (on a Redis Cluster: the one of its first target, strategy 1)."""
    delivery = sl.Delivery(row["id"], row["uid"], "BTCUSDT", "", "", 0, 0, (1,))
    return signals_io.delivered_marks(delivery, isinstance(h.redis, RedisCluster))[0]


@pytest.mark.parametrize("crashing", [CrashBeforeDelivery, CrashBeforeAck])
async def test_crash_between_log_and_ack_delivers_exactly_once(h, crashing):
    crashy = crashing(h.settings, h.pool, fast_options(consumer="crashy"))
    task = asyncio.create_task(crashy.run())
    await h.xadd(signal_fields("Close all"))
    with pytest.raises(SimulatedCrash):
        await asyncio.wait_for(task, 10)
    assert len(await h.rows()) == 1 and await h.pending() == 1
    # The same consumer restarted picks its pending entry up at once ...
    again = await h.run(consumer="crashy")
    await until(lambda: h.settled(1))
    [row] = await h.rows()
    assert row["status"] == "new" and again.stats["replayed"] == 1
    assert [e[2] for e in await h.entries()] == ["delivered", "delivered"]
    assert len(await h.routed(1)) == len(await h.routed(2)) == 1
    # ... and yet another delivery attempt of the same row sends nothing.
    report = await again._deliverer.deliver(
        [sl.Delivery(row["id"], row["uid"], "BTCUSDT", "Close all", "close", BAR_MS, BAR_MS, (1, 2))]
    )
    assert (report.sent, report.already) == (0, 1)


async def test_a_router_down_longer_than_the_mark_ttl_still_sends_once(h):
    """The router dies right after sending, stays down longer than SIGNAL_MARK_TTL_S
    (1 s here), and another router takes the entry over: the mark set by the script has
    no expiry yet, so the signal does not go out a second time."""
    crashy = CrashAfterDelivery(h.settings, h.pool, fast_options(consumer="crashy", mark_ttl_s=1))
    task = asyncio.create_task(crashy.run())
    await h.xadd(signal_fields("Close all"))
    with pytest.raises(SimulatedCrash):
        await asyncio.wait_for(task, 10)
    assert len(await h.routed(1)) == len(await h.routed(2)) == 1 and await h.pending() == 1
    await asyncio.sleep(1.5)  # the downtime: longer than the mark's 1 s lifetime
    other = await h.run(consumer="other", mark_ttl_s=1, claim_idle_ms=1000, claim_every_s=0.1)
    await until(lambda: h.settled(1))
    assert len(await h.routed(1)) == len(await h.routed(2)) == 1  # not sent again
    [row] = await h.rows()
    assert other.stats["replayed"] == 1 and row["delivered_at"] is not None
    assert 0 < await h.redis.pttl(mark_key(h, row)) <= 1000  # recorded now: the mark expires


@pytest.mark.parametrize("mark", ["kept", "lost"])
async def test_a_delivery_recorded_in_postgres_is_never_sent_again(h, mark):
    """The router dies after PostgreSQL recorded the delivery, before the acknowledgement.
    Read again, the entry is not sent, whether its mark is still there (it gets its
    expiry now) or gone (expired, evicted, lost in a failover)."""
    crashy = CrashBeforeAck(h.settings, h.pool, fast_options(consumer="crashy"))
    task = asyncio.create_task(crashy.run())
    await h.xadd(signal_fields("Close all"))
    with pytest.raises(SimulatedCrash):
        await asyncio.wait_for(task, 10)
    [row] = await h.rows()
    key = mark_key(h, row)
    ttl_after_crash = await h.redis.pttl(key)
    if mark == "lost":
        await h.redis.delete(key)
    again = await h.run(consumer="crashy")
    await until(lambda: h.settled(1))
    assert len(await h.routed(1)) == len(await h.routed(2)) == 1  # not sent again
    assert again.stats["replayed"] == 1 and again.stats["sent"] == 0
    assert ttl_after_crash == -1  # no expiry before the acknowledgement round
    [row] = await h.rows()
    assert row["delivered_at"] is not None
    if mark == "kept":
        assert 0 < await h.redis.pttl(key) <= RouterOptions().mark_ttl_s * 1000
    else:
        assert not await h.redis.exists(key)


# --------------------------------------------------------------------------- faults


async def test_redis_restart_while_running_is_ridden_out(h):
    router = await h.run()
    await h.xadd(signal_fields())
    await until(lambda: h.settled(1))
    try:
        h.server.stop()
        await until(lambda: _async(router._redis_outage.active), what="outage noticed")
    finally:
        if h.server.process is None:
            h.server.start()
    # Redis came back empty: the group is recreated, the database still knows the uid.
    await h.xadd(signal_fields(), signal_fields("Close all"))
    await until(lambda: h.settled(3))
    assert [(r["message"], r["status"]) for r in await h.rows()] == [
        ("Buy BTC", "new"),
        ("Close all", "new"),
        ("Buy BTC", "duplicate"),  # duplicates are written after the batch's other rows
    ]
    assert [f["action"] for f in await h.routed(1)] == ["close"]
    warnings = [m for m in events(level="WARNING") if m.startswith("Redis unreachable")]
    assert len(warnings) == 1
    assert any(m.startswith("Redis back after") for m in events(level="INFO"))


class RedisDiesBeforeDelivery(SignalRouter):
    server = None
    killed = False

    async def _deliver(self, batch):
        if not self.killed:
            self.killed = True
            self.server.stop()
            asyncio.get_running_loop().call_later(0.5, self.server.start)
        return await super()._deliver(batch)


async def test_redis_down_at_delivery_holds_the_batch_until_it_is_back(h):
    RedisDiesBeforeDelivery.server = h.server
    try:
        await h.run(RedisDiesBeforeDelivery)
        await h.xadd(signal_fields("Close all"))

        async def delivered() -> bool:
            try:
                return bool(await h.routed(2))
            except RedisConnectionError:  # the test's own client, while Redis restarts
                return False

        await until(delivered, timeout=15, what="delivery after restart")
    finally:
        await until(lambda: _async(h.server.process is not None), timeout=5)
    assert len(await h.routed(1)) == 1
    [row] = await h.rows()
    assert row["status"] == "new" and [e[2] for e in await h.entries()] == ["delivered", "delivered"]


async def test_postgres_outage_holds_entries_and_logs_them_once_back(h):
    async with h.router_behind_pg_proxy() as (router, proxy):
        await h.xadd(signal_fields())
        await until(lambda: h.settled(1))
        proxy.set_mode("down")
        batch = [signal_fields("Close all", bar=BAR_MS + i * 60_000) for i in range(40)]
        await h.xadd(*batch, *batch[:10])
        await until(lambda: _async(router._pg_outage.active), what="outage noticed")
        await until(lambda: _async(router._pg_outage.retries >= 3), what="several retries")
        assert await h.pending() == 50  # the batch in hand: read, held, not acknowledged
        assert len(await h.rows()) == 1
        proxy.set_mode("pass")
        await until(lambda: h.settled(51), timeout=20)
    rows = await h.rows()
    assert [r["status"] for r in rows].count("new") == 41 and [r["status"] for r in rows].count("duplicate") == 10
    assert len(await h.routed(2)) == 40
    warnings = [m for m in events(level="WARNING") if m.startswith("PostgreSQL unreachable")]
    assert len(warnings) == 1, warnings
    assert any(m.startswith("PostgreSQL back after") for m in events(level="INFO"))


async def test_batch_held_through_a_postgres_outage_survives_a_redis_wipe_too(h):
    """Both servers fail at once: the router keeps the batch it read, and once
    PostgreSQL is back logs it and delivers it into the restarted (empty) Redis."""
    async with h.router_behind_pg_proxy() as (router, proxy):
        proxy.set_mode("down")
        await h.xadd(*(signal_fields("Close all", bar=BAR_MS + i * 60_000) for i in range(5)))
        await until(lambda: _async(router._pg_outage.active), what="PostgreSQL outage noticed")
        assert await h.pending() == 5
        try:
            h.server.stop()
        finally:
            h.server.start()
        assert await h.redis.exists(STREAM) == 0  # Redis lost everything, the router has the batch
        proxy.set_mode("pass")
        await until(lambda: _async_call(lambda: h.routed(2), lambda r: len(r) == 5), timeout=20, what="deliveries")
        await h.xadd(signal_fields())  # the group is recreated and routing goes on
        await until(lambda: h.settled(6), timeout=10)
    assert [r["status"] for r in await h.rows()] == ["new"] * 6
    assert len(await h.routed(1)) == 6


async def test_standalone_process_routes_and_exits_zero_on_sigterm(h):
    env = {
        **os.environ,
        "REDIS_URL": h.server.url,
        "POSTGRES_URL": h.pg_url,
        "SIGNAL_BLOCK_MS": "100",
        "SIGNAL_CONSUMER": "standalone",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(PROJECT / "signals_v4_main.py"),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        await h.xadd(signal_fields("Close all"))
        await until(lambda: h.settled(1), timeout=20, what="standalone router routed")
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), 10)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, stderr.decode()
    assert "Traceback" not in stderr.decode()
    assert len(await h.routed(2)) == 1


# --------------------------------------------------------------------------- settings


def test_router_settings_from_the_environment():
    assert load_router_options({}) == RouterOptions()
    options = load_router_options({"SIGNAL_RELOAD_S": "60", "SIGNAL_CLAIM_IDLE_MS": "5000", "SIGNAL_CONSUMER": "w1"})
    assert (options.reload_s, options.claim_idle_ms, options.consumer) == (60.0, 5000, "w1")
    with pytest.raises(ConfigError, match="SIGNAL_RELOAD_S='soon' is not a float"):
        load_router_options({"SIGNAL_RELOAD_S": "soon"})
    with pytest.raises(ConfigError, match="SIGNAL_BATCH='0' is out of range"):
        load_router_options({"SIGNAL_BATCH": "0"})
    with pytest.raises(ConfigError, match="SIGNAL_CONSUMER"):
        load_router_options({"SIGNAL_CONSUMER": "two words"})
    options = load_router_options({"SIGNAL_BATCH_BYTES": "2097152", "SIGNAL_POLL_MS": "5"})
    assert (options.batch_bytes, options.poll_ms) == (2_097_152, 5)
    with pytest.raises(ConfigError, match="SIGNAL_BATCH_BYTES='1000' is out of range"):
        load_router_options({"SIGNAL_BATCH_BYTES": "1000"})  # under what one cut entry can take


def test_a_mark_ttl_at_or_below_the_claim_idle_time_is_refused():
    with pytest.raises(ConfigError) as caught:
        load_router_options({"SIGNAL_MARK_TTL_S": "120", "SIGNAL_CLAIM_IDLE_MS": "120000"})
    message = str(caught.value)
    assert message.startswith("SIGNAL_MARK_TTL_S=120 (120000 ms) must exceed SIGNAL_CLAIM_IDLE_MS=120000")
    assert "\n" not in message
    with pytest.raises(ConfigError, match="must exceed SIGNAL_CLAIM_IDLE_MS=86400000"):
        load_router_options({"SIGNAL_CLAIM_IDLE_MS": "86400000"})  # the default TTL is one day
    options = load_router_options({"SIGNAL_MARK_TTL_S": "121", "SIGNAL_CLAIM_IDLE_MS": "120000"})
    assert (options.mark_ttl_s, options.claim_idle_ms) == (121, 120_000)


async def _async(value: bool) -> bool:
    return value


async def _async_call(fn, check=bool) -> bool:
    return bool(check(await fn()))
