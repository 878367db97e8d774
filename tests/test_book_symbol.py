"""A symbol's one-second bars from its events (book/symbol.py, no servers): the real
2024-07-19 recordings through `SymbolSeconds` against a plain recomputation grouped by
the events' own seconds; holes where events may be lost, never a partial bar."""

from __future__ import annotations

from collections import defaultdict
from fractions import Fraction
from functools import cache

from binance.book import BookTick, depth_snapshot_of, parse_book_ticker_frame, parse_depth_frame
from book.features import ofi_step
from book.seconds import SECOND_MS
from book.symbol import Second, SymbolSeconds
from market_data import recorded_agg_trades, recorded_book_frames
from orderflow.fold import AggTrade, to_units


def _trade(row: dict) -> AggTrade:
    return AggTrade(row["a"], to_units(row["p"]), to_units(row["q"]), row["f"], row["l"], row["T"], row["m"])


@cache
def events(symbol: str) -> tuple[list, list[AggTrade]]:
    """The book messages in the order received, and the trades (as aggTrades)."""
    book = []
    for kind, text in recorded_book_frames(symbol):
        if kind == "snapshot":
            book.append(("snapshot", depth_snapshot_of(text)))
        elif kind == "bookTicker":
            book.append(("tick", parse_book_ticker_frame(text)[1]))
        else:
            book.append(("diff", parse_depth_frame(text)[1]))
    return book, [_trade(row) for row in recorded_agg_trades(symbol)]


def run(symbol: str, kinds=("trades", "ticker", "depth"), lose_at: int | None = None) -> tuple[SymbolSeconds, list]:
    """Everything through one SymbolSeconds, trades merged in by time; the clock moves
    with the book events; `lose_at`: the ticker stream loses its events at that time."""
    state = SymbolSeconds(symbol, frozenset(kinds), Fraction(1), vpin_bucket=10 * 10**8)
    book, trades = events(symbol)
    out: list[Second] = []
    at = 0
    clock = 0
    lost = False
    for kind, event in book:
        if kind == "snapshot":
            state.on_snapshot(event)
            continue
        time_ms = event.event_ms
        while at < len(trades) and trades[at].time_ms <= time_ms:
            state.on_trade(trades[at])
            at += 1
        if kind == "tick":
            if lose_at is not None and not lost and time_ms >= lose_at:
                lost = True
                state.lost("ticker")
            state.on_tick(event)
        else:
            state.on_diff(event)
        clock = max(clock, time_ms)
        out += state.close_through(clock)
    return state, out


def test_seconds_come_out_once_each_in_order_after_the_first_of_each_kind():
    _, seconds = run("BTCUSDT")
    stamps = [s.ts for s in seconds]
    assert stamps == sorted(set(stamps)) and len(stamps) > 400
    book, _ = events("BTCUSDT")
    first_tick = min(e.event_ms for k, e in book if k == "tick")
    assert all(s.ticker is None or s.ticker.ts > first_tick - first_tick % SECOND_MS for s in seconds)
    assert all(s.features is not None for s in seconds[5:])  # after the start-up hole, every second


def test_book_ticker_bars_equal_a_plain_recomputation_by_event_second():
    _, seconds = run("BTCUSDT", kinds=("ticker",))
    book, _ = events("BTCUSDT")
    ticks: dict[int, list[BookTick]] = defaultdict(list)
    for kind, event in book:
        if kind == "tick":
            ticks[event.event_ms - event.event_ms % SECOND_MS].append(event)
    previous: BookTick | None = None
    expected = {}
    for ts in sorted(ticks):
        group = ticks[ts]
        ofi = 0
        for tick in group:
            if previous is not None:
                ofi += ofi_step(
                    (previous.bid, previous.bid_qty, previous.ask, previous.ask_qty),
                    (tick.bid, tick.bid_qty, tick.ask, tick.ask_qty),
                )
            previous = tick
        bids = [t.bid for t in group]
        last = group[-1]
        expected[ts] = (bids[0], max(bids), min(bids), bids[-1], last.ask_qty, len(group), ofi, last.update_id)
    got = {
        s.ts: (b.bid_open, b.bid_high, b.bid_low, b.bid_close, b.ask_qty_close, b.updates, b.ofi, b.last_update_id)
        for s in seconds
        if (b := s.ticker) is not None
    }
    first, last = min(expected), max(expected)
    assert first not in got  # its earlier events may not have been received
    assert set(got) == set(expected) - {first, last}  # the last second is still open
    assert all(got[ts] == expected[ts] for ts in got)


