"""The Redis candle cache: one TimeSeries per field, or sorted sets where the module is
missing or refused; both answer reads identically. Bulk writes go out as one packed
round (hiredis packs the commands in C).

Re-exported by core_io, which stays the one place the rest of the code calls.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from itertools import chain, repeat
from typing import Any, NamedTuple, Protocol

import hiredis
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from candles import TF_MS, Bar, Candle
from infra import REDIS_RETRY_ERRORS

CANDLE_FIELDS: tuple[str, ...] = ("o", "h", "l", "c", "v")


def candle_series_key(symbol: str, tf: str, field: str) -> str:
    return f"ohlcv:{symbol}:{tf}:{field}"


def candle_zset_key(symbol: str, tf: str) -> str:
    return f"ohlcv:{symbol}:{tf}"


def retention_ms(tf: str, bars: int) -> int:
    """Keeps exactly `bars` contiguous bars: the oldest kept is (bars-1) periods old."""
    return bars * TF_MS[tf] - 1


# --------------------------------------------------------------------------- bulk commands


async def execute_packed(redis: Redis, commands: Sequence[Sequence[Any]]) -> list[Any]:
    """Send many commands in one write and read every reply (errors returned, not raised).

    redis-py's asyncio pipeline packs arguments in pure Python, which dominated bulk
    candle writes (15 s for a 500-symbol restore); hiredis packs them in C. The
    commands must be idempotent: on a dropped connection the whole batch is re-sent once.
    """
    packed = b"".join(hiredis.pack_command(tuple(command)) for command in commands)
    for attempt in (1, 2):
        conn = await redis.connection_pool.get_connection()
        try:
            await conn.send_packed_command(packed, check_health=attempt == 2)
            replies: list[Any] = []
            for _ in commands:
                try:
                    replies.append(await conn.read_response())
                except ResponseError as error:
                    replies.append(error)
            return replies
        except REDIS_RETRY_ERRORS:
            await conn.disconnect()
            if attempt == 2:
                raise
        finally:
            await redis.connection_pool.release(conn)
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------- candle stores


SeriesKey = tuple[str, str]  # (symbol, tf)


class Columns(NamedTuple):
    """One series as columns: open times (ms) and OHLCV as floats or decimal strings.

    The restore path passes PostgreSQL's numeric text straight through; nothing is
    converted to float and back.
    """

    open_time: Sequence[int]
    open: Sequence[float | str]
    high: Sequence[float | str]
    low: Sequence[float | str]
    close: Sequence[float | str]
    volume: Sequence[float | str]


def bars_to_columns(bars: Sequence[Bar]) -> Columns:
    return (
        Columns(
            *(list(column) for column in zip(*((b.open_time, b.open, b.high, b.low, b.close, b.volume) for b in bars)))
        )
        if bars
        else Columns([], [], [], [], [], [])
    )


def bars_by_series(candles: Iterable[Candle]) -> dict[SeriesKey, list[Bar]]:
    grouped: dict[SeriesKey, list[Bar]] = defaultdict(list)
    for candle in candles:
        grouped[(candle.symbol, candle.tf)].append(candle.to_bar())
    return grouped


class CandleStore(Protocol):
    """The Redis candle cache; both implementations answer reads identically."""

    name: str
    redis: Redis

    async def write_columns(self, items: Mapping[SeriesKey, Columns]) -> None: ...

    async def read_last_many(self, keys: Sequence[SeriesKey], count: int) -> dict[SeriesKey, list[Bar]]: ...

    def forget_created(self) -> None:
        """Redis may have been wiped: create series again on the next writes."""


async def write_bars(store: CandleStore, items: Mapping[SeriesKey, Sequence[Bar]]) -> None:
    await store.write_columns({key: bars_to_columns(bars) for key, bars in items.items() if bars})


async def write_candles(store: CandleStore, candles: Iterable[Candle]) -> None:
    await write_bars(store, bars_by_series(candles))


def _ignorable_ts_error(error: Exception) -> bool:
    text = str(error).lower()
    return "already exists" in text or "older than retention" in text


def _missing_series_error(error: Exception) -> bool:
    """What TS.MADD says for a series that is gone (this module's wording varies)."""
    text = str(error).lower()
    return "does not exist" in text or "not a tsdb key" in text


class TimeSeriesCandleStore:
    """RedisTimeSeries: one series per field, labelled, duplicate policy LAST."""

    name = "timeseries"

    def __init__(self, redis: Redis, bars_kept: int) -> None:
        self.redis = redis
        self.bars_kept = bars_kept
        self.created: set[SeriesKey] = set()  # series this process has created (or found)

    def forget_created(self) -> None:
        self.created.clear()

    async def write_columns(self, items: Mapping[SeriesKey, Columns], retry: bool = True) -> None:
        """TS.CREATE once per series and process, then TS.MADD. TS.MADD does not create
        series: after a FLUSHALL its samples fail with "key does not exist", and those
        series are created (labelled) and written again."""
        commands: list[list[Any]] = []
        madd_series: list[SeriesKey] = []
        for (symbol, tf), columns in items.items():
            if not columns.open_time:
                continue
            keys = [candle_series_key(symbol, tf, field) for field in CANDLE_FIELDS]
            for key, field in zip(keys, CANDLE_FIELDS):
                if (symbol, tf) in self.created:
                    break
                commands.append(
                    [
                        "TS.CREATE",
                        key,
                        "RETENTION",
                        retention_ms(tf, self.bars_kept),
                        "DUPLICATE_POLICY",
                        "LAST",
                        "LABELS",
                        "symbol",
                        symbol,
                        "tf",
                        tf,
                        "field",
                        field,
                    ]
                )
            times = columns.open_time
            triples = zip(*(part for key, values in zip(keys, columns[1:]) for part in (repeat(key), times, values)))
            commands.append(["TS.MADD", *chain.from_iterable(triples)])
            madd_series.append((symbol, tf))
        if not commands:
            return
        missing: set[SeriesKey] = set()
        madd_replies = iter(madd_series)
        for command, reply in zip(commands, await execute_packed(self.redis, commands)):
            if command[0] == "TS.MADD":
                series = next(madd_replies)
                for sample in reply if isinstance(reply, list) else [reply]:
                    if isinstance(sample, Exception) and _missing_series_error(sample):
                        missing.add(series)
                    elif isinstance(sample, Exception) and not _ignorable_ts_error(sample):
                        raise sample  # per-sample "older than retention" has nothing to keep
            elif isinstance(reply, Exception) and not _ignorable_ts_error(reply):
                raise reply
        self.created.update(set(madd_series) - missing)
        if missing:
            self.created -= missing
            if retry:
                await self.write_columns({key: items[key] for key in missing}, retry=False)
            else:
                raise RuntimeError(f"TimeSeries keys still missing after TS.CREATE: {sorted(missing)[:3]}")

    async def read_last_many(self, keys: Sequence[SeriesKey], count: int) -> dict[SeriesKey, list[Bar]]:
        if not keys:
            return {}
        pipe = self.redis.pipeline(transaction=False)
        for symbol, tf in keys:
            for field in CANDLE_FIELDS:
                pipe.execute_command("TS.REVRANGE", candle_series_key(symbol, tf, field), "-", "+", "COUNT", count)
        results = await pipe.execute(raise_on_error=False)
        out: dict[SeriesKey, list[Bar]] = {}
        for index, key in enumerate(keys):
            fields = results[index * 5 : (index + 1) * 5]
            if any(isinstance(c, Exception) for c in fields):
                out[key] = []  # a missing series reads as empty
                continue
            by_field = [{int(ts): float(v) for ts, v in column} for column in fields]
            common = sorted(set(by_field[0]).intersection(*by_field[1:]))
            out[key] = [Bar(ts, *(f[ts] for f in by_field)) for ts in common]
        return out


# Replace the bars at their scores, then trim to the retention window, in one call.
_ZSET_WRITE_LUA = """
for i = 2, #ARGV, 2 do
    local score = tonumber(ARGV[i])
    redis.call('ZREMRANGEBYSCORE', KEYS[1], score, score)
    redis.call('ZADD', KEYS[1], score, ARGV[i + 1])
end
local top = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
if top[2] then
    redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. (tonumber(top[2]) - tonumber(ARGV[1])))
end
return #ARGV
"""


class SortedSetCandleStore:
    """Fallback for servers without TimeSeries: a sorted set per (symbol, tf), score =
    open time, member = `open_time:o:h:l:c:v`."""

    name = "zset"

    def __init__(self, redis: Redis, bars_kept: int) -> None:
        self.redis = redis
        self.bars_kept = bars_kept

    def forget_created(self) -> None:
        pass  # sorted sets need no creation

    async def write_columns(self, items: Mapping[SeriesKey, Columns]) -> None:
        commands: list[list[Any]] = []
        for (symbol, tf), columns in items.items():
            if not columns.open_time:
                continue
            command: list[Any] = [
                "EVAL",
                _ZSET_WRITE_LUA,
                1,
                candle_zset_key(symbol, tf),
                retention_ms(tf, self.bars_kept),
            ]
            for row in zip(*columns):
                command += (row[0], ":".join(map(str, row)))
            commands.append(command)
        for reply in await execute_packed(self.redis, commands) if commands else ():
            if isinstance(reply, Exception):
                raise reply

    async def read_last_many(self, keys: Sequence[SeriesKey], count: int) -> dict[SeriesKey, list[Bar]]:
        if not keys:
            return {}
        pipe = self.redis.pipeline(transaction=False)
        for symbol, tf in keys:
            pipe.zrange(candle_zset_key(symbol, tf), -count, -1)
        results = await pipe.execute(raise_on_error=False)
        out: dict[SeriesKey, list[Bar]] = {}
        for key, members in zip(keys, results):
            if isinstance(members, Exception):
                out[key] = []
                continue
            bars = []
            for member in members:
                ts, o, h, low, c, v = member.split(":")
                bars.append(Bar(int(ts), float(o), float(h), float(low), float(c), float(v)))
            out[key] = bars
        return out


def make_candle_store(redis: Redis, use_timeseries: bool, bars_kept: int) -> CandleStore:
    if use_timeseries:
        return TimeSeriesCandleStore(redis, bars_kept)
    return SortedSetCandleStore(redis, bars_kept)
