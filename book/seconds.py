"""One-second bars per symbol, on the exchange's event time. Pure.

A second holds the events whose exchange time falls in it: `T` for trades, `E` for book
ticker and depth events (SPEC section 14). A second closes when an event of a later
second of its kind arrives, or when the exchange's clock (the newest event time seen on
any stream, `close_through`) has passed it by a grace for events still on their way;
an event for a second already closed is late: counted, never folded into a closed bar.
A second with no event of a kind has no bar of that kind.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal
from fractions import Fraction

from binance.book import BookTick
from book.features import depth_imbalance, multi_level_ofi, ofi_step, range_bounds, weighted_mid
from book.sync import LocalBook
from orderflow.fold import UNIT, VWAP_QUANTUM, AggTrade

SECOND_MS = 1_000


@dataclass(slots=True)
class TradeSecond:
    """`trades_1s_v4`: price OHLC, volumes (units), VWAP, aggTrade count."""

    ts: int
    open: int = 0
    high: int = 0
    low: int = 0
    close: int = 0
    buy_volume: int = 0
    sell_volume: int = 0
    notional: int = 0  # units²
    agg_trades: int = 0

    def add(self, trade: AggTrade) -> None:
        price, qty = trade.price, trade.qty
        if not self.agg_trades:
            self.open = self.high = self.low = price
        elif price > self.high:
            self.high = price
        elif price < self.low:
            self.low = price
        self.close = price
        if trade.buyer_maker:
            self.sell_volume += qty
        else:
            self.buy_volume += qty
        self.notional += price * qty
        self.agg_trades += 1

    @property
    def volume(self) -> int:
        return self.buy_volume + self.sell_volume

    def vwap(self) -> Decimal | None:
        if not self.volume:
            return None
        return (Decimal(self.notional) / Decimal(self.volume) / UNIT).quantize(VWAP_QUANTUM, ROUND_HALF_EVEN)


@dataclass(slots=True)
class TickerSecond:
    """`book_ticker_1s_v4`: best bid and ask OHLC, the last update's sizes and weighted
    mid, the OFI of the second's best-quote changes, the update count."""

    ts: int
    bid_open: int = 0
    bid_high: int = 0
    bid_low: int = 0
    bid_close: int = 0
    ask_open: int = 0
    ask_high: int = 0
    ask_low: int = 0
    ask_close: int = 0
    bid_qty_close: int = 0
    ask_qty_close: int = 0
    spread_sum: int = 0  # Σ (ask − bid) over the updates, for the mean spread
    ofi: int = 0  # Σ level-1 OFI over the second's updates (the first against the last before it)
    updates: int = 0
    last_update_id: int = 0

    def add(self, tick: BookTick, before: BookTick | None) -> None:
        bid, ask = tick.bid, tick.ask
        if not self.updates:
            self.bid_open = self.bid_high = self.bid_low = bid
            self.ask_open = self.ask_high = self.ask_low = ask
        else:
            self.bid_high, self.bid_low = max(self.bid_high, bid), min(self.bid_low, bid)
            self.ask_high, self.ask_low = max(self.ask_high, ask), min(self.ask_low, ask)
        self.bid_close, self.ask_close = bid, ask
        self.bid_qty_close, self.ask_qty_close = tick.bid_qty, tick.ask_qty
        self.spread_sum += ask - bid
        if before is not None:
            self.ofi += ofi_step(
                (before.bid, before.bid_qty, before.ask, before.ask_qty), (bid, tick.bid_qty, ask, tick.ask_qty)
            )
        self.updates += 1
        self.last_update_id = tick.update_id

    def microprice_close(self) -> float:
        return weighted_mid((self.bid_close, self.bid_qty_close, self.ask_close, self.ask_qty_close))

    def mean_spread(self) -> float:
        return self.spread_sum / self.updates / UNIT if self.updates else 0.0


OFI_LEVELS = 10


@dataclass(slots=True)
class DepthSecond:
    """`depth_1s_v4`: the OFI of the second's diffs (level 1, and levels 1-10 summed with
    equal weights), and the book as the second's last diff left it (`finish`, when the
    second closes, before a later diff is applied): imbalances I1, I5, I10 and the depth
    within ±r % of the mid per side."""

    ts: int
    ofi_l1: int = 0
    ofi_l10: int = 0
    imbalance_1: float = 0.0
    imbalance_5: float = 0.0
    imbalance_10: float = 0.0
    bid_depth_in_range: int = 0
    ask_depth_in_range: int = 0
    last_update_id: int = 0
    diffs: int = 0

    def add(self, before: tuple[list, list], after: tuple[list, list], update_id: int) -> None:
        """One applied diff, with the book's top ten levels a side before and after it."""
        per_level = multi_level_ofi(before, after, OFI_LEVELS)  # level 1 is Cont-Kukanov-Stoikov's
        self.ofi_l1 += per_level[0]
        self.ofi_l10 += sum(per_level)
        self.last_update_id = update_id
        self.diffs += 1

    def finish(self, book: LocalBook, range_pct: Fraction) -> None:
        bids, asks = book.top(OFI_LEVELS)
        self.imbalance_1 = depth_imbalance(bids, asks, 1)
        self.imbalance_5 = depth_imbalance(bids, asks, 5)
        self.imbalance_10 = depth_imbalance(bids, asks, 10)
        if bids and asks:
            _, bid_sizes, _, ask_sizes = book.within(*range_bounds(bids[0][0], asks[0][0], range_pct))
            self.bid_depth_in_range, self.ask_depth_in_range = sum(bid_sizes), sum(ask_sizes)


class SecondSeries[Bar: (TradeSecond, TickerSecond, DepthSecond)]:
    """One symbol's bars of one kind: the open second, closed ones handed out in order."""

    __slots__ = ("closed", "finish", "late", "make", "newest_closed", "open_bar")

    def __init__(self, make: Callable[[int], Bar], finish: Callable[[Bar], None] | None = None) -> None:
        self.make, self.finish = make, finish
        self.open_bar: Bar | None = None
        self.closed: list[Bar] = []
        self.late = 0
        self.newest_closed = -1  # ts of the newest second closed

    def bar_for(self, time_ms: int) -> Bar | None:
        """The bar an event of `time_ms` goes into; None when its second is closed (late)."""
        ts = time_ms - time_ms % SECOND_MS
        bar = self.open_bar
        if bar is not None and bar.ts == ts:
            return bar
        if ts <= self.newest_closed or (bar is not None and ts < bar.ts):
            self.late += 1
            return None
        if bar is not None:
            self._close(bar)
        bar = self.open_bar = self.make(ts)
        return bar

    def roll_to(self, time_ms: int) -> None:
        """An event of `time_ms` is about to change what the open second's `finish` reads
        (a depth diff, the book): a bar of an earlier second is closed first."""
        if self.open_bar is not None and self.open_bar.ts < time_ms - time_ms % SECOND_MS:
            self._close(self.open_bar)

    def close_through(self, clock_ms: int, grace_ms: int) -> None:
        """The exchange's clock is at `clock_ms`: an open second that ended more than
        `grace_ms` before it is closed."""
        if self.open_bar is not None and self.open_bar.ts + SECOND_MS + grace_ms <= clock_ms:
            self._close(self.open_bar)

    def _close(self, bar: Bar) -> None:
        """The open bar is closed: finished, handed out, and no longer open."""
        if self.finish is not None:
            self.finish(bar)
        self.closed.append(bar)
        self.newest_closed = bar.ts
        self.open_bar = None

    def take(self) -> list[Bar]:
        closed, self.closed = self.closed, []
        return closed
