"""Every read and write of candles, indicator values, prices and stream events.

Thin named operations over Redis and PostgreSQL, batched: one pipeline or one SQL
statement per batch, never a round trip per row. No business logic lives here.
"""

from __future__ import annotations

import functools
import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any

import asyncpg
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ResponseError

from candle_stores import (  # noqa: F401 (the candle cache is part of this module's interface)
    CandleStore,
    Columns,
    SeriesKey,
    TimeSeriesCandleStore,
    candle_columns,
    candle_event,
    candle_series_key,
    candle_zset_key,
    execute_checked,
    execute_packed,
    make_candle_store,
    write_bars,
    write_candles,
)
from candles import (
    ALL_TIMEFRAMES,
    TF_MS,
    TIMEFRAMES,
    Bar,
    Candle,
    datetime_to_ms,
    key_arrays,
    ms_to_datetime,
    range_arrays,
)
from gap_log import (  # noqa: F401 (the gap log is part of this module's interface)
    close_missing_m1,
    fetch_missing_m1,
    fetch_unfillable_m1,
    log_missing_m1,
    set_missing_status,
)
from shards.cluster import read_streams_apart
from shards.keys import symbol_part
from storage import partitions
from storage.retention import drop_expired

log = logging.getLogger("CORE_IO")

# --------------------------------------------------------------------------- names


def candle_stream(tf: str) -> str:
    """Where candles of `tf` are announced (any timeframe: a row is never unannounceable)."""
    return f"ohlcv_{tf}_ready"


# The streams of the timeframes this deployment builds: those its readers consume.
CANDLE_STREAMS: dict[str, str] = {tf: candle_stream(tf) for tf in TIMEFRAMES}
CANDLE_STREAM_TF: dict[str, str] = {stream: tf for tf, stream in CANDLE_STREAMS.items()}
INDICATORS_READY_STREAM = "indicators_ready_stream"
SIGNALS_STREAM = "signals_stream"

# The consumer groups the daemon reads with; restore creates the streams and these up
# front. The indicator worker makes its own group on the candle streams when it starts
# (`indicator_workers`, or one per process when several share the deployment:
# indicators/groups.py).
INDICATOR_GROUP = "indicator_workers"
SIGNAL_GROUP = "signal_processor"
CONSUMER_GROUPS: dict[str, tuple[str, ...]] = {
    **{stream: () for stream in CANDLE_STREAMS.values()},
    INDICATORS_READY_STREAM: (),
    SIGNALS_STREAM: (SIGNAL_GROUP,),
}


def price_key(symbol: str) -> str:
    return f"price:{symbol_part(symbol)}"


def indicator_key(symbol: str, tf: str) -> str:
    return f"indicator:{symbol_part(symbol)}:{tf}"


def candle_table(tf: str) -> str:
    if tf not in TF_MS:
        raise ValueError(f"unknown timeframe {tf!r}")
    return f"ohlcv4_{tf}"


# --------------------------------------------------------------------------- candles in PostgreSQL

CANDLE_COLUMNS = (
    "open",
    "high",
    "low",
    "close",
    "volume",
    "quote_volume",
    "trades",
    "taker_buy_volume",
    "taker_buy_quote_volume",
)


_NUMERIC_COLUMNS = frozenset(CANDLE_COLUMNS) - {"trades"}


def _upsert_part_sql(tf: str, first_param: int) -> str:
    """One timeframe's INSERT of the upsert (a CTE of `_upsert_candles_sql`). Decimals go
    as text and times as epoch ms: asyncpg encodes a numeric in ~3 µs, text in a fraction
    of that (9 ms saved on 500 candles), and PostgreSQL casts exactly."""
    table = candle_table(tf)
    columns = list(CANDLE_COLUMNS) + (["m1_count"] if tf != "m1" else [])
    kinds = ["text" if c in _NUMERIC_COLUMNS else "smallint" if c == "m1_count" else "integer" for c in columns]
    params = [f"${first_param}::text[]", f"${first_param + 1}::int8[]"]
    params += [f"${first_param + 2 + i}::{kind}[]" for i, kind in enumerate(kinds)]
    selected = ", ".join(f"u.{c}::numeric" if c in _NUMERIC_COLUMNS else f"u.{c}" for c in columns)
    return (
        f"INSERT INTO {table} (symbol, open_time, {', '.join(columns)}) "
        f"SELECT u.symbol, 'epoch'::timestamptz + u.t * interval '1 millisecond', {selected} "
        f"FROM unnest({', '.join(params)}) AS u(symbol, t, {', '.join(columns)}) "
        f"{update_if_changed_sql(table, columns)} "
        f"RETURNING symbol, (extract(epoch FROM open_time) * 1000)::int8 AS t"
    )


def update_if_changed_sql(table: str, columns: Sequence[str]) -> str:
    """A candle upsert's conflict clause: a row is rewritten only where it differs, so an
    identical repeat changes (and returns) nothing."""
    updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in columns)
    changed = " OR ".join(f"{table}.{c} IS DISTINCT FROM EXCLUDED.{c}" for c in columns)
    return f"ON CONFLICT (symbol, open_time) DO UPDATE SET {updates} WHERE {changed}"


