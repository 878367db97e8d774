"""Order flow in and out of PostgreSQL and Redis: the thin I/O beside the pure modules.
Batched: one statement for many bars, one Redis round for many keys."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from itertools import chain
from typing import Any

import asyncpg
from redis.asyncio import Redis

from candle_stores import execute_checked
from candles import DAY_MS, datetime_to_ms, ms_to_datetime
from core_io import xadd_command
from orderflow.fold import BarFlow
from orderflow.output import FinalBar
from orderflow.render import FootprintRenderer
from orderflow.rows import RULE_HOURS, day_row
from shards.keys import symbol_part
from storage import partitions

ORDERFLOW_READY_STREAM = "orderflow_ready"

ORDERFLOW_COLUMNS = (
    "symbol",
    "tf",
    "open_time",
    "buy_units",
    "sell_units",
    "delta_min",
    "delta_max",
    "cvd",
    "cvd_day",
    "agg_trades",
    "trades",
    "buy_trades",
    "sell_trades",
    "vwap",
    "max_trade_qty",
    "row_size",
    "poc",
    "vah",
    "val",
    "first_agg_id",
    "last_agg_id",
    "row_index",
    "bid_units",
    "ask_units",
    "bid_trades",
    "ask_trades",
    "notional",
    "high",
    "low",
    "first_trade_id",
    "last_trade_id",
)
_KEY = ("symbol", "tf", "open_time")
_UPDATED = [c for c in ORDERFLOW_COLUMNS if c not in _KEY]
_FOOTPRINT = ("row_index", "bid_units", "ask_units", "bid_trades", "ask_trades")  # array columns
_TYPES = dict.fromkeys(ORDERFLOW_COLUMNS, "int8") | {
    "symbol": "text",
    "tf": "text",
    "open_time": "timestamptz",
    "cvd": "numeric",
    "cvd_day": "numeric",
    "vwap": "numeric",
    "notional": "numeric",
    "agg_trades": "int4",
    "trades": "int4",
    "buy_trades": "int4",
    "sell_trades": "int4",
    "bid_trades": "int4",
    "ask_trades": "int4",
}
_SENT_AS_TEXT = frozenset(c for c, kind in _TYPES.items() if kind == "numeric")  # exact; cheap to encode


def _upsert_sql() -> str:
    """One statement for a batch: a column array per field, and each footprint column
    flattened over the batch, sliced back per bar by its first and last position."""
    scalars = [c for c in ORDERFLOW_COLUMNS if c not in _FOOTPRINT]
    unnested = [f"${i}::{'text' if c in _SENT_AS_TEXT else _TYPES[c]}[]" for i, c in enumerate(scalars, 1)]
    first = len(scalars) + 1
    unnested += [f"${first}::int4[]", f"${first + 1}::int4[]"]
    flat = {c: f"${first + 2 + i}::{_TYPES[c]}[]" for i, c in enumerate(_FOOTPRINT)}
    selected = [
        f"({flat[c]})[u.lo:u.hi]" if c in flat else f"u.{c}::numeric" if c in _SENT_AS_TEXT else f"u.{c}"
        for c in ORDERFLOW_COLUMNS
    ]
    return (
        f"INSERT INTO orderflow4 ({', '.join(ORDERFLOW_COLUMNS)}) "
        f"SELECT {', '.join(selected)} FROM unnest({', '.join(unnested)}) AS u({', '.join(scalars)}, lo, hi) "
        f"ON CONFLICT (symbol, tf, open_time) DO UPDATE SET "
        + ", ".join(f"{c} = EXCLUDED.{c}" for c in _UPDATED)
        + ", written_at = now() WHERE ("
        + ", ".join(f"orderflow4.{c}" for c in _UPDATED)
        + ") IS DISTINCT FROM ("
        + ", ".join(f"EXCLUDED.{c}" for c in _UPDATED)
        + ")"
    )


_UPSERT_SQL = _upsert_sql()


def upsert_params(records: Sequence[Sequence[Any]]) -> list[list[Any]]:
    """The statement's arguments for `FinalBar.record()`s."""
    columns = dict(zip(ORDERFLOW_COLUMNS, map(list, zip(*records)))) if records else {}
    params = []
    for name in ORDERFLOW_COLUMNS:
        if name in _FOOTPRINT:
            continue
        values = columns.get(name, [])
        params.append([None if v is None else str(v) for v in values] if name in _SENT_AS_TEXT else values)
    lows, highs, position = [], [], 1
    for index in columns.get("row_index", []):
        lows.append(position)
        position += len(index)
        highs.append(position - 1)
    params += [lows, highs]
    params += [list(chain.from_iterable(columns.get(name, []))) for name in _FOOTPRINT]
    return params


