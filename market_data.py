"""Reads Binance's monthly 1m kline archives (gzipped CSV) into candles."""

from __future__ import annotations

import csv
import gzip
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

from candles import Candle

SHARED_DATA_DIR = Path(__file__).resolve().parent.parent / "shared" / "data"
ARCHIVE_DIR = SHARED_DATA_DIR / "binance_um_1m_2026-02"


def archive_symbols(archive_dir: Path = ARCHIVE_DIR) -> list[str]:
    return sorted(p.name.split("-")[0] for p in archive_dir.glob("*-1m-*.csv.gz"))


def read_archive(symbol: str, archive_dir: Path = ARCHIVE_DIR) -> Iterator[Candle]:
    """The archive's rows as M1 candles, oldest first (the header line is skipped)."""
    path = next(archive_dir.glob(f"{symbol}-1m-*.csv.gz"))
    with gzip.open(path, "rt", newline="") as handle:
        for row in csv.reader(handle):
            if not row or not row[0].isdigit():
                continue
            yield Candle(
                symbol=symbol,
                tf="m1",
                open_time=int(row[0]),
                open=Decimal(row[1]),
                high=Decimal(row[2]),
                low=Decimal(row[3]),
                close=Decimal(row[4]),
                volume=Decimal(row[5]),
                quote_volume=Decimal(row[7]),
                trades=int(row[8]),
                taker_buy_volume=Decimal(row[9]),
                taker_buy_quote_volume=Decimal(row[10]),
            )
