"""Pure feed logic on real frames: parsing, bucket maths, aggregation, gap detection."""

from __future__ import annotations

import json
from decimal import Decimal
from itertools import islice

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregation import GapTracker, RecentCandles, affected_buckets, aggregate, buildable
from backfill import contiguous_ranges
from binance.protocol import (
    FrameError,
    KlineUpdate,
    MarkPrices,
    Reply,
    closed_rest_klines,
    klines_weight,
    parse_frame,
)
from candle_publisher import widen
from candles import Candle, bucket_start
from market_data import SHARED_DATA_DIR, read_archive

FRAMES = SHARED_DATA_DIR / "ws_frames"
T0 = 1_769_904_000_000


def test_every_2021_kline_frame_parses():
    for capture in ("fstream_2021-07-22", "fstream_2021-04-17"):
        lines = (FRAMES / capture / "kline_1m_frames.jsonl").read_text().splitlines()
        updates = [parse_frame(json.loads(line)["raw"]) for line in lines]
        assert updates and all(isinstance(u, KlineUpdate) for u in updates)
        assert all(u.open_time % 60_000 == 0 for u in updates)
        assert all(u.candle is not None for u in updates if u.closed)
    closes = [u for u in updates if u.closed]
    assert all(u.event_time >= u.open_time + 59_999 for u in closes)


def test_2026_kline_frame_keeps_exact_decimals():
    raw = (FRAMES / "fstream_2026-10-07" / "stream_btcusdt_kline_1m.json").read_text()
    assert parse_frame(raw).candle is None  # forming updates are not converted unless asked
    update = parse_frame(raw, forming_candle=True)
    assert isinstance(update, KlineUpdate) and not update.closed
    candle = update.candle
    assert (candle.symbol, candle.open, candle.close, candle.volume) == (
        "BTCUSDT",
        Decimal("83084.90"),
        Decimal("83091.60"),
        Decimal("13.551"),
    )
    assert candle.trades == 1027 and candle.quote_volume == Decimal("1125714.73960")
    k = orjson.loads(raw)["data"]["k"]
    assert (update.first_trade_id, update.last_trade_id) == (k["f"], k["L"]) and k["L"] > k["f"] > 0


def test_mark_price_frames_of_every_schema_parse():
    arr = parse_frame((FRAMES / "fstream_2026-10-07" / "stream_all_markPrice_arr_1s.json").read_text())
    assert isinstance(arr, MarkPrices) and arr.prices["XAUUSDT"] == "4103.92233180"
    for line in (FRAMES / "misc_real_frames_with_provenance.jsonl").read_text().splitlines():
        message = parse_frame(json.loads(line)["raw"])
        assert isinstance(message, (MarkPrices, KlineUpdate))


def test_dated_contract_mark_price_with_empty_funding_rate():
    frame = '{"e":"markPriceUpdate","E":1769904030000,"s":"BTCUSDT_260327","p":"83000.1","r":"","T":0,"st":1,"zz":[1]}'
    assert parse_frame(frame).prices == {"BTCUSDT_260327": "83000.1"}


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        ("{not json", "not JSON"),
        ("[1,2]", "not a JSON object"),
        ('{"stream":"btcusdt@kline_1m","data":{"e":"kline","E":1769904030000,"s":"BTCUSDT"}}', "without a 'k'"),
        (
            '{"stream":"btcusdt@kline_1m","data":{"e":"kline","E":1769904030000,"k":{"t":1769904000000,"s":"BTCUSDT","x":true,'
            '"o":"1","h":"1","l":"1","c":"abc","v":"1","n":1}}}',
            "field c is not a decimal",
        ),
        (
            '{"stream":"btcusdt@kline_1m","data":{"e":"kline","E":1769904030000,"k":{"t":1769904000001,"s":"BTCUSDT","x":true}}}',
            "not a whole minute",
        ),
        (
            '{"stream":"btcusdt@kline_1m","data":{"e":"kline","E":1769904030000,"k":{"t":1769904000000,"s":"BTCUSDT","x":"yes"}}}',
            "'x' is not a boolean",
        ),
        (
            '{"stream":"ethusdt@kline_1m","data":{"e":"kline","E":1769904030000,"k":{"t":1769904000000,"s":"BTCUSDT","x":true,'
            '"o":"1","h":"1","l":"1","c":"1","v":"1","n":1}}}',
            "on stream",
        ),
        ('{"stream":"btcusdt@depth","data":{"e":"depthUpdate"}}', "unknown event"),
        ('{"stream":"x","data":{"e":"markPriceUpdate","s":"BTCUSDT","p":"NaN"}}', "out of range"),
    ],
)
def test_malformed_frames_are_rejected_with_a_reason(frame, reason):
    with pytest.raises(FrameError, match=reason):
        parse_frame(frame)


