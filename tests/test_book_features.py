"""Book features against the `orderflow-metrics` package (a test-only reference, MIT)
within 1e-12, on random books (hypothesis) and on the real recordings; and by hand
where the rule has an edge (ties, empty sides). No servers."""

from __future__ import annotations

import math

import orderflow_metrics as om
from hypothesis import given
from hypothesis import strategies as st
from orderflow_metrics.fairvalue import weighted_mid as om_weighted_mid
from orderflow_metrics.mlofi import BookSnapshot
from orderflow_metrics.mlofi import multi_level_ofi as om_multi_level_ofi
from orderflow_metrics.orderbook import Level as OmLevel
from orderflow_metrics.orderbook import OrderBook

from book.features import depth_imbalance, multi_level_ofi, ofi_step, weighted_mid
from book.sync import BookSync
from orderflow.fold import UNIT
from tests.test_book_sync import recorded

prices = st.integers(min_value=1, max_value=10**7).map(lambda p: p * 10_000)  # ticks of 0.0001
quantities = st.integers(min_value=0, max_value=10**12)


@st.composite
def quotes(draw) -> tuple[int, int, int, int]:
    bid = draw(prices)
    ask = bid + draw(st.integers(min_value=1, max_value=50)) * 10_000
    return bid, draw(quantities), ask, draw(quantities)


@st.composite
def books(draw, size: int = 12) -> tuple[list, list]:
    """(bids best first, asks best first), each side possibly short or empty."""
    mid = draw(prices) + 10**6
    bid_steps = draw(st.lists(st.integers(min_value=1, max_value=20), max_size=size))
    ask_steps = draw(st.lists(st.integers(min_value=1, max_value=20), max_size=size))
    bids, asks, price = [], [], mid
    for step in bid_steps:
        price -= step * 10_000
        bids.append((price, draw(st.integers(min_value=1, max_value=10**12))))
    price = mid
    for step in ask_steps:
        price += step * 10_000
        asks.append((price, draw(st.integers(min_value=1, max_value=10**12))))
    return [b for b in bids if b[0] > 0], asks


def as_quote(quote) -> om.L1Quote:
    bid, bid_qty, ask, ask_qty = quote
    return om.L1Quote(bid / UNIT, bid_qty / UNIT, ask / UNIT, ask_qty / UNIT)


def close(ours: float, theirs: float) -> bool:
    return math.isclose(ours, theirs, rel_tol=1e-12, abs_tol=1e-12)


@given(quotes(), quotes())
def test_level_one_ofi_equals_the_reference(prev, curr):
    assert close(ofi_step(prev, curr) / UNIT, om.ofi([as_quote(prev), as_quote(curr)]))


@given(books(), books())
def test_multi_level_ofi_equals_the_reference(prev, curr):
    def snapshot(book):
        bids, asks = book
        return BookSnapshot(
            [OmLevel(p / UNIT, q / UNIT) for p, q in bids], [OmLevel(p / UNIT, q / UNIT) for p, q in asks]
        )

    ours = multi_level_ofi(prev, curr, 10)
    theirs = om_multi_level_ofi(snapshot(prev), snapshot(curr), 10)
    assert len(ours) == 10 and all(close(a / UNIT, b) for a, b in zip(ours, theirs, strict=True))


@given(quotes())
def test_weighted_mid_equals_the_reference(quote):
    assert close(weighted_mid(quote), om_weighted_mid(as_quote(quote)))


@given(books())
def test_depth_imbalance_equals_the_reference(book):
    bids, asks = book
    reference = OrderBook()
    for price, qty in bids:
        reference.update("bid", price / UNIT, qty / UNIT)
    for price, qty in asks:
        reference.update("ask", price / UNIT, qty / UNIT)
    for levels in (1, 5, 10):
        assert close(depth_imbalance(bids, asks, levels), reference.imbalance(levels))


def test_ofi_rules_by_hand():
    q = (100, 5, 101, 7)
    assert ofi_step(q, q) == 5 - 5 + 7 - 7 == 0  # nothing changed: the terms cancel
    assert ofi_step(q, (100, 9, 101, 7)) == 4  # bid queue grew
    assert ofi_step(q, (99, 3, 101, 7)) == -5  # bid level gone: its queue left
    assert ofi_step(q, (100, 5, 102, 2)) == 7  # ask level gone: its queue left, a buying pressure
    assert ofi_step(q, (101, 2, 102, 4)) == 2 + 7  # bid improved, ask lifted
    assert multi_level_ofi(([(100, 5)], []), ([(100, 6)], [(101, 1)]), 2) == [0, 0]  # a side missing
    assert weighted_mid((100 * UNIT, 0, 102 * UNIT, 0)) == 101.0
    assert weighted_mid((100 * UNIT, 3, 102 * UNIT, 1)) == 101.5  # heavy bid: nearer the ask
    assert depth_imbalance([], [], 10) == 0.0 and depth_imbalance([(1, 4)], [(2, 1)], 1) == 0.6


def test_the_recordings_features_equal_the_reference():
    """Every synchronised BTCUSDT book of the recording, diff after diff."""
    snap, diffs, _ = recorded("BTCUSDT")
    sync = BookSync()
    sync.on_snapshot(snap)
    previous, compared = None, 0
    for d in diffs:
        if not sync.on_diff(d):
            continue
        top = sync.book.top(10)
        quote = (*top[0][0], *top[1][0])
        assert close(weighted_mid(quote), om_weighted_mid(as_quote(quote)))
        if previous is not None:
            prev_quote = (*previous[0][0], *previous[1][0])
            assert close(ofi_step(prev_quote, quote) / UNIT, om.ofi([as_quote(prev_quote), as_quote(quote)]))
            ours = multi_level_ofi(previous, top, 10)
            theirs = om_multi_level_ofi(
                BookSnapshot(*([OmLevel(p / UNIT, q / UNIT) for p, q in side] for side in previous)),
                BookSnapshot(*([OmLevel(p / UNIT, q / UNIT) for p, q in side] for side in top)),
                10,
            )
            assert all(close(a / UNIT, b) for a, b in zip(ours, theirs, strict=True))
            compared += 1
        previous = top
    assert compared > 8_000
