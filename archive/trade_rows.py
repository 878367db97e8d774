"""An aggTrades CSV's rows as PostgreSQL binary COPY rows of `agg_trades4`, whole columns
at a time (numpy): no Python per row and no numeric parsing in the server, which was
what held the SQL path to ~120k rows a second. Pure.

Exactness: the CSV's decimals are read as doubles, and a price or quantity becomes its
integer units of 1e-8 by rounding `x * 1e8`. That is exact when the decimal has at most
8 decimals and `x * 1e8` stays under 2**50 (values under ~11 million; integers under
2**53 units): the double's error is then under a quarter unit. A chunk that does not
meet this (more decimals, seen by `DecimalScanner`, or a bigger value) is not converted
here: `Unconvertible` sends the whole file to the exact SQL path, which decides each
row as before. Rows that fail the same checks as that path's are refused here too.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass

import numpy as np

UNITS = 100_000_000
PG_EPOCH_MS = 946_684_800_000  # 2000-01-01: binary timestamps count microseconds from it
COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + b"\x00" * 8
COPY_TRAILER = b"\xff\xff"
CSV_COLUMNS = ("agg_id", "price", "quantity", "first_id", "last_id", "t", "buyer_maker")
CSV_TYPES = {
    "agg_id": np.int64,
    "price": np.float64,
    "quantity": np.float64,
    "first_id": np.int64,
    "last_id": np.int64,
    "t": np.int64,
    "buyer_maker": bool,
}
_EXACT_BELOW = float(2**50)  # units: rounding x * 1e8 is exact below this
_INTEGRAL_BELOW = float(2**53)  # ... and for integral values, below this
_TOO_PRECISE = re.compile(rb"\.\d{9}")


class Unconvertible(ValueError):
    """A value this path cannot convert exactly: the file goes to the SQL path."""


@dataclass
class Converted:
    rows: bytes  # binary COPY rows (no header or trailer)
    kept: int
    refused: int
    examples: list[tuple]  # a few refused rows, as read


def copy_rows(symbol: str, day_start: int, day_end: int, columns: dict[str, np.ndarray]) -> Converted:
    """The chunk's valid rows as binary COPY rows of agg_trades4 (symbol, ts, agg_id,
    price_units, qty_units, first_id, last_id, buyer_maker)."""
    price, quantity = columns["price"], columns["quantity"]
    price_units, price_exact = _units(price)
    qty_units, qty_exact = _units(quantity)
    finite = np.isfinite(price) & np.isfinite(quantity)
    if not ((price_exact & qty_exact) | ~finite).all():
        raise Unconvertible("a price or quantity this path cannot convert exactly")
    t, agg_id, first_id, last_id = columns["t"], columns["agg_id"], columns["first_id"], columns["last_id"]
    valid = (
        finite
        & (price > 0)
        & (quantity >= 0)
        & (last_id >= first_id)
        & (agg_id >= 0)
        & (t >= day_start)
        & (t < day_end)
    )
    kept = int(valid.sum())
    examples = [
        (symbol, int(agg_id[i]), float(price[i]), float(quantity[i]), int(first_id[i]), int(last_id[i]), int(t[i]))
        for i in np.flatnonzero(~valid)[:3]
    ]
    name = symbol.encode()
    int8_columns = {
        "ts": (t - PG_EPOCH_MS) * 1000,  # timestamptz: microseconds from 2000-01-01
        "agg_id": agg_id,
        "price": price_units,
        "qty": qty_units,
        "first_id": first_id,
        "last_id": last_id,
    }
    layout = np.dtype(  # each field: its length (int4), then its bytes, big-endian
        [("fields", ">i2"), ("symbol_len", ">i4"), ("symbol", f"S{len(name)}")]
        + [item for field in int8_columns for item in ((f"{field}_len", ">i4"), (field, ">i8"))]
        + [("maker_len", ">i4"), ("maker", "u1")]
    )
    out = np.empty(kept, dtype=layout)
    out["fields"], out["symbol_len"], out["symbol"], out["maker_len"] = 8, len(name), name, 1
    for field, values in int8_columns.items():
        out[f"{field}_len"] = 8
        out[field] = values[valid]
    out["maker"] = columns["buyer_maker"][valid]
    return Converted(out.tobytes(), kept, len(valid) - kept, examples)


def _units(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Integer units of 1e-8, and where the rounding is exact (see the module's note)."""
    with np.errstate(invalid="ignore", over="ignore"):
        scaled = values * UNITS
        rounded = np.rint(scaled)
        magnitude = np.abs(scaled)
        exact = (magnitude < _EXACT_BELOW) | ((values == np.trunc(values)) & (magnitude < _INTEGRAL_BELOW))
        exact &= np.abs(scaled - rounded) <= 0.25
        units = np.where(exact, rounded, 0).astype(np.int64)
    return units, exact


class DecimalScanner(io.RawIOBase):
    """Reads through a file, noting whether any number has more than 8 decimals (which a
    double cannot be trusted to round to its units)."""

    def __init__(self, raw: io.BufferedIOBase) -> None:
        self.raw = raw
        self.tail = b""
        self.too_precise = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        data = self.raw.read(len(buffer))
        if data and not self.too_precise:
            window = self.tail + data
            self.too_precise = _TOO_PRECISE.search(window) is not None
            self.tail = window[-10:]  # a match may span reads
        buffer[: len(data)] = data
        return len(data)
