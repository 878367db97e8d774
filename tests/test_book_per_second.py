"""Per-second features from the seconds' bars (no servers): each field against its
definition (the reference package or the standard library), and the rules for seconds
missing a kind."""

from __future__ import annotations

import math
import statistics

import orderflow_metrics as om
from hypothesis import given
from hypothesis import strategies as st

from binance.book import BookTick
from book.per_second import FeatureState
from book.seconds import DepthSecond, TickerSecond, TradeSecond
from book.vpin import Vpin
from orderflow.fold import UNIT, AggTrade

T0 = 1_721_347_200_000


def ticker_second(ts: int, bid: int, bid_qty: int, ask: int, ask_qty: int) -> TickerSecond:
    bar = TickerSecond(ts)
    bar.add(BookTick(1, bid, bid_qty, ask, ask_qty, ts, ts), None)
    return bar


quotes = st.tuples(
    st.integers(min_value=100, max_value=10**6),
    st.integers(min_value=1, max_value=10**6),
    st.integers(min_value=1, max_value=50),
    st.integers(min_value=1, max_value=10**6),
)


@given(st.lists(quotes, min_size=1, max_size=90), st.integers(min_value=2, max_value=60))
def test_returns_and_volatility_follow_the_microprice(seconds, window):
    state = FeatureState(Vpin(UNIT), window)
    microprices, returns = [], []
    for k, (bid, bid_qty, spread, ask_qty) in enumerate(seconds):
        ticker = ticker_second(T0 + k * 1000, bid * UNIT, bid_qty * UNIT, (bid + spread) * UNIT, ask_qty * UNIT)
        features = state.second(T0 + k * 1000, None, ticker, None)
        quote = om.L1Quote(bid, bid_qty, bid + spread, ask_qty)
        assert math.isclose(features.microprice, om.weighted_mid(quote), rel_tol=1e-12)
        assert math.isclose(features.i1, om.depth_imbalance(quote), rel_tol=1e-12, abs_tol=1e-15)
        assert features.i10 is None and features.volume_imbalance is None and features.vpin is None
        if microprices:
            returns.append(math.log(features.microprice / microprices[-1]))
            assert features.log_return == returns[-1]
        else:
            assert features.log_return is None
        microprices.append(features.microprice)
        recent = returns[-window:]
        if len(recent) >= 2:
            assert math.isclose(features.volatility, statistics.stdev(recent), rel_tol=1e-9, abs_tol=1e-15)
        else:
            assert features.volatility is None


def test_trades_and_depth_only_seconds():
    state = FeatureState(Vpin(2 * UNIT, window=5))
    trades = TradeSecond(T0)
    for k, (qty, sold) in enumerate([(3, False), (1, True), (2, False)]):
        trade = AggTrade(k, 100 * UNIT + k, qty * UNIT, k, k, T0 + k, sold)
        trades.add(trade)
        state.vpin.add(trade.price, trade.qty, not sold)
    depth = DepthSecond(T0, ofi_l1=5 * UNIT, imbalance_1=0.25, imbalance_10=-0.5)
    features = state.second(T0, trades, None, depth, depth_quote=(100 * UNIT, UNIT, 102 * UNIT, 3 * UNIT))
    buys = [om.Trade(100, 3, "buy"), om.Trade(100, 1, "sell"), om.Trade(100, 2, "buy")]
    assert math.isclose(features.volume_imbalance, om.trade_imbalance(buys), rel_tol=1e-12)
    assert features.microprice == 100.5 and features.ofi == 5.0  # the depth book's best, the depth OFI
    assert (features.i1, features.i10) == (0.25, -0.5)
    assert features.vpin == state.vpin.exact() == (abs(2 * 2 - 2) + abs(2 * 1 - 2) + abs(2 * 2 - 2)) / 6
    assert state.second(T0 + 1000, None, None, None) is None  # nothing that second: no row
    quiet = state.second(T0 + 2000, TradeSecond(T0 + 2000), None, None)
    assert quiet.microprice is None and quiet.log_return is None and quiet.volume_imbalance is None