def orderflow_key(symbol: str, tf: str) -> str:
    return f"orderflow:{symbol_part(symbol)}:{tf}"


def footprint_key(symbol: str, tf: str, forming: bool = False) -> str:
    return f"footprint:{symbol_part(symbol)}:{tf}{':forming' if forming else ''}"


async def upsert_bars(pool: asyncpg.Pool, bars: Sequence[FinalBar]) -> None:
    """Idempotent: writing a bar again with the same values changes nothing. One
    statement (a pipelined executemany of 500 bars took 110-700 ms, its rows executed
    one by one, on a loop busy with trades)."""
    if bars:
        params = upsert_params([bar.record() for bar in bars])
        times = {"orderflow4": [bar.bar.open_time for bar in bars]}
        await partitions.write_through(pool, times, lambda: pool.execute(_UPSERT_SQL, *params))


def publish_commands(
    bars: Sequence[FinalBar], maxlen: int, renderer: FootprintRenderer | None = None
) -> list[list[Any]]:
    """Each bar's hash and footprint, then its `orderflow_ready` entry, for one round
    (Redis runs them in order: a reader of the announcement finds the bar). Only the
    newest bar of a series is kept in the hash; an older one (a rebuild) is announced
    but leaves a newer hash alone. Built apart from sending, so that the documents can
    be made while PostgreSQL writes the bars; `renderer` holds the rows the forming
    footprints made already."""
    renderer = renderer or FootprintRenderer()
    newest: dict[tuple[str, str], FinalBar] = {}
    for bar in bars:
        key = (bar.symbol, bar.tf)
        if key not in newest or newest[key].bar.open_time < bar.bar.open_time:
            newest[key] = bar
    commands: list[list[Any]] = []
    for (symbol, tf), bar in newest.items():
        commands.append(
            [
                "EVAL",
                _NEWER_ONLY_LUA,
                2,
                orderflow_key(symbol, tf),
                footprint_key(symbol, tf),
                bar.bar.open_time,
                renderer.document((symbol, tf), bar.bar, bar.profile),
                *chain.from_iterable(bar.fields().items()),
            ]
        )
    for bar in bars:
        event = {"symbol": bar.symbol, "tf": bar.tf, "open_time": str(bar.bar.open_time)}
        commands.append(xadd_command(ORDERFLOW_READY_STREAM, event, maxlen))
    return commands


# The hash and footprint take a bar only if it is not older than the one they hold.
_NEWER_ONLY_LUA = """
local held = redis.call('HGET', KEYS[1], 'open_time')
if held and tonumber(held) > tonumber(ARGV[1]) then return 0 end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('SET', KEYS[2], ARGV[2])
return 1
"""


async def set_forming(redis: Redis, documents: Mapping[tuple[str, str], bytes]) -> None:
    """The forming bars' footprints (`footprint:<SYMBOL>:<tf>:forming`), in one round."""
    if documents:
        commands = [["SET", footprint_key(symbol, tf, forming=True), doc] for (symbol, tf), doc in documents.items()]
        await execute_checked(redis, commands)


async def read_bars(pool: asyncpg.Pool, symbol: str, tf: str, start: Any, end: Any) -> list[asyncpg.Record]:
    """Rows of `orderflow_v4` for one series, oldest first (start inclusive, end exclusive)."""
    return await pool.fetch(
        "SELECT * FROM orderflow_v4 WHERE symbol = $1 AND tf = $2 AND open_time >= $3 AND open_time < $4 "
        "ORDER BY open_time",
        symbol,
        tf,
        start,
        end,
    )


# --------------------------------------------------------------------------- resuming


