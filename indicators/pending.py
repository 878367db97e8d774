"""Values computed and not yet in PostgreSQL, and the candle events waiting on them.

A candle event is acknowledged only once the values it led to are written. Acknowledged
as soon as they were computed, by a worker killed before they were written, it is gone:
the next run opens from PostgreSQL, where the bar (a rebuilt M5/M15 bucket, a late
correction) is already the new one and its values are the old ones, and nothing says
so. Held until written, the event is still unacknowledged at the next start, which
writes the series again from its bar.

Every queued bar gets a stamp from one counter, and the queue is kept in stamp order
(a bar queued again moves to the end). A batch of events is held with the stamp
current when its values were all queued; it is due once the oldest queued stamp is
past it.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from typing import Any, NamedTuple

Key = tuple[str, str, int, Any]  # (symbol, tf, open_time, group); group "" is the fast set
Ack = tuple[str, str]  # (stream, entry id)


class Entry(NamedTuple):
    ids: Sequence[int]
    names: Sequence[str]
    values: Sequence[float]
    rewrite: bool  # the bar may have stored values: an output without one now loses its row
    stamp: int


class Matrix(NamedTuple):
    """Bars of one layout (the fast set of a timeframe, or a pandas-ta instance)."""

    symbols: list[str]
    times: list[int]
    values: list[float]  # len(ids) per bar, bar after bar


class PendingValues:
    def __init__(self) -> None:
        self.entries: dict[Key, Entry] = {}
        self.rows = 0
        self.stamp = 0  # of the newest queued bar
        self._held: deque[tuple[int, Sequence[Ack]]] = deque()

    def __len__(self) -> int:
        return len(self.entries)

    def clear(self) -> None:
        """Forget the values (a crash, in tests); the events stay held."""
        self.entries.clear()
        self.rows = 0

    def add(
        self, key: Key, ids: Sequence[int], names: Sequence[str], values: Sequence[float], rewrite: bool = False
    ) -> None:
        old = self.entries.pop(key, None)
        self.rows += len(values) - (len(old.values) if old is not None else 0)
        self.stamp += 1
        self.entries[key] = Entry(ids, names, values, rewrite or (old is not None and old.rewrite), self.stamp)

    def value(self, symbol: str, tf: str, t: int, instance_id: int, name: str) -> float | None:
        entry = self.entries.get((symbol, tf, t, ""))
        if entry is None:
            return None
        for i, n, v in zip(entry.ids, entry.names, entry.values):
            if i == instance_id and n == name and v == v:
                return v
        return None

    def take(self, max_rows: int) -> list[tuple[Key, Entry]]:
        """The oldest bars, up to `max_rows` values (at least one bar)."""
        taken: list[tuple[Key, Entry]] = []
        rows = 0
        for item in self.entries.items():
            taken.append(item)
            rows += len(item[1].values)
            if rows >= max_rows:
                break
        return taken

    def done(self, taken: Sequence[tuple[Key, Entry]]) -> None:
        """Written: dropped, unless queued again meanwhile."""
        for key, entry in taken:
            if self.entries.get(key) is entry:
                del self.entries[key]
                self.rows -= len(entry.values)

    # ----------------------------------------------------------------- events held

    def hold(self, acks: Sequence[Ack]) -> None:
        """Events whose values are all queued by now."""
        if acks:
            self._held.append((self.stamp, acks))

    def due(self) -> tuple[int, list[Ack]]:
        """The held events with no value left to write, and the stamp to `forget` them by."""
        oldest = next(iter(self.entries.values())).stamp if self.entries else None
        through, acks = 0, []
        for stamp, batch in self._held:
            if oldest is not None and stamp >= oldest:
                break
            through = stamp
            acks.extend(batch)
        return through, acks

    def forget(self, through: int) -> None:
        """Acknowledged: the batches held at stamps up to `through`."""
        while self._held and self._held[0][0] <= through:
            self._held.popleft()

    def held(self) -> int:
        return sum(len(batch) for _, batch in self._held)

    # ----------------------------------------------------------------- a symbol handed over

    def drop(self, symbols: set[str]) -> int:
        """The values of these symbols, not written (their next owner writes them); returns how many bars."""
        gone = [key for key in self.entries if key[0] in symbols]
        for key in gone:
            self.rows -= len(self.entries.pop(key).values)
        return len(gone)

    def held_acks(self) -> list[Ack]:
        return [ack for _, batch in self._held for ack in batch]

    def take_back(self, acks: set[Ack]) -> None:
        """These events are no longer acknowledged once their batch is written."""
        self._held = deque((stamp, [a for a in batch if a not in acks]) for stamp, batch in self._held)


def matrices(taken: Sequence[tuple[Key, Entry]]) -> tuple[dict[tuple, Matrix], tuple[list, list, list, list]]:
    """The bars as one matrix per layout, and the (instance, symbol, time, name) rows a
    rewritten bar no longer has a value for (e.g. SUPERTl after the trend flipped)."""
    by_layout: dict[tuple, Matrix] = {}
    gone: tuple[list, list, list, list] = ([], [], [], [])
    for (symbol, _tf, t, _group), entry in taken:
        matrix = by_layout.setdefault((tuple(entry.ids), tuple(entry.names)), Matrix([], [], []))
        matrix.symbols.append(symbol)
        matrix.times.append(t)
        matrix.values.extend(entry.values)
        if entry.rewrite:
            for instance_id, name, value in zip(entry.ids, entry.names, entry.values):
                if not math.isfinite(value):
                    for column, field_value in zip(gone, (instance_id, symbol, t, name)):
                        column.append(field_value)
    return by_layout, gone
