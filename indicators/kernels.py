"""Incremental, TA-Lib-exact implementations of the common indicators.

Every kernel has `names` (its output columns, pandas-ta style), `fill(bars)` which
(re)opens its state from history and returns one array per output aligned with the
bars, and `step(bar)` which takes one new bar `(open, high, low, close, volume,
open_time_ms)` and returns one float per output (NaN: no value on this bar).
"""

from __future__ import annotations

from collections import deque
from typing import NamedTuple, Protocol

import numpy as np
import talib

from candles import DAY_MS
from indicators.stages import NAN, Stage

BarTuple = tuple[float, float, float, float, float, int]


class BarArrays(NamedTuple):
    open_time: np.ndarray  # int64 ms
    open: np.ndarray
    high: np.ndarray
    low: np.ndarray
    close: np.ndarray
    volume: np.ndarray

    @property
    def size(self) -> int:
        return len(self.open_time)

    @classmethod
    def from_rows(cls, rows: list[BarTuple]) -> BarArrays:
        """From `(o, h, l, c, v, t)` tuples, oldest first."""
        if not rows:
            empty = np.empty(0)
            return cls(np.empty(0, dtype=np.int64), empty, empty, empty, empty, empty)
        o, h, lo, c, v, t = (np.asarray(col) for col in zip(*rows))
        return cls(t.astype(np.int64), *(x.astype(np.float64) for x in (o, h, lo, c, v)))

    @classmethod
    def from_columns(cls, columns: tuple[list, ...]) -> BarArrays:
        """From (t, o, h, l, c, v) lists, as core_io.fetch_history returns them."""
        t, o, h, lo, c, v = columns
        return cls(np.asarray(t, dtype=np.int64), *(np.asarray(x, dtype=np.float64) for x in (o, h, lo, c, v)))

    def tail(self, start: int) -> BarArrays:
        return BarArrays(*(column[start:] for column in self))


class Kernel(Protocol):
    names: tuple[str, ...]

    def fill(self, bars: BarArrays) -> list[np.ndarray]: ...

    def step(self, bar: BarTuple) -> tuple[float, ...]: ...


# ------------------------------------------------------------------ price sources

SOURCES = ("close", "open", "high", "low", "volume", "hl2", "hlc3", "ohlc4")


def source_array(bars: BarArrays, source: str) -> np.ndarray:
    if source == "hl2":
        return (bars.high + bars.low) / 2
    if source == "hlc3":
        return (bars.high + bars.low + bars.close) / 3
    if source == "ohlc4":
        return (bars.open + bars.high + bars.low + bars.close) / 4
    return getattr(bars, source)


_SOURCE_INDEX = {"open": 0, "high": 1, "low": 2, "close": 3, "volume": 4}


def source_value(bar: BarTuple, source: str) -> float:
    index = _SOURCE_INDEX.get(source)
    if index is not None:
        return bar[index]
    o, h, lo, c = bar[0], bar[1], bar[2], bar[3]
    if source == "hl2":
        return (h + lo) / 2
    if source == "hlc3":
        return (h + lo + c) / 3
    return (o + h + lo + c) / 4


# ------------------------------------------------------------------ kernels


class SourceKernel:
    """One TA-Lib function of one price source (EMA, SMA, WMA, RSI, ROC)."""

    __slots__ = ("index", "names", "scale", "source", "stage")

    def __init__(self, name: str, function: str, source: str, scale: float = 1.0, **params: float) -> None:
        self.names = (name,)
        self.stage = Stage(function, **params)
        self.source = source
        self.index = _SOURCE_INDEX.get(source)
        self.scale = scale

    def fill(self, bars: BarArrays) -> list[np.ndarray]:
        (out,) = self.stage.fill(source_array(bars, self.source))
        return [out * self.scale if self.scale != 1.0 else out]

    def step(self, bar: BarTuple) -> tuple[float, ...]:
        (out,) = self.stage.step(bar[self.index] if self.index is not None else source_value(bar, self.source))
        return (out * self.scale if self.scale != 1.0 else out,)


class HlcKernel:
    """One single-output TA-Lib function of high, low, close (ATR, NATR, CCI, WILLR)."""

    __slots__ = ("names", "scale", "stage")

    def __init__(self, name: str, function: str, scale: float = 1.0, **params: float) -> None:
        self.names = (name,)
        self.stage = Stage(function, **params)
        self.scale = scale

    def fill(self, bars: BarArrays) -> list[np.ndarray]:
        (out,) = self.stage.fill(bars.high, bars.low, bars.close)
        return [out * self.scale if self.scale != 1.0 else out]

    def step(self, bar: BarTuple) -> tuple[float, ...]:
        (out,) = self.stage.step(bar[1], bar[2], bar[3])
        return (out * self.scale if self.scale != 1.0 else out,)


