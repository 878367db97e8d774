"""Where the fake exchange gets its M1 candles: the real archives, or a seeded synthetic walk.

The exchange only ever asks a source for "the candle of this symbol at this minute", so a
source can be a dict lookup (archives) or a pure function of (seed, symbol, minute)
(synthetic, any number of symbols without memory per minute).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import ROUND_DOWN, Decimal
from pathlib import Path
from typing import Protocol

from candles import Candle, datetime_to_ms
from market_data import ARCHIVE_DIR, archive_symbols, read_archive

MINUTE_MS = 60_000


class CandleSource(Protocol):
    """The exchange's history: M1 candles by (symbol, open time)."""

    symbols: list[str]
    first_open_time: int  # ms, inclusive
    last_open_time: int  # ms, inclusive

    def candle(self, symbol: str, open_time_ms: int) -> Candle | None:
        """The M1 candle at that minute, None if the exchange has none."""
        ...


class ArchiveSource:
    """Binance's monthly 1m archives, loaded into memory (one dict per symbol).

    `start_ms` / `end_ms` keep only a window (inclusive), which also makes loading faster
    when the window is near the start of the month (reading stops past `end_ms`).
    """

    def __init__(
        self,
        symbols: Sequence[str] | None = None,
        start_ms: int | None = None,
        end_ms: int | None = None,
        archive_dir: Path = ARCHIVE_DIR,
    ) -> None:
        available = archive_symbols(archive_dir)
        chosen = list(symbols) if symbols is not None else available
        unknown = sorted(set(chosen) - set(available))
        if unknown:
            raise ValueError(f"no archive for {unknown} in {archive_dir}")
        self._rows: dict[str, dict[int, Candle]] = {}
        for symbol in chosen:
            rows: dict[int, Candle] = {}
            for candle in read_archive(symbol, archive_dir):
                if start_ms is not None and candle.open_time < start_ms:
                    continue
                if end_ms is not None and candle.open_time > end_ms:
                    break
                rows[candle.open_time] = candle
            if not rows:
                raise ValueError(f"{symbol}: no archive rows in the requested window")
            self._rows[symbol] = rows
        self.symbols: list[str] = chosen
        self.first_open_time: int = min(min(rows) for rows in self._rows.values())
        self.last_open_time: int = max(max(rows) for rows in self._rows.values())

    def candle(self, symbol: str, open_time_ms: int) -> Candle | None:
        rows = self._rows.get(symbol)
        return rows.get(open_time_ms) if rows is not None else None


# --- synthetic -----------------------------------------------------------------------

SYNTHETIC_START_MS = datetime_to_ms(datetime(2026, 2, 1, tzinfo=UTC))  # same start as the archives
SYNTHETIC_END_MS = datetime_to_ms(datetime(2027, 1, 31, 23, 59, tzinfo=UTC))
_MASK64 = (1 << 64) - 1
_LEVELS = 26  # the walk covers minutes [0, 2**26): epoch to ~2097
_SIGMA = 0.0008  # log-return standard deviation per minute
_SQRT3 = math.sqrt(3.0)
# Midpoint displacement of a Brownian bridge over L minutes has standard deviation sqrt(L)/2.
_LEVEL_SD = {1 << k: _SIGMA * math.sqrt(1 << k) / 2 * _SQRT3 for k in range(_LEVELS + 1)}
_ZERO_MINUTE_P = 0.002  # about 3 trade-less minutes a day per symbol
_PRICE = Decimal("0.0001")
_QUOTE = Decimal("0.00001")
_CACHE_LIMIT = 200_000


