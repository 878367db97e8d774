"""The read API's reads: PostgreSQL for history, Redis for what PostgreSQL does not
hold yet (the newest indicator values, the forming footprint, the newest feature
second, the book), merged into one answer. Read only: nothing here writes.

Candles, order flow and footprints reach PostgreSQL before Redis (the daemon's order),
so PostgreSQL answers them whole; while it is unreachable, candles come from Redis's
window (open, high, low, close and volume; the other fields `null`).
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import asyncpg
import orjson
from redis.asyncio import Redis

from book.store import FEATURE_NAMES, book_key, features_key
from candle_stores import CandleStore
from candles import TIMEFRAMES, datetime_to_ms, ms_to_datetime
from core_io import candle_table, indicator_key
from orderflow.fold import units_text
from orderflow.output import footprint_document
from orderflow.profile import ImbalanceRules, profile
from orderflow.store import bar_of_record, footprint_key, orderflow_key
from web.params import MAX_TIME_MS
from web.shapes import float_or_none, indicator_row, merge_indicator_rows, orderflow_from_hash

END_OF_TIME = ms_to_datetime(MAX_TIME_MS)
# PostgreSQL away (not a query it refused): what a read may fall back from.
PG_DOWN = (
    OSError, TimeoutError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError, asyncpg.CannotConnectNowError,
)  # fmt: skip
MS = "(extract(epoch FROM {0}) * 1000)::bigint"


def _end(end: int | None):
    return END_OF_TIME if end is None else ms_to_datetime(end)


# --------------------------------------------------------------------------- symbols


async def enabled_tickers(pool: asyncpg.Pool, redis: Redis) -> list[dict[str, Any]]:
    """The enabled tickers, their stream switches, their newest bar per timeframe (one
    index probe each) and whether their book is in Redis now (`has_book`)."""
    newest = ", ".join(
        f"(SELECT {MS.format('open_time')} FROM {candle_table(tf)} c WHERE c.symbol = t.symbol "
        f"ORDER BY open_time DESC LIMIT 1) AS newest_{tf}"
        for tf in TIMEFRAMES
    )
    rows = await pool.fetch(
        f"SELECT t.symbol, t.status, t.trades, t.book_ticker, t.depth, {newest} FROM tickers t "
        "WHERE t.status = 'enabled' ORDER BY t.symbol"
    )
    async with redis.pipeline(transaction=False) as pipe:
        for r in rows:
            pipe.exists(book_key(r["symbol"]))
        books = await pipe.execute()
    return [
        {
            "symbol": r["symbol"],
            "status": r["status"],
            "trades": r["trades"],
            "book_ticker": r["book_ticker"],
            "depth": r["depth"],
            "has_book": bool(has_book),
            "newest": {tf: r[f"newest_{tf}"] for tf in TIMEFRAMES},
        }
        for r, has_book in zip(rows, books)
    ]


# --------------------------------------------------------------------------- candles

_CANDLE_JSON = (
    "'open_time', " + MS.format("open_time") + ", 'open', open::text, 'high', high::text, 'low', low::text, "
    "'close', close::text, 'volume', volume::text, 'quote_volume', quote_volume::text, 'trades', trades, "
    "'taker_buy_volume', taker_buy_volume::text"
)


_M1_COUNT_JSON = ", 'm1_count', m1_count"


def _candle_json(tf: str) -> str:
    """A candle as a JSON object built by PostgreSQL (M5/M15 with their `m1_count`)."""
    return f"json_build_object({_CANDLE_JSON}{_M1_COUNT_JSON if tf != 'm1' else ''})"


def _candles_sql(tf: str) -> str:
    """The answer built by PostgreSQL itself as JSON text: no row is decoded in Python."""
    return (
        f"SELECT coalesce(json_agg({_candle_json(tf)} ORDER BY open_time), '[]')::text "
        f"FROM (SELECT * FROM {candle_table(tf)} WHERE symbol = $1 AND open_time <= $2 "
        "ORDER BY open_time DESC LIMIT $3) c"
    )


_CANDLES_SQL = {tf: _candles_sql(tf) for tf in TIMEFRAMES}


async def candles_json(pool: asyncpg.Pool, symbol: str, tf: str, limit: int, end: int | None) -> bytes:
    return (await pool.fetchval(_CANDLES_SQL[tf], symbol, _end(end), limit)).encode()


async def candles_at(pool: asyncpg.Pool, tf: str, keys: Sequence[tuple[str, int]]) -> dict[tuple[str, int], bytes]:
    """Given bars' JSON, one statement (the WebSocket's pushes of closed bars)."""
    rows = await pool.fetch(
        f"SELECT c.symbol, {MS.format('c.open_time')} AS t, {_candle_json(tf)}::text AS j "
        f"FROM unnest($1::text[], $2::timestamptz[]) AS k(s, t) "
        f"JOIN {candle_table(tf)} c ON c.symbol = k.s AND c.open_time = k.t",
        [k[0] for k in keys],
        [ms_to_datetime(k[1]) for k in keys],
    )
    return {(r["symbol"], r["t"]): r["j"].encode() for r in rows}


async def candles_from_redis(store: CandleStore, symbol: str, tf: str, limit: int, end: int | None) -> list[dict]:
    """Redis's window, for when PostgreSQL cannot answer."""
    bars = (await store.read_last_many([(symbol, tf)], limit))[(symbol, tf)]
    return [
        {
            "open_time": b.open_time,
            "open": repr(b.open),
            "high": repr(b.high),
            "low": repr(b.low),
            "close": repr(b.close),
            "volume": repr(b.volume),
            "quote_volume": None,
            "trades": None,
            "taker_buy_volume": None,
        }
        for b in bars
        if end is None or b.open_time <= end
    ][-limit:]


