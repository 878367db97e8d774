"""Indicator benchmark: 500 symbols x m1/m5/m15 x the default set (14 instances per
timeframe, sql/002_default_indicators.sql), at the worst minute boundary, where M1, M5
and M15 close together (1500 series step at once). Prints:

1. engine compute time for one worst boundary: every kernel of the 1500 series, opened
   from ~3000 bars of real archive history, steps one new bar (median and max over
   consecutive boundaries);
2. the time pandas-ta (TA-Lib mode) takes to recompute the same set over a 250-bar
   window for the 1500 series, and its ratio to the engine.

Budgets: compute <= 20 ms per worst boundary; pandas-ta at least 50x slower than the
engine. What a user gets at a boundary, end to end (the daemon as a process, the
exchange at real speed), is bench/boundary_bench.py's to measure: this file's former
end-to-end part ran the feed in its own process against a 4x exchange, with 300 minutes
of history, closes spread over 0.2-2 s and no forming updates, and so reported p99
~200 ms where the daemon took over a second.
"""

from __future__ import annotations

import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from candles import TF_MS, TIMEFRAMES  # noqa: E402
from indicators.kernels import BarArrays, Kernel  # noqa: E402
from indicators.registry import parse_common  # noqa: E402
from market_data import archive_symbols, read_archive  # noqa: E402

SYMBOLS = 500
M1 = 60_000
# The default set of sql/002_default_indicators.sql, as (indicator, params) rows.
DEFAULT_SET: list[tuple[str, dict[str, str]]] = [
    ("ema", {"length": "9"}),
    ("ema", {"length": "21"}),
    ("ema", {"length": "50"}),
    ("ema", {"length": "200"}),
    ("sma", {"length": "20"}),
    ("rsi", {"length": "14"}),
    ("macd", {"fast": "12", "slow": "26", "signal": "9"}),
    ("bbands", {"length": "20", "lower_std": "2", "upper_std": "2"}),
    ("atr", {"length": "14"}),
    ("adx", {"length": "14"}),
    ("stoch", {"k": "14", "d": "3", "smooth_k": "3"}),
    ("supertrend", {"length": "10", "multiplier": "3"}),
    ("vwap", {"anchor": "D"}),
    ("obv", {}),
]
HISTORY = 3000  # bars each series is opened from (fewer on m15: the archives hold one month)
STEPS = 20  # consecutive worst boundaries timed
WINDOW = 250  # bars pandas-ta recomputes over (IndicatorOptions.slow_window)
COMPUTE_BUDGET_MS = 20.0
RATIO_BUDGET = 50.0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, int(len(ordered) * q + 0.5) - 1)]


# --------------------------------------------------------------------------- 1. engine compute


def archive_bars() -> dict[str, dict[str, BarArrays]]:
    """Each archive symbol's month as M1 bars, and M5/M15 by reshaping (epoch-aligned, gap-free)."""
    out: dict[str, dict[str, BarArrays]] = {}
    for symbol in archive_symbols():
        rows = [
            (float(c.open), float(c.high), float(c.low), float(c.close), float(c.volume), c.open_time)
            for c in read_archive(symbol)
        ]
        m1 = BarArrays.from_rows(rows)
        if np.any(np.diff(m1.open_time) != M1):
            raise RuntimeError(f"{symbol}: the archive has gaps; reshaping needs contiguous minutes")
        by_tf = {"m1": m1}
        for tf in ("m5", "m15"):
            k = TF_MS[tf] // M1
            first = int(np.argmax(m1.open_time % TF_MS[tf] == 0))
            n = (m1.size - first) // k * k
            cut = m1.tail(first)

            def shaped(column: np.ndarray, k: int = k, n: int = n) -> np.ndarray:
                return column[:n].reshape(-1, k)

            by_tf[tf] = BarArrays(
                shaped(cut.open_time)[:, 0].copy(),
                shaped(cut.open)[:, 0].copy(),
                shaped(cut.high).max(axis=1),
                shaped(cut.low).min(axis=1),
                shaped(cut.close)[:, -1].copy(),
                shaped(cut.volume).sum(axis=1),
            )
        out[symbol] = by_tf
    return out


