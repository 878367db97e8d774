"""Order flow and footprints rebuilt from stored raw trades (`agg_trades4`, filled by an
aggTrades import), for whole UTC days: the same fold, kline check, row rule and chain as
the live path, so a day rebuilt equals the day followed live (tested).

Per day: its M1 row size is the one stored in `orderflow_rows4` or, if none, decided by
the rule from the day before's stored candles (its first trade's price without them) and
stored; the trades are read in `agg_id` order a chunk at a time; each minute is folded
and checked against its stored kline (volume, taker buy volume, trade count): a minute
that disagrees, or has no kline, is not written (it is unfillable for this import) and
counted. The chain resumes from the newest stored bar before the first day (its CVD goes
on), publishes M1 bars and the M5/M15 they complete, which are written a thousand a
statement; open or unfillable gaps of the rebuilt minutes become 'filled'. Bars stored
after the rebuilt days keep their CVD (a running sum from where their own chain began).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg
from redis.asyncio import Redis

import core_io
from candles import DAY_MS, ms_to_datetime
from orderflow import store
from orderflow.chain import HIGHER, SymbolChain
from orderflow.fold import AggTrade, fold
from orderflow.output import CvdChain, FinalBar
from orderflow.profile import ImbalanceRules
from orderflow.rows import first_price_row
from orderflow.tape import KlineCheck, verify

M1_MS = 60_000
READ_CHUNK = 200_000
WRITE_CHUNK = 1_000

_TRADES_SQL = (
    "SELECT agg_id, price_units, qty_units, first_id, last_id, "
    "(extract(epoch FROM ts) * 1000)::int8 AS t, buyer_maker FROM agg_trades4 "
    "WHERE symbol = $1 AND ts >= $2 AND ts < $3 AND agg_id > $4 ORDER BY agg_id LIMIT $5"
)
_FILLED_SQL = (
    "UPDATE trade_gaps_v4 SET status = 'filled', reason = 'rebuilt from the archive''s aggTrades', "
    "attempts = attempts + 1, resolved_at = now() "
    "WHERE symbol = $1 AND open_time = ANY($2::timestamptz[]) AND status <> 'filled'"
)


@dataclass
class Rebuilt:
    bars: int = 0  # written, every timeframe
    minutes: int = 0  # M1 bars written
    refused: int = 0  # minutes whose trades disagree with their kline, or have none
    gaps_filled: int = 0


async def day_row_size(pool: asyncpg.Pool, symbol: str, day: int, first_price: int | None) -> int:
    """The day's M1 row as the live path decides it (store.plan_day_rows), else by the
    day's first price (then stored; the first decision wins)."""
    planned = await store.plan_day_rows(pool, day, [symbol], lambda _: None)
    if symbol in planned:
        return planned[symbol]
    return (await store.decide_row_sizes(pool, day, {symbol: first_price_row(first_price, None)}))[symbol]


async def read_trades(pool: asyncpg.Pool, symbol: str, start: int, end: int) -> list[AggTrade]:
    """The stored trades of [start, end) in agg_id order."""
    trades: list[AggTrade] = []
    after = -1
    while True:
        rows = await pool.fetch(_TRADES_SQL, symbol, ms_to_datetime(start), ms_to_datetime(end), after, READ_CHUNK)
        trades += [AggTrade(r[0], r[1], r[2], r[3], r[4], r[5], r[6]) for r in rows]
        if len(rows) < READ_CHUNK:
            return trades
        after = rows[-1][0]


async def resumed_chain(pool: asyncpg.Pool, symbol: str, first: int, rules: ImbalanceRules) -> SymbolChain:
    """A chain starting at `first` (a day's start) whose CVD goes on from the stored bars before."""
    chain = SymbolChain(symbol, rules)
    cvd: dict[str, CvdChain] = {}
    for tf in ("m1", *HIGHER):
        record = await pool.fetchrow(
            "SELECT open_time, cvd, cvd_day FROM orderflow4 WHERE symbol = $1 AND tf = $2 AND open_time < $3 "
            "ORDER BY open_time DESC LIMIT 1",
            symbol,
            tf,
            ms_to_datetime(first),
        )
        cvd[tf] = CvdChain.after(record)
    chain.resume(first, cvd, {tf: [] for tf in HIGHER})
    return chain


async def rebuild_days(
    pool: asyncpg.Pool, redis: Redis, symbol: str, days: Sequence[int], maxlen: int, rules: ImbalanceRules | None = None
) -> Rebuilt:
    """Order flow of these whole days (their starts, ms, ascending and contiguous)."""
    out = Rebuilt()
    if not days:
        return out
    rules = rules or ImbalanceRules()
    chain = await resumed_chain(pool, symbol, days[0], rules)
    pending: list[FinalBar] = []
    filled: list[int] = []
    for day in days:
        candles = {
            c.open_time: c
            for c in (await core_io.fetch_candle_ranges(pool, "m1", [(symbol, day, day + DAY_MS)])).get(symbol, [])
        }
        trades = await read_trades(pool, symbol, day, day + DAY_MS)
        row = await day_row_size(pool, symbol, day, trades[0].price if trades else None)
        by_minute: dict[int, list[AggTrade]] = {}
        for trade in trades:
            by_minute.setdefault(trade.time_ms - trade.time_ms % M1_MS, []).append(trade)
        for minute in range(day, day + DAY_MS, M1_MS):
            candle = candles.get(minute)
            bar = fold(minute, row, by_minute.get(minute, ()))
            if candle is None or verify(bar, KlineCheck.of(candle)):
                out.refused += 1
                pending += chain.offer(minute, None)
                continue
            pending += chain.offer(minute, bar)
            filled.append(minute)
            if len(pending) >= WRITE_CHUNK:
                out.bars += await _write(pool, pending)
                pending = []
    out.bars += await _write(pool, pending)
    out.minutes = len(filled)
    status = await pool.execute(_FILLED_SQL, symbol, [ms_to_datetime(m) for m in filled])
    out.gaps_filled = int(status.split()[-1])
    await _announce(redis, symbol, days[0], maxlen)
    return out


async def _write(pool: asyncpg.Pool, bars: list[FinalBar]) -> int:
    await store.upsert_bars(pool, bars)
    return len(bars)


async def _announce(redis: Redis, symbol: str, first: int, maxlen: int) -> None:
    """One `orderflow_ready` event per timeframe for the oldest rebuilt bar, with
    `history=1` (a month is 43,200 minutes a symbol: more than a stream keeps)."""
    commands = [
        core_io.xadd_command(
            store.ORDERFLOW_READY_STREAM, {"symbol": symbol, "tf": tf, "open_time": str(first), "history": "1"}, maxlen
        )
        for tf in ("m1", *HIGHER)
    ]
    await core_io.execute_checked(redis, commands)
