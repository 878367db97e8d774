"""The book domain in and out of PostgreSQL and Redis (SPEC section 14): the thin I/O
beside the pure bars (book/seconds.py, book/per_second.py, book/minutes.py).

PostgreSQL: the one-second tables of migration 009, in hourly pieces on `ts`. A
flush (~220 symbols × up to four kinds a second) is one statement: a data-modifying CTE
per table, each an `INSERT ... SELECT FROM unnest(...)` of column arrays, so it is one
round trip and one transaction. Seconds are final when written (a second is closed on
the exchange's clock and never reopened), so they are `ON CONFLICT DO NOTHING`: a batch
re-sent after a lost reply neither fails nor duplicates. Prices and quantities go as the
exact decimal text of their units, never through a float.

Partitions (plain PostgreSQL) are made on demand, an hour ahead, by storage.partitions;
TimescaleDB makes its chunks itself.

Redis: `features:<SYMBOL>` (the newest second; an absent feature is an absent field),
the bounded stream `features_1s` (every second), `book:<SYMBOL>` (the depth filter).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

import asyncpg
import orjson

from book.minutes import MinuteRow
from book.per_second import Features
from book.seconds import DepthSecond, TickerSecond, TradeSecond
from candles import datetime_to_ms, ms_to_datetime
from core_io import xadd_command
from orderflow.fold import units_text
from shards.keys import symbol_part
from storage import partitions
from storage.layout import ONE_SECOND_TABLES

FEATURES_STREAM = "features_1s"
FEATURE_NAMES = ("microprice", "i1", "i10", "ofi", "volume_imbalance", "vpin", "vpin_bulk", "volatility", "log_return")


def features_key(symbol: str) -> str:
    return f"features:{symbol_part(symbol)}"


def book_key(symbol: str) -> str:
    return f"book:{symbol_part(symbol)}"


# --------------------------------------------------------------------------- seconds

# (column, type): numeric columns travel as text (exact, cheap to encode) and are cast.
_TRADES = (
    ("symbol", "text"),
    ("ts", "timestamptz"),
    ("open", "numeric"),
    ("high", "numeric"),
    ("low", "numeric"),
    ("close", "numeric"),
    ("buy_volume", "numeric"),
    ("sell_volume", "numeric"),
    ("quote_volume", "numeric"),
    ("vwap", "numeric"),
    ("agg_trades", "int4"),
)
_TICKERS = (
    ("symbol", "text"),
    ("ts", "timestamptz"),
    *((name, "numeric") for name in ("bid_open", "bid_high", "bid_low", "bid_close")),
    *((name, "numeric") for name in ("ask_open", "ask_high", "ask_low", "ask_close")),
    ("bid_qty_close", "numeric"),
    ("ask_qty_close", "numeric"),
    ("microprice_close", "float8"),
    ("spread_sum", "numeric"),
    ("ofi", "numeric"),
    ("updates", "int4"),
    ("last_update_id", "int8"),
)
_DEPTHS = (
    ("symbol", "text"),
    ("ts", "timestamptz"),
    ("ofi_l1", "numeric"),
    ("ofi_l10", "numeric"),
    ("imbalance_1", "float8"),
    ("imbalance_5", "float8"),
    ("imbalance_10", "float8"),
    ("bid_depth_in_range", "numeric"),
    ("ask_depth_in_range", "numeric"),
    ("last_update_id", "int8"),
    ("diffs", "int4"),
)
_FEATURES = (("symbol", "text"), ("ts", "timestamptz"), *((name, "float8") for name in FEATURE_NAMES))
_MINUTES = (
    ("symbol", "text"),
    ("open_time", "timestamptz"),
    ("ofi", "numeric"),
    ("ofi_l1", "numeric"),
    ("ofi_l10", "numeric"),
    ("mean_spread", "float8"),
    ("microprice", "float8"),
    ("vpin", "float8"),
    ("vpin_bulk", "float8"),
    ("i1_mean", "float8"),
    ("volume_imbalance", "float8"),
    ("volatility", "float8"),
    ("book_ticker_updates", "int4"),
    ("depth_diffs", "int4"),
    ("seconds", "int2"),
)
_TABLES = (
    ("trades_1s4", _TRADES),
    ("book_ticker_1s4", _TICKERS),
    ("depth_1s4", _DEPTHS),
    ("features_1s4", _FEATURES),
    ("book_m1_4", _MINUTES),
)


def _insert_sql(table: str, columns: Sequence[tuple[str, str]], first: int) -> str:
    names = ", ".join(name for name, _ in columns)
    arrays = ", ".join(f"${i}::{'text' if kind == 'numeric' else kind}[]" for i, (_, kind) in enumerate(columns, first))
    selected = ", ".join(f"u.{name}::numeric" if kind == "numeric" else f"u.{name}" for name, kind in columns)
    return f"INSERT INTO {table} ({names}) SELECT {selected} FROM unnest({arrays}) AS u({names})"


def _write_sql() -> str:
    """One statement: the four second tables (DO NOTHING), then the minutes.

    A minute may be rolled up again: after a restart, from only the seconds the new
    process saw (its row then holds fewer `seconds`), or re-sent unchanged. The row that
    saw more of the minute is kept (ties: the newer), an unchanged one is not rewritten;
    the two halves of a minute split by a restart are not merged (`seconds` tells a
    reader how complete a minute is)."""
    parts, first = [], 1
    for n, (table, columns) in enumerate(_TABLES[:-1], 1):
        parts.append(f"w{n} AS ({_insert_sql(table, columns, first)} ON CONFLICT (symbol, ts) DO NOTHING)")
        first += len(columns)
    minutes = [name for name, _ in _MINUTES[2:]]
    return (
        "WITH "
        + ", ".join(parts)
        + " "
        + _insert_sql("book_m1_4", _MINUTES, first)
        + " ON CONFLICT (symbol, open_time) DO UPDATE SET "
        + ", ".join(f"{c} = EXCLUDED.{c}" for c in minutes)
        + ", written_at = now() WHERE EXCLUDED.seconds >= book_m1_4.seconds AND ("
        + ", ".join(f"book_m1_4.{c}" for c in minutes)
        + ") IS DISTINCT FROM ("
        + ", ".join(f"EXCLUDED.{c}" for c in minutes)
        + ")"
    )


_WRITE_SQL = _write_sql()


def _scaled_text(value: int, decimals: int) -> str:
    """Exact decimal text of value × 10^-decimals."""
    return format(Decimal(value).scaleb(-decimals).normalize(), "f")


def _opt_units(value: int | None) -> str | None:
    return None if value is None else units_text(value)


def trade_record(symbol: str, t: TradeSecond) -> tuple[Any, ...]:
    vwap = t.vwap()
    return (
        symbol,
        ms_to_datetime(t.ts),
        units_text(t.open),
        units_text(t.high),
        units_text(t.low),
        units_text(t.close),
        units_text(t.buy_volume),
        units_text(t.sell_volume),
        _scaled_text(t.notional, 16),  # units² of 1e-8 × 1e-8
        None if vwap is None else format(vwap, "f"),
        t.agg_trades,
    )


def ticker_record(symbol: str, t: TickerSecond) -> tuple[Any, ...]:
    prices = (t.bid_open, t.bid_high, t.bid_low, t.bid_close, t.ask_open, t.ask_high, t.ask_low, t.ask_close)
    return (
        symbol,
        ms_to_datetime(t.ts),
        *map(units_text, prices),
        units_text(t.bid_qty_close),
        units_text(t.ask_qty_close),
        t.microprice_close(),
        units_text(t.spread_sum),
        units_text(t.ofi),
        t.updates,
        t.last_update_id,
    )


def depth_record(symbol: str, d: DepthSecond) -> tuple[Any, ...]:
    return (
        symbol,
        ms_to_datetime(d.ts),
        units_text(d.ofi_l1),
        units_text(d.ofi_l10),
        d.imbalance_1,
        d.imbalance_5,
        d.imbalance_10,
        units_text(d.bid_depth_in_range),
        units_text(d.ask_depth_in_range),
        d.last_update_id,
        d.diffs,
    )


def features_record(symbol: str, f: Features) -> tuple[Any, ...]:
    return (symbol, ms_to_datetime(f.ts), *(getattr(f, name) for name in FEATURE_NAMES))


def minute_record(m: MinuteRow) -> tuple[Any, ...]:
    return (
        m.symbol,
        ms_to_datetime(m.open_time),
        _opt_units(m.ofi),
        _opt_units(m.ofi_l1),
        _opt_units(m.ofi_l10),
        m.mean_spread,
        m.microprice,
        m.vpin,
        m.vpin_bulk,
        m.i1_mean,
        m.volume_imbalance,
        m.volatility,
        m.book_ticker_updates,
        m.depth_diffs,
        m.seconds,
    )


def _columns(records: Sequence[tuple[Any, ...]], width: int) -> list[list[Any]]:
    return [list(column) for column in zip(*records)] if records else [[] for _ in range(width)]


def write_params(
    trades: Sequence[tuple[str, TradeSecond]],
    tickers: Sequence[tuple[str, TickerSecond]],
    depths: Sequence[tuple[str, DepthSecond]],
    features: Sequence[tuple[str, Features]],
    minutes: Sequence[MinuteRow],
) -> list[list[Any]]:
    """The statement's column arrays. A minute given twice goes once (the one with more
    seconds; ties: the later): one statement may not update a row twice."""
    fullest: dict[tuple[str, int], MinuteRow] = {}
    for m in minutes:
        held = fullest.get((m.symbol, m.open_time))
        if held is None or m.seconds >= held.seconds:
            fullest[(m.symbol, m.open_time)] = m
    params: list[list[Any]] = []
    for records, (_, columns) in zip(
        (
            [trade_record(s, t) for s, t in trades],
            [ticker_record(s, t) for s, t in tickers],
            [depth_record(s, d) for s, d in depths],
            [features_record(s, f) for s, f in features],
            [minute_record(m) for m in fullest.values()],
        ),
        _TABLES,
    ):
        params += _columns(records, len(columns))
    return params


async def write_seconds(
    pool: asyncpg.Pool,
    trades: list[tuple[str, TradeSecond]],
    tickers: list[tuple[str, TickerSecond]],
    depths: list[tuple[str, DepthSecond]],
    features: list[tuple[str, Features]],
    minutes: list[MinuteRow],
) -> None:
    """One flush, all or nothing, in one statement; safe to send again."""
    stamps = [bar.ts for batch in (trades, tickers, depths, features) for _, bar in batch]
    times = {table: stamps for table in ONE_SECOND_TABLES} if stamps else {}  # the same hours in all four
    if not times and not minutes:
        return
    params = write_params(trades, tickers, depths, features, minutes)
    await partitions.write_through(pool, times, lambda: pool.execute(_WRITE_SQL, *params))


async def newest_seconds(pool: asyncpg.Pool, symbols: Sequence[str]) -> dict[str, int]:
    """Each symbol's newest stored second (ms) of any kind, for the hole a restart
    leaves: one index probe per table, partition and symbol."""
    probes = " UNION ALL ".join(
        f"SELECT s.symbol, x.ts FROM unnest($1::text[]) AS s(symbol) CROSS JOIN LATERAL "
        f"(SELECT ts FROM {table} t WHERE t.symbol = s.symbol ORDER BY t.ts DESC LIMIT 1) x"
        for table in ("trades_1s4", "book_ticker_1s4", "depth_1s4", "features_1s4")
    )
    rows = await pool.fetch(f"SELECT symbol, max(ts) AS ts FROM ({probes}) newest GROUP BY symbol", list(symbols))
    return {r["symbol"]: datetime_to_ms(r["ts"]) for r in rows}


# --------------------------------------------------------------------------- Redis


def feature_fields(f: Features) -> dict[str, str]:
    """`ts` (ms) and each feature that has a value (shortest round-tripping text); a
    feature without one (None, NaN, ±inf) is left out, never an empty string."""
    fields = {"ts": str(f.ts)}
    for name in FEATURE_NAMES:
        value = getattr(f, name)
        if value is not None and math.isfinite(value):
            fields[name] = repr(float(value))
    return fields


_LEVEL_TEXTS: dict[int, str] = {}
_LEVEL_TEXTS_MAX = 200_000


def _texts(values: Sequence[int]) -> list[str]:
    """`units_text` of each value, remembered: a book's ~2,000 levels in range go out four
    times a second and their prices and sizes mostly repeat; looked up with `map` (C
    speed: a third of a core went here, for depth on 20 symbols, one call a level)."""
    found = list(map(_LEVEL_TEXTS.get, values))
    if None in found:
        if len(_LEVEL_TEXTS) >= _LEVEL_TEXTS_MAX:
            _LEVEL_TEXTS.clear()
        for index, text in enumerate(found):
            if text is None:
                found[index] = _LEVEL_TEXTS[values[index]] = units_text(values[index])
    return found


def book_document(
    bid_prices: Sequence[int],
    bid_quantities: Sequence[int],
    ask_prices: Sequence[int],
    ask_quantities: Sequence[int],
    update_id: int,
    time_ms: int,
) -> dict[str, Any]:
    """`book:<SYMBOL>` from the depth filter's levels (columns in units, each side best
    first): prices and quantities as exact decimal text (JSON numbers would be floats to
    most readers), and each side's summed depth."""
    return {
        "bids": list(zip(_texts(bid_prices), _texts(bid_quantities), strict=True)),
        "asks": list(zip(_texts(ask_prices), _texts(ask_quantities), strict=True)),
        "update_id": int(update_id),
        "time": int(time_ms),
        "bid_depth": units_text(sum(bid_quantities)),
        "ask_depth": units_text(sum(ask_quantities)),
    }


def redis_commands(
    features: list[tuple[str, Features]], books: list[tuple[str, dict]], stream_maxlen: int
) -> list[list]:
    """Commands for one pipeline: each symbol's newest features replace its hash (DEL and
    HSET inside one MULTI/EXEC, so a reader never sees a half-written or missing hash),
    then every second's `features_1s` entry in the order given (a stream reader finds
    the hash already there), then the books: each dict is the document as it is stored
    (`book_document` makes one), the last given per symbol wins."""
    newest: dict[str, Features] = {}
    for symbol, f in features:
        if symbol not in newest or newest[symbol].ts <= f.ts:
            newest[symbol] = f
    commands: list[list[Any]] = []
    if newest:
        commands.append(["MULTI"])
        for symbol, f in newest.items():
            fields = feature_fields(f)
            commands.append(["DEL", features_key(symbol)])
            commands.append(["HSET", features_key(symbol), *(x for item in fields.items() for x in item)])
        commands.append(["EXEC"])
    for symbol, f in features:
        commands.append(xadd_command(FEATURES_STREAM, {"symbol": symbol, **feature_fields(f)}, stream_maxlen))
    for symbol, book in books:
        commands.append(["SET", book_key(symbol), orjson.dumps(book)])
    return commands
