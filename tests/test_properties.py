"""Property-based tests (hypothesis) of what comes from outside: exchange frames, the
intake fed with them, and indicator configuration. Whatever arrives, the parser answers
a message or a FrameError; the pipeline keeps storing and announcing every other
symbol's candles with bounded memory; a configuration runs or is refused with a reason."""

from __future__ import annotations

import asyncio
import json
from itertools import islice
from typing import Any

import numpy as np
import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import core_io
from binance.protocol import (
    EARLIEST_MS,
    LATEST_MS,
    MAX_TRADES_PER_MINUTE,
    FrameError,
    KlineUpdate,
    MarkPrices,
    Reply,
    check_candle,
    parse_frame,
    parse_general_frame,
)
from feed_and_aggregate import Feed, FeedSettings
from indicators import slow
from indicators.kernels import BarArrays
from indicators.registry import COMMON, IndicatorConfigError, parse_common
from infra import load_settings, make_redis
from market_data import read_archive
from migrations import apply_migrations

NEAR = list(islice(read_archive("NEARUSDT"), 30))
LINK = list(islice(read_archive("LINKUSDT"), 30))
REAL_CLOSE = orjson.loads(
    orjson.dumps(
        {
            "stream": "linkusdt@kline_1m",
            "data": {
                "e": "kline",
                "E": LINK[0].open_time + 61_000,
                "s": "LINKUSDT",
                "k": {
                    "t": LINK[0].open_time,
                    "T": LINK[0].open_time + 59_999,
                    "s": "LINKUSDT",
                    "i": "1m",
                    "o": str(LINK[0].open),
                    "c": str(LINK[0].close),
                    "h": str(LINK[0].high),
                    "l": str(LINK[0].low),
                    "v": str(LINK[0].volume),
                    "n": LINK[0].trades,
                    "x": True,
                    "q": str(LINK[0].quote_volume),
                    "V": str(LINK[0].taker_buy_volume),
                    "Q": str(LINK[0].taker_buy_quote_volume),
                },
            },
        }
    )
)

# Values an attacker or a broken relay would put in a field.
NASTY_NUMBERS = st.sampled_from(
    [0, -1, 1, 2**31, 2**63, -(2**63), 10**30, LATEST_MS, LINK[0].open_time * 1000, 1.5, float("inf")]
)
NASTY_TEXT = st.sampled_from(
    ["", "NaN", "-1", "1e999999", "0", "0.0", "1" * 50, "\x00", "💥", "12.5", "1e-999999", " 7 ", "-0", "Infinity"]
)
ANY_VALUE = st.recursive(
    st.none() | st.booleans() | st.integers() | NASTY_NUMBERS | st.text(max_size=20) | NASTY_TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
K_FIELDS = ["t", "T", "s", "i", "o", "c", "h", "l", "v", "n", "x", "q", "V", "Q"]


@st.composite
def mutated_close(draw, symbol: str = "LINKUSDT") -> bytes:
    """A real closing frame with some fields replaced, removed or retyped."""
    frame = orjson.loads(orjson.dumps(REAL_CLOSE))
    data = frame["data"]
    data["s"] = data["k"]["s"] = symbol
    data["k"]["x"] = draw(st.booleans())  # forming or closing
    frame["stream"] = f"{symbol.lower()}@kline_1m"
    for _ in range(draw(st.integers(1, 4))):
        levels: list[tuple[dict, list[str]]] = [(frame, ["stream", "data"])]
        if isinstance(frame.get("data"), dict):
            levels.append((frame["data"], ["E", "e", "s", "k"]))
            if isinstance(frame["data"].get("k"), dict):
                levels += [(frame["data"]["k"], K_FIELDS)] * 3
        target, keys = draw(st.sampled_from(levels))
        key = draw(st.sampled_from(keys))
        if draw(st.booleans()):
            target[key] = draw(ANY_VALUE)
        else:
            target.pop(key, None)
    return dumps(frame)


def dumps(value: Any) -> bytes:
    """JSON as a relay might write it: big integers and non-finite floats included."""
    return json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")


FRAMES = st.one_of(
    mutated_close(),
    st.binary(max_size=200),
    st.text(max_size=200).map(str.encode),
    ANY_VALUE.map(dumps),
    st.builds(lambda data: dumps({"stream": "x", "data": data}), ANY_VALUE),
)


@settings(max_examples=600, deadline=None)
@given(raw=FRAMES)
def test_any_frame_parses_to_a_plausible_message_or_a_frame_error(raw):
    try:
        message = parse_frame(raw, forming_candle=True)
    except FrameError:
        return
    assert isinstance(message, KlineUpdate | MarkPrices | Reply)
    if isinstance(message, KlineUpdate) and message.candle is not None:
        candle = check_candle(message.candle)
        assert 0 <= candle.trades <= MAX_TRADES_PER_MINUTE
        assert candle.open_time % 60_000 == 0 and candle.open_time < LATEST_MS
        assert message.event_time == 0 or candle.open_time <= message.event_time < LATEST_MS
    if isinstance(message, MarkPrices):
        assert all(float(price) > 0 for price in message.prices.values())


# --------------------------------------------------------------------------- the intake


async def _run_intake_example(pg_url: str, redis_url: str, bad_frames: list[bytes]) -> None:
    pool = await __import__("asyncpg").create_pool(pg_url, min_size=1, max_size=4)
    redis = make_redis(redis_url)
    try:
        await apply_migrations(pool)
        await pool.execute("TRUNCATE ohlcv4_m1, ohlcv4_m5, ohlcv4_m15, missing_m1_log_v4, system_log_v4")
        await redis.flushall()
        settings_ = load_settings({"REDIS_URL": redis_url, "POSTGRES_URL": pg_url})
        feed = Feed(settings_, FeedSettings(), pool, redis, core_io.make_candle_store(redis, True, 250))
        feed.symbols = await feed.ownership.claim({"NEARUSDT", "LINKUSDT"})  # the leases: what it may write
        feed.clock.sync(NEAR[-1].open_time + 61_000)
        intake = feed.intake
        workers = [
            asyncio.create_task(w())
            for w in (feed.intake_loop, intake.run_aggregator, intake.run_publisher, intake.run_settler)
        ]
        try:
            for index, candle in enumerate(NEAR):
                for raw in bad_frames[index :: len(NEAR)]:
                    feed.handle_frame(raw)
                feed.handle_frame(orjson.dumps(closing(candle)))
            deadline = asyncio.get_running_loop().time() + 20
            while feed.batch or not feed.closed.empty() or intake.buckets_due or intake.aggregating or intake.held:
                assert asyncio.get_running_loop().time() < deadline, "the intake did not drain"
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.05)
            for task in workers:
                assert not task.done(), task
            stored = await core_io.fetch_candles(pool, "NEARUSDT", "m1", NEAR[0].open_time, NEAR[-1].open_time + 1)
            assert stored == NEAR
            m15 = await core_io.fetch_candles(pool, "NEARUSDT", "m15", NEAR[0].open_time, NEAR[-1].open_time + 1)
            assert len(m15) == 2
            announced = await core_io.announced_candles(redis, core_io.CANDLE_STREAMS["m1"])
            assert {t for s, t in announced if s == "NEARUSDT"} == {c.open_time for c in NEAR}
            assert len(feed.ahead) <= feed.HELD_FRAMES_MAX and len(feed.new_gaps) < 10_000
            assert feed.clock.now_ms <= NEAR[-1].open_time + 61_000 + feed.clock.tolerance_ms
        finally:
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            await feed.rest.close()
    finally:
        await redis.aclose()
        await pool.close()