def make_series(archives: dict[str, dict[str, BarArrays]]) -> list[tuple[str, str, BarArrays, int]]:
    """(symbol, tf, bars, open_at) per series: symbol i takes archive i % 7, a price scale
    and a start offset of its own; the series opens from bars[:open_at] and steps the rest."""
    names = sorted(archives)
    variants = -(-SYMBOLS // len(names))
    series = []
    for i in range(SYMBOLS):
        variant = i // len(names)
        scale = 1.0 + 0.37 * variant / variants
        for tf in TIMEFRAMES:
            bars = archives[names[i % len(names)]][tf]
            history = min(HISTORY, bars.size - STEPS - variants)
            window = bars.tail(variant)
            window = BarArrays(
                window.open_time[: history + STEPS],
                *(column[: history + STEPS] * scale for column in window[1:5]),
                window.volume[: history + STEPS].copy(),
            )
            series.append((f"S{i:04d}", tf, window, history))
    return series


def bench_engine() -> tuple[float, list[tuple[str, BarArrays, int]]]:
    started = time.perf_counter()
    archives = archive_bars()
    specs = make_series(archives)
    loaded = time.perf_counter() - started
    instances = {
        tf: [
            parse_common(n, indicator, tf, TF_MS[tf] // 60_000, params)
            for n, (indicator, params) in enumerate(DEFAULT_SET, 1)
        ]
        for tf in TIMEFRAMES
    }
    if any(i is None for tf in TIMEFRAMES for i in instances[tf]):
        raise RuntimeError("an instance of the default set is not in the incremental set")
    started = time.perf_counter()
    opened: list[tuple[list[Kernel], list[tuple]]] = []
    for _, tf, bars, at in specs:
        kernels = [instance.make_kernel() for instance in instances[tf]]  # type: ignore[union-attr]
        history = BarArrays(*(column[:at] for column in bars))
        for kernel in kernels:
            kernel.fill(history)
        new = list(
            zip(
                bars.open[at:].tolist(),
                bars.high[at:].tolist(),
                bars.low[at:].tolist(),
                bars.close[at:].tolist(),
                bars.volume[at:].tolist(),
                bars.open_time[at:].tolist(),
            )
        )
        opened.append((kernels, new))
    open_s = time.perf_counter() - started
    outputs = sum(len(k.names) for k in opened[0][0])
    sizes = {tf: at for _, tf, _, at in specs}
    print(
        f"engine: {len(specs)} series ({SYMBOLS} symbols x {len(TIMEFRAMES)} timeframes) x {len(DEFAULT_SET)} "
        f"instances ({outputs} outputs per series), from real archives ({len(archives)} symbols, {loaded:.1f} s to "
        f"load); opened from {sizes['m1']}/{sizes['m5']}/{sizes['m15']} bars (m1/m5/m15) in {open_s:.1f} s"
    )
    timings: list[float] = []
    for step in range(STEPS):
        started = time.perf_counter()
        for kernels, new in opened:
            bar = new[step]
            values: list[float] = []
            for kernel in kernels:
                values.extend(kernel.step(bar))
        timings.append((time.perf_counter() - started) * 1000)
    median = statistics.median(timings)
    print(
        f"engine compute, one worst boundary ({len(specs)} series step one bar): median {median:.2f} ms, "
        f"max {max(timings):.2f} ms over {STEPS} consecutive boundaries (budget <= {COMPUTE_BUDGET_MS:.0f} ms)"
    )
    return median, [(tf, bars, at) for _, tf, bars, at in specs]


# --------------------------------------------------------------------------- 2. pandas-ta


def bench_pandas_ta(engine_median_ms: float, specs: list[tuple[str, BarArrays, int]]) -> None:
    warnings.filterwarnings("ignore")
    import pandas as pd
    import pandas_ta  # registers the DataFrame.ta accessor

    started = time.perf_counter()
    frames = []
    for _, bars, at in specs:
        part = slice(at + 1 - WINDOW, at + 1)  # the window ending at the first new bar
        frames.append(
            pd.DataFrame(
                {
                    "open": bars.open[part],
                    "high": bars.high[part],
                    "low": bars.low[part],
                    "close": bars.close[part],
                    "volume": bars.volume[part],
                },
                index=pd.to_datetime(bars.open_time[part], unit="ms", utc=True),
            )
        )
    build_s = time.perf_counter() - started
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        started = time.perf_counter()
        for df in frames:
            df.ta.ema(length=9)
            df.ta.ema(length=21)
            df.ta.ema(length=50)
            df.ta.ema(length=200)
            df.ta.sma(length=20)
            df.ta.rsi(length=14)
            df.ta.macd(fast=12, slow=26, signal=9)
            df.ta.bbands(length=20, lower_std=2, upper_std=2)
            df.ta.atr(length=14)
            df.ta.adx(length=14)
            df.ta.stoch(k=14, d=3, smooth_k=3)
            df.ta.supertrend(length=10, multiplier=3)
            df.ta.vwap(anchor="D")
            df.ta.obv()
        total = time.perf_counter() - started
    ratio = total * 1000 / engine_median_ms
    print(
        f"pandas-ta {pandas_ta.version} (TA-Lib mode) recomputing the same set over a {WINDOW}-bar window for "
        f"{len(frames)} series: {total:.2f} s ({total / len(frames) * 1000:.2f} ms per series; DataFrames built "
        f"beforehand in {build_s:.2f} s); pandas-ta / engine median = {ratio:,.0f}x (budget >= {RATIO_BUDGET:.0f}x)"
    )


# --------------------------------------------------------------------------- 3. end to end


def main() -> None:
    engine_median_ms, specs = bench_engine()
    bench_pandas_ta(engine_median_ms, specs)
    del specs


if __name__ == "__main__":
    main()
