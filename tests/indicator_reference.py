"""The references the stored values are checked against: TA-Lib's batch functions over
a whole series (and the documented formulas for what TA-Lib lacks)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import talib

import core_io
from candles import TF_MS, datetime_to_ms
from indicators.kernels import DAY_MS, BarArrays
from indicators.registry import parse_common

TFS = ("m1", "m5", "m15")

# (indicator, params as configured) for every indicator of the common set.
COMMON_CASES: list[tuple[str, dict[str, str]]] = [
    ("ema", {"length": "9"}),
    ("ema", {"length": "50"}),
    ("sma", {"length": "20"}),
    ("sma", {"length": "20", "source": "volume"}),
    ("wma", {"length": "10"}),
    ("rsi", {"length": "14"}),
    ("macd", {"fast": "12", "slow": "26", "signal": "9"}),
    ("bbands", {"length": "20", "lower_std": "2", "upper_std": "2"}),
    ("atr", {"length": "14"}),
    ("natr", {"length": "14"}),
    ("adx", {"length": "14"}),
    ("stoch", {"k": "14", "d": "3", "smooth_k": "3"}),
    ("stochrsi", {}),
    ("cci", {"length": "20"}),
    ("mfi", {}),
    ("willr", {}),
    ("obv", {}),
    ("roc", {}),
    ("psar", {}),
    ("supertrend", {"length": "10", "multiplier": "3"}),
    ("kc", {}),
    ("donchian", {}),
    ("vwap", {"anchor": "D"}),
]


def shift(values: np.ndarray, n: int) -> np.ndarray:
    return np.concatenate((np.full(n, np.nan), values[:-n])) if n else values


def vwap_daily(bars: BarArrays) -> np.ndarray:
    """Σ(typical·volume)/Σ(volume) from each 00:00 UTC, summed bar by bar."""
    out = np.full(bars.size, np.nan)
    day, pv, volume = None, 0.0, 0.0
    for i in range(bars.size):
        d = int(bars.open_time[i]) // DAY_MS
        if d != day:
            day, pv, volume = d, 0.0, 0.0
        pv += (bars.high[i] + bars.low[i] + bars.close[i]) / 3 * bars.volume[i]
        volume += bars.volume[i]
        out[i] = pv / volume if volume > 0 else np.nan
    return out


def reference(indicator: str, p: dict, bars: BarArrays) -> list[np.ndarray]:
    """Outputs in the order of the instance's names."""
    h, lo, c, v = bars.high, bars.low, bars.close, bars.volume
    src = v if p.get("source") == "volume" else c
    if indicator in ("ema", "sma", "wma"):
        return [getattr(talib, indicator.upper())(src, p["length"])]
    if indicator == "rsi":
        return [talib.RSI(c, p["length"])]
    if indicator == "roc":
        return [talib.ROC(c, p["length"])]
    if indicator == "macd":
        macd, signal, hist = talib.MACD(c, p["fast"], p["slow"], p["signal"])
        return [macd, hist, signal]
    if indicator == "bbands":
        u, m, lower = talib.BBANDS(c, p["length"], p["upper_std"], p["lower_std"], 0)
        with np.errstate(divide="ignore", invalid="ignore"):  # %B of a flat window: no value
            percent = (c - lower) / (u - lower)
        percent[~np.isfinite(percent)] = np.nan
        return [lower, m, u, 100 * (u - lower) / m, percent]
    if indicator in ("atr", "natr", "willr"):
        return [getattr(talib, indicator.upper())(h, lo, c, p["length"])]
    if indicator == "cci":
        return [talib.CCI(h, lo, c, p["length"]) * (0.015 / p["c"])]
    if indicator == "mfi":
        return [talib.MFI(h, lo, c, v, p["length"])]
    if indicator == "adx":
        adx = talib.ADX(h, lo, c, p["length"])
        return [
            adx,
            0.5 * (adx + shift(adx, p["adxr_length"])),
            talib.PLUS_DI(h, lo, c, p["length"]),
            talib.MINUS_DI(h, lo, c, p["length"]),
        ]
    if indicator == "stoch":
        k, d = talib.STOCH(h, lo, c, p["k"], p["smooth_k"], 0, p["d"], 0)
        return [k, d, k - d]
    if indicator == "stochrsi":
        rsi = talib.RSI(c, p["rsi_length"])
        return list(talib.STOCH(rsi, rsi, rsi, p["length"], p["k"], 0, p["d"], 0))
    if indicator == "obv":
        return [talib.OBV(c, v)]
    if indicator == "psar":
        sar = talib.SAR(h, lo, p["af0"], p["max_af"])
        return [np.where(sar <= lo, sar, np.nan), np.where(sar > lo, sar, np.nan)]
    if indicator == "supertrend":
        value, trend = talib.SUPERTREND(h, lo, c, p["length"], p["multiplier"])
        trend = np.where(np.isfinite(value), trend.astype(float), np.nan)
        return [value, trend, np.where(trend == 1, value, np.nan), np.where(trend == -1, value, np.nan)]
    if indicator == "kc":
        u, m, lower = talib.KC(h, lo, c, p["length"], p["length"], float(p["scalar"]))
        return [lower, m, u]
    if indicator == "donchian":
        u, m, lower = talib.DONCHIAN(h, lo, p["lower_length"])
        return [lower, m, u]
    if indicator == "vwap":
        return [vwap_daily(bars)]
    raise KeyError(indicator)