def test_trade_bars_equal_the_trades_of_each_second():
    _, seconds = run("BTCUSDT", kinds=("trades", "ticker"))
    _, trades = events("BTCUSDT")
    by_second: dict[int, list[AggTrade]] = defaultdict(list)
    for trade in trades:
        by_second[trade.time_ms - trade.time_ms % SECOND_MS].append(trade)
    checked = 0
    for second in seconds:
        if second.trades is None:
            assert second.ts not in by_second or second.ts == min(by_second)
            continue
        group = by_second[second.ts]
        bar = second.trades
        assert bar.agg_trades == len(group)
        assert bar.buy_volume == sum(t.qty for t in group if not t.buyer_maker)
        assert bar.sell_volume == sum(t.qty for t in group if t.buyer_maker)
        assert (bar.open, bar.close) == (group[0].price, group[-1].price)
        checked += 1
    assert checked > 300


def test_depth_bars_follow_the_synchronised_book_and_features_read_them():
    state, seconds = run("BTCUSDT", kinds=("ticker", "depth"))
    assert state.sync.state == "synced" and state.sync.resyncs == 0
    depth = [s for s in seconds if s.depth is not None]
    assert len(depth) > 300
    assert all(-1 <= s.depth.imbalance_10 <= 1 and s.depth.bid_depth_in_range > 0 for s in depth)
    ids = [s.depth.last_update_id for s in depth]
    assert ids == sorted(ids)
    for second in depth:
        if second.features is not None:
            assert second.features.i10 == second.depth.imbalance_10
            assert second.features.i1 == second.depth.imbalance_1


def test_a_lost_stream_leaves_a_hole_of_whole_seconds_and_the_other_kinds_stand():
    _, whole = run("ETHUSDT", kinds=("ticker", "depth"))
    book, _ = events("ETHUSDT")
    ticks = [e.event_ms for k, e in book if k == "tick"]
    lose_at = ticks[len(ticks) // 2]
    state, holed = run("ETHUSDT", kinds=("ticker", "depth"), lose_at=lose_at)
    hole = lose_at - lose_at % SECOND_MS
    by_ts = {s.ts: s for s in holed}
    assert state.dropped["ticker"] >= 1
    assert by_ts[hole].ticker is None and by_ts[hole].features is None  # dropped, not partial
    assert by_ts[hole].depth is not None  # depth's bar of that second is whole
    reference = {s.ts: s for s in whole}
    for ts, second in by_ts.items():
        if second.ticker is not None:
            assert second.ticker == reference[ts].ticker
        assert second.depth == reference[ts].depth


def test_before_the_first_trade_seconds_have_features_and_the_first_trades_second_none():
    """Trades come on the feed's open connection: the seconds before the first trade had
    none; the first trade's second may miss earlier trades: no bar, no features."""
    state = SymbolSeconds("BTCUSDT", frozenset({"trades", "ticker"}), Fraction(1), None)
    out: list[Second] = []
    for second in range(8):
        for step in range(4):
            t = second * SECOND_MS + 100 + step * 200
            state.on_tick(BookTick(second * 10 + step, 100 * 10**8, 10**8, 101 * 10**8, 2 * 10**8, t, t))
            if second >= 3 and step == 1:
                state.on_trade(AggTrade(second, 100 * 10**8, 10**8, second, second, t, second % 2 == 0))
            out += state.close_through(t)
    by_ts = {s.ts // SECOND_MS: s for s in out}
    assert 0 not in by_ts  # the ticker's first second: dropped, and no other bar
    assert by_ts[1].features is not None and by_ts[2].features is not None  # no trades: none missed
    assert by_ts[1].features.volume_imbalance is None
    assert by_ts[3].trades is None and by_ts[3].features is None  # the first trade's second
    assert by_ts[4].trades is not None and by_ts[4].features.volume_imbalance == -1.0  # m: the taker sold
    assert by_ts[5].features.volume_imbalance == 1.0
