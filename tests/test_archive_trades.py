"""aggTrades files into agg_trades4: the converted binary COPY (archive/trade_rows.py)
stores exactly what the exact SQL path stores, and hands every file it cannot convert
exactly to that path."""

from __future__ import annotations

import io
import logging
from datetime import date
from decimal import Decimal

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from archive import trades
from archive.files import ArchiveError, day_start_ms
from archive.trade_rows import DecimalScanner, _units
from archive.trades import TradeFile, _copy_checked, store_trades
from candles import DAY_MS, ms_to_datetime
from fake_exchange.archive import AGG_TRADE_HEADER, zipped
from storage import partitions

pytestmark = pytest.mark.storage_modes  # run again on each TimescaleDB edition by `make test`

SYMBOL = "TESTUSDT"
DAY = date(2026, 3, 20)
START = day_start_ms(DAY)
EXACT_PATH = "taking the exact path"


def trade_lines(count: int, first_id: int = 0) -> list[str]:
    return [
        f"{a},{60000 + (a % 997) / 10:.1f},{(a % 89) / 1000 + 0.001:.3f},{3 * a},{3 * a + 2},{START + a * 1000},"
        f"{'true' if a % 3 else 'false'}"
        for a in range(first_id, first_id + count)
    ]


BAD_LINES = [  # each refused by both paths
    f"900001,0,1.5,10,11,{START + 5},true",  # no price
    f"900002,12.5,-1,10,11,{START + 5},true",  # negative quantity
    f"900003,12.5,1,12,11,{START + 5},false",  # last id before first
    f"900004,12.5,1,12,13,{START - 1},false",  # the day before
    f"900005,12.5,1,12,13,{START + 86_400_000},false",  # the day after
]


async def stored_rows(pool) -> list[tuple]:
    rows = await pool.fetch(
        "SELECT symbol, ts, agg_id, price_units, qty_units, first_id, last_id, buyer_maker FROM agg_trades4 "
        "ORDER BY agg_id"
    )
    return [tuple(r) for r in rows]


def expected_units(lines: list[str]) -> dict[int, tuple[int, int]]:
    """agg_id -> (price units, quantity units), from the text with exact decimals."""
    out = {}
    for line in lines:
        fields = line.split(",")
        out[int(fields[0])] = (int(Decimal(fields[1]) * 100_000_000), int(Decimal(fields[2]) * 100_000_000))
    return out


@pytest.fixture(params=[trades.CHUNK_ROWS, 64], ids=["one-block", "blocks-of-64"])
def blocks(request, monkeypatch) -> int:
    """The file's rows in one block (a stream idle) or in many, spread over both streams."""
    monkeypatch.setattr(trades, "CHUNK_ROWS", request.param)
    monkeypatch.setattr(trades, "COPY_LOCK_TIMEOUT", "1s")  # a trade twice across the streams
    return request.param


async def day_pieces(pool) -> int:
    """The pieces of agg_trades4 across DAY, whatever the mode."""
    kind = await partitions.table_kind(pool, "agg_trades4")
    if kind == partitions.HYPERTABLE:
        sql = (
            "SELECT count(*) FROM show_chunks('agg_trades4', newer_than => $1::timestamptz, "
            "older_than => $2::timestamptz)"
        )
        return await pool.fetchval(sql, ms_to_datetime(START - 1), ms_to_datetime(START + DAY_MS))
    sql = (
        "SELECT count(*) FROM pg_inherits WHERE inhparent = 'agg_trades4'::regclass "
        "AND inhrelid::regclass::text >= $1 AND inhrelid::regclass::text < $2"
    )
    bounds = (partitions.partition_name("agg_trades4", START), partitions.partition_name("agg_trades4", START + DAY_MS))
    return await pool.fetchval(sql, *bounds)