class MfiKernel:
    __slots__ = ("names", "stage")

    def __init__(self, name: str, length: int) -> None:
        self.names = (name,)
        self.stage = Stage("MFI", timeperiod=length)

    def fill(self, bars: BarArrays) -> list[np.ndarray]:
        return list(self.stage.fill(bars.high, bars.low, bars.close, bars.volume))

    def step(self, bar: BarTuple) -> tuple[float, ...]:
        return self.stage.step(bar[1], bar[2], bar[3], bar[4])


class MacdKernel:
    """TA-Lib gives (macd, signal, hist); pandas-ta names them MACD, MACDh, MACDs."""

    __slots__ = ("names", "stage")

    def __init__(self, names: tuple[str, str, str], fast: int, slow: int, signal: int) -> None:
        self.names = names
        self.stage = Stage("MACD", 3, fastperiod=fast, slowperiod=slow, signalperiod=signal)

    def fill(self, bars: BarArrays) -> list[np.ndarray]:
        macd, signal, hist = self.stage.fill(bars.close)
        return [macd, hist, signal]

    def step(self, bar: BarTuple) -> tuple[float, ...]:
        macd, signal, hist = self.stage.step(bar[3])
        return (macd, hist, signal)


def _bb_extras(close, upper, middle, lower):
    width = upper - lower
    return 100 * width / middle, (close - lower) / width


class BbandsKernel:
    """Lower, middle, upper, bandwidth (100·(U−L)/M) and %B ((C−L)/(U−L)), pandas-ta's formulas."""

    __slots__ = ("names", "stage")

    def __init__(self, names: tuple[str, ...], length: int, lower_std: float, upper_std: float) -> None:
        self.names = names
        self.stage = Stage("BBANDS", 3, timeperiod=length, nbdevup=upper_std, nbdevdn=lower_std, matype=0)

    def fill(self, bars: BarArrays) -> list[np.ndarray]:
        upper, middle, lower = self.stage.fill(bars.close)
        with np.errstate(divide="ignore", invalid="ignore"):
            width = upper - lower
            bandwidth, percent = 100 * width / middle, (bars.close - lower) / width
        percent[~np.isfinite(percent)] = NAN
        bandwidth[~np.isfinite(bandwidth)] = NAN
        return [lower, middle, upper, bandwidth, percent]

    def step(self, bar: BarTuple) -> tuple[float, ...]:
        upper, middle, lower = self.stage.step(bar[3])
        width = upper - lower
        bandwidth = 100 * width / middle if middle != 0 else NAN
        percent = (bar[3] - lower) / width if width != 0 else NAN
        return (lower, middle, upper, bandwidth, percent)


class AdxKernel:
    """ADX, ADXR (pandas-ta: ½·(ADXₜ + ADXₜ₋ᵣ)), and TA-Lib's true +DI/−DI."""

    __slots__ = ("adx", "dmn", "dmp", "names", "recent", "shift")

    def __init__(self, names: tuple[str, ...], length: int, adxr_length: int) -> None:
        self.names = names
        self.adx = Stage("ADX", timeperiod=length)
        self.dmp = Stage("PLUS_DI", timeperiod=length)
        self.dmn = Stage("MINUS_DI", timeperiod=length)
        self.shift = adxr_length
        self.recent: deque[float] = deque([NAN] * (adxr_length + 1), maxlen=adxr_length + 1)

    def fill(self, bars: BarArrays) -> list[np.ndarray]:
        hlc = (bars.high, bars.low, bars.close)
        (adx,) = self.adx.fill(*hlc)
        shifted = np.concatenate((np.full(min(self.shift, len(adx)), NAN), adx[: len(adx) - self.shift]))
        self.recent.extend([NAN] * (self.shift + 1))
        self.recent.extend(adx[-(self.shift + 1) :].tolist())
        return [adx, 0.5 * (adx + shifted), self.dmp.fill(*hlc)[0], self.dmn.fill(*hlc)[0]]

    def step(self, bar: BarTuple) -> tuple[float, ...]:
        hlc = bar[1:4]
        (adx,) = self.adx.step(*hlc)
        self.recent.append(adx)
        return (adx, 0.5 * (adx + self.recent[0]), self.dmp.step(*hlc)[0], self.dmn.step(*hlc)[0])


