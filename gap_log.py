"""The M1 gap log (`missing_m1_log_v4`): minutes found missing, and what became of them
('missing', 'backfilled', 'unfillable'). Re-exported by core_io, the one place the rest
of the code calls."""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from candles import datetime_to_ms, key_arrays, range_arrays


async def log_missing_m1(pool: asyncpg.Pool, minutes: Sequence[tuple[str, int]]) -> int:
    """Record missing minutes (not those already stored or already logged)."""
    if not minutes:
        return 0
    result = await pool.execute(
        "INSERT INTO missing_m1_log_v4 (symbol, open_time) "
        "SELECT g.symbol, g.open_time FROM unnest($1::text[], $2::timestamptz[]) AS g(symbol, open_time) "
        "WHERE NOT EXISTS (SELECT 1 FROM ohlcv4_m1 m WHERE m.symbol = g.symbol AND m.open_time = g.open_time) "
        "ON CONFLICT (symbol, open_time) DO NOTHING",
        *key_arrays(minutes),
    )
    return int(result.split()[-1])


async def set_missing_status(pool: asyncpg.Pool, minutes: Sequence[tuple[str, int]], status: str) -> None:
    """Move logged minutes to 'backfilled' or 'unfillable' (a stored candle always wins)."""
    if not minutes:
        return
    await pool.execute(
        "UPDATE missing_m1_log_v4 g SET status = $3, fixed_at = CASE WHEN $3 = 'backfilled' THEN now() END, "
        "attempts = attempts + CASE WHEN $3 = 'unfillable' THEN 1 ELSE 0 END "
        "FROM unnest($1::text[], $2::timestamptz[]) AS u(symbol, open_time) "
        "WHERE g.symbol = u.symbol AND g.open_time = u.open_time AND g.status <> 'backfilled' AND g.status <> $3",
        *key_arrays(minutes),
        status,
    )


async def fetch_missing_m1(pool: asyncpg.Pool, symbols: Sequence[str], per_symbol: int = 3000) -> list[tuple[str, int]]:
    """The oldest 'missing' minutes of each of these symbols, at most `per_symbol`
    each: one symbol's backlog never crowds out the others'."""
    rows = await pool.fetch(
        "SELECT s.symbol, g.open_time FROM unnest($1::text[]) AS s(symbol) "
        "CROSS JOIN LATERAL (SELECT open_time FROM missing_m1_log_v4 m "
        "WHERE m.symbol = s.symbol AND m.status = 'missing' ORDER BY m.open_time LIMIT $2) g",
        list(symbols),
        per_symbol,
    )
    return [(r["symbol"], datetime_to_ms(r["open_time"])) for r in rows]


async def close_missing_m1(pool: asyncpg.Pool, symbols: Sequence[str]) -> None:
    """Every 'missing' minute of these symbols becomes 'unfillable': they are not
    followed (not listed, a bad name), so nothing will fill them."""
    await pool.execute(
        "UPDATE missing_m1_log_v4 SET status = 'unfillable' WHERE status = 'missing' AND symbol = ANY($1::text[])",
        list(symbols),
    )


async def fetch_unfillable_m1(pool: asyncpg.Pool, ranges: Sequence[tuple[str, int, int]]) -> set[tuple[str, int]]:
    if not ranges:
        return set()
    rows = await pool.fetch(
        "SELECT DISTINCT g.symbol, g.open_time "
        "FROM unnest($1::text[], $2::timestamptz[], $3::timestamptz[]) AS r(symbol, start_at, end_at) "
        "JOIN missing_m1_log_v4 g ON g.symbol = r.symbol AND g.open_time >= r.start_at AND g.open_time < r.end_at "
        "WHERE g.status = 'unfillable'",
        *range_arrays(ranges),
    )
    return {(r["symbol"], datetime_to_ms(r["open_time"])) for r in rows}
