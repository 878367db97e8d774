"""Reads Binance's monthly 1m kline archives (gzipped CSV) into candles, and the real
stream recordings of 2024-07-19."""

from __future__ import annotations

import csv
import gzip
import json
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


STREAMS_DIR = SHARED_DATA_DIR / "binance_um_streams_2024-07-19"


def _recorded_messages(symbol: str, streams_dir: Path) -> Iterator[str]:
    """Every message of a symbol's recordings as received (both files: the recording was
    split at midnight), without its receive time."""
    for path in sorted(streams_dir.glob(f"usdm_{symbol.lower()}_*.gz")):
        with gzip.open(path, "rt") as handle:
            for line in handle:
                yield line.partition(" ")[2]


def read_recorded_trades(symbol: str, streams_dir: Path = STREAMS_DIR) -> Iterator[dict]:
    """The raw `<s>@trade` events of the 2024-07-19 recordings, in the order received
    (both files of the symbol: the recording was split at midnight)."""
    for text in _recorded_messages(symbol, streams_dir):
        if '@trade"' in text:
            yield json.loads(text)["data"]


def recorded_book_frames(symbol: str, streams_dir: Path = STREAMS_DIR) -> Iterator[tuple[str, str]]:
    """The recordings' book messages in the order received: ("snapshot", its body) for the
    REST depth snapshot, ("bookTicker", frame) and ("depth", frame) for the streams'
    combined-stream envelopes, as sent."""
    for text in _recorded_messages(symbol, streams_dir):
        if text.startswith('{"lastUpdateId"'):
            yield "snapshot", text
        elif "@bookTicker" in text[:40]:
            yield "bookTicker", text
        elif "@depth" in text[:40]:
            yield "depth", text


def recorded_agg_trades(symbol: str, streams_dir: Path = STREAMS_DIR) -> Iterator[dict]:
    """The recordings' raw trades as `<s>@aggTrade` payloads: a run of consecutive
    MARKET trades with the same time, price and side is one aggTrade (the usual stand-in:
    raw trades do not name their taker order); other trades (insurance fund) are not
    aggregated, as on the exchange. `a` counts from 1."""
    runs: list[list[dict]] = [[]]
    for trade in read_recorded_trades(symbol, streams_dir):
        run = runs[-1]
        if trade["X"] != "MARKET":
            runs.append([])  # ends the run, joins none
        elif (
            run
            and trade["t"] == run[-1]["t"] + 1
            and (trade["T"], trade["p"], trade["m"])
            == (
                run[0]["T"],
                run[0]["p"],
                run[0]["m"],
            )
        ):
            run.append(trade)
        else:
            runs.append([trade])
    for agg_id, run in enumerate(filter(None, runs), start=1):
        first, last = run[0], run[-1]
        yield {
            "e": "aggTrade",
            "E": last["E"],
            "s": symbol,
            "a": agg_id,
            "p": first["p"],
            "q": str(sum((Decimal(t["q"]) for t in run), Decimal(0))),
            "f": first["t"],
            "l": last["t"],
            "T": first["T"],
            "m": first["m"],
        }
