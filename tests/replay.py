"""Replaying real market data through the daemon: its settings, waits and the exact
checks of what it stored against the exchange's archive (shared by the end-to-end tests)."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import defaultdict
from collections.abc import Callable

from daemon import DaemonProcess

import core_io
from aggregation import aggregate
from candles import ALL_TIMEFRAMES, BASE_TIMEFRAMES, TF_MS, Candle, datetime_to_ms, ms_to_datetime
from fake_exchange import ArchiveSource, FakeExchange

M1 = 60_000
START = 1_770_163_200_000  # 2026-02-04 00:00 UTC
HISTORY_M1 = 300
SYMBOLS = ["ALGOUSDT", "AVAXUSDT", "DOTUSDT", "FILUSDT", "LINKUSDT", "LTCUSDT", "NEARUSDT"]


def daemon_env(exchange: FakeExchange, redis_url: str, pg_url: str, symbols: list[str]) -> dict[str, str]:
    return {
        "REDIS_URL": redis_url,
        "POSTGRES_URL": pg_url,
        "BINANCE_WS_URL": exchange.ws_url,
        "BINANCE_REST_URL": exchange.rest_url,
        "SYMBOLS": ",".join(symbols),
        "INITIAL_HISTORY_M1": str(HISTORY_M1),
        "WS_SILENCE_S": "2",
        "WS_FIRST_DATA_TIMEOUT_S": "3",
        "WS_BACKOFF_MAX_S": "1",
        "TICKER_REFRESH_S": "0.3",
        "BOOT_WAIT_S": "10",
        "TIMEFRAMES": ",".join(ALL_TIMEFRAMES),  # every replay checks H1/H4/D1 too
    }


async def timeframes_in_use(pool) -> tuple[str, ...]:
    """M1/M5/M15, and each higher timeframe with rows: the replayed daemons build them
    all (daemon_env), a feed run inside the tests' process the configured ones."""
    higher = ALL_TIMEFRAMES[len(BASE_TIMEFRAMES) :]
    found = await pool.fetch(
        " UNION ALL ".join(
            f"SELECT '{tf}' AS tf WHERE EXISTS (SELECT FROM {core_io.candle_table(tf)})" for tf in higher
        )
    )
    built = {r["tf"] for r in found}
    return (*BASE_TIMEFRAMES, *(tf for tf in higher if tf in built))


async def until(predicate: Callable, timeout: float, what: str, interval: float = 0.25) -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(interval)


async def until_sim(exchange: FakeExchange, sim_ms: int, daemon: DaemonProcess | None = None) -> None:
    while exchange.clock.now_ms() < sim_ms:
        if daemon is not None:
            assert daemon.alive(), daemon.output()[-3000:]
        await asyncio.sleep(0.05)


def archive_m1(source: ArchiveSource, symbol: str, first: int, last: int) -> list[Candle]:
    return [c for t in range(first, last + M1, M1) if (c := source.candle(symbol, t)) is not None]


async def complete(pool, symbols: list[str], last_closed: int, redis=None) -> bool:
    """Every symbol stored to `last_closed` with no open gap and, given `redis`, every
    newest stored bar in the Redis candle caches too (they are published after the
    write, by their own worker, so they trail PostgreSQL by a moment)."""
    rows = await pool.fetch(
        "SELECT symbol, count(*) AS n, min(open_time) AS first, max(open_time) AS last FROM ohlcv4_m1 GROUP BY symbol"
    )
    done = {r["symbol"]: r for r in rows}
    if any(s not in done or datetime_to_ms(done[s]["last"]) < last_closed for s in symbols):
        return False
    open_gaps = await pool.fetchval("SELECT count(*) FROM missing_m1_log_v4 WHERE status = 'missing'")
    if open_gaps or not await buckets_built(pool, symbols, last_closed):
        return False
    return redis is None or await caches_caught_up(pool, redis, symbols)


async def buckets_built(pool, symbols: list[str], last_closed: int) -> bool:
    """Every bucket that `last_closed` completes is stored: they are built by the
    aggregator a moment after their last minute (later still when it came by backfill),
    and the caches' check alone passes while the newest bucket is still being built."""
    for tf in (await timeframes_in_use(pool))[1:]:
        newest_complete = (last_closed + M1) // TF_MS[tf] * TF_MS[tf] - TF_MS[tf]
        rows = await pool.fetch(
            f"SELECT symbol, max(open_time) AS last FROM {core_io.candle_table(tf)} WHERE symbol = ANY($1) GROUP BY 1",
            symbols,
        )
        built = {r["symbol"]: datetime_to_ms(r["last"]) for r in rows}
        if any(built.get(s, -1) < newest_complete for s in symbols):
            return False
    return True


