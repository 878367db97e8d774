"""Building M5 to D1 buckets from the parts memory or PostgreSQL holds: the I/O beside
the pure rules of aggregation.py, shared by the candle intake and the archive import."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence

import asyncpg

import core_io
from aggregation import LEVEL, SOURCE_TF, aggregate, bucket_parts, buildable
from candles import TF_MS, Candle


async def build_buckets(
    pool: asyncpg.Pool,
    buckets: set[tuple[str, str, int]],
    remembered: Callable[[str, str, int], Candle | None] = lambda symbol, tf, open_time: None,
) -> list[Candle]:
    """The buckets whose parts are all stored (or made only of unfillable minutes), lower
    timeframes first, so that an H1 is built from the M15 built in the same call: from
    what `remembered` (symbol, tf, open time → candle) holds where it has all of a
    bucket's parts, the others from PostgreSQL."""
    built: dict[tuple[str, str, int], Candle] = {}
    for level in sorted({LEVEL[tf] for _, tf, _ in buckets}):
        rest: list[tuple[str, str, int]] = []
        for key in sorted(k for k in buckets if LEVEL[k[1]] == level):
            symbol, tf, start = key
            source = SOURCE_TF[tf]
            members = [built.get((symbol, source, t)) or remembered(symbol, source, t) for t in bucket_parts(tf, start)]
            if all(members):
                built[key] = aggregate(tf, start, members)  # type: ignore[arg-type]
            else:
                rest.append(key)
        for key, candle in (await _build_stored(pool, rest, built)).items():
            built[key] = candle
    return list(built.values())


async def _build_stored(
    pool: asyncpg.Pool, keys: Sequence[tuple[str, str, int]], built: dict[tuple[str, str, int], Candle]
) -> dict[tuple[str, str, int], Candle]:
    """Buckets of one level from the parts PostgreSQL holds (those built in this call
    first): a range per symbol for contiguous buckets, one query per source timeframe."""
    if not keys:
        return {}
    ranges: list[tuple[str, int, int]] = []
    for symbol, tf, start in sorted(keys, key=lambda k: (k[0], k[2])):
        end = start + TF_MS[tf]
        if ranges and ranges[-1][0] == symbol and ranges[-1][2] >= start:  # contiguous or nested: one range
            ranges[-1] = (symbol, ranges[-1][1], max(ranges[-1][2], end))
        else:
            ranges.append((symbol, start, end))
    stored: dict[tuple[str, str, int], Candle] = {}
    for source in {SOURCE_TF[tf] for _, tf, _ in keys}:
        for candles in (await core_io.fetch_candle_ranges(pool, source, ranges)).values():
            stored.update(((c.symbol, source, c.open_time), c) for c in candles)
    stored.update(built)
    lost: dict[str, set[int]] = defaultdict(set)
    for symbol, t in await core_io.fetch_unfillable_m1(pool, ranges):
        lost[symbol].add(t)
    out: dict[tuple[str, str, int], Candle] = {}
    for symbol, tf, start in keys:
        source = SOURCE_TF[tf]
        members = [c for t in bucket_parts(tf, start) if (c := stored.get((symbol, source, t))) is not None]
        if buildable(tf, start, {c.open_time for c in members}, lost.get(symbol, set())):
            out[(symbol, tf, start)] = aggregate(tf, start, members)
    return out
