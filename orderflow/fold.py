"""aggTrades folded into one bar's order flow and footprint rows, exactly; M1 bars merged
into M5/M15 exactly.

Prices and quantities are integers in units of 10⁻⁸ (Binance quotes at most 8
decimals), so sums, row edges and comparisons are exact and cost what integer
arithmetic costs; a bar's values become decimals once, when it is written. (Decimal
arithmetic per trade would not fit 150k trades a second on one core; float sums are not
exact.)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from decimal import ROUND_HALF_EVEN, Decimal
from typing import NamedTuple

UNIT_DECIMALS = 8
UNIT = 10**UNIT_DECIMALS
VWAP_QUANTUM = Decimal(1).scaleb(-UNIT_DECIMALS)


_SCALES = [10 ** (UNIT_DECIMALS - d) for d in range(UNIT_DECIMALS + 1)]


def to_units(text: str) -> int:
    """'63944.10' -> 6394410000000. ValueError for anything but a plain non-negative
    decimal of at most 8 decimals (trailing zeros aside). Two of these a trade: written
    for speed (a digit check and one int() in C)."""
    dot = text.find(".")
    if dot < 0:
        digits, decimals = text, 0
    else:
        digits, decimals = text[:dot] + text[dot + 1 :], len(text) - dot - 1
    if dot == 0 or decimals > UNIT_DECIMALS or not (digits.isascii() and digits.isdigit()):
        stripped = text.rstrip("0") if dot > 0 else ""
        if stripped != text and len(stripped) - dot - 1 <= UNIT_DECIMALS:
            return to_units(stripped)
        raise ValueError(f"not a price or quantity: {text!r}")
    return int(digits) * _SCALES[decimals]


def units_text(value: int) -> str:
    """The exact decimal text of a value in units: 6394410000000 -> '63944.1'. (Some
    hundred a footprint document: kept to one divmod and one format.)"""
    if value < 0:
        return "-" + units_text(-value)
    whole, frac = divmod(value, UNIT)
    if not frac:
        return str(whole)
    return f"{whole}.{frac:08d}".rstrip("0")


def units_decimal(value: int) -> Decimal:
    return Decimal(units_text(value))


class AggTrade(NamedTuple):
    """One aggTrade: a taker order's fills at one price (prices, quantities in units)."""

    agg_id: int  # `a`: contiguous per symbol
    price: int
    qty: int
    first_trade_id: int  # `f`
    last_trade_id: int  # `l`
    time_ms: int  # `T`
    buyer_maker: bool  # `m`: true when the taker sold (bid side of a footprint)


# A footprint row's cells, by position.
BID, ASK, BID_TRADES, ASK_TRADES = range(4)


