"""TA-Lib 0.8 stream handles wrapped so a series can be opened from any history.

A `Stage` is one TA-Lib function on one series. `fill` opens it from history and
returns the batch outputs (bit-for-bit TA-Lib's batch function over that history);
`step` advances it by one bar in O(1). While the history is shorter than TA-Lib's
lookback the stage keeps its inputs and opens itself as soon as it can, so a young
series gets its first value on exactly the bar the batch function would.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import cache

import numpy as np
import talib
import talib.abstract
import talib.stream

NAN = math.nan


def leading_nans(inputs: Sequence[np.ndarray]) -> int:
    """Bars before the first one where every input is finite (TA-Lib skips them)."""
    finite = np.ones(len(inputs[0]), dtype=bool)
    for column in inputs:
        finite &= np.isfinite(column)
    hits = np.flatnonzero(finite)
    return int(hits[0]) if len(hits) else len(finite)


@cache
def bars_needed(function: str, params: tuple[tuple[str, float], ...]) -> int:
    """TA-Lib's lookback + 1: the fewest bars a handle opens from.

    Opening is only tried from there on: below it TA-Lib 0.8's KC open sometimes answers
    TA_BAD_PARAM instead of InsufficientHistory (it reads past the short history)."""
    abstract = talib.abstract.Function(function)
    abstract.parameters = dict(params)
    return abstract.lookback + 1


class Stage:
    __slots__ = ("handle", "n_out", "needed", "opener", "params", "young")

    def __init__(self, function: str, n_out: int = 1, **params: float) -> None:
        self.opener = getattr(talib.stream, function).open_and_fill
        self.needed = bars_needed(function, tuple(sorted(params.items())))
        self.params = params
        self.n_out = n_out
        self.handle = None
        self.young: list[list[float]] | None = None

    def fill(self, *inputs: np.ndarray) -> tuple[np.ndarray, ...]:
        """Open from `inputs` (equal-length float arrays); outputs aligned with them."""
        size = len(inputs[0])
        skip = leading_nans(inputs)
        history = [np.ascontiguousarray(column[skip:], dtype=np.float64) for column in inputs]
        self.handle, self.young = None, None
        outputs: tuple[np.ndarray, ...]
        try:
            if len(history[0]) < self.needed:
                raise talib.InsufficientHistory
            self.handle, raw = self.opener(*history, **self.params)
            outputs = tuple(np.asarray(o, dtype=np.float64) for o in (raw if isinstance(raw, tuple) else (raw,)))
        except talib.InsufficientHistory:
            self.young = [list(column) for column in history]
            outputs = tuple(np.full(size - skip, NAN) for _ in range(self.n_out))
        if skip:
            pad = np.full(skip, NAN)
            outputs = tuple(np.concatenate((pad, o)) for o in outputs)
        return outputs

    def step(self, *values: float) -> tuple[float, ...]:
        """The outputs for one new bar (NaN while TA-Lib would still give none)."""
        handle = self.handle
        if handle is not None:
            out = handle.update(*values)
            return out if self.n_out > 1 else (out,)
        return self._grow(values)

    def _grow(self, values: Sequence[float]) -> tuple[float, ...]:
        if self.young is None:
            if any(v != v for v in values):  # a leading NaN is not history
                return (NAN,) * self.n_out
            self.young = [[] for _ in values]
        for column, value in zip(self.young, values):
            column.append(value)
        if len(self.young[0]) < self.needed:
            return (NAN,) * self.n_out
        try:
            self.handle, raw = self.opener(*(np.asarray(c, dtype=np.float64) for c in self.young), **self.params)
        except talib.InsufficientHistory:
            return (NAN,) * self.n_out
        self.young = None
        last = raw if isinstance(raw, tuple) else (raw,)
        return tuple(float(o[-1]) for o in last)
