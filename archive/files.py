"""The archive's files (data.binance.vision layout), pure: where a day's file is, its
checksum, its CSV rows (with or without a header line) and the candles they hold.

Layout: `data/futures/um/daily/klines/<S>/1m/<S>-1m-YYYY-MM-DD.zip` and
`data/futures/um/daily/aggTrades/<S>/<S>-aggTrades-YYYY-MM-DD.zip`, each with a
`.CHECKSUM` beside it: `<sha256 hex>  <file name>`. A zip holds one CSV of the same name;
recent files start with a header line, older ones do not.
"""

from __future__ import annotations

import csv
import hashlib
import io
import zipfile
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta

from binance.protocol import FrameError, parse_rest_kline
from candles import DAY_MS, TF_MS, Candle

KINDS = ("klines", "aggTrades")
M1_MS = TF_MS["m1"]
MAX_ZIP_BYTES = 512 * 1024 * 1024  # one day of the busiest symbol's aggTrades is far less


class ArchiveError(ValueError):
    """A file that cannot be used: missing, corrupt, not what its checksum says."""


def file_name(kind: str, symbol: str, day: date) -> str:
    if kind == "klines":
        return f"{symbol}-1m-{day.isoformat()}.zip"
    if kind == "aggTrades":
        return f"{symbol}-aggTrades-{day.isoformat()}.zip"
    raise ValueError(f"unknown archive kind {kind!r}: one of {', '.join(KINDS)}")


def daily_path(kind: str, symbol: str, day: date) -> str:
    """The file's path under the archive's base (URL or folder)."""
    folder = f"{symbol}/1m" if kind == "klines" else symbol
    return f"data/futures/um/daily/{kind}/{folder}/{file_name(kind, symbol, day)}"


def days(first: date, last: date) -> list[date]:
    return [first + timedelta(days=i) for i in range((last - first).days + 1)]


def day_start_ms(day: date) -> int:
    return int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp() * 1000)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def verify(data: bytes, checksum_text: str, name: str) -> str:
    """The file's sha256 when it is what its `.CHECKSUM` says, else ArchiveError."""
    fields = checksum_text.split()
    if not fields or len(fields[0]) != 64:
        raise ArchiveError(f"{name}.CHECKSUM is not '<sha256>  <name>': {checksum_text[:120]!r}")
    if len(fields) > 1 and fields[1].lstrip("*") != name:
        raise ArchiveError(f"{name}.CHECKSUM names another file: {fields[1]!r}")
    digest = sha256_hex(data)
    if digest != fields[0].lower():
        raise ArchiveError(f"{name}: sha256 {digest} differs from its .CHECKSUM {fields[0].lower()}")
    return digest


def csv_member(data: bytes, name: str) -> tuple[zipfile.ZipFile, zipfile.ZipInfo, bool]:
    """The zip's one CSV and whether it starts with a header line (recent files do)."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        members = [m for m in archive.infolist() if not m.is_dir()]
        if len(members) != 1:
            raise ArchiveError(f"{name}: a zip of {len(members)} files, not one CSV")
        if members[0].file_size > MAX_ZIP_BYTES:
            raise ArchiveError(f"{name}: {members[0].file_size} bytes unpacked, over the cap")
        with archive.open(members[0]) as head:
            first = head.read(1)
    except (zipfile.BadZipFile, EOFError) as exc:
        raise ArchiveError(f"{name}: not a readable zip ({exc})") from exc
    return archive, members[0], bool(first) and not first.isdigit()


def csv_rows(data: bytes, name: str) -> Iterator[list[str]]:
    """The rows of the zip's one CSV, the header line (if any) left out."""
    archive, member, header = csv_member(data, name)
    try:
        text = io.TextIOWrapper(archive.open(member), encoding="ascii", newline="")
        rows = csv.reader(text)
        if header:
            next(rows, None)
        yield from (row for row in rows if row)
    except (zipfile.BadZipFile, UnicodeDecodeError, csv.Error, EOFError) as exc:
        raise ArchiveError(f"{name}: not a readable zip of CSV ({exc})") from exc


def kline_candles(symbol: str, day: date, rows: Iterator[list[str]], rejected: list[str]) -> list[Candle]:
    """The day's M1 candles, each checked as a REST kline is (times, prices, sums); a row
    that fails goes to `rejected` with its reason, and the others are kept."""
    first = day_start_ms(day)
    candles: dict[int, Candle] = {}
    for row in rows:
        try:
            if len(row) < 11:
                raise FrameError(f"a kline row of {len(row)} fields: {','.join(row)[:200]}")
            fields: list[object] = list(row[:11])
            fields[0], fields[6], fields[8] = int(row[0]), int(row[6]), int(row[8])
            candle, _ = parse_rest_kline(symbol, fields)
        except (FrameError, ValueError) as exc:
            rejected.append(str(exc))
            continue
        if not first <= candle.open_time < first + DAY_MS:
            rejected.append(f"a kline of {candle.open_time} in the file of {day.isoformat()}")
            continue
        candles[candle.open_time] = candle
    return [candles[t] for t in sorted(candles)]


def expected_minutes(day: date) -> range:
    first = day_start_ms(day)
    return range(first, first + DAY_MS, M1_MS)
