"""Footprint documents as JSON bytes, each row's text made once while the row stays the
same. Pure.

The forming footprints of every symbol that traded are sent four times a second (M1)
and once a second (M5/M15); between two sends most rows have not changed, and making
their decimal texts again was most of the order flow's CPU (a profile at 500 symbols:
45 % of the intake in the forming refresh, 27 % in `units_text` alone). The closing
bar's document then finds its rows made by the last forming send. The bytes equal
`orjson.dumps(footprint_document(bar, profile))` (a test holds them to it).
"""

from __future__ import annotations

import orjson

from orderflow.fold import BarFlow, units_text
from orderflow.output import profile_fields
from orderflow.profile import Profile

Key = tuple[str, str]  # (symbol, tf)
_ROW = b'{"price":"%s","bid_volume":"%s","ask_volume":"%s","bid_trades":%d,"ask_trades":%d}'


class FootprintRenderer:
    """Per series, the rows of its newest bars (`kept` of them: the forming bar and the
    one just closed, whose final document is made after the next bar began)."""

    def __init__(self, kept: int = 2) -> None:
        self.kept = kept
        # (symbol, tf) -> (open_time, row_size) -> row index -> (its cell's values, its JSON): tuples
        # of numbers and bytes, which the cyclic collector stops tracking (a burst's rows are
        # tens of thousands)
        self.rows: dict[Key, dict[tuple[int, int], dict[int, tuple[tuple[int, ...], bytes]]]] = {}

    def document(self, key: Key, bar: BarFlow, profile: Profile | None = None) -> bytes:
        size = bar.row_size
        made = self._rows_of(key, (bar.open_time, size))
        parts = []
        for index, cell in sorted(bar.rows.items()):
            values = tuple(cell)
            known = made.get(index)
            if known is None or known[0] != values:
                bid, ask, bid_trades, ask_trades = values
                text = _ROW % (
                    units_text(index * size).encode(),
                    units_text(bid).encode(),
                    units_text(ask).encode(),
                    bid_trades,
                    ask_trades,
                )
                known = made[index] = (values, text)
            parts.append(known[1])
        head = b'{"open_time":%d,"row_size":"%s","rows":[' % (bar.open_time, units_text(size).encode())
        tail = b"]}" if profile is None else b"]," + orjson.dumps(profile_fields(size, profile))[1:]
        return head + b",".join(parts) + tail

    def _rows_of(self, key: Key, bar_key: tuple[int, int]) -> dict[int, tuple[tuple[int, ...], bytes]]:
        bars = self.rows.get(key)
        if bars is None:
            bars = self.rows[key] = {}
        made = bars.get(bar_key)
        if made is None:
            made = bars[bar_key] = {}
            while len(bars) > self.kept:  # the oldest bar of the series goes
                del bars[min(bars)]
        return made

    def forget(self, symbols: set[str]) -> None:
        self.rows = {key: bars for key, bars in self.rows.items() if key[0] not in symbols}
