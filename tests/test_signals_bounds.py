"""The signal router's reading bounds against real Redis and PostgreSQL: entries of
megabytes (and thousands of fields) never reach the router whole, a batch stays under
its byte budget (new entries, own pending ones and entries taken over from a dead
consumer alike), valid signals are routed as before, junk is logged with a bounded raw.
Plus a property-based run of the router over random entries."""

from __future__ import annotations

import asyncio
import tracemalloc
from collections import Counter

import asyncpg
import pytest
from conftest import DATA_TABLES
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from test_signals_router import BAR_MS, GROUP, STREAM, Harness, fast_options, seed_config, signal_fields, until

import core_io
import signals_io
import signals_logic as sl
from infra import load_settings, make_redis
from migrations import apply_migrations
from signals_v4_main import SignalRouter

MB = 1024 * 1024
BUDGET = 262_144  # the smallest SIGNAL_BATCH_BYTES: the bound bites often


def blob(size: int, seed: int = 1) -> bytes:
    """`size` bytes of a repeated non-UTF-8 pattern (cheap to build at megabytes)."""
    pattern = bytes((seed * 37 + i * 11) % 256 for i in range(251)) + b"\xff"
    return (pattern * (size // len(pattern) + 1))[:size]


def field_bytes(entries) -> int:
    """What a batch holds of the stream: its names and values, in bytes."""
    return sum(len(k) + len(v) for entry in entries for k, v in entry[1].items())


@pytest.fixture
async def raw_redis(redis_stack_server):
    """A client that leaves replies as bytes (as the router's), on a flushed server."""
    client = make_redis(redis_stack_server.url, decode_responses=False)
    await client.flushall()
    yield client
    await client.aclose()


@pytest.fixture
async def h(pool, redis, redis_stack_server, pg_url):
    await seed_config(pool)
    await core_io.ensure_groups(redis, {STREAM: (GROUP,)})
    harness = Harness(pool, redis, redis_stack_server, pg_url)
    yield harness
    await harness.stop_all()


class Measuring(SignalRouter):
    """A router that notes the size of every batch it is handed."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.batch_sizes: list[int] = []

    async def process(self, entries, *rest):
        self.batch_sizes.append(field_bytes(entries))
        await super().process(entries, *rest)


async def raw_sizes(pool) -> list[int]:
    """Bytes of each stored raw, as PostgreSQL prints it."""
    return [len(r["raw"].encode()) for r in await pool.fetch("SELECT raw::text AS raw FROM signals_v2_log")]


# --------------------------------------------------------------------------- the scripts


async def test_xreadgroup_and_xautoclaim_may_be_called_from_a_script(redis):
    """What the reading script relies on: both commands run inside EVAL (not BLOCK)."""
    await core_io.ensure_groups(redis, {"s": ("g",)})
    first = await redis.xadd("s", {"a": "1"})
    read = "return redis.call('XREADGROUP', 'GROUP', 'g', 'c1', 'COUNT', 1, 'STREAMS', KEYS[1], '>')"
    assert await redis.eval(read, 1, "s") == [["s", [[first, ["a", "1"]]]]]
    claim = "return redis.call('XAUTOCLAIM', KEYS[1], 'g', 'c2', 0, '0-0', 'COUNT', 1)"
    assert (await redis.eval(claim, 1, "s"))[1] == [[first, ["a", "1"]]]
    assert await redis.eval(read, 1, "s") is None  # nothing new: no block inside a script


async def test_reader_cuts_entries_in_redis_and_bounds_the_batch_in_bytes(raw_redis):
    """Megabyte entries cost the client a few kilobytes each; the batch stops before its
    budget, entries not returned stay unread; the whole read allocates well under the
    budget in the client (tracemalloc) although the stream holds ~64 MB."""
    await core_io.ensure_groups(raw_redis, {STREAM: (GROUP,)})
    huge = [
        {"symbol": "BTCUSDT", "message": blob(8 * MB), "bar_time": "1", "sent_at": "1"},
        {blob(2 * MB, 2): b"name of two megabytes", "payload": blob(10 * MB, 3)},
        {f"f{i}".encode(): blob(4000, i) for i in range(3000)},  # 3000 fields, 12 MB
    ]
    for n in range(8):
        await raw_redis.xadd(STREAM, huge[n % 4 - 1] if n % 4 else signal_fields(bar=BAR_MS + n))
    reader = signals_io.StreamReader(raw_redis, STREAM, GROUP, "reader", BUDGET)
    batches = []
    tracemalloc.start()
    try:
        while batch := await reader.read_new(200):
            batches.append(batch)
            assert (await raw_redis.xpending(STREAM, GROUP))["pending"] == sum(len(b.entries) for b in batches)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sum(len(b.entries) for b in batches) == 8 and len(batches) > 1
    for batch in batches:
        assert field_bytes(batch.entries) <= batch.reply_bytes <= BUDGET
    assert peak < BUDGET * 3, peak
    entries = [e for b in batches for e in b.entries]
    message = entries[1].fields[b"message"]
    assert len(message) == sl.READ_MESSAGE_BYTES
    assert entries[1].cuts.values[b"message"][0] == 8 * MB
    named = entries[2]
    assert [len(k) for k in named.fields] == [sl.READ_NAME_BYTES, len(b"payload")]
    assert named.cuts.values[b"payload"][0] == 10 * MB and len(named.cuts.names) == 1
    wide = entries[3]
    assert len(wide.fields) == sl.READ_EXTRA_FIELDS and wide.cuts.dropped == 3000 - sl.READ_EXTRA_FIELDS
    # Read again (own pending, after a crash): the same cut entries, the same raw uids.
    again = await reader.read_pending(200)
    assert [e.entry_id for e in again.entries] == [e.entry_id for e in entries[: len(again.entries)]]
    for before, after in zip(entries, again.entries):
        assert sl.raw_uid(before.fields, before.cuts) == sl.raw_uid(after.fields, after.cuts)
    assert again.reply_bytes <= BUDGET


async def test_a_valid_message_of_4096_four_byte_characters_is_read_whole(raw_redis):
    """The message limit is in bytes: 4096 characters of 4 UTF-8 bytes pass whole and
    validate; one more character is cut and recognised as too long."""
    await core_io.ensure_groups(raw_redis, {STREAM: (GROUP,)})
    text = "𝄞" * sl.MAX_MESSAGE_CHARS
    snapshot = sl.build_snapshot(
        [("BTCUSDT", "enabled")], [(1, text, "close", True)], [(1, "a", True, False, True)], [(1, 1)]
    )
    await raw_redis.xadd(STREAM, signal_fields(text))
    await raw_redis.xadd(STREAM, signal_fields(text + "𝄞"))
    await raw_redis.xadd(STREAM, signal_fields(symbol="€" * 2000))  # cut inside a character
    batch = await signals_io.StreamReader(raw_redis, STREAM, GROUP, "r", BUDGET).read_new(10)
    ok, long, symbol = sl.decide_batch(batch.entries, snapshot)
    assert ok.status == "new" and ok.message == text
    assert (long.status, long.reason) == (
        "ignored",
        f"message too long: {len(text.encode()) + 4} bytes, over 4096 characters",
    )
    assert symbol.status == "ignored" and symbol.reason.startswith(sl.REASON_BAD_SYMBOL)


async def test_script_is_loaded_again_after_a_script_flush(raw_redis):
    await core_io.ensure_groups(raw_redis, {STREAM: (GROUP,)})
    reader = signals_io.StreamReader(raw_redis, STREAM, GROUP, "r", BUDGET)
    await raw_redis.xadd(STREAM, signal_fields())
    assert len((await reader.read_new(10)).entries) == 1
    await raw_redis.script_flush()  # NOSCRIPT at the next EVALSHA
    await raw_redis.xadd(STREAM, signal_fields())
    assert len((await reader.read_new(10)).entries) == 1


# --------------------------------------------------------------------------- the router


def mixed_entries() -> tuple[list[dict], list[tuple[str, str | None]]]:
    """Valid signals between entries of megabytes; what each must become."""
    entries: list[tuple[dict, str, str | None]] = [
        (signal_fields(message="Buy BTC " + "x" * (5 * MB)), "ignored", "message too long: 5242888 bytes"),
        (signal_fields(symbol="B" * (3 * MB)), "ignored", sl.REASON_BAD_SYMBOL),
        (signal_fields(bar_time="1" * MB), "ignored", sl.REASON_BAD_BAR_TIME),
        ({f"junk{i}": blob(1024, i) for i in range(3000)}, "ignored", "missing field symbol"),
        ({"payload": blob(10 * MB)}, "ignored", "missing field symbol"),
        (signal_fields("Close all", bar=BAR_MS + 1, **{"x" * (2 * MB): "a huge name"}), "new", None),
        (signal_fields("Close all", bar=BAR_MS + 2, note=blob(10 * MB, 5)), "new", None),
        (signal_fields("Close all", bar=BAR_MS + 3, **{f"extra{i}": "v" for i in range(1000)}), "new", None),
    ]
    stream: list[tuple[dict, str, str | None]] = []
    for n, big in enumerate(entries):
        stream.append((signal_fields("Buy BTC" if n % 2 else "Close all", bar=BAR_MS + 60_000 * (n + 1)), "new", None))
        stream.append(big)
    stream.append((signal_fields("Close all", bar=BAR_MS + 2), "duplicate", None))
    return [e[0] for e in stream], [(e[1], e[2]) for e in stream]


async def check_routed(h, ids: list[str], expected: list[tuple[str, str | None]]) -> None:
    rows = {r["stream_id"]: r for r in await h.rows()}
    assert len(rows) == len(ids)
    for entry_id, (status, reason) in zip(ids, expected):
        row = rows[entry_id]
        assert row["status"] == status, (entry_id, row["status"], row["reason"])
        if reason:
            assert row["reason"].startswith(reason), row["reason"]
    assert max(await raw_sizes(h.pool)) <= sl.RAW_MAX_BYTES
    new = [rows[i] for i, (status, _) in zip(ids, expected) if status == "new"]
    routed = await h.routed(1)
    assert [f["log_id"] for f in routed] == [str(r["id"]) for r in new]  # once each, in order
    for fields, row in zip(routed, new):
        assert fields == {
            "strategy_id": "1",
            "log_id": str(row["id"]),
            "uid": row["uid"],
            "symbol": "BTCUSDT",
            "message": row["message"],
            "action": row["action"],
            "bar_time": str(sl.datetime_to_ms(row["bar_time"])),
            "sent_at": str(sl.datetime_to_ms(row["sent_at"])),
        }
    assert len(await h.routed(2)) == sum(r["message"] == "Close all" for r in new)


async def test_entries_of_megabytes_are_read_bounded_and_valid_signals_routed_as_before(h):
    """With the default settings: ~37 MB in the stream, at most SIGNAL_BATCH_BYTES
    (1 MiB) in any batch."""
    fields, expected = mixed_entries()
    ids = [await h.redis.xadd(STREAM, f) for f in fields]
    router = await h.run(Measuring)
    budget = getattr(router.options, "batch_bytes", 1_048_576)
    await until(lambda: h.settled(len(ids)), timeout=30)
    assert len(router.batch_sizes) > 1 and max(router.batch_sizes) <= budget, router.batch_sizes
    assert 0 < router.largest_batch_bytes <= budget
    await check_routed(h, ids, expected)
    raw = {r["stream_id"]: r["raw"] for r in await h.rows()}
    assert '"_truncated": 1' in raw[ids[13]] and '"_entry_bytes": ' in raw[ids[13]]  # the 10 MB note
    assert '"_dropped_fields": ' in raw[ids[15]]  # the 1000 extra fields


@pytest.mark.parametrize("taken_over", [True, False], ids=["xautoclaim", "own-pending"])
async def test_entries_left_pending_by_a_crash_are_read_bounded_too(h, taken_over):
    """A consumer read the big entries and died. Taken over by another consumer
    (XAUTOCLAIM) or read again by the same one restarted: bounded batches again, every
    entry logged once. An entry deleted from the stream meanwhile is acknowledged."""
    fields, expected = mixed_entries()
    ids = [await h.redis.xadd(STREAM, f) for f in fields]
    dead = signals_io.StreamReader(make_redis(h.server.url, decode_responses=False), STREAM, GROUP, "dead", BUDGET)
    while await dead.read_new(1000):  # ... and "dead" never acknowledges them
        pass
    await dead.redis.aclose()
    assert await h.pending() == len(ids)
    await h.redis.xdel(STREAM, ids[9])  # trimmed while pending: nothing to log
    consumer = "survivor" if taken_over else "dead"
    router = await h.run(Measuring, consumer=consumer, batch_bytes=BUDGET, claim_idle_ms=200, claim_every_s=0.1)
    await until(lambda: h.settled(len(ids) - 1), timeout=30)
    keep = [i for i in range(len(ids)) if i != 9]
    await check_routed(h, [ids[i] for i in keep], [expected[i] for i in keep])
    assert len(router.batch_sizes) > 1 and max(router.batch_sizes) <= BUDGET, router.batch_sizes
    assert router.stats["entries"] == len(ids)  # the deleted one counted, acknowledged, not logged
    consumers = {c["name"]: c["pending"] for c in await h.redis.xinfo_consumers(STREAM, GROUP)}
    assert consumers["dead"] == 0


async def test_the_router_is_woken_by_writes_and_polls_without_notifications(h, monkeypatch):
    """Waiting never reads the stream: a write notification (CLIENT TRACKING) wakes the
    router at once although it would otherwise wait a minute; a server without
    notifications is polled every SIGNAL_POLL_MS."""
    router = await h.run(block_ms=60_000, claim_every_s=60)  # nothing else makes it read
    await until(lambda: _async(router._watch.active), what="write notifications")
    await asyncio.sleep(0.2)  # the router is waiting now
    started = asyncio.get_running_loop().time()
    await h.xadd(signal_fields())
    await until(lambda: h.settled(1), timeout=5)
    assert asyncio.get_running_loop().time() - started < 1.0
    await h.stop_all()

    async def refused(self):
        self.active = False
        await asyncio.Event().wait()

    monkeypatch.setattr(signals_io.StreamWatch, "run", refused)
    await h.run(block_ms=60_000, claim_every_s=60, poll_ms=20, consumer="poller")
    await asyncio.sleep(0.2)
    started = asyncio.get_running_loop().time()
    await h.xadd(signal_fields("Close all"))
    await until(lambda: h.settled(2), timeout=5)
    assert asyncio.get_running_loop().time() - started < 1.0


async def _async(value: bool) -> bool:
    return value


# --------------------------------------------------------------------------- property


@st.composite
def stream_entries(draw) -> list[tuple[dict[bytes, bytes], str, str | None]]:
    """Random entries and what each is: ('valid', uid) or ('junk', None). Valid ones are
    signals (repeats included) with random extra fields; junk has random binary names
    and values, sometimes a required name with a random value; now and then one value
    of 1-10 MB or an entry of thousands of fields."""
    out = []
    for _ in range(draw(st.integers(1, 10))):
        if draw(st.booleans()):
            message = draw(st.sampled_from(["Buy BTC", "  buy   btc ", "Close all", "CLOSE ALL"]))
            bar = BAR_MS + draw(st.integers(0, 3)) * 60_000
            fields = {k.encode(): v.encode() for k, v in signal_fields(message, bar=bar).items()}
            extras = draw(st.dictionaries(st.binary(min_size=1, max_size=8), st.binary(max_size=30), max_size=4))
            fields |= {b"x-" + k: v for k, v in extras.items()}
            kind, uid = "valid", sl.signal_uid("BTCUSDT", message, bar)
        else:
            names = st.one_of(st.binary(min_size=1, max_size=12), st.sampled_from([b"symbol", b"message", b"sent_at"]))
            fields = draw(st.dictionaries(names, st.binary(max_size=60), min_size=1, max_size=6))
            kind, uid = "junk", None
        if draw(st.integers(0, 11)) == 0:  # a value of megabytes, on any field
            name = draw(st.sampled_from(sorted(fields)))
            fields[name] = blob(draw(st.integers(1, 10)) * MB, len(out))
            if name in (b"symbol", b"message", b"bar_time", b"sent_at"):
                kind, uid = "junk", None
        elif draw(st.integers(0, 11)) == 0:  # thousands of fields
            fields |= {b"w%d" % i: b"v" * 100 for i in range(draw(st.integers(100, 5000)))}
        out.append((fields, kind, uid))
    return out


@settings(
    max_examples=25,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(entries=stream_entries())
def test_router_over_random_entries(redis_stack_server, pg_url, entries):
    """Every entry gets exactly one log row; valid signals are routed once per uid;
    junk is 'ignored'; no batch outgrows its budget; raw stays bounded."""
    event(f"{sum(max(map(len, f.values())) >= MB for f, _, _ in entries)} entries with a value of megabytes")
    event(f"{sum(len(f) > 100 for f, _, _ in entries)} entries with over 100 fields")
    asyncio.run(_route_random(redis_stack_server.url, pg_url, entries))


async def _route_random(redis_url: str, pg_url: str, entries) -> None:
    pool = await asyncpg.create_pool(pg_url, min_size=1, max_size=4)
    redis = make_redis(redis_url, decode_responses=False)
    router = None
    try:
        await apply_migrations(pool)
        await pool.execute(f"TRUNCATE {', '.join(DATA_TABLES)} RESTART IDENTITY CASCADE")
        await seed_config(pool)
        await redis.flushall()
        await core_io.ensure_groups(redis, {STREAM: (GROUP,)})
        ids = [(await redis.xadd(STREAM, fields)).decode() for fields, _, _ in entries]
        settings_ = load_settings({"REDIS_URL": redis_url, "POSTGRES_URL": pg_url, "STREAM_MAXLEN": "10000"})
        router = Measuring(settings_, pool, fast_options(batch_bytes=BUDGET, batch=7, consumer="prop"))
        task = asyncio.create_task(router.run())

        async def settled() -> bool:
            if task.done():
                task.result()
            n = await pool.fetchval("SELECT count(*) FROM signals_v2_log")
            return n >= len(ids) and (await redis.xpending(STREAM, GROUP))["pending"] == 0

        await until(settled, timeout=60)
        router.stop()
        await asyncio.wait_for(task, 10)

        rows = {r["stream_id"]: r for r in await pool.fetch("SELECT * FROM signals_v2_log")}
        assert sorted(rows) == sorted(ids)  # one row per entry, no other
        seen: set[str] = set()
        new_uids: Counter = Counter()
        for entry_id, (_, kind, uid) in zip(ids, entries):
            row = rows[entry_id]
            if kind == "junk":
                assert row["status"] == "ignored", (row["reason"], entry_id)
            else:
                assert row["status"] == ("duplicate" if uid in seen else "new"), row["reason"]
                assert row["uid"] == uid
                seen.add(uid)
                new_uids[uid] += row["status"] == "new"
        closes = {uid for (fields, kind, uid) in entries if kind == "valid" and b"close" in fields[b"message"].lower()}
        for strategy_id, want in ((1, set(new_uids)), (2, closes)):
            routed = [f[b"uid"].decode() for _, f in await redis.xrange(signals_io.strategy_stream(strategy_id))]
            assert sorted(routed) == sorted(want)  # each once
        assert max(router.batch_sizes) <= BUDGET and router.largest_batch_bytes <= BUDGET
        assert max(await raw_sizes(pool)) <= sl.RAW_MAX_BYTES
    finally:
        if router is not None:
            router.stop()
        await redis.aclose()
        await pool.close()