def closing(candle) -> dict[str, Any]:
    frame = orjson.loads(orjson.dumps(REAL_CLOSE))
    k = frame["data"]["k"]
    frame["stream"] = f"{candle.symbol.lower()}@kline_1m"
    frame["data"].update({"s": candle.symbol, "E": candle.open_time + 61_000})
    k.update(
        t=candle.open_time, T=candle.open_time + 59_999, s=candle.symbol, o=str(candle.open), c=str(candle.close),
        h=str(candle.high), l=str(candle.low), v=str(candle.volume), n=candle.trades, q=str(candle.quote_volume),
        V=str(candle.taker_buy_volume), Q=str(candle.taker_buy_quote_volume),
    )  # fmt: skip
    return frame


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bad_frames=st.lists(st.one_of(mutated_close("LINKUSDT"), FRAMES), min_size=1, max_size=120))
def test_adversarial_frames_never_hold_up_another_symbols_candles(pg_url, redis_stack_server, bad_frames):
    asyncio.run(_run_intake_example(pg_url, redis_stack_server.url, bad_frames))


# --------------------------------------------------------------------------- indicator configuration

PARAM_NAMES = sorted({name for spec in COMMON.values() for name in spec.params} | {"source", "mamode", "talib"})
PARAM_TEXT = st.one_of(
    st.integers(-5, 20_000).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["1e300", "-1e300", "inf", "nan", "", " ", "2.5", "0", "True", "close", "hl2", "x" * 200]),
    st.text(max_size=10),
)
RNG = np.random.default_rng(3)
CLOSE = 100 + np.cumsum(RNG.normal(0, 1, 400))
BARS = BarArrays(
    np.arange(400, dtype=np.int64) * 60_000 + 1_767_225_600_000,
    CLOSE + RNG.normal(0, 0.2, 400),
    CLOSE + 2,
    CLOSE - 2,
    CLOSE,
    RNG.random(400) * 100,
)