@functools.cache
def _upsert_candles_sql(tfs: tuple[str, ...]) -> str:
    """The timeframes present, in one statement (one round trip): a data-modifying CTE
    each, their changed rows together."""
    parts, first = [], 1
    for tf in tfs:
        parts.append(f"{tf} AS ({_upsert_part_sql(tf, first)})")
        first += 11 + (tf != "m1")
    selects = " UNION ALL ".join(f"SELECT '{tf}' AS tf, symbol, t FROM {tf}" for tf in tfs)
    return f"WITH {', '.join(parts)} {selects}"


async def upsert_candles(
    pool: asyncpg.Pool | asyncpg.Connection, candles: Sequence[Candle]
) -> list[tuple[str, str, int]]:
    """Upsert candles of any timeframes in one statement.

    Returns (symbol, tf, open_time) of the rows inserted or changed; an identical
    repeat changes nothing. Within a batch the last candle for a key wins.
    """
    by_tf: dict[str, dict[tuple[str, int], Candle]] = defaultdict(dict)
    for candle in candles:
        by_tf[candle.tf][(candle.symbol, candle.open_time)] = candle
    if not by_tf:
        return []
    tfs = tuple(tf for tf in ALL_TIMEFRAMES if tf in by_tf)
    params: list[list[Any]] = []
    for tf in tfs:
        rows = list(by_tf[tf].values())
        params += [
            [c.symbol for c in rows],
            [c.open_time for c in rows],
            [str(c.open) for c in rows],
            [str(c.high) for c in rows],
            [str(c.low) for c in rows],
            [str(c.close) for c in rows],
            [str(c.volume) for c in rows],
            [str(c.quote_volume) for c in rows],
            [c.trades for c in rows],
            [str(c.taker_buy_volume) for c in rows],
            [str(c.taker_buy_quote_volume) for c in rows],
        ]
        if tf != "m1":
            params.append([c.m1_count for c in rows])
    return [(r["symbol"], r["tf"], r["t"]) for r in await pool.fetch(_upsert_candles_sql(tfs), *params)]


def _candle_from_record(record: asyncpg.Record, tf: str) -> Candle:
    return Candle(
        symbol=record["symbol"],
        tf=tf,
        open_time=datetime_to_ms(record["open_time"]),
        open=record["open"],
        high=record["high"],
        low=record["low"],
        close=record["close"],
        volume=record["volume"],
        quote_volume=record["quote_volume"],
        trades=record["trades"],
        taker_buy_volume=record["taker_buy_volume"],
        taker_buy_quote_volume=record["taker_buy_quote_volume"],
        m1_count=record["m1_count"] if tf != "m1" else None,
    )


async def fetch_candles(pool: asyncpg.Pool, symbol: str, tf: str, start_ms: int, end_ms: int) -> list[Candle]:
    """Exact candles with start <= open_time < end, oldest first."""
    extra = ", m1_count" if tf != "m1" else ""
    rows = await pool.fetch(
        f"SELECT symbol, open_time, {', '.join(CANDLE_COLUMNS)}{extra} FROM {candle_table(tf)} "
        "WHERE symbol = $1 AND open_time >= $2 AND open_time < $3 ORDER BY open_time",
        symbol,
        ms_to_datetime(start_ms),
        ms_to_datetime(end_ms),
    )
    return [_candle_from_record(r, tf) for r in rows]


def _series_arrays_sql(tf: str, cast: str) -> str:
    """Per (symbol, newest open time, count): one row of arrays, oldest first."""
    prices = ", ".join(
        f"array_agg(c.{column}::{cast} ORDER BY c.open_time) AS {alias}"
        for column, alias in (("open", "o"), ("high", "h"), ("low", "l"), ("close", "c"), ("volume", "v"))
    )
    return (
        "SELECT s.symbol, array_agg((extract(epoch FROM c.open_time) * 1000)::bigint ORDER BY c.open_time) AS t, "
        f"{prices} FROM unnest($1::text[], $2::timestamptz[], $3::integer[]) AS s(symbol, upto, n) "
        f"CROSS JOIN LATERAL (SELECT * FROM {candle_table(tf)} x WHERE x.symbol = s.symbol AND x.open_time <= s.upto "
        "ORDER BY x.open_time DESC LIMIT s.n) c GROUP BY s.symbol"
    )


_LAST_COLUMNS_SQL = {tf: _series_arrays_sql(tf, "text") for tf in ALL_TIMEFRAMES}
_HISTORY_SQL = {tf: _series_arrays_sql(tf, "float8") for tf in ALL_TIMEFRAMES}
FAR_FUTURE_MS = 32_503_680_000_000  # year 3000: "no upper bound"