# --------------------------------------------------------------------------- indicators


async def indicator_rows(
    pool: asyncpg.Pool, redis: Redis, symbol: str, tf: str, limit: int, end: int | None
) -> list[dict[str, Any]]:
    """Values of the `limit` newest bars up to `end` that have any, oldest first. The
    bars are bounded first from the candle table's index, so the values read are those
    of `limit` bars at most (not of the whole retention)."""
    rows = await pool.fetch(
        f"SELECT {MS.format('v.open_time')} AS t, json_object_agg(v.param_name, v.value)::text AS j "
        "FROM indicator_values_v4 v JOIN indicator_instances_v4 i ON i.id = v.instance_id AND i.timeframe = $2 "
        "WHERE v.symbol = $1 AND v.open_time <= $3 AND v.open_time >= coalesce(("
        f"SELECT open_time FROM {candle_table(tf)} WHERE symbol = $1 AND open_time <= $3 "
        "ORDER BY open_time DESC OFFSET $4 - 1 LIMIT 1), '-infinity') "
        "GROUP BY v.open_time ORDER BY v.open_time",
        symbol,
        tf,
        _end(end),
        limit,
    )
    stored = [(r["t"], orjson.loads(r["j"])) for r in rows]
    latest = indicator_row(await redis.hgetall(indicator_key(symbol, tf)))
    return merge_indicator_rows(stored, latest, end)[-limit:]


async def hashes(redis: Redis, names: Sequence[str]) -> list[dict]:
    """Several hashes in one round (HGETALL each, pipelined)."""
    async with redis.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.hgetall(name)
        return await pipe.execute()


async def latest_indicators(redis: Redis, keys: Sequence[tuple[str, str]]) -> list[dict[str, Any] | None]:
    return [indicator_row(r) for r in await hashes(redis, [indicator_key(s, tf) for s, tf in keys])]


# --------------------------------------------------------------------------- order flow