def close_enough(got: float, want: float) -> bool:
    """1e-9 relative, 1e-9 absolute near zero."""
    return math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-9)


async def configure(pool, cases: list[tuple[str, dict[str, str]]], timeframes: Sequence[str] = TFS) -> None:
    """These instances, and no others, on every timeframe (M1/M5/M15 unless told)."""
    await pool.execute("DELETE FROM indicator_instances_v4")
    for tf in timeframes:
        for indicator, params in cases:
            instance_id = await pool.fetchval(
                "INSERT INTO indicator_instances_v4 (indicator, timeframe) VALUES ($1, $2) RETURNING id", indicator, tf
            )
            for name, value in params.items():
                await pool.execute(
                    "INSERT INTO indicator_parameters_v4 (instance_id, param, value) VALUES ($1, $2, $3)",
                    instance_id,
                    name,
                    value,
                )


async def stored_series(pool, tf: str, symbol: str = "LINKUSDT") -> BarArrays:
    history = await core_io.fetch_history(pool, tf, [(symbol, None, 1_000_000)])
    return BarArrays.from_columns(history[symbol])


async def assert_values_match_talib(pool, symbols: list[str]) -> int:
    """Every stored value of every symbol equals the reference over the whole stored
    series (1e-9 relative, 1e-9 absolute near zero); returns how many were checked."""
    checked, wrong = await talib_mismatches(pool, symbols)
    example = sorted(wrong)[:4]
    assert not wrong, f"{len(wrong)} of {checked} values differ, e.g. {example}; per series: {summarize(wrong)}"
    return checked


def summarize(wrong: list[tuple]) -> dict[tuple[str, str], tuple[int, str, str, list[str]]]:
    """Per series: how many values differ, from which bar to which, of which outputs."""
    series: dict[tuple[str, str], list[tuple]] = {}
    for row in wrong:
        series.setdefault(row[:2], []).append(row)
    return {
        key: (len(rows), min(str(r[3]) for r in rows), max(str(r[3]) for r in rows), sorted({r[2] for r in rows}))
        for key, rows in series.items()
    }


async def talib_mismatches(pool, symbols: list[str]) -> tuple[int, list[tuple]]:
    """(values checked, the values that differ or are missing at the newest bar)."""
    instances = await pool.fetch("SELECT id, indicator, timeframe FROM indicator_instances_v4 ORDER BY id")
    params_rows = await pool.fetch("SELECT instance_id, param, value FROM indicator_parameters_v4")
    checked = 0
    wrong: list[tuple] = []
    for symbol in symbols:
        for tf in TFS:
            bars = await stored_series(pool, tf, symbol)
            index = {int(t): i for i, t in enumerate(bars.open_time)}
            for row in (r for r in instances if r["timeframe"] == tf):
                params = {r["param"]: r["value"] for r in params_rows if r["instance_id"] == row["id"]}
                instance = parse_common(row["id"], row["indicator"], tf, TF_MS[tf] // 60_000, params)
                expected = dict(zip(instance.names, reference(row["indicator"], instance.params, bars)))
                stored = await pool.fetch(
                    "SELECT open_time, param_name, value FROM indicator_values_v4 "
                    "WHERE instance_id = $1 AND symbol = $2",
                    row["id"],
                    symbol,
                )
                at_newest = {r["param_name"] for r in stored if datetime_to_ms(r["open_time"]) == bars.open_time[-1]}
                for name, values in expected.items():
                    if np.isfinite(values[-1]) and name not in at_newest:
                        wrong.append((symbol, tf, name, "no value for the newest bar"))
                for r in stored:
                    want = expected[r["param_name"]][index[datetime_to_ms(r["open_time"])]]
                    if not (np.isfinite(want) and close_enough(r["value"], want)):
                        wrong.append((symbol, tf, r["param_name"], r["open_time"].isoformat(), r["value"], float(want)))
                    checked += 1
    return checked, wrong