def bar_of_record(record: Mapping[str, Any]) -> BarFlow:
    """A stored bar as the fold left it (what merging it into M5/M15 needs)."""
    bar = BarFlow(datetime_to_ms(record["open_time"]), record["row_size"])
    bar.buy, bar.sell = record["buy_units"], record["sell_units"]
    if record["agg_trades"]:
        bar.delta_min, bar.delta_max = record["delta_min"], record["delta_max"]
    bar.agg_trades, bar.trades = record["agg_trades"], record["trades"]
    bar.buy_trades, bar.sell_trades = record["buy_trades"], record["sell_trades"]
    bar.notional, bar.max_qty = int(record["notional"] or 0), record["max_trade_qty"]
    bar.high, bar.low = record["high"], record["low"]
    bar.first_agg_id, bar.last_agg_id = record["first_agg_id"], record["last_agg_id"]
    bar.first_trade_id, bar.last_trade_id = record["first_trade_id"], record["last_trade_id"]
    bar.rows = {
        index: [bid, ask, bid_n, ask_n]
        for index, bid, ask, bid_n, ask_n in zip(
            record["row_index"], record["bid_units"], record["ask_units"], record["bid_trades"], record["ask_trades"]
        )
    }
    return bar


async def newest_bars(
    pool: asyncpg.Pool, symbols: Sequence[str], timeframes: Sequence[str]
) -> dict[tuple[str, str], asyncpg.Record]:
    """Each series' newest stored bar (symbol, tf) -> its row, one index probe each."""
    rows = await pool.fetch(
        "SELECT o.* FROM unnest($1::text[]) AS s(symbol) CROSS JOIN unnest($2::text[]) AS t(tf) "
        "CROSS JOIN LATERAL (SELECT * FROM orderflow4 f WHERE f.symbol = s.symbol AND f.tf = t.tf "
        "ORDER BY f.open_time DESC LIMIT 1) o",
        list(symbols),
        list(timeframes),
    )
    return {(r["symbol"], r["tf"]): r for r in rows}


async def bars_between(
    pool: asyncpg.Pool, ranges: Sequence[tuple[str, int, int]], timeframes: Sequence[str]
) -> dict[str, dict[tuple[str, int], BarFlow]]:
    """Stored bars of these timeframes per symbol opened in [first, last], one query:
    symbol -> (tf, open time) -> bar."""
    rows = await pool.fetch(
        "SELECT f.* FROM unnest($1::text[], $2::timestamptz[], $3::timestamptz[]) AS r(symbol, first, last) "
        "JOIN orderflow4 f ON f.symbol = r.symbol AND f.tf = ANY($4::text[]) "
        "AND f.open_time BETWEEN r.first AND r.last",
        [r[0] for r in ranges],
        [ms_to_datetime(r[1]) for r in ranges],
        [ms_to_datetime(r[2]) for r in ranges],
        list(timeframes),
    )
    out: dict[str, dict[tuple[str, int], BarFlow]] = {}
    for record in rows:
        bar = bar_of_record(record)
        out.setdefault(record["symbol"], {})[(record["tf"], bar.open_time)] = bar
    return out


# --------------------------------------------------------------------------- row sizes


async def day_ranges(pool: asyncpg.Pool, symbols: Sequence[str], first: int, end: int) -> dict[str, tuple[Any, ...]]:
    """Per symbol over M1 candles in [first, end): (Σ true range in units, bars, the
    largest number of decimals of a close). The first bar's true range is high − low."""
    rows = await pool.fetch(
        "SELECT symbol, sum(greatest(high, prev) - least(low, prev)) * 100000000 AS total, count(*) AS bars, "
        "max(scale(close)) AS decimals FROM ("
        "  SELECT symbol, high, low, close, lag(close) OVER (PARTITION BY symbol ORDER BY open_time) AS prev "
        "  FROM ohlcv4_m1 WHERE symbol = ANY($1::text[]) AND open_time >= $2 AND open_time < $3) m "
        "GROUP BY symbol",
        list(symbols),
        ms_to_datetime(first),
        ms_to_datetime(end),
    )
    return {r["symbol"]: (int(r["total"]), r["bars"], r["decimals"]) for r in rows}


async def row_sizes(pool: asyncpg.Pool, day: int, symbols: Sequence[str]) -> dict[str, int]:
    rows = await pool.fetch(
        "SELECT symbol, m1_row FROM orderflow_rows4 WHERE day = $1 AND symbol = ANY($2::text[])",
        ms_to_datetime(day).date(),
        list(symbols),
    )
    return {r["symbol"]: r["m1_row"] for r in rows}