@settings(max_examples=800, deadline=None)
@given(
    indicator=st.sampled_from(sorted(COMMON)),
    params=st.dictionaries(st.sampled_from(PARAM_NAMES), PARAM_TEXT, max_size=4),
)
def test_any_configuration_of_a_common_indicator_runs_or_is_refused_with_a_reason(indicator, params):
    try:
        instance = parse_common(1, indicator, "m1", 1, params)
    except IndicatorConfigError as exc:
        assert str(exc)
        return
    if instance is None:
        return  # pandas-ta's to run (see the next test)
    kernel = instance.make_kernel()
    outputs = kernel.fill(BARS, None) if instance.anchored else kernel.fill(BARS)  # type: ignore[call-arg]
    assert len(outputs) == len(instance.names) and all(len(o) == BARS.size for o in outputs)
    values = kernel.step((101.0, 103.0, 99.0, 102.0, 5.0, int(BARS.open_time[-1]) + 60_000))
    assert len(values) == len(instance.names)


@settings(max_examples=60, deadline=None)
@given(
    indicator=st.sampled_from(["hma", "kama", "zlma", "ichimoku", "squeeze", "aroon", "nope", "cmo", "trix"]),
    params=st.dictionaries(
        st.sampled_from(["length", "fast", "slow", "tenkan", "lenght", "scalar"]), PARAM_TEXT, max_size=3
    ),
)
def test_any_pandas_ta_configuration_is_described_or_refused_with_a_reason(indicator, params):
    try:
        kwargs, names = slow.describe(indicator, params)
    except IndicatorConfigError as exc:
        assert str(exc)
        return
    assert names and set(kwargs) == set(params)


def _outcome(parse, raw: str | bytes, forming_candle: bool) -> object:
    try:
        return parse(raw, forming_candle)
    except FrameError:
        return FrameError


# Values close to what the fast path must get right: a field at or just past its bound,
# another symbol's stream, a reply's keys.
_T = LINK[0].open_time
EDGE_VALUES = {
    ("frame", "stream"): ["LINKUSDT@kline_1m", "nearusdt@kline_1m", "linkusdt@kline_5m", "linkusdt", ""],
    ("frame", "id"): [1, None],
    ("frame", "result"): [None],
    ("data", "E"): [0, _T - 1, _T, _T + 86_400_000, _T + 86_400_001, LATEST_MS, True],
    ("data", "s"): ["", "NEARUSDT", "linkusdt", 5],
    ("data", "e"): ["Kline", "markPriceUpdate"],
    ("k", "s"): ["", "NEARUSDT", "link usdt", None],
    ("k", "t"): [_T + 1, _T - 60_000, EARLIEST_MS - 60_000, LATEST_MS, float(_T), str(_T)],
    ("k", "i"): ["5m", "", None],
    ("k", "x"): [0, 1, "true", None],
    ("k", "n"): [-1, MAX_TRADES_PER_MINUTE, MAX_TRADES_PER_MINUTE + 1, 1.0, "7"],
    ("k", "o"): ["0", "-1", "1" * 41, "NaN", 9.98, "9.9820"],
    ("k", "h"): ["9.973", "1e15", "Infinity"],
    ("k", "q"): ["1e9"],
    ("k", "V"): ["0"],
    ("k", "Q"): ["1e9", None],
    ("k", "f"): [-1, 0, -2, 2**63, 1.0, "7", None],
    ("k", "L"): [-1, 0, -2, 1.0],
}


@st.composite
def kline_variant(draw) -> str | bytes:
    """A real forming or closing frame with one to three fields at an edge, removed or garbled."""
    frame = orjson.loads(orjson.dumps(REAL_CLOSE))
    frame["data"]["k"]["x"] = draw(st.booleans())
    for _ in range(draw(st.integers(1, 3))):
        (level, key), values = draw(st.sampled_from(list(EDGE_VALUES.items())))
        target = {"frame": frame, "data": frame["data"], "k": frame["data"]["k"]}[level]
        choice = draw(st.sampled_from(["edge", "edge", "edge", "remove", "any"]))
        if choice == "edge":
            target[key] = draw(st.sampled_from(values))
        elif choice == "remove":
            target.pop(key, None)
        else:
            target[key] = draw(ANY_VALUE)
    raw = dumps(frame)
    return raw.decode("utf-8", "surrogateescape") if draw(st.booleans()) else raw


def _outcome(parse, raw: str | bytes, forming_candle: bool) -> object:
    try:
        return parse(raw, forming_candle)
    except FrameError:
        return FrameError


@settings(max_examples=2500, deadline=None)
@given(raw=kline_variant(), forming_candle=st.booleans())
def test_the_kline_fast_path_agrees_with_the_general_parse(raw, forming_candle):
    """The typed decoder takes most frames; whatever it accepts, the general parse
    accepts with the same result, and what that refuses it refuses too."""
    assert _outcome(parse_frame, raw, forming_candle) == _outcome(parse_general_frame, raw, forming_candle)
