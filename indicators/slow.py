"""Any other pandas-ta indicator, recomputed by pandas-ta over a window of bars.

These functions run in a separate process (see SlowRunner): pandas-ta
takes milliseconds per call and 150 MB to import, and must never delay the
incremental set. Values are pandas-ta's own, on the window it is given.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import math
import multiprocessing
import warnings
from collections.abc import Mapping, Sequence
from functools import cache
from typing import Any

import numpy as np

from candles import TF_MS
from indicators.registry import MAX_NUMBER, IndicatorConfigError

SERIES_ARGS = {"open_", "open", "high", "low", "close", "volume"}
PROBE_BARS = 400


@cache
def _pandas_ta() -> Any:
    warnings.filterwarnings("ignore")
    import pandas_ta

    return pandas_ta


def indicator_names() -> set[str]:
    return {name for names in _pandas_ta().Category.values() for name in names}


def _parse_value(text: str) -> Any:
    """A parameter's text as pandas-ta takes it; numbers bounded like the incremental
    set's (a length of 10^300 would make pandas-ta allocate or overflow)."""
    word = text.strip()
    lowered = word.lower()
    if len(word) > 100:
        raise IndicatorConfigError(f"value {text[:40]!r}... is longer than 100 characters")
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null", ""):
        return None
    try:
        number: float = int(word)
    except ValueError:
        try:
            number = float(word)
        except ValueError:
            return word
    if not math.isfinite(number):
        raise IndicatorConfigError(f"value {text!r} is not finite")
    if abs(number) > MAX_NUMBER:
        raise IndicatorConfigError(f"value {text!r} is beyond {MAX_NUMBER:g}")
    return number


def parse_params(indicator: str, raw: Mapping[str, str]) -> dict[str, Any]:
    """pandas-ta keyword arguments; an unknown indicator or parameter name is an error
    (pandas-ta itself would silently ignore a misspelt one)."""
    if indicator not in indicator_names():
        raise IndicatorConfigError(f"unknown indicator {indicator!r} (not a pandas-ta indicator)")
    signature = inspect.signature(getattr(_pandas_ta(), indicator))
    accepted = {
        name
        for name, p in signature.parameters.items()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and name not in SERIES_ARGS
    }
    unknown = sorted(set(raw) - accepted)
    if unknown:
        raise IndicatorConfigError(
            f"{indicator} has no parameter {', '.join(unknown)} (it takes {', '.join(sorted(accepted)) or 'none'})"
        )
    return {name: _parse_value(text) for name, text in raw.items()}


def _frame(open_time: Sequence[int], columns: Sequence[Sequence[float]]) -> Any:
    import pandas as pd

    index = pd.to_datetime(np.asarray(open_time, dtype=np.int64), unit="ms", utc=True)
    o, h, lo, c, v = (np.asarray(x, dtype=np.float64) for x in columns)
    return pd.DataFrame({"open": o, "high": h, "low": lo, "close": c, "volume": v}, index=index)


def _last_row(result: Any) -> dict[str, float]:
    import pandas as pd

    if isinstance(result, tuple):  # e.g. ichimoku: (values, projection)
        result = result[0]
    if isinstance(result, pd.Series):
        result = result.to_frame()
    if not isinstance(result, pd.DataFrame) or result.empty:
        return {}
    row = result.iloc[-1]
    out: dict[str, float] = {}
    for name, value in row.items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        out[str(name)] = number
    return out


def compute_last(
    indicator: str, kwargs: dict[str, Any], open_time: Sequence[int], columns: Sequence[Sequence[float]]
) -> dict[str, float]:
    """The indicator's outputs on the window's last bar, by pandas-ta column name."""
    _pandas_ta()  # registers the DataFrame.ta accessor in this process
    frame = _frame(open_time, columns)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _last_row(getattr(frame.ta, indicator)(**kwargs))


def describe(indicator: str, raw: Mapping[str, str]) -> tuple[dict[str, Any], tuple[str, ...]]:
    """Validated arguments and output names, found by running it once on a probe series."""
    kwargs = parse_params(indicator, raw)
    rng = np.random.default_rng(7)
    close = 100 + np.cumsum(rng.normal(0, 1, PROBE_BARS))
    open_ = close + rng.normal(0, 0.2, PROBE_BARS)
    spread = rng.random(PROBE_BARS)
    columns = (open_, np.maximum(open_, close) + spread, np.minimum(open_, close) - spread, close, spread * 1000)
    open_time = np.arange(PROBE_BARS, dtype=np.int64) * 60_000 + 1_767_225_600_000
    try:
        names = tuple(compute_last(indicator, kwargs, open_time, columns))
    except Exception as exc:  # pandas-ta raises anything on bad arguments
        raise IndicatorConfigError(f"{indicator} fails with these parameters: {exc!r}") from None
    if not names:
        raise IndicatorConfigError(f"{indicator} gives no output with these parameters")
    return kwargs, names


def compute_many(
    jobs: Sequence[tuple[str, dict[str, Any], Sequence[int], Sequence[Sequence[float]]]],
) -> list[dict[str, float] | str]:
    """A batch of `compute_last` calls (one process round trip); an error becomes its text."""
    out: list[dict[str, float] | str] = []
    for indicator, kwargs, open_time, columns in jobs:
        try:
            out.append(compute_last(indicator, kwargs, open_time, columns))
        except Exception as exc:
            out.append(f"{indicator} failed: {exc!r}")
    return out


class SlowRunner:
    """pandas-ta in a separate process, so a slow indicator never holds up the common set."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None

    def _executor(self) -> concurrent.futures.ProcessPoolExecutor:
        if self._pool is None:
            self._pool = concurrent.futures.ProcessPoolExecutor(
                self.workers, mp_context=multiprocessing.get_context("spawn")
            )
        return self._pool

    async def call(self, fn: Any, *args: Any) -> Any:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor(), fn, *args)
        except concurrent.futures.process.BrokenProcessPool:
            self._pool = None
            raise

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


class SlowDue:
    """The bars awaiting their pandas-ta values: one range per series, so a long backfill
    costs constant memory (the bars are read from PostgreSQL when their turn comes), and
    `wake` set when there are some."""

    def __init__(self) -> None:
        self.ranges: dict[tuple[str, str], tuple[int, int]] = {}
        self.wake = asyncio.Event()

    def __len__(self) -> int:
        return len(self.ranges)

    def add(self, key: tuple[str, str], first: int, last: int) -> None:
        """Bars first..last of the series (symbol, tf); behind the others in the queue."""
        old_first, old_last = self.ranges.pop(key, (first, last))
        self.ranges[key] = (min(first, old_first), max(last, old_last))
        self.wake.set()

    def discard(self, key: tuple[str, str]) -> None:
        self.ranges.pop(key, None)

    def take(self, budget: int) -> list[tuple[tuple[str, str], int, int]]:
        """Up to `budget` of the due bars, oldest series first; a series with more keeps
        the rest due, behind the others (round robin)."""
        picked: list[tuple[tuple[str, str], int, int]] = []
        while self.ranges and budget > 0:
            key = next(iter(self.ranges))
            first, last = self.ranges.pop(key)
            tf_ms = TF_MS[key[1]]
            if (last - first) // tf_ms + 1 > budget:
                cut = first + (budget - 1) * tf_ms
                self.ranges[key] = (cut + tf_ms, last)
                last = cut
            picked.append((key, first, last))
            budget -= (last - first) // tf_ms + 1
        return picked
