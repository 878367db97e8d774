"""VPIN, the volume-synchronised probability of informed trading (Easley, López de Prado
& O'Hara 2012, "Flow toxicity and liquidity in a high-frequency world"). Pure.

Trades fill equal-volume buckets (a trade that overflows a bucket is split across it and
the next ones); VPIN over the last n buckets is Σ|V^buy − V^sell| / (n·V). Two
classifications side by side:

- exact: each trade's taker side is known (`m` of the aggTrade), so a bucket's buy
  volume is what takers bought in it;
- bulk (BVC, as in the paper): V^buy = V·Φ(ΔP/σ), ΔP the bucket's close minus the
  previous bucket's close (the first bucket's: minus the first trade's price), σ the
  population standard deviation of ΔP over the window's buckets. Φ is the standard
  normal CDF through `math.erf` (the `orderflow-metrics` package uses Abramowitz &
  Stegun 7.1.26, error up to 1.5e-7; otherwise the definitions are the same).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from orderflow.fold import UNIT


def normal_cdf(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


@dataclass(frozen=True, slots=True)
class Bucket:
    price_change: int  # units
    volume: int  # units: the bucket size
    buy_volume: int  # units: what takers bought in it


@dataclass
class Vpin:
    """Buckets of `bucket_volume` units; VPIN over the newest `window` of them."""

    bucket_volume: int
    window: int = 50
    buckets: deque[Bucket] = field(default_factory=deque)
    filled: int = 0
    bought: int = 0
    previous_close: int | None = None

    def __post_init__(self) -> None:
        if self.bucket_volume <= 0 or self.window <= 0:
            raise ValueError("the bucket volume and the window must be positive")
        self.buckets = deque(self.buckets, maxlen=self.window)

    def add(self, price: int, qty: int, taker_bought: bool) -> int:
        """One trade (units); returns how many buckets it closed."""
        if self.previous_close is None:
            self.previous_close = price
        closed = 0
        while self.filled + qty >= self.bucket_volume:
            part = self.bucket_volume - self.filled
            qty -= part
            bought = self.bought + (part if taker_bought else 0)
            self.buckets.append(Bucket(price - self.previous_close, self.bucket_volume, bought))
            self.previous_close, self.filled, self.bought = price, 0, 0
            closed += 1
        self.filled += qty
        self.bought += qty if taker_bought else 0
        return closed

    def exact(self) -> float | None:
        """From the takers' sides; None before the first bucket."""
        if not self.buckets:
            return None
        imbalance = sum(abs(2 * b.buy_volume - b.volume) for b in self.buckets)
        return imbalance / sum(b.volume for b in self.buckets)

    def bulk(self) -> float | None:
        """By bulk volume classification; None before the first bucket."""
        if not self.buckets:
            return None
        changes = [b.price_change / UNIT for b in self.buckets]
        mean = sum(changes) / len(changes)
        sigma = math.sqrt(sum((c - mean) ** 2 for c in changes) / len(changes))
        imbalance = volume = 0.0
        for bucket, change in zip(self.buckets, changes, strict=True):
            buy_fraction = normal_cdf(change / sigma) if sigma > 0 else 0.5
            imbalance += bucket.volume / UNIT * abs(2 * buy_fraction - 1)
            volume += bucket.volume / UNIT
        return imbalance / volume
