"""The footprint row size: per symbol and UTC day, from the previous day's M1 true range.

Deterministic by construction (the same stored candles give the same size, live or
rebuilt): the mean true range of the previous UTC day's M1 candles over a target row
count, snapped down to the tick size times 1, 2 or 5 × 10^k (at least one tick).
M5 to D1 rows are whole multiples of the M1 row, so their footprints are merged from M1
footprints exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction

TARGET_ROWS = 10  # rows an average M1 bar spans
RULE_HOURS = 23  # the rule reads the first 23 hours of the previous day: known by 23:00
# Ranges grow about as √(minutes): 1, 2.2, 3.9, 7.7, 15.5, 38. Each divides the next, so
# a forming bucket can be resumed from stored coarser bars (orderflow/chain.py).
TF_ROW_MULTIPLE = {"m1": 1, "m5": 2, "m15": 4, "h1": 8, "h4": 16, "d1": 32}
DEFAULT_TICKS = 10  # the M1 row, in ticks, for a symbol with no previous day


def mean_true_range(bars: Sequence[tuple[int, int, int]]) -> Fraction | None:
    """Of (high, low, close) bars, oldest first; the first bar's range is high − low."""
    if not bars:
        return None
    total, previous_close = 0, None
    for high, low, close in bars:
        if previous_close is None:
            total += high - low
        else:
            total += max(high, previous_close) - min(low, previous_close)
        previous_close = close
    return Fraction(total, len(bars))


def snap(raw: Fraction | int, tick: int) -> int:
    """The largest tick × {1, 2, 5} × 10^k not above `raw`, and at least one tick."""
    if tick <= 0:
        raise ValueError(f"tick size must be positive, not {tick}")
    best, scale = tick, tick
    while scale <= raw:
        for step in (1, 2, 5):
            if scale * step <= raw:
                best = scale * step
        scale *= 10
    return best


def m1_row_size(previous_day: Sequence[tuple[int, int, int]], tick: int, target_rows: int = TARGET_ROWS) -> int:
    atr = mean_true_range(previous_day)
    if atr is None:
        return tick * DEFAULT_TICKS
    return snap(atr / target_rows, tick)


def row_size(m1_row: int, tf: str, fixed: int | None = None) -> int:
    """A timeframe's row; a ticker's fixed step (units) stands in for the M1 row."""
    return (fixed if fixed is not None else m1_row) * TF_ROW_MULTIPLE[tf]


def day_row(total_true_range: int, bars: int, decimals: int | None, tick: int | None) -> tuple[int, str] | None:
    """A day's M1 row (units) and the rule that gave it, from the Σ true range (units)
    and count of the previous day's bars; the tick (units) if the exchange gave one, else
    one unit of the last decimal the closes were quoted with. None without bars."""
    if not bars:
        return None
    if tick is None:
        tick = 10 ** max(0, 8 - (decimals if decimals is not None else 2))
    return snap(Fraction(total_true_range, bars * TARGET_ROWS), tick), "atr"


PRICE_ROW = Fraction(1, 20_000)  # half a basis point: an M1 bar spans some 5-10


def first_price_row(price: int | None, tick: int | None) -> tuple[int, str]:
    """A day's M1 row when the day before is unknown (a symbol new to the database): half
    a basis point of the day's first price, snapped to the tick (if the exchange gave
    none, the largest power of ten dividing that price, at most 1); 10 ticks without a
    price."""
    if tick is None:
        tick = 1
        while price and tick < UNIT_ONE and price % (tick * 10) == 0:
            tick *= 10
    if not price:
        return tick * DEFAULT_TICKS, "default"
    return snap(Fraction(price) * PRICE_ROW, tick), "price"


UNIT_ONE = 10**8  # 1.0 in units
