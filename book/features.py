"""Order-book features from best levels and the top of the book. Pure.

Inputs are exact integer units (prices and quantities × 10⁸, as the book keeps them);
OFI comes out in quantity units, exact; ratios and prices as floats (derived features
are double precision, SPEC section 14).

- Level-1 order flow imbalance (Cont, Kukanov & Stoikov 2014, "The price impact of
  order book events", eq. 2): for consecutive best quotes (n−1, n),
  e_n = q^b_n·1{P^b_n ≥ P^b_{n−1}} − q^b_{n−1}·1{P^b_n ≤ P^b_{n−1}}
        − q^a_n·1{P^a_n ≤ P^a_{n−1}} + q^a_{n−1}·1{P^a_n ≥ P^a_{n−1}};
  OFI over an interval is the sum of its e_n.
- Multi-level OFI (Xu, Gould & Howison 2018, "Multi-level order-flow imbalance in a
  limit order book"; Cont, Cucuringu & Zhang 2023): the same contribution at each of
  the top k levels, levels aligned by rank (the i-th best bid and ask of each book); a
  level missing from either book contributes 0.
- Weighted mid (the imbalance-weighted "microprice" of most feeds):
  P^b·q^a/(q^b+q^a) + P^a·q^b/(q^b+q^a); the plain mid when both sizes are 0.
- Depth imbalance over the top k levels: (Σq^b − Σq^a)/(Σq^b + Σq^a), 0 on an empty
  book (I1: k = 1, I5, I10).
- The depth filter (seed 003): the levels priced within ±r % of the mid price, and
  their summed quantity per side.
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction

from binance.book import Level
from orderflow.fold import UNIT

Quote = tuple[int, int, int, int]  # (bid, bid qty, ask, ask qty), units


def ofi_step(prev: Quote, curr: Quote) -> int:
    """One best-quote transition's contribution (quantity units)."""
    pb, pbq, pa, paq = prev
    cb, cbq, ca, caq = curr
    return (cbq if cb >= pb else 0) - (pbq if cb <= pb else 0) + (paq if ca >= pa else 0) - (caq if ca <= pa else 0)


def multi_level_ofi(
    prev: tuple[Sequence[Level], Sequence[Level]], curr: tuple[Sequence[Level], Sequence[Level]], levels: int
) -> list[int]:
    """Per-level OFI for levels 1..`levels` between two books given as (bids best
    first, asks best first)."""
    (prev_bids, prev_asks), (curr_bids, curr_asks) = prev, curr
    out = []
    for i in range(levels):
        if i < len(prev_bids) and i < len(curr_bids) and i < len(prev_asks) and i < len(curr_asks):
            out.append(ofi_step((*prev_bids[i], *prev_asks[i]), (*curr_bids[i], *curr_asks[i])))
        else:
            out.append(0)
    return out


def weighted_mid(quote: Quote) -> float:
    """In price units of 1 (not 10⁻⁸)."""
    bid, bid_qty, ask, ask_qty = quote
    total = bid_qty + ask_qty
    if total == 0:
        return (bid + ask) / (2 * UNIT)
    return (bid * ask_qty + ask * bid_qty) / (total * UNIT)  # one rounding: exact integers divided


def depth_imbalance(bids: Sequence[Level], asks: Sequence[Level], levels: int) -> float:
    """Over the best `levels` levels a side (each given best first)."""
    bid_qty = sum(q for _, q in bids[:levels])
    ask_qty = sum(q for _, q in asks[:levels])
    total = bid_qty + ask_qty
    return 0.0 if total == 0 else (bid_qty - ask_qty) / total


def range_bounds(best_bid: int, best_ask: int, range_pct: Fraction) -> tuple[int, int]:
    """[low, high] prices (units) within ±`range_pct` % of the mid, rounded inwards."""
    mid2 = best_bid + best_ask  # twice the mid: exact
    low = -((-mid2 * (100 - range_pct)) // 200)  # ceil
    high = (mid2 * (100 + range_pct)) // 200  # floor
    return int(low), int(high)
