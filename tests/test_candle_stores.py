"""Both Redis candle stores, each on the server it is made for, answer identically."""

from __future__ import annotations

import asyncio
import contextlib
from decimal import Decimal
from itertools import islice

import hiredis
from hypothesis import given, settings
from hypothesis import strategies as st

import candle_stores
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


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.text(st.characters(codec="utf-8", exclude_characters="\r\n"), min_size=1, max_size=60),
        min_size=1,
        max_size=5,
    ),
    st.lists(st.integers(0, 2**62), max_size=20),
    st.booleans(),
    st.data(),
)
def test_a_packed_madd_is_what_hiredis_packs(keys, times, as_text, data):
    """The hand-built RESP of TS.MADD is byte for byte hiredis's packing of its arguments,
    for decimal text and floats, of any length (a key in any script)."""
    number = st.floats(allow_nan=False, allow_infinity=False)
    columns = [data.draw(st.lists(number, min_size=len(times), max_size=len(times))) for _ in keys]
    if as_text:
        columns = [[str(Decimal(repr(v))) + "0" * data.draw(st.integers(0, 300)) for v in c] for c in columns]
    arguments = ["TS.MADD"]
    for key, column in zip(keys, columns):
        for t, value in zip(times, column):
            arguments += [key, t, value if as_text else repr(value)]
    assert candle_stores.pack_madd(keys, times, columns).resp == hiredis.pack_command(tuple(arguments))


async def test_a_round_cancelled_mid_reply_leaves_no_reply_for_the_next_user(redis):
    """A task cancelled while its replies are on their way (a shutdown, a timeout around
    a publish) must not hand its connection back with them unread: the next command on
    it would read the old reply as its own."""
    await redis.set("feed_v4:test:value", "mine")
    round_trip = asyncio.create_task(
        candle_stores.execute_packed(redis, [["BLPOP", "feed_v4:test:empty", "0.3"], ["PING"]])
    )
    await asyncio.sleep(0.1)  # sent; Redis holds the BLPOP's reply for 0.3 s
    round_trip.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await round_trip
    await asyncio.sleep(0.4)  # the held replies would have arrived by now
    for _ in range(3):
        assert await redis.get("feed_v4:test:value") == "mine"
