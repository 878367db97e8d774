"""The Redis candle cache: one TimeSeries per field, or sorted sets where the module is
missing or refused; both answer reads identically. Bulk writes go out as one packed
round (hiredis packs the commands in C).

Re-exported by core_io, which stays the one place the rest of the code calls.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from itertools import chain, repeat
from typing import Any, NamedTuple, Protocol

import hiredis
from redis._parsers.hiredis import NOT_ENOUGH_DATA  # the sentinel redis-py's hiredis reader returns
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ResponseError

from candles import TF_MS, Bar, Candle
from infra import REDIS_RETRY_ERRORS
from shards.cluster import AnyRedis, execute_routed
from shards.keys import symbol_part

CANDLE_FIELDS: tuple[str, ...] = ("o", "h", "l", "c", "v")


def candle_series_key(symbol: str, tf: str, field: str) -> str:
    return f"ohlcv:{symbol_part(symbol)}:{tf}:{field}"


def candle_zset_key(symbol: str, tf: str) -> str:
    return f"ohlcv:{symbol_part(symbol)}:{tf}"


def retention_ms(tf: str, bars: int) -> int:
    """Keeps exactly `bars` contiguous bars: the oldest kept is (bars-1) periods old."""
    return bars * TF_MS[tf] - 1


# --------------------------------------------------------------------------- bulk commands


class Packed(NamedTuple):
    """A command already in RESP (`name` is its first word, for reading its replies;
    `key` its first key, for routing it on a Redis Cluster)."""

    name: str
    resp: bytes
    key: str


_CRLF = b"\r\n"
_BULK_HEADERS = [b"$%d\r\n" % n for n in range(256)]


def _bulk(data: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(data), data)


def _value_texts(values: Sequence[float | str]) -> list[bytes]:
    """Decimal text as it is; a float as its repr (Redis reads either to the same double)."""
    if values and type(values[0]) is str:
        return list(map(str.encode, values))  # type: ignore[arg-type]
    return [repr(float(v)).encode() for v in values]


PACK_MADD_FROM = 16  # samples a series, from which pack_madd beats hiredis (12 µs against 4 for one)


def pack_madd(
    keys: Sequence[str],
    times: Sequence[int],
    columns: Sequence[Sequence[float | str]],
    encoded_times: dict[int, bytes] | None = None,
) -> Packed:
    """One TS.MADD of series sharing their sample times, in RESP built here: each key and
    time is encoded once, not once per sample, and the samples are laid out by slice
    writes in C. A restore sends 1.9 million samples; hiredis.pack_command took ~0.1 µs
    an argument, three arguments a sample. `encoded_times` carries the times' encoding
    from one series to the next (the series of a timeframe share their times)."""
    encoded = {} if encoded_times is None else encoded_times
    time_parts = list(map(encoded.get, times))
    if None in time_parts:
        for t in times:
            if t not in encoded:
                encoded[t] = _bulk(b"%d" % t)
        time_parts = list(map(encoded.__getitem__, times))
    size = len(time_parts)
    parts = [b"*%d\r\n$7\r\nTS.MADD\r\n" % (1 + 3 * size * len(keys))]
    for key, column in zip(keys, columns, strict=True):
        values = _value_texts(column)
        if len(values) != size:
            raise ValueError(f"{key}: {len(values)} values for {size} times")
        lengths = list(map(len, values))
        samples = [_CRLF] * (5 * size)  # key, time, value header, value, CRLF
        samples[0::5] = [_bulk(key.encode())] * size
        samples[1::5] = time_parts
        samples[2::5] = (
            map(_BULK_HEADERS.__getitem__, lengths)
            if max(lengths, default=0) < len(_BULK_HEADERS)
            else [b"$%d\r\n" % n for n in lengths]
        )
        samples[3::5] = values
        parts += samples
    return Packed("TS.MADD", b"".join(parts), keys[0])


async def execute_packed(
    redis: AnyRedis, commands: Sequence[Sequence[Any] | Packed], replica_wait_ms: int | None = None
) -> list[Any]:
    """Send many commands in one write and read every reply (errors returned, not raised).

    redis-py's asyncio pipeline packs arguments in pure Python, which dominated bulk
    candle writes (15 s for a 500-symbol restore); hiredis packs them in C. Replies are
    read in bulk too (see `_read_replies`). The commands must be idempotent: on a
    dropped connection the whole batch is re-sent once. On a Redis Cluster the round is
    split by owning node (shards/cluster.py), each part then acknowledged by a replica
    when `replica_wait_ms` is given.
    """
    if isinstance(redis, RedisCluster):
        return await execute_routed(redis, commands, _round_on, replica_wait_ms)
    pool = redis.connection_pool
    return await _round_on(pool.get_connection, pool.release, commands)


async def _round_on(
    acquire: Callable[[], Awaitable[Any]],
    release: Callable[[Any], Awaitable[None]],
    commands: Sequence[Sequence[Any] | Packed],
) -> list[Any]:
    """One round on one connection from a pool (a single Redis's, or a cluster node's)."""
    packed = b"".join(
        command.resp if isinstance(command, Packed) else hiredis.pack_command(tuple(command)) for command in commands
    )
    for attempt in (1, 2):
        conn = await acquire()
        try:
            await conn.send_packed_command(packed, check_health=attempt == 2)
            return await _read_replies(conn, len(commands))
        except REDIS_RETRY_ERRORS:
            await conn.disconnect()
            if attempt == 2:
                raise
        except BaseException:
            # Cancelled mid-round: the replies still on their way (or half a command sent)
            # must not reach the connection's next user, who would read them as its own.
            await conn.disconnect(nowait=True)
            raise
        finally:
            await release(conn)
    raise AssertionError("unreachable")


async def execute_checked(redis: Redis, commands: Sequence[Sequence[Any] | Packed]) -> list[Any]:
    """`execute_packed`, raising the first reply Redis refused (after the whole round)."""
    replies = await execute_packed(redis, commands)
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
    return replies


async def _read_replies(conn: Any, count: int) -> list[Any]:
    """`count` replies. redis-py reads one reply at a time through layers of Python
    (a timeout context each: ~10 µs a reply, 30 ms for the 3,000 replies of a boundary);
    here the connection's own hiredis reader parses everything that arrived, in C, and
    the socket is read only when it runs dry. Error replies come back as exceptions.
    Anything but redis-py 8's hiredis parser falls back to its per-reply reads."""
    parser = getattr(conn, "_parser", None)
    reader = getattr(parser, "_reader", None)
    if not isinstance(reader, hiredis.Reader) or not hasattr(parser, "read_from_socket"):
        replies: list[Any] = []
        for _ in range(count):
            try:
                replies.append(await conn.read_response())
            except ResponseError as error:
                replies.append(error)
        return replies
    replies = []
    async with asyncio.timeout(conn.socket_timeout):
        while len(replies) < count:
            reply = reader.gets()
            if reply is NOT_ENOUGH_DATA:
                await parser.read_from_socket()
                continue
            if isinstance(reply, ConnectionError):
                raise reply
            replies.append(reply)
    return replies


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


