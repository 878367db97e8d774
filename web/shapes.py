"""What the read API answers, from what Redis holds. Pure.

Redis hashes keep text (an output without a value on the hash's bar is absent; data
written before that rule may hold an empty string, read as no value too); a
client gets JSON with numbers for derived values, decimal strings for prices and
volumes, and `null` for anything missing, never an empty string.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

ORDERFLOW_COUNTS = ("agg_trades", "trades", "buy_trades", "sell_trades", "first_agg_id", "last_agg_id")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def float_or_none(value: Any) -> float | None:
    """A finite number, or None for a missing, empty, NaN or infinite one."""
    if value is None or value == "" or value == b"":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _int_or_none(value: Any) -> int | None:
    if value is None or value == "" or value == b"":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def indicator_row(fields: Mapping[Any, Any]) -> dict[str, Any] | None:
    """An `indicator:<S>:<tf>` hash as `{"open_time", "values"}`; None without a bar."""
    text = {_text(k): v for k, v in fields.items()}
    open_time = _int_or_none(text.pop("open_time", None))
    if open_time is None:
        return None
    return {"open_time": open_time, "values": {name: float_or_none(v) for name, v in sorted(text.items())}}


def merge_indicator_rows(
    stored: Sequence[tuple[int, Mapping[str, Any]]], latest: Mapping[str, Any] | None, end: int | None
) -> list[dict[str, Any]]:
    """PostgreSQL's rows (oldest first), then Redis's newest bar when PostgreSQL does not
    have it yet (values reach PostgreSQL right behind Redis). Every row names every
    output seen, `null` where it has no value (warm-up), so a client sees one shape."""
    rows = [{"open_time": t, "values": dict(values)} for t, values in stored]
    if latest is not None and (end is None or latest["open_time"] <= end):
        if not rows or latest["open_time"] > rows[-1]["open_time"]:
            rows.append({"open_time": latest["open_time"], "values": dict(latest["values"])})
    names = sorted({name for row in rows for name in row["values"]})
    for row in rows:
        values = row["values"]
        row["values"] = {name: float_or_none(values.get(name)) for name in names}
    return rows


def orderflow_from_hash(fields: Mapping[Any, Any]) -> dict[str, Any] | None:
    """An `orderflow:<S>:<tf>` hash as an `orderflow_v4` row; None without a bar."""
    text = {_text(k): _text(v) for k, v in fields.items()}
    open_time = _int_or_none(text.pop("open_time", None))
    if open_time is None:
        return None
    row: dict[str, Any] = {"open_time": open_time}
    for name, value in text.items():
        row[name] = _int_or_none(value) if name in ORDERFLOW_COUNTS else (value or None)
    return row