def _mix(x: int) -> int:
    """splitmix64 finaliser: a fast, well-spread integer hash (deterministic across runs)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _unit(key: int, salt: int, index: int) -> float:
    """A uniform [0, 1) value for (key, salt, index)."""
    return (_mix(_mix(key ^ salt) ^ index) >> 11) * (1.0 / (1 << 53))


def _ticks(value: float, scale: int) -> Decimal:
    """`value` rounded to 1/scale, at least one tick, with a fixed number of decimals."""
    exponent = -round(math.log10(scale))
    return Decimal(max(1, round(value * scale))).scaleb(exponent)


_MIN_VOLUME = Decimal("0.010")


class SyntheticSource:
    """A seeded random walk for any number of symbols (SYN0001USDT, SYN0002USDT, ...).

    Each value is a pure function of (seed, symbol, minute): the walk is a Brownian bridge
    built by midpoint displacement over absolute epoch minutes, so any minute costs
    ~26 hashes and nothing is stored per minute (a small bounded cache only speeds up the
    exchange's repeated look-ups of the current minutes). Prices have 4 decimals, volumes 3,
    quote volumes 5; about 0.2 % of minutes have no trades (n=0, v=0, o=h=l=c=previous close,
    as in the archives).
    """

    def __init__(
        self,
        n_symbols: int,
        seed: int = 1,
        start_ms: int = SYNTHETIC_START_MS,
        end_ms: int = SYNTHETIC_END_MS,
    ) -> None:
        if n_symbols < 1:
            raise ValueError("n_symbols must be >= 1")
        self.seed = seed
        self.symbols: list[str] = [f"SYN{i:04d}USDT" for i in range(1, n_symbols + 1)]
        self.first_open_time: int = start_ms - start_ms % MINUTE_MS
        self.last_open_time: int = end_ms - end_ms % MINUTE_MS
        self._keys = {s: _mix(seed * 0x100000001B3 ^ zlib.crc32(s.encode())) for s in self.symbols}
        self._candles: dict[tuple[str, int], Candle] = {}
        self._closes: dict[tuple[int, int], Decimal] = {}

    def candle(self, symbol: str, open_time_ms: int) -> Candle | None:
        key = self._keys.get(symbol)
        if key is None or open_time_ms % MINUTE_MS or not self.first_open_time <= open_time_ms <= self.last_open_time:
            return None
        cached = self._candles.get((symbol, open_time_ms))
        if cached is None:
            if len(self._candles) > _CACHE_LIMIT:
                self._candles.clear()
            cached = self._candles[(symbol, open_time_ms)] = self._make(symbol, key, open_time_ms)
        return cached

    # The walk ---------------------------------------------------------------------------

    def _walk(self, key: int, minute: int) -> float:
        lo, hi, w_lo, w_hi = 0, 1 << _LEVELS, 0.0, 0.0
        while hi - lo > 1:
            mid = (lo + hi) >> 1
            w_mid = (w_lo + w_hi) * 0.5 + (2.0 * _unit(key, 1, mid) - 1.0) * _LEVEL_SD[hi - lo]
            if minute < mid:
                hi, w_hi = mid, w_mid
            else:
                lo, w_lo = mid, w_mid
        return w_lo

    def _base_price(self, key: int) -> float:
        """Log-uniform between 0.5 and 5000, so decimals look like alts and majors alike."""
        return math.exp(math.log(0.5) + _unit(key, 2, 0) * math.log(10_000))

    def _is_quiet(self, key: int, minute: int) -> bool:
        return _unit(key, 3, minute) < _ZERO_MINUTE_P

    def _close(self, key: int, minute: int) -> Decimal:
        """The close shown for `minute`: trade-less minutes repeat the previous close."""
        cached = self._closes.get((key, minute))
        if cached is not None:
            return cached
        m = minute
        while self._is_quiet(key, m) and minute - m < 10_000:
            m -= 1
        value = _ticks(self._base_price(key) * math.exp(self._walk(key, m)), 10_000)
        if len(self._closes) > _CACHE_LIMIT:
            self._closes.clear()
        self._closes[(key, minute)] = value
        return value

    def _make(self, symbol: str, key: int, open_time: int) -> Candle:
        minute = open_time // MINUTE_MS
        prev_close = self._close(key, minute - 1)
        if self._is_quiet(key, minute):
            zero = Decimal(0)
            return Candle(
                symbol, "m1", open_time, prev_close, prev_close, prev_close, prev_close, zero, zero, 0, zero, zero
            )
        close = self._close(key, minute)
        p_open, p_close = float(prev_close), float(close)
        # Futures open = first trade of the minute: often a tick or two off the previous close.
        opened = (
            prev_close
            if _unit(key, 4, minute) < 0.5
            else _ticks(p_open * (1 + _SIGMA * 0.3 * (2 * _unit(key, 5, minute) - 1)), 10_000)
        )
        top, bottom = max(float(opened), p_close), min(float(opened), p_close)
        high = max(_ticks(top * (1 + _SIGMA * _unit(key, 6, minute)), 10_000), opened, close)
        low = min(_ticks(bottom * (1 - _SIGMA * _unit(key, 7, minute)), 10_000), opened, close)
        activity = 20 + 380 * _unit(key, 8, 0)
        trades = 1 + int(activity * (0.2 + 1.6 * _unit(key, 9, minute)))
        volume = _ticks(trades * (1000 / max(p_close, 0.01)) * (0.2 + _unit(key, 10, minute)), 1000)
        # At least ten quantity steps: the made-up trades (trades.py) print the open, the
        # high, the low and the close and both sides, each aggTrade a step at least.
        volume = max(volume, _MIN_VOLUME)
        vwap = ((high + low) / 2).quantize(_PRICE)
        taker = (volume * Decimal(str(round(0.3 + 0.4 * _unit(key, 11, minute), 3)))).quantize(
            Decimal("0.001"), ROUND_DOWN
        )
        return Candle(
            symbol=symbol,
            tf="m1",
            open_time=open_time,
            open=opened,
            high=high,
            low=low,
            close=close,
            volume=volume,
            quote_volume=(volume * vwap).quantize(_QUOTE),
            trades=trades,
            taker_buy_volume=taker,
            taker_buy_quote_volume=(taker * vwap).quantize(_QUOTE),
        )