async def fetch_last_columns_pg(
    pool: asyncpg.Pool, symbols: Sequence[str], tf: str, count: int
) -> dict[SeriesKey, Columns]:
    """The newest `count` candles per symbol, oldest first, as exact decimal text.

    One row of arrays per symbol: decoding 1,500 such rows is several times faster
    than 375,000 rows of scalars.
    """
    rows = await pool.fetch(
        _LAST_COLUMNS_SQL[tf], list(symbols), [ms_to_datetime(FAR_FUTURE_MS)] * len(symbols), [count] * len(symbols)
    )
    return {(r["symbol"], tf): Columns(r["t"], r["o"], r["h"], r["l"], r["c"], r["v"]) for r in rows}


async def fetch_last_bars_pg(
    pool: asyncpg.Pool, symbols: Sequence[str], tf: str, count: int
) -> dict[SeriesKey, list[Bar]]:
    out: dict[SeriesKey, list[Bar]] = {(s, tf): [] for s in symbols}
    for key, c in (await fetch_last_columns_pg(pool, symbols, tf, count)).items():
        out[key] = [Bar(t, float(o), float(h), float(lo), float(cl), float(v)) for t, o, h, lo, cl, v in zip(*c)]
    return out


async def read_last_bars(
    store: CandleStore, pool: asyncpg.Pool, keys: Sequence[SeriesKey], count: int
) -> dict[SeriesKey, list[Bar]]:
    """Redis first; the series Redis cannot fill come from PostgreSQL."""
    bars = await store.read_last_many(keys, count)
    short = [key for key in keys if len(bars.get(key, ())) < count]
    by_tf: dict[str, list[str]] = defaultdict(list)
    for symbol, tf in short:
        by_tf[tf].append(symbol)
    for tf, symbols in by_tf.items():
        from_pg = await fetch_last_bars_pg(pool, symbols, tf, count)
        for key, pg_bars in from_pg.items():
            if len(pg_bars) > len(bars.get(key, ())):
                bars[key] = pg_bars
    return bars


# --------------------------------------------------------------------------- tickers


async def enabled_symbols(pool: asyncpg.Pool) -> list[str]:
    return [
        r["symbol"] for r in await pool.fetch("SELECT symbol FROM tickers WHERE status = 'enabled' ORDER BY symbol")
    ]


async def enable_symbols(pool: asyncpg.Pool | asyncpg.Connection, symbols: Sequence[str], source=None) -> None:
    """Insert or re-enable these tickers; `source` marks the rows it inserts or re-enables."""
    await pool.execute(
        "INSERT INTO tickers (symbol, status, source) SELECT unnest($1::text[]), 'enabled', $2 "
        "ON CONFLICT (symbol) DO UPDATE SET status = 'enabled', source = $2, updated_at = now() "
        "WHERE tickers.status <> 'enabled'",
        list(symbols),
        source,
    )


async def apply_symbols_setting(pool: asyncpg.Pool, symbols: Sequence[str]) -> list[str]:
    """SYMBOLS at boot: these are enabled (as SYMBOLS' own where it inserts or re-enables
    them), and rows SYMBOLS enabled before but no longer lists are disabled (returned).
    Rows enabled any other way (SQL, the CLI) are left alone."""
    async with pool.acquire() as conn, conn.transaction():
        await enable_symbols(conn, symbols, "SYMBOLS")
        rows = await conn.fetch(
            "UPDATE tickers SET status = 'disabled', updated_at = now() "
            "WHERE source = 'SYMBOLS' AND status = 'enabled' AND symbol <> ALL($1::text[]) RETURNING symbol",
            list(symbols),
        )
    return sorted(r["symbol"] for r in rows)


async def set_ticker_problems(pool: asyncpg.Pool, problems: Mapping[str, str]) -> None:
    """Why each enabled ticker is not followed (`tickers.problem`); others cleared."""
    await set_reasons(pool, "tickers", "symbol", "text", "problem", problems)


async def set_reasons(pool: asyncpg.Pool, table: str, key: str, key_type: str, column: str, reasons: Mapping) -> None:
    """`column` (and `column`_at) of the rows in `reasons` set to their reason, every
    other row's cleared; a row is only written when its reason changes. The names are
    its callers' constants, never input."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            f"UPDATE {table} t SET {column} = r.reason, {column}_at = now() "
            f"FROM unnest($1::{key_type}[], $2::text[]) AS r(key, reason) "
            f"WHERE t.{key} = r.key AND t.{column} IS DISTINCT FROM r.reason",
            list(reasons),
            list(reasons.values()),
        )
        await conn.execute(
            f"UPDATE {table} SET {column} = NULL, {column}_at = now() "
            f"WHERE {column} IS NOT NULL AND {key} <> ALL($1::{key_type}[])",
            list(reasons),
        )


# --------------------------------------------------------------------------- indicator values


@dataclass(frozen=True, slots=True)
class IndicatorValue:
    instance_id: int
    symbol: str
    tf: str
    open_time: int
    name: str
    value: float | None


async def upsert_indicator_values(pool: asyncpg.Pool, values: Sequence[IndicatorValue]) -> int:
    """One statement for the whole batch; the last value for a key wins."""
    unique = {(v.instance_id, v.symbol, v.open_time, v.name): v.value for v in values}
    if unique:
        ids, symbols, times, names = (list(column) for column in zip(*unique))
        await upsert_indicator_rows(pool, ids, symbols, times, names, list(unique.values()))
    return len(unique)


# One backward index scan per (instance, symbol), the newest bar's rows WITH TIES. Joining
# the newest time back instead let the planner fetch every symbol's rows of that time and
# filter them (127 ms against 6 ms for 100 symbols).
_LATEST_INDICATORS_SQL = """
    SELECT i.id AS instance_id, s.symbol, v.open_time, v.param_name, v.value
    FROM indicator_instances_v4 i
    CROSS JOIN unnest($1::text[]) AS s(symbol)
    CROSS JOIN LATERAL (
        SELECT x.open_time, x.param_name, x.value FROM indicator_values_v4 x
        WHERE x.instance_id = i.id AND x.symbol = s.symbol
        ORDER BY x.open_time DESC FETCH FIRST 1 ROWS WITH TIES) v
    WHERE i.enabled AND i.timeframe = $2
