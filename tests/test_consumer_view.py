"""What a consumer of Redis sees: indicator hashes with no empty field (an output without
a value on the hash's bar is absent), and candle announcements of warm-up history and
catch-up marked so that a consumer skips them with one comparison."""

from __future__ import annotations

import math
from itertools import islice

import pytest

import core_io
from candles import ms_to_datetime
from feed_and_aggregate import CandleIntake
from indicators import hashes
from market_data import read_archive
from restore_redis_from_pg import restore_redis_from_pg
from tests.indicator_reference import configure
from tests.test_indicators_worker import Running, store_in_chunks

SYMBOL = "LINKUSDT"
SUPERTREND = "SUPERT_7_3.0"


def assert_hash_is_clean(fields: dict[str, str], open_time: int) -> None:
    """No empty field, every field a float, open_time the given bar."""
    assert fields, "no hash"
    assert int(fields["open_time"]) == open_time
    for name, text in fields.items():
        assert text != "", name
        assert math.isfinite(float(text)), (name, text)


# --------------------------------------------------------------------------- pure


def test_latest_hash_commands_delete_the_outputs_without_a_value_first():
    commands = hashes.latest_hash_commands(
        "BTCUSDT", "m1", 60_000, ["EMA_9", "SUPERTl_7_3.0", "SUPERTs_7_3.0"], [b"1.5", b"", b"2.5"], ["OLD_1"]
    )
    key = core_io.indicator_key("BTCUSDT", "m1")
    assert commands == [
        ["HDEL", key, "OLD_1", "SUPERTl_7_3.0"],
        ["HSET", key, "open_time", 60_000, "EMA_9", b"1.5", "SUPERTs_7_3.0", b"2.5"],
    ]
    assert hashes.latest_hash_commands("BTCUSDT", "m1", 1, ["A"], [b"3"]) == [["HSET", key, "open_time", 1, "A", b"3"]]


def test_format_value_has_no_text_for_no_value():
    assert [hashes.format_value(v) for v in (None, math.nan, math.inf, -math.inf, 1.5, b"2", "")] == [
        "",
        "",
        "",
        "",
        "1.5",
        b"2",
        "",
    ]


# --------------------------------------------------------------------------- the hash script


async def test_the_script_deletes_no_value_outputs_and_never_keeps_an_older_bars_field(redis):
    cache = hashes.IndicatorCache(redis)
    key = core_io.indicator_key("BTCUSDT", "m1")
    await cache.write([("BTCUSDT", "m1", 1000, [("L", 1.0), ("S", math.nan), ("X", 5.0)])])
    assert await redis.hgetall(key) == {"open_time": "1000", "L": "1.0", "X": "5.0"}
    # The same bar merges (pandas-ta values come after the incremental ones) ...
    await cache.write([("BTCUSDT", "m1", 1000, [("P", 7.0), ("X", None)])])
    assert await redis.hgetall(key) == {"open_time": "1000", "L": "1.0", "P": "7.0"}
    # ... a newer bar replaces the whole hash: nothing of bar 1000 survives under 2000.
    await cache.write([("BTCUSDT", "m1", 2000, [("L", math.inf), ("S", 2.0)])])
    assert await redis.hgetall(key) == {"open_time": "2000", "S": "2.0"}
    await cache.write([("BTCUSDT", "m1", 1000, [("L", 3.0)])])  # older: refused
    assert await redis.hgetall(key) == {"open_time": "2000", "S": "2.0"}
    # Restore rebuilds even the same bar: exactly what PostgreSQL has for it.
    await cache.write([("BTCUSDT", "m1", 2000, [("L", 4.0)])], replace_same_bar=True)
    assert await redis.hgetall(key) == {"open_time": "2000", "L": "4.0"}


async def test_restore_writes_only_the_newest_bar_and_drops_older_fields(pool, redis):
    await core_io.enable_symbols(pool, [SYMBOL])
    m1 = list(islice(read_archive(SYMBOL), 30))
    await core_io.upsert_candles(pool, m1)
    ids = [r["id"] for r in await pool.fetch("SELECT id FROM indicator_instances_v4 WHERE timeframe = 'm1' LIMIT 2")]
    newest, older = m1[-1].open_time, m1[-2].open_time
    await core_io.upsert_indicator_values(
        pool,
        [
            core_io.IndicatorValue(ids[0], SYMBOL, "m1", newest, "A_1", 1.25),
            core_io.IndicatorValue(ids[1], SYMBOL, "m1", older, "B_1", 9.0),  # no value on the newest bar
        ],
    )
    key = core_io.indicator_key(SYMBOL, "m1")
    await redis.hset(key, mapping={"open_time": older, "A_1": "", "B_1": "8.0", "GONE_1": "3"})  # an older layout
    store = core_io.make_candle_store(redis, True, 250)
    await restore_redis_from_pg(pool, redis, store, 250)
    fields = await redis.hgetall(key)
    assert fields == {"open_time": str(newest), "A_1": "1.25"}
    assert_hash_is_clean(fields, newest)


# --------------------------------------------------------------------------- the worker


