"""Which tables grow with time, and how each is cut: into chunks under TimescaleDB, into
native range partitions on plain PostgreSQL (where retention needs them).

A piece should hold about a day of writes or less for the big tables (its indexes stay
in memory while it is written; TimescaleDB's advice is a quarter of RAM at most), and
long spans for the small ones (fewer pieces to plan over). Sizes at 789 symbols: M1
~1.1 M rows a day; indicator values ~27 outputs a bar on three timeframes, ~39 M rows a
day, hence quarter days; the one-second tables ~2.8 M rows an hour each, hence hours.

Candles and the per-minute book rollup are kept forever: on plain PostgreSQL they stay
one table (every read is a primary-key range; partitions would buy nothing but a row
with no partition to go to). Everything with a retention is partitioned in every mode,
so retention is a DROP of whole pieces, never a row DELETE.
"""

from __future__ import annotations

from dataclasses import dataclass

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS


@dataclass(frozen=True)
class TimeTable:
    table: str
    time_column: str
    piece_ms: int  # a chunk under TimescaleDB, a partition on plain PostgreSQL
    partitioned_plain: bool  # cut into native partitions on plain PostgreSQL too
    why: str

    @property
    def chunk(self) -> str:
        """The piece as a PostgreSQL interval."""
        if self.piece_ms % DAY_MS == 0:
            days = self.piece_ms // DAY_MS
            return f"{days} day{'s' if days > 1 else ''}"
        hours = self.piece_ms // HOUR_MS
        return f"{hours} hour{'s' if hours > 1 else ''}"


TIME_TABLES: tuple[TimeTable, ...] = (
    TimeTable("ohlcv4_m1", "open_time", DAY_MS, False, "~1.1 M rows a day at 789 symbols"),
    TimeTable("ohlcv4_m5", "open_time", 7 * DAY_MS, False, "~1.6 M rows a week"),
    TimeTable("ohlcv4_m15", "open_time", 30 * DAY_MS, False, "~2.3 M rows a month"),
    TimeTable("ohlcv4_h1", "open_time", 90 * DAY_MS, False, "optional: ~1.7 M rows a quarter"),
    TimeTable("ohlcv4_h4", "open_time", 365 * DAY_MS, False, "optional: ~1.7 M rows a year"),
    TimeTable("ohlcv4_d1", "open_time", 365 * DAY_MS, False, "optional: ~0.3 M rows a year"),
    TimeTable("indicator_values_v4", "open_time", 6 * HOUR_MS, True, "~39 M rows a day: a quarter day a piece"),
    TimeTable("orderflow4", "open_time", DAY_MS, True, "M1, M5 and M15 footprints: ~1.5 M rows a day"),
    TimeTable("book_m1_4", "open_time", DAY_MS, False, "one row a symbol a minute, as M1"),
    TimeTable("trades_1s4", "ts", HOUR_MS, True, "up to 2.8 M rows an hour; retention in hours"),
    TimeTable("book_ticker_1s4", "ts", HOUR_MS, True, "as trades_1s4"),
    TimeTable("depth_1s4", "ts", HOUR_MS, True, "as trades_1s4"),
    TimeTable("features_1s4", "ts", HOUR_MS, True, "as trades_1s4"),
    TimeTable("agg_trades4", "ts", HOUR_MS, True, "raw aggTrades (optional): ~10 M rows an hour for the market"),
    TimeTable("book_tickers4", "ts", HOUR_MS, True, "raw bookTicker updates (optional): 10-100x the trades"),
)
BY_NAME = {t.table: t for t in TIME_TABLES}
ONE_SECOND_TABLES = ("trades_1s4", "book_ticker_1s4", "depth_1s4", "features_1s4")


def piece_start(table: TimeTable, time_ms: int) -> int:
    """The start of the piece holding `time_ms` (pieces are aligned to the epoch, UTC)."""
    return time_ms - time_ms % table.piece_ms
