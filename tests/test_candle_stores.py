"""Both Redis candle stores, each on the server it is made for, answer identically."""

from __future__ import annotations

from itertools import islice

import core_io
from candles import Bar
from connections import timeseries_problem
from infra import make_redis
from market_data import read_archive

KEY = ("LINKUSDT", "m1")


def archive_bars(symbol: str, count: int) -> list[Bar]:
    return [c.to_bar() for c in islice(read_archive(symbol), count)]


async def test_written_bars_read_back(store):
    bars = archive_bars("LINKUSDT", 100)
    await core_io.write_bars(store, {KEY: bars})
    assert (await store.read_last_many([KEY], 100))[KEY] == bars
    assert (await store.read_last_many([KEY], 7))[KEY] == bars[-7:]


async def test_rewrite_replaces_the_bar(store):
    bars = archive_bars("LINKUSDT", 5)
    await core_io.write_bars(store, {KEY: bars})
    corrected = Bar(bars[2].open_time, 1.0, 2.0, 0.5, 1.5, 42.0)
    await core_io.write_bars(store, {KEY: [corrected]})
    read = (await store.read_last_many([KEY], 10))[KEY]
    assert read == [*bars[:2], corrected, *bars[3:]]


async def test_only_the_last_bars_are_kept(store):
    bars = archive_bars("AVAXUSDT", 400)
    await core_io.write_bars(store, {("AVAXUSDT", "m1"): bars})
    read = (await store.read_last_many([("AVAXUSDT", "m1")], 1000))[("AVAXUSDT", "m1")]
    assert read[-250:] == bars[-250:]
    assert bars[0] not in read


async def test_missing_series_read_as_empty(store):
    assert (await store.read_last_many([("NOPEUSDT", "m5")], 10)) == {("NOPEUSDT", "m5"): []}


async def test_both_stores_return_identical_data(redis_stack_server, plain_redis_server):
    data = {(symbol, "m1"): archive_bars(symbol, 300) for symbol in ("ALGOUSDT", "NEARUSDT", "LTCUSDT")}
    data[("ALGOUSDT", "m5")] = [
        Bar(b.open_time * 5, b.open, b.high, b.low, b.close, b.volume) for b in data[("ALGOUSDT", "m1")][:50]
    ]
    answers = []
    for server, use_ts in ((redis_stack_server, True), (plain_redis_server, False)):
        client = make_redis(server.url)
        await client.flushall()
        store = core_io.make_candle_store(client, use_ts, bars_kept=250)
        for key, bars in data.items():  # in several batches, with an overlap
            await core_io.write_bars(store, {key: bars[:200]})
            await core_io.write_bars(store, {key: bars[150:]})
        answers.append(await store.read_last_many(list(data), 250))
        await client.aclose()
    assert answers[0] == answers[1]
    assert answers[0][("NEARUSDT", "m1")] == data[("NEARUSDT", "m1")][-250:]


async def test_timeseries_series_are_labelled_even_after_a_flush(redis):
    store = core_io.TimeSeriesCandleStore(redis, bars_kept=250)
    bars = archive_bars("FILUSDT", 3)
    await core_io.write_bars(store, {("FILUSDT", "m15"): bars[:1]})
    await redis.flushall()
    await core_io.write_bars(store, {("FILUSDT", "m15"): bars[1:]})
    info = await redis.execute_command("TS.INFO", "ohlcv:FILUSDT:m15:c")
    labels = dict(info["labels"])
    assert labels == {"symbol": "FILUSDT", "tf": "m15", "field": "c"}
    assert info["duplicatePolicy"] == "last"
    assert info["retentionTime"] == 250 * 900_000 - 1
    found = await redis.execute_command("TS.QUERYINDEX", "symbol=FILUSDT", "tf=m15")
    assert sorted(found) == [f"ohlcv:FILUSDT:m15:{f}" for f in sorted("ohlcv")]


async def test_timeseries_is_detected(redis, plain_redis):
    assert await timeseries_problem(redis) is None
    assert await timeseries_problem(plain_redis) == "no TimeSeries module"