def test_subscription_replies_are_recognised():
    assert parse_frame('{"result":null,"id":7}') == Reply(7, None, None)
    assert parse_frame('{"result":["btcusdt@kline_1m"],"id":8}').result == ["btcusdt@kline_1m"]


def test_rest_rows_drop_the_forming_candle():
    rows = json.loads((FRAMES / "fstream_2026-10-07" / "rest_klines_BTCUSDT_1m_limit2.json").read_text())
    closed = closed_rest_klines("BTCUSDT", rows, server_now_ms=rows[1][6])  # second row closes at now
    assert [c.open_time for c in closed] == [rows[0][0]]
    assert closed[0].close == Decimal("83084.90") and closed[0].trades == 4409
    assert len(closed_rest_klines("BTCUSDT", rows, server_now_ms=rows[1][6] + 1)) == 2


def test_weights_follow_the_documented_table():
    assert [klines_weight(n) for n in (1, 99, 100, 499, 500, 1000, 1001, 1500)] == [1, 1, 2, 2, 5, 5, 10, 10]


def test_buckets_are_aligned_to_the_epoch():
    t = T0 + 7 * 60_000  # 00:07
    assert bucket_start(t, "m5") == T0 + 5 * 60_000
    assert bucket_start(t, "m15") == T0
    assert bucket_start(T0 + 14 * 60_000 + 59_999, "m15") == T0
    assert affected_buckets([("X", t)]) == {("X", "m5", T0 + 300_000), ("X", "m15", T0)}


def test_aggregation_is_exact_on_real_rows():
    m1 = list(islice(read_archive("LINKUSDT"), 15))
    m15 = aggregate("m15", T0, m1)
    assert m15.open == m1[0].open and m15.close == m1[-1].close
    assert m15.high == max(c.high for c in m1) and m15.low == min(c.low for c in m1)
    assert m15.volume == sum((c.volume for c in m1), Decimal(0))
    assert m15.trades == sum(c.trades for c in m1) and m15.m1_count == 15
    assert str(m15.volume) == str(sum((Decimal(str(c.volume)) for c in m1), Decimal(0)))


def test_recent_candles_build_the_buckets_they_complete_and_keep_two_buckets():
    m1 = list(islice(read_archive("LINKUSDT"), 75))  # five quarter hours from T0
    recent = RecentCandles(("m5", "m15", "h1"))
    recent.remember(m1[:14])
    assert recent.completed_buckets(m1[:14]) == [aggregate("m5", T0, m1[:5]), aggregate("m5", T0 + 300_000, m1[5:10])]
    recent.forget_m1(m1[13])  # refused by PostgreSQL: no bucket is built with it
    recent.remember([m1[14]])
    assert [b.tf for b in recent.completed_buckets([m1[14]])] == []
    recent.remember(m1[13:60])
    built = recent.completed_buckets([m1[59]])
    assert [(b.tf, b.open_time) for b in built] == [("m5", T0 + 55 * 60_000), ("m15", T0 + 45 * 60_000)]
    assert recent.parts_in_memory(("LINKUSDT", "h1", T0), {}) is None  # the M15s were never stored
    recent.remember_parts([aggregate("m15", T0 + q * 900_000, m1[15 * q : 15 * q + 15]) for q in range(4)])
    assert recent.completed_buckets([m1[59]])[-1] == aggregate("h1", T0, m1[:60])
    assert not recent.may_end(("LINKUSDT", "h1", T0 + 3_600_000)) and recent.may_end(("LINKUSDT", "h1", T0))
    recent.remember(m1[60:75])
    kept = recent.m1["LINKUSDT"]
    assert len(kept) <= recent.RECENT_M1_KEPT and min(kept) == T0 + 30 * 60_000 and max(kept) == T0 + 74 * 60_000