class StochKernel:
    """%K = SMA(fast %K, smooth_k), %D = SMA(%K, d), histogram %K − %D."""

    __slots__ = ("names", "stage")

    def __init__(self, names: tuple[str, ...], k: int, d: int, smooth_k: int) -> None:
        self.names = names
        self.stage = Stage("STOCH", 2, fastk_period=k, slowk_period=smooth_k, slowk_matype=0, slowd_period=d)

    def fill(self, bars: BarArrays) -> list[np.ndarray]:
        k, d = self.stage.fill(bars.high, bars.low, bars.close)
        return [k, d, k - d]

    def step(self, bar: BarTuple) -> tuple[float, ...]:
        k, d = self.stage.step(bar[1], bar[2], bar[3])
        return (k, d, k - d)


class StochRsiKernel:
    """pandas-ta's definition on TA-Lib parts: STOCH(rsi, rsi, rsi) over TA-Lib's RSI."""

    __slots__ = ("names", "rsi", "stoch")

    def __init__(self, names: tuple[str, ...], length: int, rsi_length: int, k: int, d: int) -> None:
        self.names = names
        self.rsi = Stage("RSI", timeperiod=rsi_length)
        self.stoch = Stage("STOCH", 2, fastk_period=length, slowk_period=k, slowk_matype=0, slowd_period=d)

    def fill(self, bars: BarArrays) -> list[np.ndarray]:
        (rsi,) = self.rsi.fill(bars.close)
        return list(self.stoch.fill(rsi, rsi, rsi))

    def step(self, bar: BarTuple) -> tuple[float, ...]:
        (rsi,) = self.rsi.step(bar[3])
        return self.stoch.step(rsi, rsi, rsi)


class SarKernel:
    """TA-Lib SAR, split like pandas-ta: the long value when SAR is under the bar, else short."""

    __slots__ = ("names", "stage")

    def __init__(self, names: tuple[str, str], af: float, max_af: float) -> None:
        self.names = names
        self.stage = Stage("SAR", acceleration=af, maximum=max_af)

    def fill(self, bars: BarArrays) -> list[np.ndarray]:
        (sar,) = self.stage.fill(bars.high, bars.low)
        long = sar <= bars.low
        return [np.where(long, sar, NAN), np.where(~long & np.isfinite(sar), sar, NAN)]

    def step(self, bar: BarTuple) -> tuple[float, ...]:
        (sar,) = self.stage.step(bar[1], bar[2])
        if sar != sar:
            return (NAN, NAN)
        return (sar, NAN) if sar <= bar[2] else (NAN, sar)


class SupertrendKernel:
    """TA-Lib SUPERTREND: value, direction (+1 up, −1 down), and the long/short halves."""

    __slots__ = ("names", "stage")

    def __init__(self, names: tuple[str, ...], length: int, multiplier: float) -> None:
        self.names = names
        self.stage = Stage("SUPERTREND", 2, timeperiod=length, multiplier=multiplier)

    def fill(self, bars: BarArrays) -> list[np.ndarray]:
        value, trend = self.stage.fill(bars.high, bars.low, bars.close)
        trend = np.where(np.isfinite(value), trend, NAN)
        return [value, trend, np.where(trend == 1, value, NAN), np.where(trend == -1, value, NAN)]

    def step(self, bar: BarTuple) -> tuple[float, ...]:
        value, trend = self.stage.step(bar[1], bar[2], bar[3])
        if value != value:
            return (NAN, NAN, NAN, NAN)
        return (value, float(trend), value if trend == 1 else NAN, value if trend == -1 else NAN)


class KcKernel:
    """TA-Lib KC (EMA of the typical price ± scalar·ATR), as lower, basis, upper."""

    __slots__ = ("names", "stage")

    def __init__(self, names: tuple[str, ...], length: int, scalar: float) -> None:
        self.names = names
        self.stage = Stage("KC", 3, timeperiod=length, atrperiod=length, nbdev=scalar)

    def fill(self, bars: BarArrays) -> list[np.ndarray]:
        upper, middle, lower = self.stage.fill(bars.high, bars.low, bars.close)
        return [lower, middle, upper]

    def step(self, bar: BarTuple) -> tuple[float, ...]:
        upper, middle, lower = self.stage.step(bar[1], bar[2], bar[3])
        return (lower, middle, upper)


