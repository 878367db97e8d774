"""The state of one series (symbol, timeframe) and the shapes around it: pure, no I/O."""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from indicators.kernels import BarArrays, BarTuple, Kernel
from indicators.registry import Instance

RECENT_BARS = 256  # covers the feed's boot reconciliation window (RECONCILE_WINDOW_M1, 120)


class RecentBars:
    """The newest bars a series holds, packed 48 bytes each: an event repeating one of
    them changes nothing. (A deque of tuples took ~250 bytes a bar, ~95 MB at 1,500
    series.) Values are compared bit for bit, as the tuples compared equal."""

    __slots__ = ("_next", "_ring", "_size")
    _BAR = struct.Struct("<5dq")

    def __init__(self, size: int = RECENT_BARS) -> None:
        self._ring, self._next, self._size = bytearray(), 0, size * self._BAR.size

    def append(self, bar: BarTuple) -> None:
        packed = self._BAR.pack(*bar)
        if len(self._ring) < self._size:
            self._ring += packed
            return
        self._ring[self._next : self._next + len(packed)] = packed
        self._next = (self._next + len(packed)) % self._size

    def extend(self, bars: Iterable[BarTuple]) -> None:
        for bar in bars:
            self.append(bar)

    def bars(self) -> list[BarTuple]:
        return list(self._BAR.iter_unpack(bytes(self._ring)))  # type: ignore[arg-type]

    def __contains__(self, bar: BarTuple) -> bool:
        packed, width = self._BAR.pack(*bar), self._BAR.size
        at = self._ring.find(packed)
        while at >= 0 and at % width:  # a match across two bars' bytes is not a bar
            at = self._ring.find(packed, at + 1)
        return at >= 0


@dataclass(frozen=True)
class SlowInstance:
    id: int
    indicator: str
    tf: str
    kwargs: dict[str, Any]
    names: tuple[str, ...]


@dataclass
class Layout:
    """The fast instances of one timeframe, and the flat list of their outputs."""

    instances: list[Instance]
    slow: list[SlowInstance]
    ids: tuple[int, ...] = ()
    names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.ids = tuple(i.id for i in self.instances for _ in i.names)
        self.names = tuple(n for i in self.instances for n in i.names)

    @property
    def history(self) -> int:
        return max((i.history for i in self.instances), default=2)


class InstanceFailure(Exception):
    """An instance's kernel raised (opening or stepping): it is disabled, the others run."""

    def __init__(self, instance_id: int, error: BaseException) -> None:
        super().__init__(f"{type(error).__name__}: {error}")
        self.instance_id = instance_id


@dataclass
class Series:
    symbol: str
    tf: str
    kernels: list[Kernel]
    seen: tuple[int, int]  # stream entries up to this id are already in the state
    instance_ids: Sequence[int] = ()  # of each kernel
    last_time: int | None = None
    # The newest bars the state holds: an event repeating one of them (a re-announcement
    # after a crash or a Redis wipe) changes nothing; any other older bar is a correction.
    recent: RecentBars = field(default_factory=RecentBars)

    def step(self, bar: BarTuple) -> list[float]:
        values: list[float] = []
        for index, kernel in enumerate(self.kernels):
            try:
                values.extend(kernel.step(bar))
            except Exception as exc:
                raise InstanceFailure(self.instance_ids[index], exc) from exc
        self.last_time = bar[5]
        self.recent.append(bar)
        return values

    def holds(self, bar: BarTuple) -> bool:
        return bar in self.recent


def parse_event(fields: Mapping[str, str]) -> tuple[str, BarTuple]:
    """(symbol, bar) from an `ohlcv_<tf>_ready` entry; ValueError/KeyError if malformed."""
    bar = (
        float(fields["open"]),
        float(fields["high"]),
        float(fields["low"]),
        float(fields["close"]),
        float(fields["volume"]),
        int(fields["open_time"]),
    )
    if not all(math.isfinite(x) for x in bar[:5]):
        raise ValueError("non-finite price")
    symbol = fields["symbol"]
    if not symbol:
        raise ValueError("empty symbol")
    return symbol, bar


