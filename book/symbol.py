"""One symbol's book and one-second bars, from its events to finished seconds. Pure.

Each kind (trades, book ticker, depth) keeps its own `SecondSeries`; a second is
finished once every kind the symbol takes has moved past it: an event of a later second
of that kind, or the exchange's clock past the second's end by that kind's grace (a
trade is pushed up to 100 ms after it happened, the book streams at once). Finished
seconds come out in time order with their features.

What could make a bar wrong is never written: when a kind's events may have been lost
(a reconnect of its route, a jump in aggTrade ids, a broken depth chain, a resync), its
open second is thrown away and so is the first second after it (whose first events may
be missing): a hole, counted in `dropped`, never a partial bar. The seconds of a kind's
hole get no features either (they would be computed without that kind), while the other
kinds' bars of those seconds are written.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Literal

from binance.book import BookTick, DepthDiff, DepthSnapshot
from book.per_second import Features, FeatureState
from book.seconds import OFI_LEVELS, SECOND_MS, DepthSecond, SecondSeries, TickerSecond, TradeSecond
from book.sync import BookSync
from book.vpin import Vpin
from orderflow.fold import AggTrade

Kind = Literal["trades", "ticker", "depth"]
KINDS: tuple[Kind, ...] = ("trades", "ticker", "depth")


@dataclass(frozen=True, slots=True)
class Second:
    """A finished second of one symbol: its bars (None: no event of that kind) and features."""

    symbol: str
    ts: int
    trades: TradeSecond | None
    ticker: TickerSecond | None
    depth: DepthSecond | None
    features: Features | None  # None in a hole of one of the symbol's kinds


@dataclass
class KindState:
    kind: Kind
    series: SecondSeries
    grace_ms: int
    passed: int = -1  # newest second this kind will give no (more) bar for
    broken: bool = False  # events may have been lost: the next event's second is dropped
    hole_from: int | None = 0  # the first second of the current or last hole (None: from the first event's)
    drop_through: int = -1  # bars of seconds up to this one are thrown away

    def in_hole(self, ts: int) -> bool:
        if self.hole_from is None or ts < self.hole_from:
            return False
        return self.broken or ts <= self.drop_through


@dataclass
class SymbolSeconds:
    symbol: str
    kinds: frozenset[Kind]
    range_pct: Fraction
    vpin_bucket: int | None  # units of base asset; None: no VPIN (no volume history)
    trade_grace_ms: int = 150
    book_grace_ms: int = 30
    vpin_window: int = 50
    volatility_window: int = 60
    sync: BookSync = field(default_factory=BookSync)
    state: dict[Kind, KindState] = field(default_factory=dict)
    pending: dict[int, list] = field(default_factory=dict)  # ts -> [trades, ticker, depth]
    second_trades: dict[int, list[AggTrade]] = field(default_factory=dict)  # VPIN's input, per second
    last_tick: BookTick | None = None
    last_agg_id: int | None = None
    features: FeatureState | None = None
    depth_quotes: dict[int, tuple[int, int, int, int]] = field(default_factory=dict)  # at each depth second's end
    dropped: dict[Kind, int] = field(default_factory=dict)
    book_changed: bool = False  # the depth filter has something new to publish

    def __post_init__(self) -> None:
        self.features = FeatureState(Vpin(self.vpin_bucket or 1, self.vpin_window), self.volatility_window)
        makers: dict[Kind, tuple[Callable[[int], object], Callable | None, int]] = {
            "trades": (TradeSecond, None, self.trade_grace_ms),
            "ticker": (TickerSecond, None, self.book_grace_ms),
            "depth": (DepthSecond, self._finish_depth, self.book_grace_ms),
        }
        for kind in self.kinds:
            make, finish, grace = makers[kind]
            # Before its first event a book stream was not connected yet: a hole. Trades come
            # on the feed's connection, already open: the seconds before the first trade had
            # none, and only the first trade's second (its earlier trades may be missed) is one.
            hole_from = None if kind == "trades" else 0
            self.state[kind] = KindState(kind, SecondSeries(make, finish), grace, broken=True, hole_from=hole_from)  # type: ignore[arg-type]
        self.dropped = dict.fromkeys(self.kinds, 0)

    def start_vpin(self, bucket: int) -> None:
        """VPIN from now on, with buckets of `bucket` units (a symbol without one had none)."""
        assert self.features is not None
        self.vpin_bucket = bucket
        self.features.vpin = Vpin(bucket, self.vpin_window)

    # ------------------------------------------------------------------ events

    def on_trade(self, trade: AggTrade) -> None:
        state = self.state.get("trades")
        if state is None:
            return
        if self.last_agg_id is not None and trade.agg_id <= self.last_agg_id:
            return  # a repeat (a reconnect's overlap)
        if self.last_agg_id is not None and trade.agg_id != self.last_agg_id + 1:
            self.lost("trades")
        self.last_agg_id = trade.agg_id
        bar = self._bar_for(state, trade.time_ms)
        if bar is not None:
            bar.add(trade)
            self.second_trades.setdefault(bar.ts, []).append(trade)

    def on_tick(self, tick: BookTick) -> None:
        state = self.state.get("ticker")
        if state is None:
            return
        bar = self._bar_for(state, tick.event_ms)
        if bar is not None:
            bar.add(tick, self.last_tick)
        self.last_tick = tick

    def on_diff(self, diff: DepthDiff) -> None:
        state = self.state.get("depth")
        if state is None:
            return
        sync = self.sync
        if sync.state != "synced":
            sync.on_diff(diff)
            return
        book = sync.book
        assert book is not None
        state.series.roll_to(diff.event_ms)  # the closing bar reads the book before this diff
        self._settle(state)
        before = book.top(OFI_LEVELS)
        if not sync.on_diff(diff):
            self.lost("depth")  # a broken chain: resynchronised from a new snapshot
            return
        self.book_changed = True
        bar = self._bar_for(state, diff.event_ms)
        if bar is not None:
            bar.add(before, book.top(OFI_LEVELS), diff.last_id)

    def on_snapshot(self, snapshot: DepthSnapshot) -> None:
        if self.sync.on_snapshot(snapshot):
            self.book_changed = True

    def lost(self, kind: Kind) -> None:
        """Events of `kind` may be missing from here back to the last one received."""
        state = self.state.get(kind)
        if state is None:
            return
        if state.broken:
            return
        open_bar = state.series.open_bar
        if open_bar is not None:
            state.hole_from = open_bar.ts
            state.drop_through = max(state.drop_through, open_bar.ts)
            state.series.open_bar = None
            state.series.newest_closed = max(state.series.newest_closed, open_bar.ts)
            state.passed = max(state.passed, open_bar.ts)
            self.dropped[kind] += 1
            self.depth_quotes.pop(open_bar.ts, None)
        else:
            state.hole_from = state.passed + SECOND_MS
        state.broken = True
        if kind == "ticker":
            self.last_tick = None  # OFI needs the quote just before: unknown now
        if kind == "trades":
            self.last_agg_id = None

    def reconnected(self, kinds: frozenset[Kind]) -> None:
        for kind in kinds:
            self.lost(kind)
        if "depth" in kinds and "depth" in self.state:
            self.sync = BookSync(resyncs=self.sync.resyncs, stale_snapshots=self.sync.stale_snapshots)

    def _bar_for(self, state: KindState, time_ms: int):
        ts = time_ms - time_ms % SECOND_MS
        if state.broken:
            state.broken = False
            state.drop_through = max(state.drop_through, ts)
            if state.hole_from is None:
                state.hole_from = ts
        bar = state.series.bar_for(time_ms)
        self._settle(state)
        state.passed = max(state.passed, ts - SECOND_MS)
        return bar

    def _finish_depth(self, bar: DepthSecond) -> None:
        if self.sync.book is not None:
            bar.finish(self.sync.book, self.range_pct)
            quote = _best_quote(self.sync)
            if quote is not None:
                self.depth_quotes[bar.ts] = quote

    def _settle(self, state: KindState) -> None:
        """Closed bars of a kind into the pending seconds (or the bin, when dropped)."""
        if not state.series.closed:
            return
        index = KINDS.index(state.kind)
        for bar in state.series.take():
            if bar.ts <= state.drop_through:
                self.dropped[state.kind] += 1
                if index == 0:
                    self.second_trades.pop(bar.ts, None)
                self.depth_quotes.pop(bar.ts, None)
                continue
            self.pending.setdefault(bar.ts, [None, None, None])[index] = bar

    # ------------------------------------------------------------------ finishing

    def close_through(self, clock_ms: int) -> list[Second]:
        """The exchange's clock is at `clock_ms`: the seconds every kind has passed, in order."""
        for state in self.state.values():
            state.series.close_through(clock_ms, state.grace_ms)
            self._settle(state)
            end = clock_ms - state.grace_ms
            state.passed = max(state.passed, end - end % SECOND_MS - SECOND_MS)
        through = min(state.passed for state in self.state.values())
        done = sorted(ts for ts in self.pending if ts <= through)
        finished = []
        for ts in done:
            trades, ticker, depth = self.pending.pop(ts)
            finished.append(self._finish(ts, trades, ticker, depth))
        for ts in [t for t in self.second_trades if t <= through]:
            del self.second_trades[ts]  # a dropped second's trades never reach VPIN
        for ts in [t for t in self.depth_quotes if t <= through]:
            del self.depth_quotes[ts]
        return finished

    def _finish(self, ts: int, trades, ticker, depth) -> Second:
        state = self.features
        assert state is not None
        if self.vpin_bucket:
            for trade in self.second_trades.pop(ts, ()):
                state.vpin.add(trade.price, trade.qty, not trade.buyer_maker)
        quote = self.depth_quotes.pop(ts, None) if ticker is None else None
        features = state.second(ts, trades, ticker, depth, quote)
        if features is not None and not self.vpin_bucket:
            features = dataclasses.replace(features, vpin=None, vpin_bulk=None)
        if any(kind.in_hole(ts) for kind in self.state.values()):
            features = None
        return Second(self.symbol, ts, trades, ticker, depth, features)


def _best_quote(sync: BookSync) -> tuple[int, int, int, int] | None:
    book = sync.book
    if book is None:
        return None
    bid, ask = book.best_bid(), book.best_ask()
    if bid is None or ask is None:
        return None
    return (bid[0], bid[1], ask[0], ask[1])