async def caches_caught_up(pool, redis, symbols: list[str]) -> bool:
    timeframes = await timeframes_in_use(pool)
    keys = [(symbol, tf) for symbol in symbols for tf in timeframes]
    cached = await core_io.TimeSeriesCandleStore(redis, 250).read_last_many(keys, 1)
    for tf in timeframes:
        rows = await pool.fetch(
            f"SELECT symbol, max(open_time) AS last FROM {core_io.candle_table(tf)} WHERE symbol = ANY($1) GROUP BY 1",
            symbols,
        )
        for r in rows:
            newest = cached[(r["symbol"], tf)]
            if not newest or newest[-1].open_time != datetime_to_ms(r["last"]):
                return False
    return True


async def diagnose(pool, daemon: DaemonProcess, last_closed: int) -> str:
    rows = await pool.fetch("SELECT symbol, count(*), min(open_time), max(open_time) FROM ohlcv4_m1 GROUP BY 1")
    gaps = await pool.fetch("SELECT status, count(*), min(open_time), max(open_time) FROM missing_m1_log_v4 GROUP BY 1")
    logs = await pool.fetch(
        "SELECT level, module, message FROM system_log_v4 WHERE level <> 'INFO' ORDER BY id DESC LIMIT 15"
    )
    return "\n".join(
        [f"last_closed={last_closed}", *map(str, rows), *map(str, gaps), *map(str, logs), daemon.output()[-4000:]]
    )


