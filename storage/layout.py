"""Which tables grow with time, and how each is cut into chunks under TimescaleDB.

A chunk should hold about a day of writes or less for the big tables (its indexes stay
in memory while it is written; TimescaleDB's advice is a quarter of RAM at most), and
long spans for the small ones (fewer chunks to plan over). Sizes at 789 symbols:
M1 ~1.1 M rows a day; indicator values ~45 outputs a bar on three timeframes, ~65 M rows a
day, hence quarter days. The one-second tables are already partitioned by hour
(migration 009) in every mode and stay so.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Hypertable:
    table: str
    time_column: str
    chunk: str  # a PostgreSQL interval
    why: str


HYPERTABLES: tuple[Hypertable, ...] = (
    Hypertable("ohlcv4_m1", "open_time", "1 day", "~1.1 M rows a day at 789 symbols"),
    Hypertable("ohlcv4_m5", "open_time", "7 days", "~1.6 M rows a week"),
    Hypertable("ohlcv4_m15", "open_time", "30 days", "~2.3 M rows a month"),
    Hypertable("indicator_values_v4", "open_time", "6 hours", "~65 M rows a day: a quarter day a chunk"),
    Hypertable("orderflow4", "open_time", "1 day", "M1, M5 and M15 footprints: ~1.5 M rows a day"),
    Hypertable("book_m1_4", "open_time", "1 day", "one row a symbol a minute, as M1"),
)
