"""The latest indicator values in Redis: one hash per series, `indicator:<SYMBOL>:<tf>`.

`open_time` says which bar every other field belongs to; an output without a value on
that bar is absent (never an empty string), so a consumer's float() never fails and no
field of an older bar survives under a newer open time.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from core_io import IndicatorValue, execute_packed, indicator_key

# Only a newer (or the same) bar may replace the values of a hash.
# ARGV: open time, replace ("1": a same bar is rebuilt too, "0": only an older one), the
# count n of names without a value, those n names (deleted), then name, value pairs.
# Replacing deletes the hash first, so no field of an older bar survives under the new
# open time. The names and pairs go in chunks: Lua's unpack() fails beyond a few
# thousand values (LUAI_MAXCSTACK).
SET_LATEST_LUA = """
local stored = redis.call('HGET', KEYS[1], 'open_time')
local t = tonumber(ARGV[1])
if stored and tonumber(stored) > t then return 0 end
if stored and (tonumber(stored) < t or ARGV[2] == '1') then redis.call('DEL', KEYS[1]) end
local last_gone = 3 + tonumber(ARGV[3])
for i = 4, last_gone, 1000 do
    redis.call('HDEL', KEYS[1], unpack(ARGV, i, math.min(i + 999, last_gone)))
end
redis.call('HSET', KEYS[1], 'open_time', ARGV[1])
for i = last_gone + 1, #ARGV, 1000 do
    redis.call('HSET', KEYS[1], unpack(ARGV, i, math.min(i + 999, #ARGV)))
end
return 1
"""


def float_texts(values: Sequence[float]) -> list[bytes]:
    """Each float as the shortest decimal that reads back as it (b"" for NaN or inf: no
    value), all at once: orjson's Ryu formats 42,000 floats in ~4 ms where repr() takes ~35."""
    texts = orjson.dumps(values, option=orjson.OPT_SERIALIZE_NUMPY)[1:-1].split(b",") if values else []
    return [b"" if text == b"null" else text for text in texts]


def format_value(value: float | str | bytes | None) -> str | bytes:
    """A hash field's text: the float's repr, or empty when there is no value (None, NaN,
    an infinity). Text already formatted (float_texts) passes through."""
    if isinstance(value, (str, bytes)):
        return value
    if value is None or not math.isfinite(value):
        return ""
    return repr(float(value))


def latest_hash_commands(
    symbol: str, tf: str, open_time: int, names: Sequence[str], texts: Sequence[bytes | str], gone: Iterable[str] = ()
) -> list[list[Any]]:
    """Plain commands writing one series' newest bar (the indicator worker's, which only
    ever writes a series' newest bar): HDEL of the outputs without a value on it (and
    of `gone`: outputs no longer configured), then HSET of open_time and the others.
    The delete goes first: a reader in between sees fewer values of the older bar, never
    an older bar's value under the newer open time."""
    key = indicator_key(symbol, tf)
    pairs: list[Any] = ["open_time", open_time]
    empty: list[str] = list(gone)
    for name, text in zip(names, texts):
        if text:
            pairs += (name, text)
        else:
            empty.append(name)
    hset = ["HSET", key, *pairs]
    return [["HDEL", key, *empty], hset] if empty else [hset]


LatestValues = tuple[str, str, int, Iterable[tuple[str, Any]]]  # symbol, tf, open time, (name, value)s


class IndicatorCache:
    """The `indicator:<SYMBOL>:<tf>` hashes holding each series' latest values."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._sha: str | None = None

    async def write(
        self, latest: Iterable[LatestValues], then: Sequence[list[Any]] = (), replace_same_bar: bool = False
    ) -> None:
        """The hash writes, then `then` (e.g. announcements and acks), in one packed round.

        Each write is refused for a bar older than the hash's; for a newer bar the hash
        is rebuilt (no field of the older bar survives), for the same bar the values are
        merged, or the hash rebuilt with `replace_same_bar` (restore: PostgreSQL's newest
        bar, whole). Values without a value (None, NaN, inf, empty text) are deleted.
        A script flushed away by a Redis restart (NOSCRIPT) is loaded again and the hash
        writes are re-sent; any other error is raised.
        """
        if self._sha is None:
            self._sha = await self.redis.script_load(SET_LATEST_LUA)
        writes = []
        replace = "1" if replace_same_bar else "0"
        for symbol, tf, open_time, items in latest:
            empty: list[str] = []
            pairs: list[Any] = []
            for name, value in items:
                text = format_value(value)
                if text:
                    pairs += (name, text)
                else:
                    empty.append(name)
            writes.append(
                ["EVALSHA", self._sha, 1, indicator_key(symbol, tf), open_time, replace, len(empty), *empty, *pairs]
            )
        if not writes and not then:
            return
        replies = await execute_packed(self.redis, [*writes, *then])
        if any(isinstance(r, ResponseError) and "NOSCRIPT" in str(r) for r in replies[: len(writes)]):
            self._sha = await self.redis.script_load(SET_LATEST_LUA)
            replies = [
                *await execute_packed(self.redis, [[w[0], self._sha, *w[2:]] for w in writes]),
                *replies[len(writes) :],
            ]
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply

    async def set_latest(self, values: Iterable[IndicatorValue]) -> None:
        """Restore: each series' hash becomes the newest bar PostgreSQL has values for
        (the outputs without a row on that bar absent), unless Redis holds a newer bar."""
        newest: dict[tuple[str, str], int] = {}
        grouped: dict[tuple[str, str, int], list[tuple[str, float | None]]] = defaultdict(list)
        for v in values:
            grouped[(v.symbol, v.tf, v.open_time)].append((v.name, v.value))
            newest[(v.symbol, v.tf)] = max(v.open_time, newest.get((v.symbol, v.tf), v.open_time))
        await self.write(
            ((symbol, tf, t, items) for (symbol, tf, t), items in grouped.items() if newest[(symbol, tf)] == t),
            replace_same_bar=True,
        )

    async def get_latest(self, symbol: str, tf: str) -> dict[str, str]:
        return await self.redis.hgetall(indicator_key(symbol, tf))
