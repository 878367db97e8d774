"""The indicator engine alone, no servers: kernels opened at any point of real February 2026
data equal TA-Lib over the whole series; `instance.history` is enough to restart; names and
parameter errors follow pandas-ta; young series, OBV anchors, daily VWAP, the pandas-ta fallback."""

from __future__ import annotations

import math
import warnings
from collections import deque
from collections.abc import Sequence
from functools import cache
from itertools import islice
from typing import Any

import numpy as np
import pytest
import talib
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregation import aggregate
from candles import M1_PER_BUCKET, TF_MS, Candle, bucket_start
from indicators import slow
from indicators.kernels import DAY_MS, SOURCES, BarArrays, BarTuple, Kernel
from indicators.pending import PendingValues, matrices
from indicators.registry import COMMON, IndicatorConfigError, Instance, parse_common
from indicators.series import RecentBars, agrees_with_history, fill_kernel, first_values_in, same_values
from indicators.slow import SlowDue
from indicators.stages import Stage
from market_data import archive_symbols, read_archive
from tests.indicator_reference import COMMON_CASES, close_enough, reference

SYMBOL = "LINKUSDT"
M1_BARS = 6000
TFS = ("m1", "m5", "m15")
TF_MINUTES = {tf: TF_MS[tf] // 60_000 for tf in TFS}


# ------------------------------------------------------------------ real data


@cache
def m1_candles(symbol: str, count: int | None) -> tuple[Candle, ...]:
    return tuple(islice(read_archive(symbol), count))


def complete_buckets(tf: str, m1: Sequence[Candle]) -> list[Candle]:
    """`tf` candles of the buckets whose every minute is present."""
    groups: dict[int, list[Candle]] = {}
    for candle in m1:
        groups.setdefault(bucket_start(candle.open_time, tf), []).append(candle)
    size = M1_PER_BUCKET[tf]
    return [aggregate(tf, start, group) for start, group in sorted(groups.items()) if len(group) == size]


def to_bars(candles: Sequence[Candle]) -> BarArrays:
    return BarArrays.from_rows(
        [(float(c.open), float(c.high), float(c.low), float(c.close), float(c.volume), c.open_time) for c in candles]
    )


@cache
def series(tf: str, symbol: str = SYMBOL, count: int | None = M1_BARS) -> BarArrays:
    """`count` M1 bars of `symbol` (None: the whole month), or their complete M5/M15 buckets."""
    m1 = m1_candles(symbol, count)
    return to_bars(m1 if tf == "m1" else complete_buckets(tf, m1))


def rows_of(bars: BarArrays) -> list[BarTuple]:
    return list(
        zip(*(column.tolist() for column in (bars.open, bars.high, bars.low, bars.close, bars.volume, bars.open_time)))
    )


def part(bars: BarArrays, start: int, stop: int) -> BarArrays:
    return BarArrays(*(column[start:stop] for column in bars))


def opened_at(kernel: Kernel, bars: BarArrays, k: int, start: int = 0, **fill_kwargs: Any) -> list[np.ndarray]:
    """Fill `kernel` with bars[start:k], step bars[k:]; one array per output over bars[start:]."""
    filled = kernel.fill(part(bars, start, k), **fill_kwargs)
    stepped = [kernel.step(row) for row in rows_of(part(bars, k, bars.size))]
    assert all(len(values) == len(filled) for values in stepped)
    return [
        np.concatenate((column, np.array([values[j] for values in stepped], dtype=np.float64)))
        for j, column in enumerate(filled)
    ]


def mismatches(got: np.ndarray, want: np.ndarray, offset: int = 0) -> list[tuple[int, float, float]]:
    """(bar, got, want) wherever the reference is finite and `got` is not close_enough to it,
    or the reference is not (NaN, or ±inf as %B of a flat band) and `got` is not NaN."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    finite = np.isfinite(want)
    with np.errstate(invalid="ignore"):
        suspects = np.flatnonzero(np.where(finite, got != want, ~np.isnan(got)))
    bad = []
    for i in suspects.tolist():
        g, w = float(got[i]), float(want[i])
        if not (math.isfinite(w) and close_enough(g, w)):
            bad.append((i + offset, g, w))
    return bad


def first_finite(values: np.ndarray) -> int | None:
    hits = np.flatnonzero(np.isfinite(values))
    return int(hits[0]) if len(hits) else None


def case_id(case: tuple[str, dict[str, str]]) -> str:
    indicator, params = case
    return "-".join([indicator, *(f"{k}={v}" for k, v in params.items())])


def instance_of(indicator: str, params: dict[str, str], tf: str = "m1") -> Instance:
    instance = parse_common(1, indicator, tf, TF_MINUTES[tf], params)
    assert isinstance(instance, Instance), (indicator, params)  # the incremental form, not pandas-ta
    return instance


def test_the_test_series_are_real_contiguous_and_complete():
    assert len(archive_symbols()) == 7 and SYMBOL in archive_symbols()
    for tf in TFS:
        bars = series(tf)
        assert bars.size == M1_BARS // M1_PER_BUCKET[tf]
        assert set(np.diff(bars.open_time).tolist()) == {TF_MS[tf]}
        assert bars.open_time.dtype == np.int64 and bars.close.dtype == np.float64
        assert (bars.high >= np.maximum(bars.open, bars.close)).all()
        assert (bars.low <= np.minimum(bars.open, bars.close)).all()
    m1, m15 = series("m1"), series("m15")
    assert m15.high[0] == m1.high[:15].max() and m15.low[0] == m1.low[:15].min()
    assert m15.open[0] == m1.open[0] and m15.close[0] == m1.close[14]
    assert m15.volume[0] == pytest.approx(m1.volume[:15].sum(), rel=1e-12)


# ------------------------------------------------------------------ 1. exactness wherever it is opened


def open_points(size: int) -> tuple[int, ...]:
    """No history, one bar, a few bars, some, most of the series, all of it."""
    return (0, 1, 5, 300, size - size // 10, size)


@pytest.mark.parametrize("tf", TFS)
@pytest.mark.parametrize(("indicator", "params"), COMMON_CASES, ids=[case_id(c) for c in COMMON_CASES])
def test_fill_then_step_equals_the_whole_history_reference(tf, indicator, params):
    bars = series(tf)
    instance = instance_of(indicator, params, tf)
    with np.errstate(divide="ignore", invalid="ignore"):
        want = reference(indicator, instance.params, bars)
    assert len(want) == len(instance.names)
    for name, column in zip(instance.names, want):
        assert np.count_nonzero(np.isfinite(column)) >= bars.size // 10, f"reference {name} is mostly empty"
    for k in open_points(bars.size):
        got = opened_at(instance.make_kernel(), bars, k)
        assert len(got) == len(instance.names)
        for name, g, w in zip(instance.names, got, want):
            bad = mismatches(g, w)
            assert not bad, f"{tf} {name} opened at bar {k}: {len(bad)} bars differ, e.g. {bad[:3]}"


EXTRA_CASES: list[tuple[str, dict[str, str]]] = [
    ("ema", {"length": "200"}),
    ("bbands", {"length": "10", "lower_std": "1.5", "upper_std": "2.5"}),
    ("adx", {"length": "10", "adxr_length": "5"}),
    ("stoch", {"k": "5", "d": "4", "smooth_k": "2"}),
    ("stochrsi", {"length": "10", "rsi_length": "7", "k": "2", "d": "4"}),
    ("cci", {"length": "14", "c": "0.03"}),
    ("psar", {"af0": "0.03", "af": "0.03", "max_af": "0.3"}),
    ("supertrend", {}),
    ("kc", {"length": "10", "scalar": "1.5"}),
]


@pytest.mark.parametrize(("indicator", "params"), EXTRA_CASES, ids=[case_id(c) for c in EXTRA_CASES])
def test_non_default_parameters_are_exact_too(indicator, params):
    bars = series("m1")
    instance = instance_of(indicator, params)
    want = reference(indicator, instance.params, bars)
    for k in (0, 5, 300, 5000):
        for name, g, w in zip(instance.names, opened_at(instance.make_kernel(), bars, k), want):
            bad = mismatches(g, w)
            assert not bad, f"{name} opened at bar {k}: {len(bad)} bars differ, e.g. {bad[:3]}"


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("indicator", ["ema", "rsi", "sma"])
def test_a_source_price_feeds_the_kernel(indicator, source):
    bars = series("m5")
    o, h, lo, c, v = bars.open, bars.high, bars.low, bars.close, bars.volume
    price = {
        "close": c,
        "open": o,
        "high": h,
        "low": lo,
        "volume": v,
        "hl2": (h + lo) / 2,
        "hlc3": (h + lo + c) / 3,
        "ohlc4": (o + h + lo + c) / 4,
    }[source]
    instance = instance_of(indicator, {"length": "9", "source": source}, "m5")
    name = f"{indicator.upper()}_9"
    assert instance.names == ((name,) if source == "close" else (f"{source.upper()}_{name}",))
    want = getattr(talib, indicator.upper())(price, 9)
    for k in (0, 4, 600):
        (got,) = opened_at(instance.make_kernel(), bars, k)
        assert not mismatches(got, want), (source, k)


@pytest.mark.parametrize(
    ("indicator", "params", "expected"),
    [
        ("rsi", {"scalar": "50"}, lambda h, lo, c: 0.5 * talib.RSI(c, 14)),
        ("roc", {"scalar": "1"}, lambda h, lo, c: talib.ROC(c, 10) / 100),
        ("natr", {"scalar": "1"}, lambda h, lo, c: talib.NATR(h, lo, c, 14) / 100),
        ("cci", {"c": "0.03"}, lambda h, lo, c: talib.CCI(h, lo, c, 14) / 2),
    ],
    ids=["rsi-scalar", "roc-scalar", "natr-scalar", "cci-c"],
)
def test_scalars_scale_the_output(indicator, params, expected):
    bars = series("m5")
    instance = instance_of(indicator, params, "m5")
    want = expected(bars.high, bars.low, bars.close)
    for k in (0, 300):
        (got,) = opened_at(instance.make_kernel(), bars, k)
        assert not mismatches(got, want), k


def test_donchian_with_different_lower_and_upper_lengths():
    bars = series("m1")
    instance = instance_of("donchian", {"lower_length": "10", "upper_length": "30"})
    assert instance.names == ("DCL_10_30", "DCM_10_30", "DCU_10_30")
    lower, upper = talib.MIN(bars.low, 10), talib.MAX(bars.high, 30)
    for k in (0, 15, 300):
        got = opened_at(instance.make_kernel(), bars, k)
        assert first_finite(got[0]) == 9 and first_finite(got[1]) == 29 and first_finite(got[2]) == 29
        for g, w in zip(got, (lower, (lower + upper) / 2, upper)):
            assert not mismatches(g, w), k


@pytest.mark.parametrize("k", [0, 3, 300])
def test_supertrend_direction_is_nan_exactly_while_the_value_is(k):
    bars = series("m1")
    instance = instance_of("supertrend", {"length": "10", "multiplier": "3"})
    value, direction, long, short = opened_at(instance.make_kernel(), bars, k)
    talib_value, _ = talib.SUPERTREND(bars.high, bars.low, bars.close, 10, 3.0)
    warm_up = first_finite(value)
    assert warm_up == first_finite(talib_value) == 10  # TA-Lib's lookback: the ATR's
    assert np.isnan(direction[:warm_up]).all() and np.isnan(long[:warm_up]).all() and np.isnan(short[:warm_up]).all()
    assert (np.isnan(direction) == np.isnan(value)).all()
    assert set(direction[warm_up:].tolist()) == {1.0, -1.0}
    assert (np.isfinite(long) == (direction == 1)).all() and (np.isfinite(short) == (direction == -1)).all()
    assert (long[direction == 1] == value[direction == 1]).all()
    assert (short[direction == -1] == value[direction == -1]).all()


@pytest.mark.parametrize(("indicator", "params"), COMMON_CASES, ids=[case_id(c) for c in COMMON_CASES])
def test_refilling_a_used_kernel_reopens_it(indicator, params):
    """fill (re)opens: a kernel filled, stepped, then filled again from an earlier point
    (as a correction rewinds it) gives the reference from there on."""
    bars = series("m5")
    instance = instance_of(indicator, params, "m5")
    want = reference(indicator, instance.params, bars)
    kernel = instance.make_kernel()
    kernel.fill(part(bars, 0, 600))
    for row in rows_of(part(bars, 600, 700)):
        kernel.step(row)
    got = opened_at(kernel, bars, 500)
    for name, g, w in zip(instance.names, got, want):
        bad = mismatches(g, w)
        assert not bad, f"{name} re-filled: {len(bad)} bars differ, e.g. {bad[:3]}"


# ------------------------------------------------------------------ 1b. OBV: a running sum, continued from an anchor


@pytest.mark.parametrize("tf", TFS)
def test_obv_continues_from_an_anchor_inside_a_truncated_window(tf):
    bars = series(tf)
    instance = instance_of("obv", {}, tf)
    assert instance.anchored
    (want,) = reference("obv", instance.params, bars)
    k = bars.size * 2 // 3
    for start, j in ((k - 50, k - 20), (k - 50, k - 50), (k - 50, k - 1), (0, 7)):
        anchor = (int(bars.open_time[j]), float(want[j]))
        (got,) = opened_at(instance.make_kernel(), bars, k, start=start, anchor=anchor)
        assert np.isnan(got[: j - start]).all(), "no value before the anchor"
        bad = mismatches(got[j - start :], want[j:], offset=j)
        assert not bad, f"anchored at bar {j}, window from {start}: {len(bad)} bars differ, e.g. {bad[:3]}"


@pytest.mark.parametrize("tf", TFS)
def test_obv_without_an_anchor_takes_the_window_as_the_whole_history(tf):
    """By design: a truncated window without an anchor restarts the sum at its first volume,
    so it is off the whole-history OBV by a constant (which is why the worker anchors it)."""
    bars = series(tf)
    instance = instance_of("obv", {}, tf)
    (want,) = reference("obv", instance.params, bars)
    start, k = bars.size // 3, bars.size * 2 // 3
    (got,) = opened_at(instance.make_kernel(), bars, k, start=start)
    assert got[0] == bars.volume[start]
    offset = want[start] - bars.volume[start]
    assert abs(offset) > 1.0
    assert not mismatches(got + offset, want[start:], offset=start)
    assert not any(close_enough(g, w) for g, w in zip(got[1:], want[start + 1 :]))


def test_obv_with_an_anchor_outside_the_window_falls_back_to_the_window():
    bars = series("m1")
    instance = instance_of("obv", {})
    missing = (int(bars.open_time[10]) + 1, 123.0)  # no bar opens then
    (anchored,) = instance.make_kernel().fill(part(bars, 0, 100), anchor=missing)
    (plain,) = instance.make_kernel().fill(part(bars, 0, 100))
    assert np.array_equal(anchored, plain)


# ------------------------------------------------------------------ 2. restart from `instance.history` bars


RESTART_CASES = [("ema", {"length": "200"}), *(c for c in COMMON_CASES if c[0] != "obv")]


@pytest.mark.parametrize(("tf", "opens"), [("m1", (20_000, 35_000)), ("m5", (4_000, 7_000))])
@pytest.mark.parametrize(("indicator", "params"), RESTART_CASES, ids=[case_id(c) for c in RESTART_CASES])
def test_opening_from_history_bars_matches_the_whole_history(tf, opens, indicator, params):
    bars = series(tf, count=None)
    assert bars.size >= 40_320 // M1_PER_BUCKET[tf]
    instance = instance_of(indicator, params, tf)
    want = reference(indicator, instance.params, bars)
    for n in opens:
        assert instance.history < n
        stop = n + 500
        got = opened_at(instance.make_kernel(), part(bars, 0, stop), n, start=n - instance.history)
        for name, g, w in zip(instance.names, got, want):
            after, expected = g[instance.history :], w[n:stop]
            assert np.isfinite(expected).any()
            bad = mismatches(after, expected, offset=n)
            assert not bad, f"{name} after {instance.history} bars of history: {len(bad)} differ, e.g. {bad[:3]}"


@pytest.mark.parametrize(
    ("indicator", "params"),
    [("ema", {"length": "200"}), ("rsi", {"length": "14"}), ("macd", {}), ("adx", {"length": "14"})],
    ids=["ema200", "rsi14", "macd", "adx14"],
)
def test_a_quarter_of_history_is_not_enough(indicator, params):
    """The check above can fail: these carry their seed for long, so a short window differs."""
    bars = series("m1", count=None)
    instance = instance_of(indicator, params)
    want = reference(indicator, instance.params, bars)
    n, window = 20_000, instance.history // 4
    got = opened_at(instance.make_kernel(), part(bars, 0, n + 500), n, start=n - window)
    assert mismatches(got[0][window:], want[0][n : n + 500], offset=n)


# ------------------------------------------------------------------ 3. names and normalisation


def test_bbands_std_written_as_int_or_float_gives_one_name():
    as_int = instance_of("bbands", {"length": "20", "lower_std": "2", "upper_std": "2"})
    as_float = instance_of("bbands", {"length": "20", "lower_std": "2.0", "upper_std": " 2.00 "})
    assert as_int.names == as_float.names == tuple(f"BB{p}_20_2.0_2.0" for p in "LMUBP")
    assert as_int.params == as_float.params and isinstance(as_int.params["lower_std"], float)
    assert instance_of("bbands", {"lower_std": "1.5", "upper_std": "3"}).names[0] == "BBL_5_1.5_3.0"


DEFAULT_NAMES: dict[str, tuple[str, ...]] = {
    "ema": ("EMA_10",),
    "sma": ("SMA_10",),
    "wma": ("WMA_10",),
    "rsi": ("RSI_14",),
    "roc": ("ROC_10",),
    "macd": ("MACD_12_26_9", "MACDh_12_26_9", "MACDs_12_26_9"),
    "bbands": ("BBL_5_2.0_2.0", "BBM_5_2.0_2.0", "BBU_5_2.0_2.0", "BBB_5_2.0_2.0", "BBP_5_2.0_2.0"),
    "atr": ("ATRr_14",),
    "natr": ("NATR_14",),
    "adx": ("ADX_14", "ADXR_14_2", "DMP_14", "DMN_14"),
    "stoch": ("STOCHk_14_3_3", "STOCHd_14_3_3", "STOCHh_14_3_3"),
    "stochrsi": ("STOCHRSIk_14_14_3_3", "STOCHRSId_14_14_3_3"),
    "cci": ("CCI_14_0.015",),
    "mfi": ("MFI_14",),
    "willr": ("WILLR_14",),
    "obv": ("OBV",),
    "psar": ("PSARl_0.02_0.2", "PSARs_0.02_0.2"),
    "supertrend": ("SUPERT_7_3.0", "SUPERTd_7_3.0", "SUPERTl_7_3.0", "SUPERTs_7_3.0"),
    "kc": ("KCLe_20_2", "KCBe_20_2", "KCUe_20_2"),
    "donchian": ("DCL_20_20", "DCM_20_20", "DCU_20_20"),
    "vwap": ("VWAP_D",),
}


@pytest.mark.parametrize(("indicator", "names"), DEFAULT_NAMES.items())
def test_default_names_follow_pandas_ta(indicator, names):
    instance = instance_of(indicator, {})
    assert instance.names == names
    assert len(instance.make_kernel().names) == len(names)


def test_the_cases_cover_every_fast_indicator():
    assert set(DEFAULT_NAMES) == set(COMMON) == {c[0] for c in COMMON_CASES}


@pytest.mark.parametrize(
    ("indicator", "params", "names"),
    [
        ("sma", {"length": "20", "source": "volume"}, ("VOLUME_SMA_20",)),
        ("ema", {"source": " HLC3 "}, ("HLC3_EMA_10",)),
        ("ema", {"close": "hl2"}, ("HL2_EMA_10",)),
        ("ema", {"source": "close"}, ("EMA_10",)),
        ("kc", {"scalar": "2.0"}, ("KCLe_20_2", "KCBe_20_2", "KCUe_20_2")),
        ("kc", {"scalar": "2.5"}, ("KCLe_20_2.5", "KCBe_20_2.5", "KCUe_20_2.5")),
        ("cci", {"c": "0.0150"}, ("CCI_14_0.015",)),
        ("supertrend", {"multiplier": "3"}, ("SUPERT_7_3.0", "SUPERTd_7_3.0", "SUPERTl_7_3.0", "SUPERTs_7_3.0")),
        ("psar", {"af0": "0.03", "af": "0.03"}, ("PSARl_0.03_0.2", "PSARs_0.03_0.2")),
        ("adx", {"length": "10", "adxr_length": "4"}, ("ADX_10", "ADXR_10_4", "DMP_10", "DMN_10")),
        ("macd", {"fast": "5.0", "slow": "35"}, ("MACD_5_35_9", "MACDh_5_35_9", "MACDs_5_35_9")),
    ],
)
def test_names_of_configured_parameters(indicator, params, names):
    assert instance_of(indicator, params).names == names


# ------------------------------------------------------------------ 4. configuration errors and the slow path


@pytest.mark.parametrize(
    ("indicator", "params", "fragments"),
    [
        ("ema", {"length": "ten"}, ("length", "'ten'")),
        ("ema", {"length": "0"}, ("length", "at least 1")),
        ("ema", {"length": "0", "offset": "1"}, ("length", "at least 1")),
        ("rsi", {"length": "1"}, ("length", "at least 2")),
        ("sma", {"length": "14.5"}, ("length", "whole number")),
        ("sma", {"length": ""}, ("length",)),
        ("bbands", {"lower_std": "nan"}, ("lower_std", "not finite")),
        ("bbands", {"upper_std": "inf"}, ("upper_std", "not finite")),
        ("ema", {"length": "1e400"}, ("length", "not finite")),
        ("supertrend", {"multiplier": "-1"}, ("multiplier", "at least 0")),
        ("macd", {"fast": "26", "slow": "12"}, ("fast=26", "slow=12")),
        ("macd", {"fast": "12", "slow": "12"}, ("fast=12", "slow=12")),
        ("ema", {"source": "median"}, ("source", "median")),
        ("sma", {"close": "typical"}, ("source", "typical")),
        ("vwap", {"anchor": "  "}, ("anchor",)),
    ],
)
def test_invalid_parameters_raise_naming_the_parameter(indicator, params, fragments):
    with pytest.raises(IndicatorConfigError) as error:
        parse_common(1, indicator, "m1", 1, params)
    for fragment in fragments:
        assert fragment in str(error.value)


@pytest.mark.parametrize(
    ("indicator", "params"),
    [
        ("rsi", {"mamode": "ema"}),
        ("psar", {"af": "0.03"}),
        ("psar", {"af0": "0.01"}),
        ("vwap", {"anchor": "W"}),
        ("adx", {"signal_length": "20"}),
        ("adx", {"length": "10", "signal_length": "14"}),
        ("kc", {"mamode": "sma"}),
        ("kc", {"tr": "false"}),
        ("supertrend", {"atr_length": "10"}),
        ("ema", {"offset": "1"}),
        ("ema", {"presma": "false"}),
        ("bbands", {"ddof": "1"}),
        ("rsi", {"drift": "2"}),
        ("hma", {"length": "20"}),
    ],
)
def test_parameters_only_pandas_ta_reproduces_leave_the_fast_path(indicator, params):
    assert parse_common(1, indicator, "m1", 1, params) is None


@pytest.mark.parametrize(
    ("indicator", "fixed", "base"),
    [
        ("rsi", {"drift": "1"}, {}),
        ("rsi", {"mamode": "RMA", "drift": "1.0"}, {}),
        ("adx", {"signal_length": "14"}, {}),
        ("adx", {"length": "10", "signal_length": "10.0"}, {"length": "10"}),
        ("supertrend", {"atr_length": "7"}, {}),
        ("psar", {"af": "0.02"}, {}),
        ("kc", {"mamode": "ema", "tr": "true"}, {}),
        ("ema", {"presma": "True"}, {}),
        ("atr", {"percent": "false", "mamode": "rma"}, {}),
        ("bbands", {"ddof": "0", "mamode": "sma"}, {}),
        ("wma", {"asc": "yes"}, {}),
    ],
)
def test_fixed_parameters_at_their_default_keep_the_fast_path(indicator, fixed, base):
    plain = instance_of(indicator, base)
    configured = instance_of(indicator, {**base, **fixed})
    assert isinstance(configured, Instance) and configured.names == plain.names and configured.params == plain.params


# ------------------------------------------------------------------ 5. young series


@pytest.mark.parametrize(
    ("indicator", "params", "first_bars"),
    [
        ("ema", {"length": "20"}, {"EMA_20": 19}),
        ("macd", {}, {"MACD_12_26_9": 33, "MACDh_12_26_9": 33, "MACDs_12_26_9": 33}),
        ("adx", {"length": "14"}, {"ADX_14": 27, "ADXR_14_2": 29, "DMP_14": 14, "DMN_14": 14}),
        ("stochrsi", {}, {"STOCHRSIk_14_14_3_3": 31, "STOCHRSId_14_14_3_3": 31}),
        ("kc", {}, {"KCLe_20_2": 20, "KCBe_20_2": 20, "KCUe_20_2": 20}),
        ("psar", {}, {}),
        ("bbands", {"length": "20"}, {"BBM_20_2.0_2.0": 19}),
        ("obv", {}, {"OBV": 0}),
        ("vwap", {}, {"VWAP_D": 0}),
    ],
)
def test_a_young_series_gets_its_first_value_on_the_batch_bar(indicator, params, first_bars):
    bars = part(series("m1"), 0, 200)
    instance = instance_of(indicator, params)
    want = reference(indicator, instance.params, bars)
    kernel = instance.make_kernel()
    filled = kernel.fill(part(bars, 0, 3))
    assert len(filled) == len(want) and all(len(column) == 3 for column in filled)
    for name, column, w in zip(instance.names, filled, want):
        assert not mismatches(column, w[:3]), name  # NaN unless TA-Lib has a value within 3 bars
    stepped = [kernel.step(row) for row in rows_of(part(bars, 3, bars.size))]
    got = [np.concatenate((filled[j], [s[j] for s in stepped])) for j in range(len(filled))]
    for name, g, w in zip(instance.names, got, want):
        assert first_finite(g) == first_finite(w), name
        if name in first_bars:
            assert first_finite(g) == first_bars[name], name
        assert not mismatches(g, w), name


def test_a_stage_skips_leading_nans_as_the_batch_function_does():
    values = np.array([np.nan, np.nan, 1, 2, 3, 4, 5, 6, 7, 8.5, 9, 3, 4, 5, 6, 7])
    want = talib.EMA(values, 5)
    assert first_finite(want) == 6
    for filled in (None, 0, 1, 2, 4, 7, len(values)):
        stage = Stage("EMA", timeperiod=5)
        got = [] if filled is None else stage.fill(values[:filled])[0].tolist()
        got += [stage.step(v)[0] for v in values[len(got) :]]
        assert not mismatches(np.array(got), want), filled
    stoch = Stage("STOCH", 2, fastk_period=3, slowk_period=2, slowk_matype=0, slowd_period=2)
    stoch.fill(values[:1], values[:1], values[:1])
    got = np.array([stoch.step(v, v, v) for v in values[1:]]).T
    for g, w in zip(got, talib.STOCH(values, values, values, 3, 2, 0, 2, 0)):
        assert not mismatches(np.concatenate(([np.nan], g)), w)


# ------------------------------------------------------------------ 6. the pandas-ta fallback


@pytest.fixture(scope="module")
def pandas_ta():
    return slow._pandas_ta()


def frame_of(bars: BarArrays):
    return slow._frame(bars.open_time, (bars.open, bars.high, bars.low, bars.close, bars.volume))


def window_args(bars: BarArrays) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    return bars.open_time, (bars.open, bars.high, bars.low, bars.close, bars.volume)


def test_describe_hma(pandas_ta):
    kwargs, names = slow.describe("hma", {"length": "20"})
    assert kwargs == {"length": 20} and type(kwargs["length"]) is int
    assert names == ("HMA_20",)


def test_compute_last_hma_is_pandas_ta_on_the_window(pandas_ta):
    bars = part(series("m1"), 1000, 1250)
    got = slow.compute_last("hma", {"length": 20}, *window_args(bars))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = pandas_ta.hma(frame_of(bars)["close"], length=20).iloc[-1]
    assert math.isfinite(want) and want != bars.close[-1]
    assert got == {"HMA_20": want}


def test_compute_last_ichimoku_is_pandas_ta_on_the_window(pandas_ta):
    bars = part(series("m1"), 2000, 2250)
    got = slow.compute_last("ichimoku", {}, *window_args(bars))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        row = frame_of(bars).ta.ichimoku()[0].iloc[-1]
    want = {str(name): float(value) for name, value in row.items()}
    assert list(got) == list(want)
    assert {"ISA_9", "ISB_26", "ITS_9", "IKS_26"} <= set(want)
    assert sum(math.isfinite(v) for v in want.values()) >= 4
    for name, value in want.items():
        assert got[name] == value or (math.isnan(got[name]) and math.isnan(value)), name
    _, names = slow.describe("ichimoku", {})
    assert names == tuple(want)


@pytest.mark.parametrize(
    ("indicator", "params", "fragment"),
    [
        ("hmaa", {}, "unknown indicator 'hmaa'"),
        ("hma", {"lenght": "20"}, "no parameter lenght"),
        ("hma", {"length": "inf"}, "not finite"),
    ],
)
def test_slow_path_configuration_errors(pandas_ta, indicator, params, fragment):
    with pytest.raises(IndicatorConfigError, match=fragment):
        slow.describe(indicator, params)


@pytest.mark.parametrize("indicator", sorted(COMMON))
def test_default_names_are_pandas_ta_columns(pandas_ta, indicator):
    frame = frame_of(part(series("m1"), 0, 400))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = getattr(frame.ta, indicator)()
    columns = {result.name} if hasattr(result, "to_frame") else set(result.columns)
    assert set(instance_of(indicator, {}).names) <= columns


# ------------------------------------------------------------------ 7. VWAP resets at 00:00 UTC


@pytest.mark.parametrize("tf", TFS)
def test_vwap_restarts_each_day_at_the_first_bar_typical_price(tf):
    bars = series(tf)
    instance = instance_of("vwap", {}, tf)
    starts = np.flatnonzero(bars.open_time % DAY_MS == 0)
    assert len(starts) >= 4 and starts[0] == 0
    typical = (bars.high + bars.low + bars.close) / 3
    for k in (0, 2, starts[2] + 1, bars.size):
        (got,) = opened_at(instance.make_kernel(), bars, k)
        for i in starts:
            assert got[i] == pytest.approx(typical[i], rel=1e-14, abs=0), (k, i)
            pair = (typical[i] * bars.volume[i] + typical[i + 1] * bars.volume[i + 1]) / (
                bars.volume[i] + bars.volume[i + 1]
            )
            assert got[i + 1] == pytest.approx(pair, rel=1e-12), (k, i)
            if i:  # the day before ran on: its last bar is not a one-bar VWAP
                assert got[i - 1] != pytest.approx(typical[i - 1], rel=1e-9)


# ------------------------------------------------------------------ a bug found: Bollinger bandwidth on a flat window


def flat_bbands_case():
    bars = series("m1", "ALGOUSDT")
    instance = instance_of("bbands", {})  # pandas-ta's default length 5
    with np.errstate(divide="ignore", invalid="ignore"):
        want = reference("bbands", instance.params, bars)
    flat = np.flatnonzero(want[2] == want[0])  # upper == lower: five equal closes
    assert len(flat) >= 5
    assert (want[3][flat] == 0).all() and not np.isfinite(want[4][flat]).any()
    return bars, instance, want


def test_bbands_on_flat_windows_filled():
    bars, instance, want = flat_bbands_case()
    for name, g, w in zip(instance.names, instance.make_kernel().fill(bars), want):
        assert not mismatches(g, w), name


def test_bbands_on_flat_windows_stepped():
    """The live path must give what a restart (fill) and the reference give: BBB = 0.0 on a
    window of equal closes (upper == lower), not NaN."""
    bars, instance, want = flat_bbands_case()
    for k in (0, 300):
        got = opened_at(instance.make_kernel(), bars, k)
        for name, g, w in zip(instance.names, got, want):
            bad = mismatches(g, w)
            assert not bad, f"{name} stepped from bar {k}: {len(bad)} bars differ, e.g. {bad[:3]}"


# A few distinct values, so that repeats and near-misses (one field off) are common.
_BAR_VALUE = st.sampled_from([0.5, 1.0, 1.0000000000000002, 2.5, 1e15, 3.0])
_BAR = st.tuples(*[_BAR_VALUE] * 5, st.sampled_from([0, 60_000, 120_000, 1_769_904_000_000]))


@settings(max_examples=300, deadline=None)
@given(bars=st.lists(_BAR, max_size=40), probes=st.lists(_BAR, max_size=10), size=st.integers(1, 8))
def test_recent_bars_hold_what_a_bounded_deque_of_tuples_holds(bars, probes, size):
    recent, reference = RecentBars(size), deque(maxlen=size)
    for bar in bars:
        recent.append(bar)
        reference.append(bar)
    for probe in [*bars, *probes]:
        assert (probe in recent) == (probe in reference)


def test_candle_events_are_due_only_once_every_value_queued_before_them_is_written():
    pending = PendingValues()
    ids, names = (1, 2), ("EMA_9", "RSI_14")
    pending.add(("A", "m1", 60_000, ""), ids, names, [1.0, 2.0])
    pending.hold([("ohlcv_m1_ready", "1-0")])
    pending.add(("B", "m1", 60_000, ""), ids, names, [3.0, math.nan], rewrite=True)
    pending.hold([("ohlcv_m1_ready", "2-0")])
    assert pending.due() == (0, [])
    first = pending.take(2)  # one bar's two values
    assert [key[0] for key, _ in first] == ["A"]
    pending.done(first)
    through, due = pending.due()
    assert due == [("ohlcv_m1_ready", "1-0")]
    pending.forget(through)
    # B queued again (a correction): it moves behind, and so do the events' turns.
    pending.add(("C", "m1", 60_000, ""), ids, names, [5.0, 6.0])
    pending.add(("B", "m1", 60_000, ""), ids, names, [7.0, math.nan])
    pending.hold([("ohlcv_m1_ready", "3-0")])
    taken = pending.take(1)
    assert [key[0] for key, _ in taken] == ["C"] and pending.rows == 4
    by_layout, gone = matrices(pending.take(10))
    assert by_layout[(ids, names)].values[:3] == [5.0, 6.0, 7.0] and by_layout[(ids, names)].symbols == ["C", "B"]
    assert gone == ([2], ["B"], [60_000], ["RSI_14"])  # rewrite sticks to a bar queued again
    pending.done(taken)
    # B's first values gave way to newer ones, held by the later event: the earlier is due.
    through, due = pending.due()
    assert due == [("ohlcv_m1_ready", "2-0")]
    pending.forget(through)
    pending.done(pending.take(10))
    through, due = pending.due()
    assert due == [("ohlcv_m1_ready", "3-0")] and not pending
    pending.forget(through)
    assert pending.held() == 0 and pending.rows == 0


def test_a_symbol_handed_over_loses_its_unwritten_values_and_their_events_are_taken_back():
    pending = PendingValues()
    ids, names = (1,), ("EMA_9",)
    pending.add(("A", "m1", 60_000, ""), ids, names, [1.0])
    pending.add(("B", "m1", 60_000, ""), ids, names, [2.0])
    pending.hold([("ohlcv_m1_ready", "1-0"), ("ohlcv_m1_ready", "2-0")])
    assert pending.drop({"A"}) == 1 and pending.rows == 1 and pending.drop({"C"}) == 0
    assert pending.held_acks() == [("ohlcv_m1_ready", "1-0"), ("ohlcv_m1_ready", "2-0")]
    pending.take_back({("ohlcv_m1_ready", "1-0")})  # A's event: held for its next owner
    pending.done(pending.take(10))
    assert pending.due()[1] == [("ohlcv_m1_ready", "2-0")] and not pending


def test_bars_due_for_pandas_ta_are_taken_round_robin_within_the_budget():
    due = SlowDue()
    m1 = 60_000
    due.add(("A", "m1"), 0, 9 * m1)  # 10 bars
    due.add(("B", "m1"), 5 * m1, 5 * m1)
    due.add(("A", "m1"), 10 * m1, 11 * m1)  # merged into A's range, and A goes behind B
    assert len(due) == 2 and due.wake.is_set()
    assert due.take(5) == [(("B", "m1"), 5 * m1, 5 * m1), (("A", "m1"), 0, 3 * m1)]
    assert due.take(100) == [(("A", "m1"), 4 * m1, 11 * m1)]
    due.add(("C", "m5"), 0, 0)
    due.discard(("C", "m5"))
    assert not due and due.take(10) == []


def test_stored_values_are_the_same_within_the_seeding_tolerance_and_a_missing_value_only_equals_nan():
    nan = math.nan
    assert same_values([1.0, nan, 0.0], [1.0 + 1e-12, nan, 1e-12])
    assert not same_values([1.0], [1.0 + 1e-6])  # computed on other bars
    assert not same_values([5.0], [nan])  # nothing stored where the history now gives a value
    assert not same_values([nan], [5.0])
    with pytest.raises(ValueError):
        same_values([1.0, 2.0], [1.0])


def test_a_flat_minute_stored_late_changes_only_obv_which_is_checked_on_the_whole_series():
    """A minute of no price change stored after the values around it were computed
    changes OBV alone (the scale-out run's OBV-only mismatch): OBV's first value is
    checked where the bars are the whole stored series, and not otherwise (a window of
    it gives another sum)."""
    flat = [(10.0, 10.0, 10.0, 10.0, 100.0 + k, k * 60_000) for k in range(40)]
    bars = BarArrays.from_rows(flat)
    obv = parse_common(7, "obv", "m1", 1, {})
    ema = parse_common(8, "ema", "m1", 1, {"length": "9"})
    assert obv is not None and ema is not None and obv.anchored
    first = 20 * 60_000
    thin = BarArrays.from_rows(flat[1:])  # computed before the first minute was stored
    stored = {}
    for instance in (obv, ema):
        for name, column in zip(instance.names, instance.make_kernel().fill(thin), strict=True):
            stored[(instance.id, "X", first, name)] = float(column[19])
    firsts = {obv.id: first, ema.id: first}
    outputs = {i.id: fill_kernel(i, bars)[1] for i in (obv, ema)}
    checked = first_values_in(bars, [obv, ema], firsts, whole=True)
    assert [i.id for i, _, _ in checked] == [obv.id, ema.id]
    assert not agrees_with_history("X", checked, outputs, stored)  # OBV: 100 more
    only_ema = first_values_in(bars, [obv, ema], firsts, whole=False)
    assert [i.id for i, _, _ in only_ema] == [ema.id]
    assert agrees_with_history("X", only_ema, outputs, stored)  # a flat minute leaves the EMA as it was