"""


async def fetch_latest_indicator_values(pool: asyncpg.Pool, symbols: Sequence[str], tf: str) -> list[IndicatorValue]:
    """The newest stored values of every enabled instance on `tf`, per symbol."""
    rows = await pool.fetch(_LATEST_INDICATORS_SQL, list(symbols), tf)
    return [
        IndicatorValue(r["instance_id"], r["symbol"], tf, datetime_to_ms(r["open_time"]), r["param_name"], r["value"])
        for r in rows
    ]


async def fetch_history(
    pool: asyncpg.Pool, tf: str, requests: Sequence[tuple[str, int | None, int]]
) -> dict[str, tuple[list, ...]]:
    """Per (symbol, newest open time or None for the newest stored, bar count): that
    many stored bars, oldest first, as (t, o, h, l, c, v) lists of ms and float8.

    PostgreSQL's numeric→float8 is correctly rounded, as Python's float(str) is, so these
    floats equal the ones parsed from the stream events.
    """
    if not requests:
        return {}
    rows = await pool.fetch(
        _HISTORY_SQL[tf],
        [r[0] for r in requests],
        [ms_to_datetime(FAR_FUTURE_MS if r[1] is None else r[1]) for r in requests],
        [r[2] for r in requests],
    )
    return {r["symbol"]: (r["t"], r["o"], r["h"], r["l"], r["c"], r["v"]) for r in rows}


async def persisted_spans(
    pool: asyncpg.Pool, instance_ids: Sequence[int], symbols: Sequence[str]
) -> dict[tuple[int, str], tuple[int, int]]:
    """Oldest and newest bar with a stored value, per (instance, symbol)."""
    if not instance_ids or not symbols:
        return {}
    pairs = [(i, s) for i in instance_ids for s in symbols]
    rows = await pool.fetch(
        "SELECT p.i, p.s, v.first, v.last FROM unnest($1::integer[], $2::text[]) AS p(i, s) "
        "CROSS JOIN LATERAL (SELECT min(open_time) AS first, max(open_time) AS last FROM indicator_values_v4 "
        "WHERE instance_id = p.i AND symbol = p.s) v",
        [p[0] for p in pairs],
        [p[1] for p in pairs],
    )
    return {
        (r["i"], r["s"]): (datetime_to_ms(r["first"]), datetime_to_ms(r["last"])) for r in rows if r["last"] is not None
    }


VALUE_HOLE_BARS = 256  # how far back from its newest value a series is searched for bars without values


async def first_value_holes(
    pool: asyncpg.Pool, tf: str, instance_ids: Sequence[int], spans: Mapping[str, tuple[int, int]]
) -> dict[str, int]:
    """Per symbol, the oldest stored bar inside (first, last) without a value of any of
    these instances (within VALUE_HOLE_BARS of `last`; one index probe a bar)."""
    if not spans or not instance_ids:
        return {}
    symbols = list(spans)
    lows = [max(spans[s][0], spans[s][1] - VALUE_HOLE_BARS * TF_MS[tf]) for s in symbols]
    rows = await pool.fetch(
        f"SELECT s.symbol, (SELECT min(c.open_time) FROM {candle_table(tf)} c "
        "WHERE c.symbol = s.symbol AND c.open_time > s.lo AND c.open_time < s.hi AND NOT EXISTS ("
        "SELECT 1 FROM indicator_values_v4 v WHERE v.instance_id = ANY($4::integer[]) "
        "AND v.symbol = c.symbol AND v.open_time = c.open_time)) AS hole "
        "FROM unnest($1::text[], $2::timestamptz[], $3::timestamptz[]) AS s(symbol, lo, hi)",
        symbols,
        [ms_to_datetime(low) for low in lows],
        [ms_to_datetime(spans[s][1]) for s in symbols],
        list(instance_ids),
    )
    return {r["symbol"]: datetime_to_ms(r["hole"]) for r in rows if r["hole"] is not None}


async def fetch_values_at(
    pool: asyncpg.Pool, keys: Sequence[tuple[int, str, int, str]]
) -> dict[tuple[int, str, int, str], float]:
    """Stored values for (instance, symbol, open time ms, output name) keys."""
    if not keys:
        return {}
    rows = await pool.fetch(
        "SELECT k.i, k.s, k.t, k.n, v.value FROM unnest($1::integer[], $2::text[], $3::int8[], $4::text[]) "
        "AS k(i, s, t, n) JOIN indicator_values_v4 v ON v.instance_id = k.i AND v.symbol = k.s "
        "AND v.open_time = 'epoch'::timestamptz + k.t * interval '1 millisecond' AND v.param_name = k.n "
        "WHERE v.value IS NOT NULL",
        [k[0] for k in keys],
        [k[1] for k in keys],
        [k[2] for k in keys],
        [k[3] for k in keys],
    )
    return {(r["i"], r["s"], r["t"], r["n"]): r["value"] for r in rows}


_OBV_SQL = {
    tf: (
        "SELECT s.symbol, (SELECT sum(d ORDER BY open_time) FROM ("
        "SELECT open_time, CASE WHEN lag(close) OVER w IS NULL THEN volume::float8 "
        "WHEN close > lag(close) OVER w THEN volume::float8 WHEN close < lag(close) OVER w THEN -volume::float8 "
        f"ELSE 0::float8 END AS d FROM {candle_table(tf)} WHERE symbol = s.symbol AND open_time <= s.at "
        "WINDOW w AS (ORDER BY open_time)) x) AS obv "
        "FROM unnest($1::text[], $2::timestamptz[]) AS s(symbol, at)"
    )
    for tf in ALL_TIMEFRAMES
}


async def obv_over_history(pool: asyncpg.Pool, tf: str, points: Sequence[tuple[str, int]]) -> dict[str, float]:
    """On-balance volume at (symbol, open time) over the whole stored series, summed in
    float8 in bar order as TA-Lib's OBV sums it. A full scan of the series: only for a
    running sum that has no stored value to continue from."""
    if not points:
        return {}
    rows = await pool.fetch(_OBV_SQL[tf], [p[0] for p in points], [ms_to_datetime(p[1]) for p in points])
    return {r["symbol"]: r["obv"] for r in rows if r["obv"] is not None}


_UPSERT_INDICATOR_ROWS_SQL = """
    INSERT INTO indicator_values_v4 (instance_id, symbol, open_time, param_name, value)
    SELECT i, s, 'epoch'::timestamptz + t * interval '1 millisecond', n, v
    FROM unnest($1::integer[], $2::text[], $3::int8[], $4::text[], $5::float8[]) AS r(i, s, t, n, v)
    ON CONFLICT (instance_id, symbol, open_time, param_name)
    DO UPDATE SET value = EXCLUDED.value WHERE indicator_values_v4.value IS DISTINCT FROM EXCLUDED.value