# Few values, each written several ways (1.5, 1.50, 1.500): ties between representations are common.
_DECIMAL = st.builds(
    lambda value, zeros: Decimal(value + "0" * zeros if "." in value else value),
    st.sampled_from(["0", "0.7", "1.5", "2", "2.25", "1000.125"]),
    st.integers(0, 3),
)


@st.composite
def _minutes(draw: st.DrawFn) -> list[Candle]:
    size = draw(st.integers(1, 15))
    fields = [draw(st.lists(_DECIMAL, min_size=size, max_size=size)) for _ in range(8)]
    trades = draw(st.lists(st.integers(0, 10**6), min_size=size, max_size=size))
    return [
        Candle(
            "X", "m1", T0 + i * 60_000, *(f[i] for f in fields[:5]), fields[5][i], trades[i], fields[6][i], fields[7][i]
        )
        for i in range(size)
    ]


@settings(max_examples=300, deadline=None)
@given(_minutes())
def test_aggregation_matches_its_definition_field_by_field(m1):
    """The one-pass aggregate against the definition, as text (so an equal value written
    differently, 1.5 against 1.50, must come from the same minute as max/min pick it)."""
    m15 = aggregate("m15", T0, m1)
    zero = Decimal(0)
    expected = [
        m1[0].open,
        max(c.high for c in m1),
        min(c.low for c in m1),
        m1[-1].close,
        sum((c.volume for c in m1), m1[0].volume * 0),
        sum((c.quote_volume for c in m1), m1[0].quote_volume * 0),
        sum(c.trades for c in m1),
        sum((c.taker_buy_volume for c in m1), zero * m1[0].taker_buy_volume),
        sum((c.taker_buy_quote_volume for c in m1), zero * m1[0].taker_buy_quote_volume),
    ]
    got = [m15.open, m15.high, m15.low, m15.close, m15.volume, m15.quote_volume, m15.trades]
    got += [m15.taker_buy_volume, m15.taker_buy_quote_volume]
    assert [str(v) for v in got] == [str(v) for v in expected]
    assert (m15.tf, m15.open_time, m15.m1_count) == ("m15", T0, len(m1))


def test_a_bucket_waits_for_missing_but_not_for_unfillable_minutes():
    present = {T0 + i * 60_000 for i in range(5) if i != 2}
    assert not buildable("m5", T0, present, set())
    assert buildable("m5", T0, present, {T0 + 120_000})
    assert not buildable("m5", T0, set(), {T0 + i * 60_000 for i in range(5)})


def test_gap_tracker_reports_skipped_and_overdue_minutes():
    tracker = GapTracker(grace_ms=10_000)
    assert tracker.on_close("A", T0) == []
    assert tracker.on_close("A", T0 + 60_000) == []
    assert tracker.on_close("A", T0 + 4 * 60_000) == [T0 + 120_000, T0 + 180_000]
    assert tracker.on_close("A", T0 + 2 * 60_000) == []  # late close: no new gap
    tracker.on_close("B", T0)
    # B's next minute closes at T0+120000; with 10 s grace it is overdue only after that.
    assert tracker.overdue(T0 + 130_000) == {}
    assert tracker.overdue(T0 + 130_001) == {"B": [T0 + 60_000]}
    assert tracker.overdue(T0 + 130_001) == {}  # reported once


def test_contiguous_ranges_split_at_holes_and_limits():
    minutes = [("A", T0 + i * 60_000) for i in (0, 1, 2, 5, 6)] + [("B", T0)]
    assert contiguous_ranges(minutes, 1500) == [
        ("A", T0, T0 + 120_000),
        ("A", T0 + 300_000, T0 + 360_000),
        ("B", T0, T0),
    ]
    assert len(contiguous_ranges([("A", T0 + i * 60_000) for i in range(3001)], 1500)) == 3


def test_what_is_let_go_is_kept_as_one_range_per_series():
    ranges: dict = {}
    for t in (300, 120, 600, 180):
        widen(ranges, "NEARUSDT", t, t)
    widen(ranges, "LINKUSDT", 60, 120)
    widen(ranges, "NEARUSDT", 60, 90)  # a range put back after a failed write
    assert ranges == {"NEARUSDT": (60, 600), "LINKUSDT": (60, 120)}