def interleave(names: Sequence[str], values: Sequence[Any]) -> list[Any]:
    """[name, value, name, value, ...]: a hash's fields as HSET takes them."""
    pairs: list[Any] = [None] * (2 * len(names))
    pairs[0::2] = names
    pairs[1::2] = values
    return pairs


def bars_as_tuples(bars: BarArrays) -> list[BarTuple]:
    return list(
        zip(
            bars.open.tolist(),
            bars.high.tolist(),
            bars.low.tolist(),
            bars.close.tolist(),
            bars.volume.tolist(),
            bars.open_time.tolist(),
        )
    )


def first_unseen(old: Series | None, bars: BarArrays, start: int | None) -> int | None:
    """The bar to write a reopened series from: `start`, or an earlier bar of the stored
    history that the series was never stepped with (it was stored after the series moved
    past its time: a backfill whose event is still on its way) or that changed. Its event,
    read later, would find the reopened series holding it and change nothing, leaving the
    values after it computed without it."""
    if old is None or old.last_time is None or not bars.size:
        return start
    held = old.recent.bars()
    if not held:
        return start
    known, oldest = set(held), min(bar[5] for bar in held)
    for row in bars_as_tuples(bars)[-RECENT_BARS:]:
        t = row[5]
        if t > old.last_time or (start is not None and t >= start):
            break
        if t >= oldest and row not in known:
            return t
    return start


# Opened from its `history` bars, an instance's values match the whole history's within
# 1e-12 of the seeding difference (registry.py): values that differ by more were
# computed on other bars than those stored now.
SAME_VALUE_REL, SAME_VALUE_ABS = 1e-9, 1e-9


def same_values(computed: Sequence[float], stored: Sequence[float]) -> bool:
    """Whether a bar's stored values are those its stored history gives now; NaN (no
    value stored) equals only NaN."""
    for new, old in zip(computed, stored, strict=True):
        if math.isnan(new) or math.isnan(old):
            if math.isnan(new) != math.isnan(old):
                return False
        elif not math.isclose(new, old, rel_tol=SAME_VALUE_REL, abs_tol=SAME_VALUE_ABS):
            return False
    return True


FirstValue = tuple[Instance, int, int]  # an instance, the open time of its first stored value, its index


def first_values_in(
    bars: BarArrays, instances: Sequence[Instance], firsts: Mapping[int, int], whole: bool
) -> list[FirstValue]:
    """The instances' first stored values (`firsts`: instance id -> open time) that `bars`
    holds with bars before them: those an older bar stored since could have changed.
    Running sums (OBV) only where `bars` is the whole stored series (TA-Lib's OBV starts
    at its first bar): the only ones a bar of no price change alters."""
    found: list[FirstValue] = []
    for instance in instances:
        t = firsts.get(instance.id)
        index = int(np.searchsorted(bars.open_time, t)) if t is not None and (whole or not instance.anchored) else 0
        if 0 < index < bars.size and bars.open_time[index] == t:
            found.append((instance, t, index))
    return found


def fill_kernel(
    instance: Instance, bars: BarArrays, anchor: tuple[int, float] | None = None
) -> tuple[Kernel, list[np.ndarray]]:
    """A kernel of `instance` stepped through `bars`, and its outputs on each of them
    (`anchor`: a running sum's trusted value, see ObvKernel)."""
    try:
        kernel = instance.make_kernel()
        outputs = kernel.fill(bars, anchor) if instance.anchored else kernel.fill(bars)  # type: ignore[call-arg]
    except Exception as exc:
        raise InstanceFailure(instance.id, exc) from exc
    return kernel, outputs


def agrees_with_history(
    symbol: str,
    firsts: Sequence[FirstValue],
    outputs: Mapping[int, list[np.ndarray]],
    stored: Mapping[tuple[int, str, int, str], float],
) -> bool:
    """Whether each first value (`stored`: (instance, symbol, open time, output) -> value)
    is what the instance gives now (`outputs`: instance id -> its outputs over the bars)."""
    for instance, t, index in firsts:
        old = [stored.get((instance.id, symbol, t, name), math.nan) for name in instance.names]
        if not same_values([float(column[index]) for column in outputs[instance.id]], old):
            return False
    return True
