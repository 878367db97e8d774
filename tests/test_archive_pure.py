"""The archive's files, pure: paths, checksums, CSV with and without a header, rows
checked one by one; and the fake exchange's archive tree that the import tests read."""

from __future__ import annotations

import io
import zipfile
from datetime import date
from decimal import Decimal

import pytest

from archive.files import (
    ArchiveError,
    csv_rows,
    daily_path,
    day_start_ms,
    days,
    kline_candles,
    sha256_hex,
    verify,
)
from archive.progress import ImportProgress
from candles import Candle
from fake_exchange.archive import KLINE_HEADER, ArchiveTree, checksum_text, kline_lines, zipped

DAY = date(2026, 2, 2)
T0 = day_start_ms(DAY)


def candle(t: int, close: str = "10.5") -> Candle:
    return Candle(
        "LINKUSDT", "m1", t, Decimal("10.1"), Decimal("11"), Decimal("10"), Decimal(close), Decimal("7.5"),
        Decimal("76.1"), 12, Decimal("3.5"), Decimal("35.2"),
    )  # fmt: skip


def test_paths_are_data_binance_visions():
    assert daily_path("klines", "BTCUSDT", DAY) == "data/futures/um/daily/klines/BTCUSDT/1m/BTCUSDT-1m-2026-02-02.zip"
    assert (
        daily_path("aggTrades", "BTCUSDT", DAY)
        == "data/futures/um/daily/aggTrades/BTCUSDT/BTCUSDT-aggTrades-2026-02-02.zip"
    )
    assert days(date(2026, 1, 30), date(2026, 2, 2)) == [date(2026, 1, d) for d in (30, 31)] + [
        date(2026, 2, 1),
        DAY,
    ]
    with pytest.raises(ValueError, match="unknown archive kind"):
        daily_path("trades", "BTCUSDT", DAY)


def test_a_file_is_used_only_when_its_checksum_says_so():
    data = b"zip bytes"
    name = "LINKUSDT-1m-2026-02-02.zip"
    assert verify(data, checksum_text(data, name), name) == sha256_hex(data)
    with pytest.raises(ArchiveError, match=r"differs from its \.CHECKSUM"):
        verify(data + b"!", checksum_text(data, name), name)
    with pytest.raises(ArchiveError, match="names another file"):
        verify(data, checksum_text(data, "OTHER.zip"), name)
    with pytest.raises(ArchiveError, match="is not '<sha256>  <name>'"):
        verify(data, "<html>not found</html>", name)


@pytest.mark.parametrize("header", [KLINE_HEADER, None])
def test_rows_are_read_with_or_without_the_header_line(header):
    lines = kline_lines([candle(T0), candle(T0 + 60_000, "10.7")])
    rows = list(csv_rows(zipped("X.zip", lines, header), "X.zip"))
    assert [r[0] for r in rows] == [str(T0), str(T0 + 60_000)]
    assert kline_candles("LINKUSDT", DAY, iter(rows), []) == [candle(T0), candle(T0 + 60_000, "10.7")]


def test_a_bad_row_is_refused_with_its_reason_and_the_others_kept():
    good = kline_lines([candle(T0 + 120_000)])[0]
    unordered = good.split(",")
    unordered[2] = "9"  # a high below the low
    rows = [
        good.split(","),
        ["1", "2"],  # short
        kline_lines([candle(T0 + 30_000)])[0].split(","),  # not a whole minute
        kline_lines([candle(T0 - 60_000)])[0].split(","),  # the day before
        good.replace("10.5", "abc").split(","),  # not a number
        unordered,
    ]
    rejected: list[str] = []
    kept = kline_candles("LINKUSDT", DAY, iter(rows), rejected)
    assert kept == [candle(T0 + 120_000)]
    assert len(rejected) == 5
    assert "a kline row of 2 fields" in rejected[0] and "bad times" in rejected[1]
    assert "in the file of 2026-02-02" in rejected[2] and "not a decimal" in rejected[3]
    assert "prices out of order" in rejected[4]


def test_a_damaged_zip_is_an_archive_error():
    data = zipped("X.zip", ["1,2"], None)
    with pytest.raises(ArchiveError, match="not a readable zip"):
        list(csv_rows(data[:-30], "X.zip"))
    two = io.BytesIO()
    with zipfile.ZipFile(two, "w") as archive:
        archive.writestr("a.csv", "1")
        archive.writestr("b.csv", "2")
    with pytest.raises(ArchiveError, match="a zip of 2 files"):
        list(csv_rows(two.getvalue(), "X.zip"))


def test_the_fake_archive_publishes_a_day_once_it_has_ended():
    now = [T0 + 86_400_000 - 1]
    tree = ArchiveTree(
        ["LINKUSDT"], T0 - 86_400_000, T0 + 3 * 86_400_000, lambda s, t: candle(t), lambda s, t: [], lambda: now[0]
    )
    path = daily_path("klines", "LINKUSDT", DAY)
    assert tree.file(path) is None  # the day has not ended
    now[0] += 1
    data = tree.file(path)
    assert data is not None and tree.file(path + ".CHECKSUM") == checksum_text(data, path.rsplit("/", 1)[1]).encode()
    rows = list(csv_rows(data, "x"))
    assert len(rows) == 1440 and rows[0][0] == str(T0)  # an even day: with the header, skipped
    assert (
        zipfile.ZipFile(io.BytesIO(data))
        .read(zipfile.ZipFile(io.BytesIO(data)).namelist()[0])
        .startswith(b"open_time,")
    )
    assert tree.file(daily_path("klines", "BTCUSDT", DAY)) is None  # not replayed
    assert tree.file("data/futures/um/daily/klines/LINKUSDT/1m/../../x.zip") is None


def test_import_progress_counts_files_rows_and_bytes():
    clock = [0.0]
    lines: list[str] = []

    class Log:
        def info(self, fmt: str, *args: object) -> None:
            lines.append(fmt % args)

    progress = ImportProgress(4, Log(), "log", clock=lambda: clock[0], interval_s=5)  # type: ignore[arg-type]
    clock[0] = 6.0
    progress.file_done(1440, 2_000_000)
    assert lines == ["import: 1/4 files, 1,440 rows, 2.0 MB (0.3 MB/s, 240 rows/s), ETA 18s"]
    clock[0] = 7.0
    progress.file_done(1440, 2_000_000)  # within the interval: no line
    assert len(lines) == 1 and progress.eta_s() == pytest.approx(7.0)