_NUMERIC_FLOW = (
    "buy_volume", "sell_volume", "delta", "delta_min", "delta_max", "cvd", "cvd_day", "vwap", "max_trade_qty",
    "row_size", "poc", "vah", "val",
)  # fmt: skip
_COUNT_FLOW = ("agg_trades", "trades", "buy_trades", "sell_trades", "first_agg_id", "last_agg_id")
_FLOW_JSON = ", ".join(
    ["'open_time', " + MS.format("open_time")]
    + [f"'{c}', trim_scale({c})::text" for c in _NUMERIC_FLOW]
    + [f"'{c}', {c}" for c in _COUNT_FLOW]
)
_FLOW_SQL = (
    f"SELECT coalesce(json_agg(json_build_object({_FLOW_JSON}) ORDER BY open_time), '[]')::text "
    "FROM (SELECT * FROM orderflow_v4 WHERE symbol = $1 AND tf = $2 AND open_time <= $3 "
    "ORDER BY open_time DESC LIMIT $4) f"
)


async def orderflow_json(pool: asyncpg.Pool, symbol: str, tf: str, limit: int, end: int | None) -> bytes:
    return (await pool.fetchval(_FLOW_SQL, symbol, tf, _end(end), limit)).encode()


async def orderflow_hashes(redis: Redis, keys: Sequence[tuple[str, str]]) -> list[dict[str, Any] | None]:
    return [orderflow_from_hash(r) for r in await hashes(redis, [orderflow_key(s, tf) for s, tf in keys])]


# --------------------------------------------------------------------------- footprints

RULES = ImbalanceRules()  # the daemon's (orderflow/intake.py uses the defaults)
# Decimal text of a value in units, remembered: a third of a document's making time went
# to writing the same prices and sizes again, bar after bar.
units_text_memo = functools.lru_cache(maxsize=100_000)(units_text)


def final_footprint(record: Mapping[str, Any]) -> dict[str, Any]:
    """A stored bar's footprint document, made by the daemon's own code (so the same
    bar reads the same from PostgreSQL as from Redis)."""
    bar = bar_of_record(record)
    document = footprint_document(bar, profile(bar.footprint(), RULES), units_text_memo)
    document["final"] = True
    return document


class FootprintCache:
    """Final footprints as encoded JSON by (symbol, tf, open_time), each with the bar's
    `written_at` (a rebuilt bar is written again with a newer one, so a stale document is
    never served). A chart opened again, or by many, then costs one index scan instead
    of ~85 ms of documents made for 1,000 bars. Bounded in bytes, least recently used
    out first."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes, self.bytes = max_bytes, 0
        self.documents: OrderedDict[tuple[str, str, int], tuple[Any, bytes]] = OrderedDict()
        self.hits = self.misses = 0

    def _put(self, key: tuple[str, str, int], written_at: Any, document: bytes) -> None:
        old = self.documents.pop(key, None)
        if old is not None:
            self.bytes -= len(old[1])
        self.documents[key] = (written_at, document)
        self.bytes += len(document)
        while self.bytes > self.max_bytes and self.documents:
            _, (_, dropped) = self.documents.popitem(last=False)
            self.bytes -= len(dropped)

    async def final(
        self, pool: asyncpg.Pool, symbol: str, tf: str, limit: int, end: int | None
    ) -> list[tuple[int, bytes]]:
        """(open time, document) of the newest `limit` final bars up to `end`, oldest first."""
        stamps = await pool.fetch(
            f"SELECT {MS.format('open_time')} AS t, written_at FROM orderflow4 "
            "WHERE symbol = $1 AND tf = $2 AND open_time <= $3 ORDER BY open_time DESC LIMIT $4",
            symbol,
            tf,
            _end(end),
            limit,
        )
        out: list[tuple[int, bytes] | None] = []
        missing: dict[int, int] = {}
        for r in reversed(stamps):
            held = self.documents.get((symbol, tf, r["t"]))
            if held is not None and held[0] == r["written_at"]:
                self.documents.move_to_end((symbol, tf, r["t"]))
                out.append((r["t"], held[1]))
            else:
                missing[r["t"]] = len(out)
                out.append(None)
        self.hits += len(out) - len(missing)
        self.misses += len(missing)
        if missing:
            rows = await pool.fetch(
                "SELECT * FROM orderflow4 WHERE symbol = $1 AND tf = $2 AND open_time = ANY($3::timestamptz[])",
                symbol,
                tf,
                [ms_to_datetime(t) for t in missing],
            )
            for record in rows:
                t = datetime_to_ms(record["open_time"])
                document = orjson.dumps(final_footprint(record))
                self._put((symbol, tf, t), record["written_at"], document)
                if t in missing:
                    out[missing[t]] = (t, document)
        return [item for item in out if item is not None]  # a bar deleted meanwhile is left out


async def footprints_json(
    pool: asyncpg.Pool, redis: Redis, cache: FootprintCache, symbol: str, tf: str, limit: int, end: int | None
) -> bytes:
    """Final footprints oldest first, and the forming one after them when `end` is open."""
    final = await cache.final(pool, symbol, tf, limit, end)
    documents = [document for _, document in final]
    if end is None:
        forming = await forming_footprint(redis, symbol, tf)
        if forming and forming[0] > (final[-1][0] if final else -1):
            documents = [*documents, forming[1]][-limit:]
    return b"[" + b",".join(documents) + b"]"


async def footprint_at(cache: FootprintCache, pool: asyncpg.Pool, symbol: str, tf: str, open_time: int | None):
    """A final footprint's document: the bar at `open_time`, or the newest; None if none."""
    found = await cache.final(pool, symbol, tf, 1, open_time)
    if found and (open_time is None or found[0][0] == open_time):
        return found[0][1]
    return None