@pytest.mark.parametrize("header", [AGG_TRADE_HEADER, None])
async def test_the_converted_copy_stores_what_the_exact_path_stores(pool, caplog, header, blocks):
    lines = trade_lines(3000) + BAD_LINES
    data = zipped("f.zip", lines, header)
    with caplog.at_level(logging.DEBUG, "ARCHIVE"):
        fast = await store_trades(pool, SYMBOL, DAY, data, "f.zip")
    assert EXACT_PATH not in caplog.text, "the converted path took the file"
    assert "f.zip: 2 COPY stream(s)" in caplog.text  # the day's pieces were all made first
    assert await day_pieces(pool) == 24
    fast_rows = await stored_rows(pool)
    await pool.execute("TRUNCATE agg_trades4")
    exact = await _copy_checked(pool, TradeFile.read(SYMBOL, DAY, data, "f.zip"))
    assert fast[:3] == exact[:3] == (3005, 5, 3000)
    assert sorted(e[1] for e in fast[3]) == sorted(e[1] for e in exact[3]) == [900001, 900002, 900003]
    assert fast_rows == await stored_rows(pool)
    want = expected_units(lines[:3000])
    assert {r[2]: (r[3], r[4]) for r in fast_rows} == want


@pytest.mark.parametrize(
    ("line", "why"),
    [
        (f"7000,12.123456789,1,10,11,{START + 5},true", "more than 8 decimals"),  # refused by the exact path
        (f"7000,12.5,50000000.12345678,10,11,{START + 5},true", "cannot convert exactly"),  # stored exactly
        # a repeated trade, kept once (in blocks of 64, the first in one stream, the repeat in the other)
        (f"10,60001.0,0.011,30,32,{START + 10_000},true", "duplicate key"),
    ],
)
async def test_what_the_conversion_cannot_take_goes_to_the_exact_path(pool, caplog, line, why, blocks):
    lines = [*trade_lines(200), line]
    with caplog.at_level(logging.INFO, "ARCHIVE"):
        total, refused, stored, _ = await store_trades(pool, SYMBOL, DAY, zipped("f.zip", lines, None), "f.zip")
    held = "lock timeout" if why == "duplicate key" and blocks == 64 else why  # the streams wait on each other
    assert EXACT_PATH in caplog.text and held in caplog.text, caplog.text
    rows = {r[2]: (r[3], r[4]) for r in await stored_rows(pool)}
    assert total == 201 and stored == len(rows) and refused == (why == "more than 8 decimals")
    assert {a: units for a, units in expected_units(trade_lines(200)).items()} == {a: rows[a] for a in range(200)}
    if why == "cannot convert exactly":
        assert rows[7000] == (1_250_000_000, 5_000_000_012_345_678)


async def test_a_field_that_is_no_number_fails_the_file_by_either_path(pool, caplog):
    lines = [*trade_lines(200), f"7000,12.5,abc,10,11,{START + 5},true"]
    with caplog.at_level(logging.INFO, "ARCHIVE"), pytest.raises(ArchiveError, match="not a readable aggTrades CSV"):
        await store_trades(pool, SYMBOL, DAY, zipped("f.zip", lines, None), "f.zip")
    assert EXACT_PATH in caplog.text and await stored_rows(pool) == []


async def test_a_day_with_trades_already_stored_takes_the_exact_path(pool, caplog):
    await store_trades(pool, SYMBOL, DAY, zipped("f.zip", trade_lines(100), None), "f.zip")
    with caplog.at_level(logging.INFO, "ARCHIVE"):
        again = await store_trades(pool, SYMBOL, DAY, zipped("f.zip", trade_lines(150), None), "f.zip")
    assert again[:3] == (150, 0, 50)  # the 100 there already are kept once
    assert len(await stored_rows(pool)) == 150


@given(st.decimals(min_value=0, max_value=Decimal("11000000"), places=8, allow_nan=False))
def test_a_decimal_of_up_to_8_places_becomes_its_exact_units(value):
    units, exact = _units(np.array([float(str(value))]))
    assert exact[0] and units[0] == int(value * 100_000_000)


def test_the_scanner_finds_a_long_decimal_across_reads():
    text = b"1,2.12345,3\n" * 1000 + b"4,5.123456789,6\n"
    for size in (7, 64, 1 << 16):
        scanner = DecimalScanner(io.BytesIO(text))
        while scanner.read(size):
            pass
        assert scanner.too_precise, size
    clean = DecimalScanner(io.BytesIO(b"1,2.12345678,3\n" * 1000))
    assert clean.read() and not clean.too_precise