class DonchianKernel:
    """Lowest low, midpoint, highest high (TA-Lib MIN/MAX; DONCHIAN when the lengths match)."""

    __slots__ = ("highest", "lowest", "names")

    def __init__(self, names: tuple[str, ...], lower_length: int, upper_length: int) -> None:
        self.names = names
        self.lowest = Stage("MIN", timeperiod=lower_length)
        self.highest = Stage("MAX", timeperiod=upper_length)

    def fill(self, bars: BarArrays) -> list[np.ndarray]:
        (lower,) = self.lowest.fill(bars.low)
        (upper,) = self.highest.fill(bars.high)
        return [lower, (upper + lower) / 2, upper]

    def step(self, bar: BarTuple) -> tuple[float, ...]:
        (lower,) = self.lowest.step(bar[2])
        (upper,) = self.highest.step(bar[1])
        return (lower, (upper + lower) / 2, upper)


class VwapKernel:
    """VWAP of the typical price (H+L+C)/3, reset at 00:00 UTC (TA-Lib's VWAP never resets).

    Sums run bar by bar from each day's first bar, as pandas-ta's grouped cumsum does.
    """

    __slots__ = ("day", "names", "pv", "volume")

    def __init__(self, name: str) -> None:
        self.names = (name,)
        self.day, self.pv, self.volume = -1, 0.0, 0.0

    def fill(self, bars: BarArrays) -> list[np.ndarray]:
        out = np.full(bars.size, NAN)
        self.day, self.pv, self.volume = -1, 0.0, 0.0
        if not bars.size:
            return [out]
        days = bars.open_time // DAY_MS
        typical = (bars.high + bars.low + bars.close) / 3
        starts = np.flatnonzero(np.diff(days, prepend=days[0] - 1))
        for begin, end in zip(starts, [*starts[1:], bars.size]):
            pv = np.cumsum(typical[begin:end] * bars.volume[begin:end])
            volume = np.cumsum(bars.volume[begin:end])
            with np.errstate(divide="ignore", invalid="ignore"):
                out[begin:end] = np.where(volume > 0, pv / volume, NAN)
            self.day, self.pv, self.volume = int(days[begin]), float(pv[-1]), float(volume[-1])
        return [out]

    def step(self, bar: BarTuple) -> tuple[float, ...]:
        day = bar[5] // DAY_MS
        if day != self.day:
            self.day, self.pv, self.volume = day, 0.0, 0.0
        self.pv += (bar[1] + bar[2] + bar[3]) / 3 * bar[4]
        self.volume += bar[4]
        return (self.pv / self.volume if self.volume > 0 else NAN,)


class ObvKernel:
    """On-balance volume. It is a running sum from the series' first bar, so no window
    of history reproduces it: after a restart it continues from a stored value
    (`anchor`), which is exactly what the sum over the whole history gave."""

    __slots__ = ("last_close", "names", "obv")

    def __init__(self, name: str) -> None:
        self.names = (name,)
        self.last_close, self.obv = NAN, NAN

    def fill(self, bars: BarArrays, anchor: tuple[int, float] | None = None) -> list[np.ndarray]:
        """`anchor`: (open_time, value) of a trusted value inside `bars`; without one the
        bars are taken as the whole history (TA-Lib's OBV starts at the first volume)."""
        out = np.full(bars.size, NAN)
        if not bars.size:
            return [out]
        at = int(np.searchsorted(bars.open_time, anchor[0])) if anchor else -1
        if anchor and at < bars.size and bars.open_time[at] == anchor[0]:
            obv = anchor[1]
            out[at] = obv
            close, volume = bars.close.tolist(), bars.volume.tolist()
            for i in range(at + 1, bars.size):
                if close[i] > close[i - 1]:
                    obv += volume[i]
                elif close[i] < close[i - 1]:
                    obv -= volume[i]
                out[i] = obv
        else:
            out = talib.OBV(bars.close, bars.volume)
        self.last_close, self.obv = float(bars.close[-1]), float(out[-1])
        return [out]

    def step(self, bar: BarTuple) -> tuple[float, ...]:
        close = bar[3]
        if self.obv != self.obv:
            self.obv = bar[4]
        elif close > self.last_close:
            self.obv += bar[4]
        elif close < self.last_close:
            self.obv -= bar[4]
        self.last_close = close
        return (self.obv,)
