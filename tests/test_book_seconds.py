"""One-second bars (no servers): the series' rules by hand, and the real recordings'
trade and book ticker seconds against an independent recomputation from the raw
events (decimals, grouped by their exchange time)."""

from __future__ import annotations

import math
from collections import defaultdict
from decimal import ROUND_HALF_EVEN, Decimal
from fractions import Fraction

import orjson
from orderflow_metrics.mlofi import BookSnapshot
from orderflow_metrics.mlofi import multi_level_ofi as om_multi_level_ofi
from orderflow_metrics.orderbook import Level as OmLevel

from binance.book import BookTick, parse_book_ticker_frame
from binance.trades import agg_trades_of
from book.features import depth_imbalance
from book.seconds import OFI_LEVELS, DepthSecond, SecondSeries, TickerSecond, TradeSecond
from book.sync import BookSync
from market_data import recorded_agg_trades, recorded_book_frames
from orderflow.fold import UNIT, AggTrade, units_text
from tests.test_book_sync import recorded

T0 = 1_721_347_200_000
RANGE = Fraction(1)  # ±1 % of the mid


def trade(at: int, price: int = 100 * UNIT, qty: int = UNIT, sold: bool = False) -> AggTrade:
    return AggTrade(at, price, qty, at, at, at, sold)


def test_a_second_closes_on_a_later_event_or_the_exchanges_clock_and_late_events_are_counted():
    series = SecondSeries(TradeSecond)
    for at in (T0 + 10, T0 + 990):
        series.bar_for(at).add(trade(at))
    series.bar_for(T0 + 3_000).add(trade(T0 + 3_000))  # seconds 1 and 2 had nothing: no bars
    assert [(b.ts, b.agg_trades) for b in series.take()] == [(T0, 2)]
    assert series.bar_for(T0 + 500) is None and series.late == 1  # its second is closed
    series.close_through(T0 + 4_000 + 49, grace_ms=50)
    assert series.take() == [] and series.open_bar is not None  # still within the grace
    series.close_through(T0 + 4_050, grace_ms=50)
    assert [b.ts for b in series.take()] == [T0 + 3_000] and series.open_bar is None
    assert series.bar_for(T0 + 3_999) is None and series.late == 2
    assert series.bar_for(T0 + 4_000) is not None  # the next second opens
    finished = []
    depth = SecondSeries(DepthSecond, finished.append)
    depth.bar_for(T0 + 100).add(([], []), ([], []), 7)
    depth.roll_to(T0 + 900)  # the same second: stays open
    assert not finished
    depth.roll_to(T0 + 1_000)  # a later one: finished before the book changes
    assert [b.last_update_id for b in finished] == [7] and depth.open_bar is None


def test_trade_seconds_by_hand():
    bar = TradeSecond(T0)
    bar.add(trade(T0, 100 * UNIT, 2 * UNIT))
    bar.add(trade(T0 + 1, 103 * UNIT, UNIT, sold=True))
    bar.add(trade(T0 + 2, 99 * UNIT, UNIT))
    assert (bar.open, bar.high, bar.low, bar.close) == (100 * UNIT, 103 * UNIT, 99 * UNIT, 99 * UNIT)
    assert (bar.buy_volume, bar.sell_volume, bar.agg_trades) == (3 * UNIT, UNIT, 3)
    assert bar.vwap() == Decimal("100.5")