def candle_columns(
    candles: Sequence[Candle], events: Sequence[Mapping[str, str]] | None = None
) -> dict[SeriesKey, Columns]:
    """Candles by series as columns of their exact decimal text, taken from their
    `ohlcv_<tf>_ready` entries (made here unless given): hiredis packs a str ~10x faster
    than a float (which it formats through Python), and Redis reads the text to the
    same double."""
    grouped: dict[SeriesKey, list[tuple[int, Mapping[str, str]]]] = defaultdict(list)
    for candle, event in zip(candles, events if events is not None else map(candle_event, candles)):
        grouped[(candle.symbol, candle.tf)].append((candle.open_time, event))
    return {
        key: Columns(
            [t for t, _ in rows],
            *([event[name] for _, event in rows] for name in ("open", "high", "low", "close", "volume")),
        )
        for key, rows in grouped.items()
    }


def candle_event(candle: Candle) -> dict[str, str]:
    """The `ohlcv_<tf>_ready` entry: exact decimal strings, open time in ms."""
    event = {
        "symbol": candle.symbol,
        "tf": candle.tf,
        "open_time": str(candle.open_time),
        "open": str(candle.open),
        "high": str(candle.high),
        "low": str(candle.low),
        "close": str(candle.close),
        "volume": str(candle.volume),
    }
    if candle.m1_count is not None:
        event["m1_count"] = str(candle.m1_count)
    return event