"""


async def upsert_indicator_rows(
    pool: asyncpg.Pool, ids: list[int], symbols: list[str], times_ms: list[int], names: list[str], values: list
) -> None:
    """Columns of unique keys (the caller dedupes); times as ms, converted in SQL."""
    if ids:
        await partitions.write_through(
            pool,
            {"indicator_values_v4": times_ms},
            lambda: pool.execute(_UPSERT_INDICATOR_ROWS_SQL, ids, symbols, times_ms, names, values),
        )


# The bars of one layout (the same instance ids and output names for every bar) as a
# matrix: one row of arrays per statement instead of a row per value, so the client
# encodes a few arrays and PostgreSQL (another core) does the expanding. Warm-up NaNs
# and infinities are not stored (abs(NaN) < Infinity is false in PostgreSQL).
_UPSERT_INDICATOR_MATRIX_SQL = """
    INSERT INTO indicator_values_v4 (instance_id, symbol, open_time, param_name, value)
    SELECT o.id, b.symbol, 'epoch'::timestamptz + b.t * interval '1 millisecond', o.name, v.value
    FROM unnest($1::text[], $2::int8[]) WITH ORDINALITY AS b(symbol, t, i)
    CROSS JOIN unnest($3::integer[], $4::text[]) WITH ORDINALITY AS o(id, name, j)
    CROSS JOIN LATERAL (SELECT ($5::float8[])[(b.i - 1) * cardinality($3::integer[]) + o.j] AS value) v
    WHERE abs(v.value) < 'Infinity'::float8
    ON CONFLICT (instance_id, symbol, open_time, param_name)
    DO UPDATE SET value = EXCLUDED.value WHERE indicator_values_v4.value IS DISTINCT FROM EXCLUDED.value
"""


async def upsert_indicator_matrix(
    pool: asyncpg.Pool,
    ids: Sequence[int],
    names: Sequence[str],
    symbols: list[str],
    times_ms: list[int],
    values: list[float],
) -> int:
    """Bar b's output k is values[b * len(ids) + k]; one statement; returns rows written."""
    if not symbols:
        return 0
    status = await partitions.write_through(
        pool,
        {"indicator_values_v4": times_ms},
        lambda: pool.execute(_UPSERT_INDICATOR_MATRIX_SQL, symbols, times_ms, list(ids), list(names), values),
    )
    return int(status.split()[-1])