async def decide_row_sizes(pool: asyncpg.Pool, day: int, decided: Mapping[str, tuple[int, str]]) -> dict[str, int]:
    """Store these sizes for the day unless one is stored already (the first decision
    wins); returns what is stored."""
    if decided:
        await pool.execute(
            "INSERT INTO orderflow_rows4 (symbol, day, m1_row, rule) "
            "SELECT symbol, $1, m1_row, rule "
            "FROM unnest($2::text[], $3::bigint[], $4::text[]) AS d(symbol, m1_row, rule) "
            "ON CONFLICT (symbol, day) DO NOTHING",
            ms_to_datetime(day).date(),
            list(decided),
            [v[0] for v in decided.values()],
            [v[1] for v in decided.values()],
        )
    return await row_sizes(pool, day, list(decided))


async def plan_day_rows(
    pool: asyncpg.Pool, day: int, symbols: Sequence[str], tick_of: Callable[[str], int | None]
) -> dict[str, int]:
    """The M1 rows of `day`: stored, else decided by the rule from the first RULE_HOURS of
    the day before and stored (the first decision wins). A symbol with no such day is left
    out: its day's first price decides (rows.first_price_row)."""
    stored = await row_sizes(pool, day, symbols)
    missing = [s for s in symbols if s not in stored]
    if missing:
        ranges = await day_ranges(pool, missing, day - DAY_MS, day - DAY_MS + RULE_HOURS * 3_600_000)
        decided = {
            symbol: rule
            for symbol in missing
            if (rule := day_row(*ranges.get(symbol, (0, 0, None)), tick_of(symbol))) is not None
        }
        stored |= await decide_row_sizes(pool, day, decided)
    return stored


async def fixed_rows(pool: asyncpg.Pool, symbols: Sequence[str]) -> dict[str, int]:
    """Tickers with a fixed footprint row (units)."""
    rows = await pool.fetch(
        "SELECT symbol, (footprint_row * 100000000)::bigint AS units FROM tickers "
        "WHERE footprint_row IS NOT NULL AND symbol = ANY($1::text[])",
        list(symbols),
    )
    return {r["symbol"]: r["units"] for r in rows if r["units"] > 0}


async def trade_symbols(pool: asyncpg.Pool) -> set[str]:
    """Enabled tickers whose trades are followed."""
    rows = await pool.fetch("SELECT symbol FROM tickers WHERE status = 'enabled' AND trades")
    return {r["symbol"] for r in rows}


# --------------------------------------------------------------------------- trade gaps


async def log_gaps(pool: asyncpg.Pool, gaps: Sequence[tuple[str, int, str]]) -> None:
    """Minutes being refetched (symbol, minute, reason); one already logged (or settled
    while this was on its way) keeps its row."""
    if gaps:
        await pool.execute(
            "INSERT INTO trade_gaps_v4 (symbol, open_time, status, reason) "
            "SELECT symbol, open_time, 'open', reason FROM unnest($1::text[], $2::timestamptz[], $3::text[]) "
            "AS g(symbol, open_time, reason) "
            "ON CONFLICT (symbol, open_time) DO NOTHING",
            [g[0] for g in gaps],
            [ms_to_datetime(g[1]) for g in gaps],
            [g[2][:500] for g in gaps],
        )


async def resolve_gaps(pool: asyncpg.Pool, gaps: Sequence[tuple[str, int]], status: str, reason: str = "") -> None:
    """Filled, or unfillable (with why); counted as an attempt either way."""
    if gaps:
        await pool.execute(
            "INSERT INTO trade_gaps_v4 (symbol, open_time, status, reason, attempts, resolved_at) "
            "SELECT symbol, open_time, $3, $4, 1, now() "
            "FROM unnest($1::text[], $2::timestamptz[]) AS g(symbol, open_time) "
            "ON CONFLICT (symbol, open_time) DO UPDATE SET status = $3, "
            "reason = CASE WHEN $4 = '' THEN trade_gaps_v4.reason ELSE $4 END, "
            "attempts = trade_gaps_v4.attempts + 1, resolved_at = now()",
            [g[0] for g in gaps],
            [ms_to_datetime(g[1]) for g in gaps],
            status,
            reason[:500],
        )


async def open_gaps(pool: asyncpg.Pool, symbols: Sequence[str]) -> list[tuple[str, int]]:
    rows = await pool.fetch(
        "SELECT symbol, open_time FROM trade_gaps_v4 WHERE status = 'open' AND symbol = ANY($1::text[]) "
        "ORDER BY open_time",
        list(symbols),
    )
    return [(r["symbol"], datetime_to_ms(r["open_time"])) for r in rows]
