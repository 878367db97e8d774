"""What a footprint's rows say: point of control, value area, diagonal imbalances,
stacked imbalances, unfinished auctions. Pure; rows as `BarFlow.footprint()` gives them.

Every rule is over the bar's whole price range, row by row from its low to its high: a
row no trade printed at is a row of zero volume (it separates stacked runs and counts
as an empty row for the value area), never a missing one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

Row = tuple[int, int, int, int, int]  # (index, bid, ask, bid trades, ask trades)


@dataclass(frozen=True)
class ImbalanceRules:
    """A diagonal imbalance: the ask at a row against the bid one row below (buying),
    the bid at a row against the ask one row above (selling), when the larger side is at
    least `ratio` times the other and at least `min_volume` (units). A zero on the other
    side counts as an imbalance of any ratio. Runs of `stacked` or more adjacent rows
    are stacked imbalances."""

    ratio: Fraction = Fraction(3)
    min_volume: int = 0
    stacked: int = 3


@dataclass(frozen=True)
class Profile:
    poc: int  # row indices
    val: int
    vah: int
    buy_imbalances: tuple[int, ...]
    sell_imbalances: tuple[int, ...]
    stacked_buy: tuple[tuple[int, int], ...]  # (lowest row, highest row) of each run
    stacked_sell: tuple[tuple[int, int], ...]
    unfinished_high: bool
    unfinished_low: bool


def dense(rows: Sequence[Row]) -> tuple[int, list[int], list[int]]:
    """(lowest index, bid volumes, ask volumes) for every row from the lowest to the highest."""
    low, high = rows[0][0], rows[-1][0]
    bids, asks = [0] * (high - low + 1), [0] * (high - low + 1)
    for index, bid, ask, _, _ in rows:
        bids[index - low], asks[index - low] = bid, ask
    return low, bids, asks


def point_of_control(totals: Sequence[int]) -> int:
    """The position of the largest volume; of several, the nearest the middle of the
    range, then the lower (the usual charting rule: a tie never depends on row order)."""
    top = max(totals)
    last = len(totals) - 1
    return min((abs(2 * i - last), i) for i, v in enumerate(totals) if v == top)[1]


def value_area(totals: Sequence[int], poc: int, percent: int = 70) -> tuple[int, int]:
    """(lowest, highest) position of the value area: from the POC, add the next row
    above or below, whichever holds more volume (both on a tie), until the rows hold
    `percent` % of the volume."""
    wanted = sum(totals) * percent
    low = high = poc
    covered = totals[poc]
    while covered * 100 < wanted and (low > 0 or high < len(totals) - 1):
        below = totals[low - 1] if low > 0 else -1
        above = totals[high + 1] if high < len(totals) - 1 else -1
        if above >= below:
            high += 1
            covered += above
        if below >= above:
            low -= 1
            covered += below
    return low, high


def imbalances(bids: Sequence[int], asks: Sequence[int], rules: ImbalanceRules) -> tuple[list[int], list[int]]:
    """(positions of buying imbalances, of selling imbalances)."""
    num, den = rules.ratio.numerator, rules.ratio.denominator
    buying = [
        i
        for i in range(1, len(asks))
        if asks[i] > 0 and asks[i] >= rules.min_volume and asks[i] * den >= num * bids[i - 1]
    ]
    selling = [
        i
        for i in range(len(bids) - 1)
        if bids[i] > 0 and bids[i] >= rules.min_volume and bids[i] * den >= num * asks[i + 1]
    ]
    return buying, selling


def runs(positions: Sequence[int], at_least: int) -> list[tuple[int, int]]:
    """Every run of `at_least` or more adjacent positions, as (first, last)."""
    found: list[tuple[int, int]] = []
    start = previous = None
    for p in [*positions, None]:
        if p is not None and previous is not None and p == previous + 1:
            previous = p
            continue
        if start is not None and previous - start + 1 >= at_least:  # type: ignore[operator]
            found.append((start, previous))  # type: ignore[arg-type]
        start = previous = p
    return found


def profile(rows: Sequence[Row], rules: ImbalanceRules = ImbalanceRules(), percent: int = 70) -> Profile | None:
    """None for a bar without trades."""
    if not rows:
        return None
    low, bids, asks = dense(rows)
    totals = [b + a for b, a in zip(bids, asks)]
    poc = point_of_control(totals)
    val, vah = value_area(totals, poc, percent)
    buying, selling = imbalances(bids, asks, rules)
    top = len(totals) - 1
    return Profile(
        poc=low + poc,
        val=low + val,
        vah=low + vah,
        buy_imbalances=tuple(low + i for i in buying),
        sell_imbalances=tuple(low + i for i in selling),
        stacked_buy=tuple((low + a, low + b) for a, b in runs(buying, rules.stacked)),
        stacked_sell=tuple((low + a, low + b) for a, b in runs(selling, rules.stacked)),
        unfinished_high=bids[top] > 0 and asks[top] > 0,
        unfinished_low=bids[0] > 0 and asks[0] > 0,
    )