async def newest_m1_time(pool: asyncpg.Pool) -> int | None:
    """The newest stored M1 open time: the exchange's clock as far as storage knows."""
    newest = await pool.fetchval("SELECT max(open_time) FROM ohlcv4_m1")
    return None if newest is None else datetime_to_ms(newest)


async def delete_indicator_rows(
    pool: asyncpg.Pool, ids: list[int], symbols: list[str], times_ms: list[int], names: list[str]
) -> None:
    """Remove outputs a recomputation found to have no value any more."""
    await pool.execute(
        "DELETE FROM indicator_values_v4 v USING unnest($1::integer[], $2::text[], $3::int8[], $4::text[]) "
        "AS k(i, s, t, n) WHERE v.instance_id = k.i AND v.symbol = k.s AND v.param_name = k.n "
        "AND v.open_time = 'epoch'::timestamptz + k.t * interval '1 millisecond'",
        ids,
        symbols,
        times_ms,
        names,
    )


async def prune_indicator_values(pool: asyncpg.Pool, retention_ms: int) -> list[str]:
    """The pieces of indicator values wholly older than the retention, counted back from
    the newest stored M1 (the exchange's clock), dropped; their names. No row DELETE."""
    newest = await newest_m1_time(pool)
    return [] if newest is None else await drop_expired(pool, ["indicator_values_v4"], retention_ms, newest)


# --------------------------------------------------------------------------- mark prices


async def set_mark_prices(redis: Redis, prices: Mapping[str, str]) -> None:
    """Exchange decimal strings as they came, all in one MSET."""
    if prices:
        mapping = {price_key(symbol): price for symbol, price in prices.items()}
        if isinstance(redis, RedisCluster):  # MSET cannot span slots: one SET per node's round
            await execute_checked(redis, [["SET", key, price] for key, price in mapping.items()])
        else:
            await redis.mset(mapping)


async def get_mark_prices(redis: Redis, symbols: Sequence[str]) -> dict[str, str | None]:
    if not symbols:
        return {}
    keys = [price_key(s) for s in symbols]
    values = await (redis.mget_nonatomic(keys) if isinstance(redis, RedisCluster) else redis.mget(keys))
    return dict(zip(symbols, values))


# --------------------------------------------------------------------------- Redis state

# Set once Redis holds what PostgreSQL has; its absence means Redis lost its data
# (a restart without persistence, FLUSHALL) and must be refilled.
RESTORED_KEY = "feed_v4:restored_at"


# --------------------------------------------------------------------------- streams


# Announcements of warm-up history and catch-up (REST minutes that closed more than a
# couple of minutes before they were fetched, and the M5/M15 buckets built from them)
# carry HISTORY_FIELD=HISTORY_VALUE; live closes carry no such field. A consumer that
# acts on fresh bars skips them with one comparison; the indicator worker reads them all.
HISTORY_FIELD = "history"
HISTORY_VALUE = "1"


class HistoryBatch(list):
    """Candles announced as history (see HISTORY_FIELD): a list with a mark, so that it
    travels through the intake's queues as any batch does."""

    history = True


def announced_event(candle: Candle, history: bool) -> dict[str, str]:
    """The `ohlcv_<tf>_ready` entry, marked as history when it is."""
    event = candle_event(candle)
    if history:
        event[HISTORY_FIELD] = HISTORY_VALUE
    return event


def xadd_command(stream: str, fields: Mapping[str, Any], maxlen: int) -> list[Any]:
    return ["XADD", stream, "MAXLEN", "~", maxlen, "*", *chain.from_iterable(fields.items())]


async def publish_candles(
    store: CandleStore, redis: Redis, batches: Sequence[tuple[str, Sequence[Candle]]], maxlen: int
) -> None:
    """Cache and announce candles of any timeframes in one Redis round: the series
    writes first, then each candle's `ohlcv_<tf>_ready` entry (Redis runs them in that
    order, so a reader of an announcement finds the candle cached). Series the server
    had lost are created, written and announced again (at least once). A batch that is a
    HistoryBatch is announced with `history=1`."""
    candles = [c for _, batch in batches for c in batch]
    # Their text serves the series writes too.
    events = [announced_event(c, getattr(batch, "history", False)) for _, batch in batches for c in batch]
    items = candle_columns(candles, events)
    writes = store.write_commands(items)
    announcements = [xadd_command(candle_stream(event["tf"]), event, maxlen) for event in events]
    replies = await execute_packed(redis, [*writes, *announcements])
    for reply in replies[len(writes) :]:
        if isinstance(reply, Exception):
            raise reply
    again = set(store.check_replies(items, writes, replies[: len(writes)]))
    if again:
        lost = [(tf, [c for c in batch if (c.symbol, c.tf) in again]) for tf, batch in batches]
        await write_candles(store, [c for _, batch in lost for c in batch])
        for (tf, batch), (_, source) in zip(lost, batches):
            history = getattr(source, "history", False)
            await publish(redis, candle_stream(tf), [announced_event(c, history) for c in batch], maxlen)