def expected_candles(
    source: ArchiveSource, symbol: str, first: int, last_closed: int, timeframes=BASE_TIMEFRAMES
) -> dict[str, list[Candle]]:
    """What the archive says every timeframe must hold from `first` to `last_closed`
    (each bucket straight from its minutes, not through the lower timeframes)."""
    m1 = archive_m1(source, symbol, first, last_closed)
    by_time = {c.open_time: c for c in m1}
    result = {"m1": m1}
    for tf in timeframes[1:]:
        size = TF_MS[tf]
        result[tf] = [
            aggregate(tf, bucket, [by_time[t] for t in range(bucket, bucket + size, M1) if t in by_time])
            for bucket in range(-(-first // size) * size, last_closed + M1 - size + 1, size)
        ]
    return result


async def candle_mismatches(
    pool, redis, source: ArchiveSource, symbols: list[str], last_closed: int
) -> tuple[int, int, list[tuple]]:
    """(candles expected, candles stored, every difference): each row of every timeframe
    in use from a symbol's first M1 to `last_closed` against the archive, with no hole,
    and the Redis candle caches against PostgreSQL."""
    expected_total = stored_total = 0
    wrong: list[tuple] = []
    caches = core_io.TimeSeriesCandleStore(redis, 250)
    timeframes = await timeframes_in_use(pool)
    for symbol in symbols:
        first = datetime_to_ms(await pool.fetchval("SELECT min(open_time) FROM ohlcv4_m1 WHERE symbol = $1", symbol))
        for tf, expected in expected_candles(source, symbol, first, last_closed, timeframes).items():
            stored = await core_io.fetch_candles(pool, symbol, tf, first, last_closed + M1)
            stored = [c for c in stored if c.open_time + TF_MS[tf] <= last_closed + M1]
            expected_total += len(expected)
            stored_total += len(stored)
            want = {c.open_time: c for c in expected}
            got = {c.open_time: c for c in stored}
            wrong += [(symbol, tf, t, "missing") for t in want.keys() - got.keys()]
            wrong += [(symbol, tf, t, "extra") for t in got.keys() - want.keys()]
            wrong += [(symbol, tf, t, "differs") for t in want.keys() & got.keys() if want[t] != got[t]]
            if tf == "m1" and len(expected) != (last_closed - first) // M1 + 1:
                wrong.append((symbol, tf, "holes in the archive's window"))
            # The cache against every stored bar, not those up to `last_closed`: symbols
            # stopped by a SIGTERM mid-burst may each hold a minute more than the slowest.
            cached = (await caches.read_last_many([(symbol, tf)], 250))[(symbol, tf)]
            newest = await core_io.fetch_candles(pool, symbol, tf, first, core_io.FAR_FUTURE_MS)
            wanted = [c.to_bar() for c in newest[-250:]]
            if cached != wanted:
                first_diff = next(
                    (pair for pair in itertools.zip_longest(cached, wanted) if pair[0] != pair[1]), (None, None)
                )
                wrong.append(
                    (
                        symbol,
                        tf,
                        f"Redis candle cache differs from PostgreSQL: {len(cached)} bars cached, "
                        f"first difference cached {first_diff[0]} / stored {first_diff[1]}",
                    )
                )
    return expected_total, stored_total, wrong


async def unannounced(pool, redis, since_ms: int = 0) -> list[tuple]:
    """Stored candles (opened at or after `since_ms`) missing from their stream."""
    wrong: list[tuple] = []
    for tf in ALL_TIMEFRAMES:
        stream = core_io.candle_stream(tf)
        announced = defaultdict(set)
        for _, fields in await redis.xrange(stream):
            announced[fields["symbol"]].add(int(fields["open_time"]))
        rows = await pool.fetch(
            f"SELECT symbol, open_time FROM {core_io.candle_table(tf)} WHERE open_time >= $1", ms_to_datetime(since_ms)
        )
        for r in rows:
            if datetime_to_ms(r["open_time"]) not in announced[r["symbol"]]:
                wrong.append((r["symbol"], tf, r["open_time"], "not announced"))
    return wrong


async def assert_store_matches_source(pool, redis, source, symbols: list[str], last_closed: int) -> int:
    """Every stored candle equals the exchange's archive; M5/M15 equal their M1s exactly."""
    expected, stored, wrong = await candle_mismatches(pool, redis, source, symbols, last_closed)
    assert not wrong, f"{len(wrong)} candles differ from the archive, e.g. {sorted(map(str, wrong))[:10]}"
    assert stored == expected
    return stored


async def assert_every_candle_announced(pool, redis) -> None:
    wrong = await unannounced(pool, redis)
    assert not wrong, f"{len(wrong)} not announced, e.g. {wrong[:10]}"


async def pause_mid_minute(exchange: FakeExchange) -> int:
    """Pause the exchange 21-50 s into a minute and return the newest closed minute.

    Every close of that minute is out by then (they go out at most 2 s after it), and
    the kline updates 19.3 s in have carried the event time past its end plus the gap
    grace, so a close held back by a fault is already a detected gap. Pausing at a random instant could freeze the clock
    between a minute's end and its close: never sent, never overdue.
    """
    while not 21_000 <= exchange.clock.now_ms() % M1 <= 50_000:
        await asyncio.sleep(0.002)
    exchange.clock.pause()
    return (exchange.clock.now_ms() - M1) // M1 * M1


async def flow_settled(pool, symbols: list[str], last_closed: int) -> bool:
    return not await flow_unsettled(pool, symbols, last_closed)


async def flow_unsettled(pool, symbols: list[str], last_closed: int) -> list[str]:
    """What is not yet there: candles, order flow and the indicators of every timeframe
    up to `last_closed`, no open trade gap."""
    for table in ("ohlcv4_m1", "orderflow4"):
        newest = dict(await pool.fetch(f"SELECT symbol, max(open_time) FROM {table} GROUP BY symbol"))
        behind = [s for s in symbols if s not in newest or datetime_to_ms(newest[s]) < last_closed]
        if behind:
            return [f"{table}: {len(behind)} symbols behind, e.g. {behind[:3]}"]
    gaps = await pool.fetch("SELECT symbol, open_time, reason FROM trade_gaps_v4 WHERE status = 'open' LIMIT 5")
    if gaps:
        return [f"open trade gaps, e.g. {[tuple(g) for g in gaps]}"]
    computed = {
        (r["timeframe"], r["symbol"]): r["last"]
        for r in await pool.fetch(
            "SELECT i.timeframe, v.symbol, max(v.open_time) AS last FROM indicator_values_v4 v "
            "JOIN indicator_instances_v4 i ON i.id = v.instance_id GROUP BY 1, 2"
        )
    }
    for tf in ("m1", "m5", "m15"):
        stored = dict(await pool.fetch(f"SELECT symbol, max(open_time) FROM ohlcv4_{tf} GROUP BY 1"))
        behind = [s for s in symbols if computed.get((tf, s)) != stored.get(s)]
        if behind:
            return [f"{tf} indicators: {len(behind)} symbols behind, e.g. {behind[:3]}"]
    return []