class CandleStore(Protocol):
    """The Redis candle cache; both implementations answer reads identically."""

    name: str
    redis: Redis

    async def write_columns(self, items: Mapping[SeriesKey, Columns]) -> None: ...

    def write_commands(self, items: Mapping[SeriesKey, Columns]) -> list[list[Any]]:
        """The commands that write these series, to go out with others in one round."""

    def check_replies(
        self, items: Mapping[SeriesKey, Columns], commands: Sequence[Sequence[Any]], replies: Sequence[Any]
    ) -> list[SeriesKey]:
        """Raise a refused write; return the series to write again (gone, e.g. after a FLUSHALL)."""

    async def read_last_many(self, keys: Sequence[SeriesKey], count: int) -> dict[SeriesKey, list[Bar]]: ...

    def forget_created(self) -> None:
        """Redis may have been wiped: create series again on the next writes."""


async def write_bars(store: CandleStore, items: Mapping[SeriesKey, Sequence[Bar]]) -> None:
    await store.write_columns({key: bars_to_columns(bars) for key, bars in items.items() if bars})


async def write_candles(store: CandleStore, candles: Sequence[Candle]) -> None:
    await store.write_columns(candle_columns(candles))


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

    async def write_columns(self, items: Mapping[SeriesKey, Columns]) -> None:
        """TS.CREATE once per series and process, then TS.MADD. TS.MADD does not create
        series: after a FLUSHALL its samples fail with "key does not exist", and those
        series are created (labelled) and written again."""
        await write_columns_checked(self, items)

    def write_commands(self, items: Mapping[SeriesKey, Columns]) -> list[list[Any]]:
        commands: list[list[Any]] = []
        encoded_times: dict[int, bytes] = {}
        for (symbol, tf), columns in items.items():
            if not columns.open_time:
                continue
            keys = [candle_series_key(symbol, tf, field) for field in CANDLE_FIELDS]
            if (symbol, tf) not in self.created:
                for key, field in zip(keys, CANDLE_FIELDS):
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
            if len(times) < PACK_MADD_FROM:
                triples = zip(*(p for key, values in zip(keys, columns[1:]) for p in (repeat(key), times, values)))
                commands.append(["TS.MADD", *chain.from_iterable(triples)])
            else:
                commands.append(pack_madd(keys, times, columns[1:], encoded_times))
        return commands

    def check_replies(
        self, items: Mapping[SeriesKey, Columns], commands: Sequence[Sequence[Any]], replies: Sequence[Any]
    ) -> list[SeriesKey]:
        written = iter([key for key, columns in items.items() if columns.open_time])
        missing: set[SeriesKey] = set()
        done: set[SeriesKey] = set()
        for command, reply in zip(commands, replies):
            if command[0] == "TS.MADD":
                series = next(written)
                done.add(series)
                for sample in reply if isinstance(reply, list) else [reply]:
                    if isinstance(sample, Exception) and _missing_series_error(sample):
                        missing.add(series)
                    elif isinstance(sample, Exception) and not _ignorable_ts_error(sample):
                        raise sample  # per-sample "older than retention" has nothing to keep
            elif isinstance(reply, Exception) and not _ignorable_ts_error(reply):
                raise reply
        self.created.update(done - missing)
        self.created -= missing
        return sorted(missing)

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
        await write_columns_checked(self, items)

    def write_commands(self, items: Mapping[SeriesKey, Columns]) -> list[list[Any]]:
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
        return commands

    def check_replies(
        self, items: Mapping[SeriesKey, Columns], commands: Sequence[Sequence[Any]], replies: Sequence[Any]
    ) -> list[SeriesKey]:
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return []

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


async def write_columns_checked(store: CandleStore, items: Mapping[SeriesKey, Columns]) -> None:
    """Write, and write again once what the server lost (the store recreates it)."""
    commands = store.write_commands(items)
    if not commands:
        return
    again = store.check_replies(items, commands, await execute_packed(store.redis, commands))
    if again:
        retry = {key: items[key] for key in again}
        commands = store.write_commands(retry)
        if store.check_replies(retry, commands, await execute_packed(store.redis, commands)):
            raise RuntimeError(f"candle series still missing after their creation: {again[:3]}")


def make_candle_store(redis: Redis, use_timeseries: bool, bars_kept: int) -> CandleStore:
    if use_timeseries:
        return TimeSeriesCandleStore(redis, bars_kept)
    return SortedSetCandleStore(redis, bars_kept)