async def publish(redis: Redis, stream: str, events: Sequence[Mapping[str, Any]], maxlen: int) -> None:
    """XADD each event with an approximate MAXLEN, in one packed round."""
    if not events:
        return
    await execute_checked(redis, [xadd_command(stream, event, maxlen) for event in events])


async def ensure_groups(redis: Redis, groups: Mapping[str, Sequence[str]] = CONSUMER_GROUPS, at: str = "0") -> None:
    """Create streams and their consumer groups (reading from `at`: the first entry, or
    "$" for those added from now on); existing ones are left as they are."""
    pipe = redis.pipeline(transaction=False)
    for stream, names in groups.items():
        if not names:
            # An empty stream cannot exist without a group; create then drop one.
            pipe.xgroup_create(stream, "feed_v4_init", id="$", mkstream=True)
            pipe.xgroup_destroy(stream, "feed_v4_init")
        for name in names:
            pipe.xgroup_create(stream, name, id=at, mkstream=True)
    for result in await pipe.execute(raise_on_error=False):
        if isinstance(result, Exception) and "BUSYGROUP" not in str(result):
            raise result


StreamEntry = tuple[str, str, dict[str, str]]  # (stream, entry id, fields)


def stream_id(text: str) -> tuple[int, int]:
    """An entry id as (ms, seq), so ids compare in stream order."""
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


async def read_group(
    redis: Redis,
    group: str,
    consumer: str,
    streams: Sequence[str],
    count: int = 500,
    block_ms: int | None = 1000,
    start: str | Mapping[str, str] = ">",
) -> list[StreamEntry]:
    """New entries for this consumer (start ">"), or those it was given and never
    acknowledged after an id (start "0", or an id per stream); a group lost to a Redis
    wipe is recreated."""
    starts = {s: start for s in streams} if isinstance(start, str) else dict(start)
    try:
        block = block_ms if start == ">" else None
        if isinstance(redis, RedisCluster):

            async def read(part: dict[str, str], wait: int | None) -> Any:
                return await redis.xreadgroup(group, consumer, part, count=count, block=wait)

            reply = await read_streams_apart(read, starts, block)
        else:
            reply = await redis.xreadgroup(group, consumer, starts, count=count, block=block)
    except ResponseError as exc:
        if "NOGROUP" not in str(exc):
            raise
        await ensure_groups(redis, {s: (group,) for s in streams})
        return []
    return [(stream, entry_id, fields) for stream, entries in (reply or []) for entry_id, fields in entries]


async def entry_fields(redis: Redis, entries: Sequence[tuple[str, str]]) -> dict[tuple[str, str], dict]:
    """The fields of (stream, id) entries still in their streams, in one round trip."""
    pipe = redis.pipeline(transaction=False)
    for stream, entry_id in entries:
        pipe.xrange(stream, min=entry_id, max=entry_id, count=1)
    replies = await pipe.execute() if entries else []
    return {entry: reply[0][1] for entry, reply in zip(entries, replies) if reply}


async def candle_stream_ends(redis: Redis) -> dict[str, tuple[int, int]]:
    """Per timeframe, the id of its candle stream's newest entry ((0, 0): empty)."""
    pipe = redis.pipeline(transaction=False)
    for stream in CANDLE_STREAMS.values():
        pipe.xrevrange(stream, count=1)
    replies = await pipe.execute()
    return {tf: stream_id(reply[0][0]) if reply else (0, 0) for tf, reply in zip(CANDLE_STREAMS, replies)}


def ack_commands(group: str, entries: Iterable[tuple[str, str]]) -> list[list[Any]]:
    """XACK commands for (stream, id) pairs, one per stream."""
    by_stream: dict[str, list[str]] = defaultdict(list)
    for stream, entry_id in entries:
        by_stream[stream].append(entry_id)
    return [["XACK", stream, group, *ids] for stream, ids in by_stream.items()]


async def ack(redis: Redis, group: str, entries: Iterable[tuple[str, str]]) -> None:
    """XACK (stream, id) pairs, one command per stream, one round trip."""
    commands = ack_commands(group, entries)
    if commands:
        await execute_checked(redis, commands)


async def reclaim_stale(
    redis: Redis, stream: str, group: str, consumer: str, min_idle_ms: int, count: int = 500, page: int | None = None
) -> list[StreamEntry]:
    """Take over (up to `count`) entries another consumer left pending for `min_idle_ms`
    (XAUTOCLAIM, `page` at a time, `count` by default).

    Entries deleted from the stream meanwhile (trimmed) are acknowledged away.
    """
    claimed: list[StreamEntry] = []
    cursor = "0-0"
    while len(claimed) < count:
        try:
            reply = await redis.xautoclaim(stream, group, consumer, min_idle_ms, start_id=cursor, count=page or count)
        except ResponseError as exc:
            if "NOGROUP" in str(exc):
                return claimed
            raise
        cursor, entries = reply[0], reply[1]
        deleted = reply[2] if len(reply) > 2 else []
        claimed += [(stream, entry_id, fields) for entry_id, fields in entries if fields is not None]
        if deleted:
            await redis.xack(stream, group, *deleted)
        if cursor in ("0-0", b"0-0"):
            break
    return claimed