@dataclass(slots=True)
class BarFlow:
    """One bar's order flow, trades folded in (`T`, `a`) order. Rows are keyed by their
    index: the row of price p is p // row_size, its low edge index × row_size."""

    open_time: int
    row_size: int  # units
    buy: int = 0  # taker-bought quantity (ask side)
    sell: int = 0  # taker-sold quantity (bid side)
    delta_min: int | None = None  # of the running delta after each aggTrade; None: no trade yet
    delta_max: int | None = None
    agg_trades: int = 0
    trades: int = 0  # exchange trades: Σ (l − f + 1)
    buy_trades: int = 0  # aggTrades whose taker bought
    sell_trades: int = 0
    notional: int = 0  # Σ price × qty, in units²
    max_qty: int = 0
    high: int | None = None
    low: int | None = None
    first_agg_id: int | None = None
    last_agg_id: int | None = None
    first_trade_id: int | None = None
    last_trade_id: int | None = None
    rows: dict[int, list[int]] = field(default_factory=dict)  # index -> [bid, ask, bid_trades, ask_trades]

    @property
    def delta(self) -> int:
        return self.buy - self.sell

    @property
    def volume(self) -> int:
        return self.buy + self.sell

    def add(self, trade: AggTrade) -> None:
        agg_id, price, qty, first, last, _, sold = trade
        cell = self.rows.get(price // self.row_size)
        if cell is None:
            cell = self.rows[price // self.row_size] = [0, 0, 0, 0]
        if sold:
            self.sell += qty
            self.sell_trades += 1
            cell[BID] += qty
            cell[BID_TRADES] += 1
        else:
            self.buy += qty
            self.buy_trades += 1
            cell[ASK] += qty
            cell[ASK_TRADES] += 1
        running = self.buy - self.sell
        if self.delta_min is None:
            self.delta_min = self.delta_max = running
            self.high = self.low = price
            self.first_agg_id, self.first_trade_id = agg_id, first
        else:
            if running < self.delta_min:
                self.delta_min = running
            elif running > self.delta_max:  # type: ignore[operator]
                self.delta_max = running
            if price > self.high:  # type: ignore[operator]
                self.high = price
            elif price < self.low:  # type: ignore[operator]
                self.low = price
        self.last_agg_id, self.last_trade_id = agg_id, last
        self.agg_trades += 1
        self.trades += last - first + 1
        self.notional += price * qty
        if qty > self.max_qty:
            self.max_qty = qty

    def vwap(self) -> Decimal | None:
        """Σ p·q / Σ q, to 8 decimals (half even): a ratio has no exact decimal."""
        volume = self.volume
        if not volume:
            return None
        return (Decimal(self.notional) / Decimal(volume) / UNIT).quantize(VWAP_QUANTUM, ROUND_HALF_EVEN)

    def footprint(self) -> list[tuple[int, int, int, int, int]]:
        """(row index, bid, ask, bid trades, ask trades), lowest price first."""
        return [(index, *cell) for index, cell in sorted(self.rows.items())]  # type: ignore[misc]


def fold(open_time: int, row_size: int, trades: Iterable[AggTrade]) -> BarFlow:
    bar = BarFlow(open_time, row_size)
    for trade in trades:
        bar.add(trade)
    return bar


def merge(open_time: int, row_size: int, bars: Sequence[BarFlow]) -> BarFlow:
    """The bar of all these bars' trades (given oldest first), with `row_size` a whole
    multiple of theirs: each of their rows lies inside exactly one of the new rows, so
    the result equals folding the trades themselves."""
    out = BarFlow(open_time, row_size)
    for bar in bars:
        merge_into(out, bar)
    return out


def merge_into(out: BarFlow, bar: BarFlow) -> None:
    """Add a later bar's trades to `out` (in place: a forming M15 bucket grows by one
    minute's rows, not by a copy of all it holds). The running delta's extremes are the
    bar's own, shifted by the delta before it."""
    row_size = out.row_size
    if row_size % bar.row_size:
        raise ValueError(f"row size {row_size} is not a multiple of {bar.row_size}")
    if bar.delta_min is None:
        return  # no trade: it moved nothing
    shift = out.buy - out.sell
    low_shifted, high_shifted = shift + bar.delta_min, shift + bar.delta_max  # type: ignore[operator]
    if out.delta_min is None:
        out.delta_min, out.delta_max = low_shifted, high_shifted
        out.high, out.low = bar.high, bar.low
        out.first_agg_id, out.first_trade_id = bar.first_agg_id, bar.first_trade_id
    else:
        out.delta_min = min(out.delta_min, low_shifted)
        out.delta_max = max(out.delta_max, high_shifted)  # type: ignore[type-var]
        out.high = max(out.high, bar.high)  # type: ignore[type-var]
        out.low = min(out.low, bar.low)  # type: ignore[type-var]
    out.last_agg_id, out.last_trade_id = bar.last_agg_id, bar.last_trade_id
    out.buy += bar.buy
    out.sell += bar.sell
    out.agg_trades += bar.agg_trades
    out.trades += bar.trades
    out.buy_trades += bar.buy_trades
    out.sell_trades += bar.sell_trades
    out.notional += bar.notional
    out.max_qty = max(out.max_qty, bar.max_qty)
    scale = row_size // bar.row_size
    rows = out.rows
    for index, (bid, ask, bid_trades, ask_trades) in bar.rows.items():
        target = rows.get(index // scale)
        if target is None:
            rows[index // scale] = [bid, ask, bid_trades, ask_trades]
        else:
            target[0] += bid
            target[1] += ask
            target[2] += bid_trades
            target[3] += ask_trades