def open_time_of(document: bytes) -> int | None:
    """A footprint document's open time; None for one that cannot be read."""
    try:
        return int(orjson.loads(document)["open_time"])
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


def marked(document: bytes, final: bool) -> bytes:
    """A stored footprint document with its `"final"` flag, spliced in, not re-encoded."""
    return document[:-1] + (b',"final":true}' if final else b',"final":false}')


async def forming_footprint(redis: Redis, symbol: str, tf: str) -> tuple[int, bytes] | None:
    """The forming bar's (open time, document marked not final), if there is one."""
    raw = await redis.get(footprint_key(symbol, tf, forming=True))
    open_time = open_time_of(raw) if raw else None
    return None if open_time is None else (open_time, marked(raw, False))


# --------------------------------------------------------------------------- book and features


async def book_raw(redis: Redis, symbol: str) -> bytes | None:
    return await redis.get(book_key(symbol))


_FEATURES_SQL = (
    f"SELECT {MS.format('ts')} AS ts, {', '.join(FEATURE_NAMES)} FROM (SELECT * FROM features_1s_v4 "
    "WHERE symbol = $1 AND ts <= $2 ORDER BY ts DESC LIMIT $3) f ORDER BY ts"
)


async def feature_rows(
    pool: asyncpg.Pool, redis: Redis, symbol: str, limit: int, end: int | None
) -> list[dict[str, Any]]:
    rows = [
        {"ts": r["ts"], **{n: float_or_none(r[n]) for n in FEATURE_NAMES}}
        for r in await pool.fetch(_FEATURES_SQL, symbol, _end(end), limit)
    ]
    latest = await redis.hgetall(features_key(symbol))
    if latest:
        second = feature_second(latest)
        if (end is None or second["ts"] <= end) and (not rows or second["ts"] > rows[-1]["ts"]):
            rows.append(second)
    return rows[-limit:]


def feature_second(fields: Mapping[Any, Any]) -> dict[str, Any]:
    """A `features:<S>` hash or `features_1s` entry: every feature named, `null` when absent."""
    text = {(k.decode() if isinstance(k, bytes) else k): v for k, v in fields.items()}
    return {"ts": int(text["ts"]), **{n: float_or_none(text.get(n)) for n in FEATURE_NAMES}}
