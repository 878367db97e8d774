"""A symbol's book features rolled up per minute (`book_m1_v4`, beside each M1 candle). Pure.

Fed each second's bars and features in order; a minute is finished when a second of a
later minute arrives (or on `flush`, at shutdown). Definitions, over the minute's
seconds that have the input (None when none has):

- `ofi`: Σ of the seconds' level-1 OFI as `features_1s_v4.ofi` takes it (the book
  ticker's, else the depth bar's), exact units; `ofi_l1`, `ofi_l10`: Σ of the depth
  bars' level-1 and levels 1-10 OFI;
- `mean_spread`: Σ spread over Σ updates of the book ticker: the mean over every
  update of the minute, as a second's mean is over its updates (a busy second weighs
  more than a quiet one);
- `microprice`, `vpin`, `vpin_bulk`, `volatility`: the newest value the minute had
  (volatility: at its last second with one);
- `i1_mean`: the mean of the seconds' I1;
- `volume_imbalance`: (V^buy − V^sell)/(V^buy + V^sell) over the minute's trades;
- `book_ticker_updates`, `depth_diffs`: counts; `seconds`: seconds with any input.
"""

from __future__ import annotations

from dataclasses import dataclass

from book.per_second import Features
from book.seconds import DepthSecond, TickerSecond, TradeSecond
from orderflow.fold import UNIT

MINUTE_MS = 60_000

Second = tuple[TradeSecond | None, TickerSecond | None, DepthSecond | None, Features | None]


@dataclass(frozen=True, slots=True)
class MinuteRow:
    """One row of `book_m1_4`. OFI sums in quantity units (10⁻⁸)."""

    symbol: str
    open_time: int  # ms
    ofi: int | None
    ofi_l1: int | None
    ofi_l10: int | None
    mean_spread: float | None
    microprice: float | None
    vpin: float | None
    vpin_bulk: float | None
    i1_mean: float | None
    volume_imbalance: float | None
    volatility: float | None
    book_ticker_updates: int
    depth_diffs: int
    seconds: int


class _Minute:
    """The sums of the open minute."""

    __slots__ = (
        "buy",
        "depth_diffs",
        "i1_n",
        "i1_sum",
        "microprice",
        "ofi",
        "ofi_l1",
        "ofi_l10",
        "open_time",
        "seconds",
        "sell",
        "spread_sum",
        "updates",
        "volatility",
        "vpin",
        "vpin_bulk",
    )

    def __init__(self, open_time: int) -> None:
        self.open_time = open_time
        self.ofi: int | None = None
        self.ofi_l1: int | None = None
        self.ofi_l10: int | None = None
        self.spread_sum = self.updates = self.depth_diffs = self.seconds = 0
        self.buy = self.sell = 0
        self.i1_sum, self.i1_n = 0.0, 0
        self.microprice: float | None = None
        self.vpin: float | None = None
        self.vpin_bulk: float | None = None
        self.volatility: float | None = None

    def add(
        self, trades: TradeSecond | None, ticker: TickerSecond | None, depth: DepthSecond | None, f: Features | None
    ) -> None:
        self.seconds += 1
        if trades is not None:
            self.buy += trades.buy_volume
            self.sell += trades.sell_volume
        if ticker is not None:
            self.spread_sum += ticker.spread_sum
            self.updates += ticker.updates
        if depth is not None:
            self.ofi_l1 = (self.ofi_l1 or 0) + depth.ofi_l1
            self.ofi_l10 = (self.ofi_l10 or 0) + depth.ofi_l10
            self.depth_diffs += depth.diffs
        # features_1s_v4.ofi's source (book/per_second.py), exact
        level_1 = ticker.ofi if ticker is not None else depth.ofi_l1 if depth is not None else None
        if level_1 is not None:
            self.ofi = (self.ofi or 0) + level_1
        if f is not None:
            if f.i1 is not None:
                self.i1_sum += f.i1
                self.i1_n += 1
            if f.microprice is not None:
                self.microprice = f.microprice
            if f.vpin is not None:
                self.vpin = f.vpin
            if f.vpin_bulk is not None:
                self.vpin_bulk = f.vpin_bulk
            if f.volatility is not None:
                self.volatility = f.volatility

    def row(self, symbol: str) -> MinuteRow:
        volume = self.buy + self.sell
        return MinuteRow(
            symbol,
            self.open_time,
            self.ofi,
            self.ofi_l1,
            self.ofi_l10,
            self.spread_sum / self.updates / UNIT if self.updates else None,
            self.microprice,
            self.vpin,
            self.vpin_bulk,
            self.i1_sum / self.i1_n if self.i1_n else None,
            (self.buy - self.sell) / volume if volume else None,
            self.volatility,
            self.updates,
            self.depth_diffs,
            self.seconds,
        )


class MinuteRollup:
    """One symbol's open minute. A second of an earlier minute than the open one (out of
    order) is counted in `late` and left out: a finished minute is never changed."""

    __slots__ = ("late", "minute", "newest_finished", "symbol")

    def __init__(self, symbol: str) -> None:
        self.symbol = symbol
        self.minute: _Minute | None = None
        self.newest_finished = -1
        self.late = 0

    def add(
        self,
        trades: TradeSecond | None,
        ticker: TickerSecond | None,
        depth: DepthSecond | None,
        features: Features | None,
    ) -> MinuteRow | None:
        """One second's bars and features (any may be None, all of the same second); the
        finished minute's row when this second starts a later minute."""
        stamps = {part.ts for part in (trades, ticker, depth, features) if part is not None}
        if not stamps:
            return None
        if len(stamps) > 1:
            raise ValueError(f"one second's parts have different seconds: {sorted(stamps)}")
        ts = stamps.pop()
        open_time = ts - ts % MINUTE_MS
        finished = None
        if self.minute is None or self.minute.open_time != open_time:
            if open_time <= self.newest_finished or (self.minute is not None and open_time < self.minute.open_time):
                self.late += 1
                return None
            finished = self.flush()
            self.minute = _Minute(open_time)
        self.minute.add(trades, ticker, depth, features)
        return finished

    def flush(self) -> MinuteRow | None:
        """The open minute's row as it stands (at shutdown), and no minute open."""
        minute, self.minute = self.minute, None
        if minute is None:
            return None
        self.newest_finished = minute.open_time
        return minute.row(self.symbol)
