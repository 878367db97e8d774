"""Book features against the `orderflow-metrics` package (a test-only reference, MIT)
within 1e-12, on random books (hypothesis) and on the real recordings; and by hand
where the rule has an edge (ties, empty sides). No servers."""

from __future__ import annotations

import importlib
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
from book.vpin import Vpin, normal_cdf
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


# --------------------------------------------------------------------------- VPIN


def reference_vpin(buckets) -> float:
    """The package's VPIN over our buckets, with its Φ taken through math.erf (it uses
    Abramowitz & Stegun 7.1.26, error up to 1.5e-7: the one difference, README)."""
    om_vpin = importlib.import_module("orderflow_metrics.vpin")  # the module (the package exports its function)
    saved = om_vpin.standard_normal_cdf
    om_vpin.standard_normal_cdf = normal_cdf
    try:
        return om_vpin.vpin([om_vpin.VolumeBucket(b.price_change / UNIT, b.volume / UNIT) for b in buckets])
    finally:
        om_vpin.standard_normal_cdf = saved


trades = st.lists(
    st.tuples(st.integers(min_value=1, max_value=10**6), st.integers(min_value=1, max_value=10**4), st.booleans()),
    min_size=1,
    max_size=300,
)


@given(trades, st.integers(min_value=1, max_value=5 * 10**4), st.integers(min_value=1, max_value=60))
def test_vpin_buckets_keep_every_unit_and_bulk_vpin_equals_the_reference(tape, bucket_volume, window):
    vpin = Vpin(bucket_volume * UNIT // 1000, window)
    closed = bought_total = 0
    for price, qty, bought in tape:
        closed += vpin.add(price * 10_000, qty * UNIT // 1000, bought)
        bought_total += qty if bought else 0
    total = sum(q for _, q, _ in tape) * UNIT // 1000
    assert closed * vpin.bucket_volume + vpin.filled == total
    assert len(vpin.buckets) == min(closed, window)
    if closed:
        assert close(vpin.bulk(), reference_vpin(vpin.buckets))
        assert 0.0 <= vpin.exact() <= 1.0
    else:
        assert vpin.bulk() is None and vpin.exact() is None


def test_vpin_by_hand():
    vpin = Vpin(10, window=2)
    assert vpin.add(100, 4, True) == 0
    assert vpin.add(101, 16, False) == 2  # fills the first (4 bought + 6 sold), then a whole sold one
    assert [(b.price_change, b.buy_volume) for b in vpin.buckets] == [(1, 4), (0, 0)]
    assert vpin.filled == 0 and vpin.exact() == (abs(8 - 10) + abs(0 - 10)) / 20
    vpin.add(99, 10, True)  # a third bucket: the window keeps the newest two
    assert [b.price_change for b in vpin.buckets] == [0, -2] and vpin.exact() == (10 + 10) / 20
    flat = Vpin(10, window=3)
    for _ in range(3):
        flat.add(100, 10, True)
    assert flat.bulk() == 0.0  # no price change: σ = 0, every bucket half bought