def test_recorded_trade_seconds_equal_a_recomputation_from_the_raw_trades():
    for symbol in ("BTCUSDT", "ETHUSDT"):
        payloads = list(recorded_agg_trades(symbol))
        series = SecondSeries(TradeSecond)
        for t in agg_trades_of(orjson.dumps(payloads)):
            bar = series.bar_for(t.time_ms)
            assert bar is not None  # the recording is in time order
            bar.add(t)
        series.close_through(payloads[-1]["T"] + 10_000, grace_ms=0)
        ours = {b.ts: b for b in series.take()}
        expected: dict[int, dict] = defaultdict(lambda: {"prices": [], "buy": Decimal(0), "sell": Decimal(0)})
        for p in payloads:
            second = expected[p["T"] // 1000 * 1000]
            second["prices"].append(Decimal(p["p"]))
            second["buy" if not p["m"] else "sell"] += Decimal(p["q"])
            second["notional"] = second.get("notional", Decimal(0)) + Decimal(p["p"]) * Decimal(p["q"])
        assert set(ours) == set(expected) and len(ours) > 400
        for ts, e in expected.items():
            bar = ours[ts]
            prices = e["prices"]
            got = [Decimal(units_text(v)) for v in (bar.open, bar.high, bar.low, bar.close)]
            assert got == [prices[0], max(prices), min(prices), prices[-1]], ts
            assert Decimal(units_text(bar.buy_volume)) == e["buy"] and Decimal(units_text(bar.sell_volume)) == e["sell"]
            vwap = (e["notional"] / (e["buy"] + e["sell"])).quantize(Decimal("1e-8"), ROUND_HALF_EVEN)
            assert bar.vwap() == vwap and bar.agg_trades == len(prices)


def test_recorded_book_ticker_seconds_equal_a_recomputation():
    series = SecondSeries(TickerSecond)
    before: BookTick | None = None
    raw: list[dict] = []
    for kind, text in recorded_book_frames("BTCUSDT"):
        if kind != "bookTicker":
            continue
        _, tick = parse_book_ticker_frame(text)
        raw.append(orjson.loads(text)["data"])
        bar = series.bar_for(tick.event_ms)
        if bar is not None:
            bar.add(tick, before)
        before = tick
    series.close_through(raw[-1]["E"] + 10_000, grace_ms=0)
    ours = {b.ts: b for b in series.take()}
    assert series.late == 0  # E never goes back in the recording
    by_second: dict[int, list[dict]] = defaultdict(list)
    for event in raw:
        by_second[event["E"] // 1000 * 1000].append(event)
    assert set(ours) == set(by_second)
    previous = None
    for ts in sorted(by_second):
        events, bar = by_second[ts], ours[ts]
        bids, asks = [Decimal(e["b"]) for e in events], [Decimal(e["a"]) for e in events]
        got = [Decimal(units_text(v)) for v in (bar.bid_open, bar.bid_high, bar.bid_low, bar.bid_close)]
        assert got == [bids[0], max(bids), min(bids), bids[-1]]
        got = [Decimal(units_text(v)) for v in (bar.ask_open, bar.ask_high, bar.ask_low, bar.ask_close)]
        assert got == [asks[0], max(asks), min(asks), asks[-1]]
        assert bar.updates == len(events) and bar.last_update_id == events[-1]["u"]
        mean_spread = sum(a - b for a, b in zip(asks, bids, strict=True)) / len(events)
        assert math.isclose(bar.mean_spread(), float(mean_spread), rel_tol=1e-12)
        last = events[-1]
        b, a, bq, aq = (Decimal(last[k]) for k in ("b", "a", "B", "A"))
        assert abs(Decimal(bar.microprice_close()) - (b * aq + a * bq) / (bq + aq)) < Decimal("1e-9")
        ofi = Decimal(0)
        for event in events:  # Cont, Kukanov & Stoikov, in decimals
            if previous is not None:
                pb, pbq, pa, paq = (Decimal(previous[k]) for k in ("b", "B", "a", "A"))
                cb, cbq, ca, caq = (Decimal(event[k]) for k in ("b", "B", "a", "A"))
                ofi += (cbq if cb >= pb else 0) - (pbq if cb <= pb else 0)
                ofi += (paq if ca >= pa else 0) - (caq if ca <= pa else 0)
            previous = event
        assert Decimal(units_text(abs(bar.ofi))) * (1 if bar.ofi >= 0 else -1) == ofi, ts


def test_recorded_depth_seconds_equal_a_recomputation_from_the_synchronised_books():
    """Each second's OFI is the sum of its diffs' per-level OFI (the reference package's
    multi-level OFI); its imbalances and depth in range are the last book's."""
    snap, diffs, _ = recorded("BTCUSDT")
    sync = BookSync()
    sync.on_snapshot(snap)
    series = SecondSeries(DepthSecond, lambda bar: bar.finish(sync.book, RANGE))
    before = sync.book.top(OFI_LEVELS)
    expected: dict[int, dict] = {}
    for k, d in enumerate(diffs):
        series.roll_to(d.event_ms)  # the second before is finished on the book its diffs left
        if not sync.on_diff(d):
            continue
        after = sync.book.top(OFI_LEVELS)
        series.bar_for(d.event_ms).add(before, after, d.last_id)
        second = expected.setdefault(d.event_ms // 1000 * 1000, {"l1": 0.0, "l10": 0.0})
        levels = om_multi_level_ofi(snapshot_of(before), snapshot_of(after), OFI_LEVELS)
        second["l1"] += levels[0]
        second["l10"] += sum(levels)
        if k + 1 == len(diffs) or diffs[k + 1].event_ms // 1000 != d.event_ms // 1000:  # the second's last
            mid = (after[0][0][0] + after[1][0][0]) / 2 / UNIT
            bids, asks = sync.book.levels()
            second["bid_range"] = sum(q for p, q in bids if p / UNIT >= mid * 0.99) / UNIT
            second["ask_range"] = sum(q for p, q in asks if p / UNIT <= mid * 1.01) / UNIT
        second["i10"] = depth_imbalance(*after, 10)
        second["u"] = d.last_id
        before = after
    series.close_through(diffs[-1].event_ms + 10_000, grace_ms=0)
    ours = {b.ts: b for b in series.take()}
    assert set(ours) == set(expected) and len(ours) > 400
    for ts, e in expected.items():
        bar = ours[ts]
        assert math.isclose(bar.ofi_l1 / UNIT, e["l1"], rel_tol=1e-9, abs_tol=1e-9)
        assert math.isclose(bar.ofi_l10 / UNIT, e["l10"], rel_tol=1e-9, abs_tol=1e-9)
        assert math.isclose(bar.bid_depth_in_range / UNIT, e["bid_range"], rel_tol=1e-12)
        assert math.isclose(bar.ask_depth_in_range / UNIT, e["ask_range"], rel_tol=1e-12)
        assert bar.imbalance_10 == e["i10"] and bar.last_update_id == e["u"]


def snapshot_of(top) -> BookSnapshot:
    return BookSnapshot(*([OmLevel(p / UNIT, q / UNIT) for p, q in side] for side in top))
