"""The read API's pure parts: parameter checks, WebSocket channels, Redis hashes as
answers, and the per-client limits (a property test of the token bucket)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from web.limits import ConnectionCounts, RequestBuckets
from web.params import BadRequest, channel_param, range_query, subscription_request, tf_param
from web.shapes import float_or_none, indicator_row, merge_indicator_rows, orderflow_from_hash

KNOWN = {"BTCUSDT", "ETHUSDT"}


def test_a_range_query_is_normalised_and_bounded():
    q = range_query({"symbol": " btcusdt ", "tf": "M5", "limit": "10", "end": "1700000000000"}, KNOWN)
    assert (q.symbol, q.tf, q.limit, q.end) == ("BTCUSDT", "m5", 10, 1_700_000_000_000)
    q = range_query({"symbol": "ETHUSDT"}, KNOWN)
    assert (q.tf, q.limit, q.end) == ("m1", 500, None)
    assert range_query({"symbol": "ETHUSDT"}, KNOWN, max_limit=100).limit == 100
    with pytest.raises(BadRequest, match="unknown parameter"):
        range_query({"symbol": "ETHUSDT", "tf": "m1"}, KNOWN, with_tf=False)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("candles:btcusdt:M1", "candles:BTCUSDT:m1"),
        ("footprint:ETHUSDT:m15", "footprint:ETHUSDT:m15"),
        ("BOOK:BTCUSDT", "book:BTCUSDT"),
        ("features:ethusdt", "features:ETHUSDT"),
    ],
)
def test_channels_are_normalised(text, expected):
    assert channel_param(text, KNOWN) == expected


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("candles:BTCUSDT", "use <kind>"),
        ("book:BTCUSDT:m1", "use <kind>"),
        ("trades:BTCUSDT:m1", "use <kind>"),
        ("candles:DOGEUSDT:m1", "not an enabled ticker"),
        ("candles:BTCUSDT:h4", "is not one of"),
        (42, "a channel is a string"),
        ("x" * 65, "a channel is a string"),
    ],
)
def test_bad_channels_are_refused_with_the_reason(text, reason):
    with pytest.raises(BadRequest, match=reason):
        channel_param(text, KNOWN)


def test_higher_timeframes_are_served_where_built():
    built = ("m1", "m5", "m15", "h1", "h4", "d1")
    assert channel_param("candles:BTCUSDT:H4", KNOWN, built) == "candles:BTCUSDT:h4"
    assert channel_param("footprint:BTCUSDT:d1", KNOWN, built) == "footprint:BTCUSDT:d1"  # none will come
    assert tf_param({"tf": "D1"}, built) == "d1"
    with pytest.raises(BadRequest, match="'d1' is not one of m1, m5, m15"):  # this process builds the default
        range_query({"symbol": "BTCUSDT", "tf": "d1"}, KNOWN)


def test_subscription_messages():
    assert subscription_request({"unsubscribe": ["book:BTCUSDT"]}, KNOWN) == ("unsubscribe", ["book:BTCUSDT"])
    for bad in ([], {"subscribe": "book:BTCUSDT"}, {"subscribe": [], "unsubscribe": []}, {"watch": []}):
        with pytest.raises(BadRequest, match="send"):
            subscription_request(bad, KNOWN)


def test_redis_hashes_become_answers_with_null_never_empty_strings():
    assert float_or_none(b"1.5") == 1.5 and float_or_none("") is None and float_or_none("nan") is None
    assert float_or_none("inf") is None and float_or_none(None) is None and float_or_none("x") is None
    assert indicator_row({}) is None
    row = indicator_row({b"open_time": b"60000", b"EMA_9": b"1.25", b"RSI_14": b""})
    assert row == {"open_time": 60000, "values": {"EMA_9": 1.25, "RSI_14": None}}
    flow = orderflow_from_hash({"open_time": "60000", "vwap": "", "delta": "-1.5", "trades": "12", "first_agg_id": ""})
    assert flow == {"open_time": 60000, "vwap": None, "delta": "-1.5", "trades": 12, "first_agg_id": None}


def test_indicator_rows_merge_redis_newest_bar_and_name_every_output():
    stored = [(1, {"EMA_9": 1.0}), (2, {"EMA_9": 2.0, "RSI_14": 50.0})]
    latest = {"open_time": 3, "values": {"EMA_9": 3.0, "MACD": None}}
    rows = merge_indicator_rows(stored, latest, None)
    assert [r["open_time"] for r in rows] == [1, 2, 3]
    assert rows[0]["values"] == {"EMA_9": 1.0, "MACD": None, "RSI_14": None}
    assert merge_indicator_rows(stored, latest, 2)[-1]["open_time"] == 2  # past `end`: left out
    same = {"open_time": 2, "values": {"EMA_9": 9.0}}
    assert merge_indicator_rows(stored, same, None)[-1]["values"]["EMA_9"] == 2.0  # PostgreSQL's row kept


@given(st.lists(st.floats(min_value=0, max_value=5, allow_nan=False), min_size=1, max_size=200))
def test_the_bucket_never_lets_more_through_than_burst_plus_rate_times_time(gaps):
    buckets = RequestBuckets(rate=4.0, burst=10)
    now, allowed = 0.0, 0
    for gap in gaps:
        now += gap
        allowed += buckets.take("client", now) == 0.0
        assert allowed <= 10 + 4.0 * now + 1e-9
    assert buckets.take("other", now) == 0.0  # one client's use never limits another


def test_the_bucket_says_how_long_to_wait_and_forgets_idle_clients():
    buckets = RequestBuckets(rate=2.0, burst=2, max_clients=3)
    assert buckets.take("a", 0.0) == 0.0 and buckets.take("a", 0.0) == 0.0
    assert buckets.take("a", 0.0) == pytest.approx(0.5)
    assert buckets.take("a", 0.5) == 0.0
    for i, client in enumerate("bcdefg"):
        buckets.take(client, 10.0 + i)
    assert len(buckets) <= 3


def test_connection_counts_per_client_and_in_all():
    counts = ConnectionCounts(per_client=2, total=3)
    assert counts.refusal("a") is None and counts.refusal("a") is None
    assert "per client" in counts.refusal("a")
    assert counts.refusal("b") is None
    assert "limit of 3" in counts.refusal("c")
    counts.release("a")
    assert counts.refusal("c") is None and counts.open == 3
