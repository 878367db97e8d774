"""Building M5 to D1 buckets from the parts memory or PostgreSQL holds: the I/O beside
the pure rules of aggregation.py, shared by the candle intake and the archive import."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence

import asyncpg

import core_io
from aggregation import LEVEL, SOURCE_TF, aggregate, bucket_parts, buildable
from candles import TF_MS, Candle, ms_to_datetime

Bucket = tuple[str, str, int]  # (symbol, tf, open time)
# A bucket's parts if memory holds them all, given the buckets built so far in this call.
InMemory = Callable[[Bucket, dict[Bucket, Candle]], Sequence[Candle] | None]


async def build_buckets(pool: asyncpg.Pool, buckets: set[Bucket], in_memory: InMemory) -> list[Candle]:
    """The buckets whose parts are all stored (or made only of unfillable minutes), lower
    timeframes first, so that an H1 is built from the M15 built in the same call: from
    the parts `in_memory` gives, the others from PostgreSQL."""
    built: dict[Bucket, Candle] = {}
    for level in sorted({LEVEL[tf] for _, tf, _ in buckets}):
        rest: list[Bucket] = []
        for key in sorted(k for k in buckets if LEVEL[k[1]] == level):
            members = in_memory(key, built)
            if members is None:
                rest.append(key)
            else:
                built[key] = aggregate(key[1], key[2], members)
        for key, candle in (await _build_stored(pool, rest, built)).items():
            built[key] = candle
    return list(built.values())


async def missing_buckets(
    pool: asyncpg.Pool, timeframes: Sequence[str], symbols: Sequence[str], since_ms: int
) -> set[Bucket]:
    """The buckets, from `since_ms` on, that have stored minutes and no row: one
    anti-join per timeframe, a probe per bucket (the minutes grouped first)."""
    found: set[Bucket] = set()
    for tf in timeframes:
        rows = await pool.fetch(
            "SELECT m.symbol, m.n FROM (SELECT symbol, floor(extract(epoch FROM open_time) / $3)::bigint AS n "
            f"FROM {core_io.candle_table('m1')} WHERE symbol = ANY($1) AND open_time >= $2 GROUP BY 1, 2) m "
            f"WHERE NOT EXISTS (SELECT 1 FROM {core_io.candle_table(tf)} b "
            "WHERE b.symbol = m.symbol AND b.open_time = to_timestamp(m.n * $3))",
            list(symbols),
            ms_to_datetime(since_ms),
            TF_MS[tf] // 1000,
        )
        found |= {(r["symbol"], tf, r["n"] * TF_MS[tf]) for r in rows}
    return found


async def _build_stored(
    pool: asyncpg.Pool, keys: Sequence[Bucket], built: dict[Bucket, Candle]
) -> dict[Bucket, Candle]:
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
    stored: dict[Bucket, Candle] = {}
    for source in {SOURCE_TF[tf] for _, tf, _ in keys}:
        for candles in (await core_io.fetch_candle_ranges(pool, source, ranges)).values():
            stored.update(((c.symbol, source, c.open_time), c) for c in candles)
    stored.update(built)
    lost: dict[str, set[int]] = defaultdict(set)
    for symbol, t in await core_io.fetch_unfillable_m1(pool, ranges):
        lost[symbol].add(t)
    out: dict[Bucket, Candle] = {}
    for symbol, tf, start in keys:
        source = SOURCE_TF[tf]
        members = [c for t in bucket_parts(tf, start) if (c := stored.get((symbol, source, t))) is not None]
        if buildable(tf, start, {c.open_time for c in members}, lost.get(symbol, set())):
            out[(symbol, tf, start)] = aggregate(tf, start, members)
    return out