@pytest.mark.timeout(240)
async def test_worker_hashes_hold_no_empty_field_and_a_flipped_supertrend_line_is_gone(pool, redis):
    """Bar by bar: the hash holds the newest bar, only outputs with a value on it; when
    SuperTrend flips, the line that had a value on the previous bar is gone. EMA 200 on
    M15 (100 bars stored) never has a value: never a field."""
    await configure(pool, [("supertrend", {}), ("ema", {"length": "200"}), ("rsi", {})])
    await core_io.enable_symbols(pool, [SYMBOL])
    m1 = list(islice(read_archive(SYMBOL), 1800))
    intake = CandleIntake(pool, redis, core_io.make_candle_store(redis, True, 250), stream_maxlen=100_000)
    await store_in_chunks(intake, m1[:1500], 500)
    running = Running(pool, redis)
    key = core_io.indicator_key(SYMBOL, "m1")
    lines = ("SUPERTl_7_3.0", "SUPERTs_7_3.0")
    flips = 0
    try:
        await running.settle(redis)
        before = await redis.hgetall(key)
        assert_hash_is_clean(before, m1[1499].open_time)
        for candle in m1[1500:1800]:
            await intake.store_m1([candle])
            await running.settle(redis)
            fields = await redis.hgetall(key)
            assert_hash_is_clean(fields, candle.open_time)
            assert SUPERTREND in fields and sum(line in fields for line in lines) == 1, fields
            if [line in fields for line in lines] != [line in before for line in lines]:
                flips += 1
                gone = next(line for line in lines if line in before)
                assert gone not in fields
            before = fields
        m15 = await redis.hgetall(core_io.indicator_key(SYMBOL, "m15"))
        assert_hash_is_clean(m15, (m1[1799].open_time + 60_000) // 900_000 * 900_000 - 900_000)
        assert "EMA_200" not in m15 and "RSI_14" in m15
    finally:
        await running.crash()
    assert flips >= 2
    # What the hash holds is what PostgreSQL holds for that bar.
    rows = await pool.fetch(
        "SELECT v.param_name, v.value FROM indicator_values_v4 v JOIN indicator_instances_v4 i ON i.id = v.instance_id "
        "WHERE i.timeframe = 'm1' AND v.symbol = $1 AND v.open_time = $2",
        SYMBOL,
        ms_to_datetime(m1[1799].open_time),
    )
    assert {r["param_name"] for r in rows} == set(before) - {"open_time"}


# --------------------------------------------------------------------------- history announcements and progress


async def _events(redis, tf: str) -> list[dict[str, str]]:
    return [fields for _, fields in await redis.xrange(core_io.CANDLE_STREAMS[tf])]


@pytest.mark.timeout(120)
async def test_history_and_catch_up_are_announced_as_history_with_progress_lines(pool, redis, caplog, monkeypatch):
    """A first history (NEAR), a catch-up of old logged minutes (LINK) and a live minute
    repaired at once (LINK): the REST minutes and their buckets carry history=1, the live
    repair does not; the backfill logs progress lines (not a TTY) and one summary."""
    from fake_exchange import ArchiveSource, FakeExchange
    from tests.test_hardening_feed import _feed

    M1 = 60_000
    t0 = next(iter(read_archive("NEARUSDT"))).open_time
    now = t0 + 4000 * M1 + 30_000  # mid-minute: the minute before is the newest closed one
    exchange = FakeExchange(ArchiveSource(["NEARUSDT", "LINKUSDT"]), start_ms=now, speed=1)
    await exchange.start()
    monkeypatch.setenv("PROGRESS", "log")
    caplog.set_level("INFO", logger="BACKFILL")
    feed = await _feed(pool, redis, exchange, {"NEARUSDT", "LINKUSDT"})
    await core_io.ensure_groups(redis)
    backfiller = feed.backfiller
    backfiller.reporter.interval_s = 0.0  # a line per change (5 s in the daemon)
    last_closed = (now - M1) // M1 * M1 - M1
    try:
        backfiller.request_history("NEARUSDT", t0, last_closed)  # 3,999 minutes
        old = [("LINKUSDT", t0 + i * M1) for i in range(2000)]
        live = ("LINKUSDT", last_closed)
        await core_io.log_missing_m1(pool, [*old, live])
        for _ in range(10):
            if not await backfiller.fill_once():
                break
            # The fetched gap rows become 'backfilled' before the next round (what the
            # settler does in the background: a round that read them while its UPDATE
            # was on its way fetched them again, and the job counted them twice).
            settled, feed.intake.to_settle = feed.intake.to_settle, []
            await core_io.set_missing_status(pool, settled, "backfilled")
        intake = feed.intake
        while intake.buckets_due:
            due, intake.buckets_due = intake.buckets_due, set()
            await intake.aggregate(due)
        await intake.publish_held()
    finally:
        await feed.rest.close()
        await exchange.stop()

    m1 = await _events(redis, "m1")
    by_key = {(e["symbol"], int(e["open_time"])): e for e in m1}
    assert len([k for k in by_key if k[0] == "NEARUSDT"]) == 3999
    assert all(e.get("history") == "1" for k, e in by_key.items() if k[0] == "NEARUSDT")
    assert all(by_key[key].get("history") == "1" for key in old)
    assert "history" not in by_key[live]  # repaired within two minutes of its close: live
    m15 = await _events(redis, "m15")
    assert m15 and all(e.get("history") == "1" for e in m15 if e["symbol"] == "NEARUSDT")
    # One comparison skips them: what a consumer acting on fresh bars sees.
    fresh = [e for e in m1 if e.get(core_io.HISTORY_FIELD) != core_io.HISTORY_VALUE]
    assert [(e["symbol"], int(e["open_time"])) for e in fresh] == [live]

    lines = [r.getMessage() for r in caplog.records if r.name == "BACKFILL" and r.levelname == "INFO"]
    progress = [line for line in lines if "symbols done" in line]
    assert progress, lines
    assert all("minutes (" in line and "REST weight" in line and "ETA" in line for line in progress)
    assert any("/6,000 minutes" in line for line in progress), progress
    (summary,) = [line for line in lines if " done: " in line]
    assert summary.startswith("REST history/catch-up done: 2 symbols, 6,000 minutes, REST weight ")
    weight = int(summary.split("REST weight ")[1].split(",")[0].replace(",", ""))
    assert weight >= 3 * 10  # at least three 1,500-row requests of weight 10