async def unacknowledged(
    redis: Redis, stream: str, group: str, consumer: str, page: int = 10_000
) -> list[dict[str, str]]:
    """Every entry of `stream` the group has not acknowledged: those pending with any of
    its consumers (claimed by `consumer`, so that it acknowledges them) and those not
    yet delivered. Entries trimmed from the stream are left out."""
    found = [fields for _, _, fields in await reclaim_stale(redis, stream, group, consumer, 0, 2**62, page)]
    after = next((g["last-delivered-id"] for g in await stream_groups(redis, stream) if g["name"] == group), None)
    if after is not None:
        found += [fields for _, fields in await entries_after(redis, stream, after, page)]
    return found


async def stream_groups(redis: Redis, stream: str) -> list[dict[str, Any]]:
    """XINFO GROUPS; a stream that does not exist has none."""
    try:
        return await redis.xinfo_groups(stream)
    except ResponseError as exc:
        if "no such key" in str(exc).lower():
            return []
        raise


async def entries_after(redis: Redis, stream: str, after: str, page: int = 10_000) -> list[tuple[str, dict[str, str]]]:
    """Every entry after id `after` (a group's last delivered: those it has not read), `page` a round trip."""
    found: list[tuple[str, dict[str, str]]] = []
    while True:
        entries = await redis.xrange(stream, min=f"({after}", count=page)
        found += entries
        if len(entries) < page:
            return found
        after = entries[-1][0]


# --------------------------------------------------------------------------- M1 ranges and keys


async def last_m1_open_times(pool: asyncpg.Pool, symbols: Sequence[str]) -> dict[str, int]:
    """Newest stored M1 per symbol (symbols with none are absent), one index probe each."""
    return await _m1_open_times(pool, symbols, "max")


async def first_m1_open_times(pool: asyncpg.Pool, symbols: Sequence[str]) -> dict[str, int]:
    """Oldest stored M1 per symbol (symbols with none are absent), one index probe each."""
    return await _m1_open_times(pool, symbols, "min")


async def _m1_open_times(pool: asyncpg.Pool, symbols: Sequence[str], end: str) -> dict[str, int]:
    rows = await pool.fetch(
        f"SELECT s.symbol, (SELECT {end}(open_time) FROM ohlcv4_m1 m WHERE m.symbol = s.symbol) AS t "
        "FROM unnest($1::text[]) AS s(symbol)",
        list(symbols),
    )
    return {r["symbol"]: datetime_to_ms(r["t"]) for r in rows if r["t"] is not None}


async def fetch_candles_at(pool: asyncpg.Pool, tf: str, keys: Sequence[tuple[str, int]]) -> list[Candle]:
    """Exact candles of `tf` at these (symbol, open_time) keys, oldest first, one query."""
    if not keys:
        return []
    extra = ", m.m1_count" if tf != "m1" else ""
    rows = await pool.fetch(
        f"SELECT m.symbol, m.open_time, {', '.join('m.' + c for c in CANDLE_COLUMNS)}{extra} "
        "FROM unnest($1::text[], $2::timestamptz[]) AS k(symbol, open_time) "
        f"JOIN {candle_table(tf)} m ON m.symbol = k.symbol AND m.open_time = k.open_time ORDER BY m.open_time",
        *key_arrays(keys),
    )
    return [_candle_from_record(r, tf) for r in rows]


async def fetch_candle_ranges(
    pool: asyncpg.Pool, tf: str, ranges: Sequence[tuple[str, int, int]]
) -> dict[str, list[Candle]]:
    """Exact candles of `tf` with start <= open_time < end for each (symbol, start, end)."""
    if not ranges:
        return {}
    extra = ", m.m1_count" if tf != "m1" else ""
    rows = await pool.fetch(
        f"SELECT DISTINCT m.symbol, m.open_time, {', '.join('m.' + c for c in CANDLE_COLUMNS)}{extra} "
        "FROM unnest($1::text[], $2::timestamptz[], $3::timestamptz[]) AS r(symbol, start_at, end_at) "
        f"JOIN {candle_table(tf)} m ON m.symbol = r.symbol AND m.open_time >= r.start_at AND m.open_time < r.end_at "
        "ORDER BY m.symbol, m.open_time",
        *range_arrays(ranges),
    )
    out: dict[str, list[Candle]] = defaultdict(list)
    for r in rows:
        out[r["symbol"]].append(_candle_from_record(r, tf))
    return out


async def announced_candles(redis: Redis, stream: str, page: int = 10_000) -> set[tuple[str, int]]:
    """(symbol, open_time) of every candle event still in `stream`."""
    found: set[tuple[str, int]] = set()
    start = "-"
    while True:
        entries = await redis.xrange(stream, min=start, count=page)
        for _, fields in entries:
            if "symbol" in fields and "open_time" in fields:
                found.add((fields["symbol"], int(fields["open_time"])))
        if len(entries) < page:
            return found
        start = "(" + entries[-1][0]
