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

from binance.book import BookTick
from book.features import ofi_step, weighted_mid
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


class SecondSeries[Bar: (TradeSecond, TickerSecond)]:
    """One symbol's bars of one kind: the open second, closed ones handed out in order."""

    __slots__ = ("closed", "late", "make", "newest_closed", "open_bar")

    def __init__(self, make: Callable[[int], Bar]) -> None:
        self.make = make
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

    def close_through(self, clock_ms: int, grace_ms: int) -> None:
        """The exchange's clock is at `clock_ms`: an open second that ended more than
        `grace_ms` before it is closed."""
        bar = self.open_bar
        if bar is not None and bar.ts + SECOND_MS + grace_ms <= clock_ms:
            self._close(bar)
            self.open_bar = None

    def _close(self, bar: Bar) -> None:
        self.closed.append(bar)
        self.newest_closed = bar.ts

    def take(self) -> list[Bar]:
        closed, self.closed = self.closed, []
        return closed
