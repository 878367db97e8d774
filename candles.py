"""Candle types and time-bucket maths: pure, no I/O."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

TIMEFRAMES: tuple[str, ...] = ("m1", "m5", "m15")
TF_MS: dict[str, int] = {"m1": 60_000, "m5": 300_000, "m15": 900_000}
DAY_MS = 86_400_000
M1_PER_BUCKET: dict[str, int] = {"m1": 1, "m5": 5, "m15": 15}

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(slots=True, unsafe_hash=True)
class Candle:
    """A closed candle with the exchange's exact decimals; `open_time` in epoch ms.

    Treated as immutable, but not declared frozen: a frozen dataclass sets each field
    through object.__setattr__, 3.9 µs a candle against 0.5 (the feed makes one per close)."""

    symbol: str
    tf: str
    open_time: int
    open: Decimal
    high: Decimal
    low: Decimal
    close: Decimal
    volume: Decimal
    quote_volume: Decimal = Decimal(0)
    trades: int = 0
    taker_buy_volume: Decimal = Decimal(0)
    taker_buy_quote_volume: Decimal = Decimal(0)
    m1_count: int | None = None  # M5/M15 only: how many M1 candles built it

    def to_bar(self) -> Bar:
        return Bar(
            self.open_time, float(self.open), float(self.high), float(self.low), float(self.close), float(self.volume)
        )


@dataclass(slots=True, unsafe_hash=True)
class Bar:
    """OHLCV as floats: what the Redis cache holds and the indicators consume."""

    open_time: int
    open: float
    high: float
    low: float
    close: float
    volume: float


def ms_to_datetime(ms: int) -> datetime:
    """Exact for any integer ms (no float rounding)."""
    return EPOCH + timedelta(milliseconds=ms)


def datetime_to_ms(moment: datetime) -> int:
    delta = moment - EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000


def bucket_start(open_time_ms: int, tf: str) -> int:
    """Open time of the epoch-aligned bucket of `tf` that contains `open_time_ms`."""
    size = TF_MS[tf]
    return open_time_ms - open_time_ms % size


def key_arrays(keys: Sequence[tuple[str, int]]) -> tuple[list[str], list]:
    """(symbol, open_time ms) pairs as the two arrays an `unnest` takes."""
    return [k[0] for k in keys], [ms_to_datetime(k[1]) for k in keys]


def range_arrays(ranges: Sequence[tuple[str, int, int]]) -> tuple[list[str], list, list]:
    """(symbol, start ms, end ms) triples as the three arrays an `unnest` takes."""
    return [r[0] for r in ranges], [ms_to_datetime(r[1]) for r in ranges], [ms_to_datetime(r[2]) for r in ranges]
