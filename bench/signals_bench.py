"""Signal router throughput and latency, end to end (budget: >= 2000 signals/s, 20 strategies).

A private Redis and a scratch database; 50 tickers, 20 strategies (every fifth with
allow_open = false), five phrases (one per action) each mapped to all 20 strategies,
so every signal fans out to 20 strategies: 16-20 deliveries and 20 log entries.

burst:  20,000 signals XADDed as fast as possible while the router runs; the figure is
        signals / (first XADD -> last entry logged, delivered and acknowledged).
paced:  1,000 signals/s for 5 s; latency of each signal from its XADD to its delivery
        (both stamped by the Redis clock: the two stream entry ids).
sparse: 200 signals one at a time, 20 ms apart (the router idle in between): the same
        latency, i.e. how fast a waiting router wakes up.
idle:   CPU of the router's process and of Redis over 10 s with nothing to route.
sparse and idle run twice: woken by write notifications (CLIENT TRACKING, the default)
and polling every SIGNAL_POLL_MS (what a server without notifications gets).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import core_io
import signals_io
from infra import load_settings, make_redis
from migrations import apply_migrations
from signals_v4_main import RouterOptions, SignalRouter
from tests.servers import RedisServer, recreate_database, setting

STRATEGIES = 20
TICKERS = 50
BURST = 20_000
PACED_RATE = 1000
PACED_SECONDS = 5
SPARSE = 200
SPARSE_GAP_S = 0.02
IDLE_S = 10.0
PHRASES = [
    ("Buy", "open_long"),
    ("Sell", "open_short"),
    ("Close long", "close_long"),
    ("Close short", "close_short"),
    ("Flat", "close"),
]
BAR0 = 1_769_904_000_000
BUDGET = 2000


async def seed(pool: asyncpg.Pool) -> list[str]:
    symbols = [f"SYM{i:02d}USDT" for i in range(TICKERS)]
    await core_io.enable_symbols(pool, symbols)
    await pool.executemany(
        "INSERT INTO strategies (name, allow_open) VALUES ($1, $2)",
        [(f"strategy-{i}", i % 5 != 0) for i in range(STRATEGIES)],
    )
    await pool.executemany("INSERT INTO signal_phrases (phrase, action) VALUES ($1, $2)", PHRASES)
    await pool.execute("INSERT INTO strategy_signals SELECT s.id, p.id FROM strategies s CROSS JOIN signal_phrases p")
    return symbols


def make_signal(n: int, symbols: list[str]) -> dict[str, str]:
    bar = BAR0 + (n // len(symbols)) * 60_000
    return {
        "symbol": symbols[n % len(symbols)],
        "message": PHRASES[n % len(PHRASES)][0],
        "bar_time": str(bar),
        "sent_at": str(bar + 500),
    }


async def produce(redis, signals: list[dict[str, str]], chunk: int, pause_s: float) -> None:
    for start in range(0, len(signals), chunk):
        pipe = redis.pipeline(transaction=False)
        for fields in signals[start : start + chunk]:
            pipe.xadd(core_io.SIGNALS_STREAM, fields)
        await pipe.execute()
        if pause_s:
            await asyncio.sleep(pause_s)


async def wait_routed(router: SignalRouter, total: int, timeout: float) -> float:
    deadline = time.perf_counter() + timeout
    while router.stats["entries"] < total:
        if time.perf_counter() > deadline:
            raise RuntimeError(f"only {router.stats['entries']} of {total} routed in {timeout} s")
        await asyncio.sleep(0.005)
    return time.perf_counter()


async def latencies_ms(pool: asyncpg.Pool, redis, since_log_id: int) -> list[int]:
    """XADD -> delivery on the first strategy's stream, per signal, in ms (Redis clock)."""
    source = {
        r["id"]: int(r["stream_id"].split("-")[0])
        for r in await pool.fetch("SELECT id, stream_id FROM signals_v2_log WHERE id > $1", since_log_id)
    }
    first = await pool.fetchval("SELECT min(id) FROM strategies")
    out = []
    for entry_id, fields in await redis.xrange(signals_io.strategy_stream(first)):
        log_id = int(fields["log_id"])
        if log_id in source:
            out.append(int(entry_id.split("-")[0]) - source[log_id])
    return out


def pct(values: list[int], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


async def redis_cpu_s(redis) -> float:
    info = await redis.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


async def sparse_and_idle(router: SignalRouter, pool, redis, symbols: list[str], first: int, label: str) -> int:
    """Signals one at a time (latency of a waiting router), then CPU while idle."""
    last_id = await pool.fetchval("SELECT coalesce(max(id), 0) FROM signals_v2_log")
    for n in range(SPARSE):
        await produce(redis, [make_signal(first + n, symbols)], chunk=1, pause_s=SPARSE_GAP_S)
    await wait_routed(router, first + SPARSE, timeout=60)
    lat = await latencies_ms(pool, redis, last_id)
    await asyncio.sleep(1.0)  # let the last batch settle
    cpu0, redis0, wall0 = time.process_time(), await redis_cpu_s(redis), time.perf_counter()
    await asyncio.sleep(IDLE_S)
    wall = time.perf_counter() - wall0
    cpu = (time.process_time() - cpu0) / wall * 100
    redis_cpu = (await redis_cpu_s(redis) - redis0) / wall * 100
    print(
        f"{label}: sparse ({SPARSE} signals {SPARSE_GAP_S * 1000:.0f} ms apart): XADD->delivery "
        f"p50 {pct(lat, 50):.0f} ms, p99 {pct(lat, 99):.0f} ms, max {max(lat)} ms; "
        f"idle: router process {cpu:.2f}% of a core, Redis {redis_cpu:.2f}%"
    )
    return first + SPARSE


async def run_router(settings, pool, **options) -> tuple[SignalRouter, asyncio.Task]:
    router = SignalRouter(settings, pool, RouterOptions(consumer="bench", **options))
    worker = asyncio.create_task(router.run())
    while router.snapshot_version == 0:
        await asyncio.sleep(0.01)
    return router, worker


async def stop_router(router: SignalRouter, worker: asyncio.Task) -> None:
    router.stop()
    await asyncio.wait_for(worker, 10)


async def main() -> None:
    url = await recreate_database(setting("POSTGRES_URL"), "feed_v4_signals_bench")
    pool = await asyncpg.create_pool(url, min_size=2, max_size=4)
    await apply_migrations(pool)
    symbols = await seed(pool)
    server = RedisServer(with_timeseries=False)
    server.start()
    redis = make_redis(server.url)
    settings = load_settings({"REDIS_URL": server.url, "POSTGRES_URL": url, "STREAM_MAXLEN": "1000000"})
    print(f"load average before: {os.getloadavg()[0]:.2f} ({os.cpu_count()} cores)")
    router, worker = await run_router(settings, pool)
    try:
        burst = [make_signal(n, symbols) for n in range(BURST)]
        started = time.perf_counter()
        await produce(redis, burst, chunk=500, pause_s=0)
        finished = await wait_routed(router, BURST, timeout=120)
        seconds = finished - started
        burst_lat = await latencies_ms(pool, redis, 0)
        last_id = await pool.fetchval("SELECT max(id) FROM signals_v2_log")
        counts = dict(await pool.fetch("SELECT status, count(*) FROM signal_log_entries_v2 GROUP BY status"))
        rate = BURST / seconds
        print(
            f"burst: {BURST} signals x {STRATEGIES} strategies in {seconds:.2f} s = {rate:,.0f} signals/s "
            f"({counts.get('delivered', 0)} deliveries, {counts.get('skipped', 0)} skipped); "
            f"XADD->delivery p50 {pct(burst_lat, 50):.0f} ms, p99 {pct(burst_lat, 99):.0f} ms (queueing included); "
            f"budget {BUDGET}/s: {'OK' if rate >= BUDGET else 'MISSED'}"
        )

        paced_total = PACED_RATE * PACED_SECONDS
        paced = [make_signal(BURST + n, symbols) for n in range(paced_total)]
        chunk = PACED_RATE // 100  # every 10 ms
        await produce(redis, paced, chunk=chunk, pause_s=0.01)
        await wait_routed(router, BURST + paced_total, timeout=60)
        paced_lat = await latencies_ms(pool, redis, last_id)
        print(
            f"paced: {paced_total} signals at ~{PACED_RATE}/s: XADD->delivery p50 {pct(paced_lat, 50):.0f} ms, "
            f"p99 {pct(paced_lat, 99):.0f} ms, max {max(paced_lat)} ms; "
            f"largest batch read {router.largest_batch_bytes:,} bytes"
        )
        print(f"router stats: {router.stats}")
        total = await sparse_and_idle(router, pool, redis, symbols, BURST + paced_total, "notified")
        await stop_router(router, worker)

        # The same router on a server that gives no write notifications: it polls.
        async def no_notifications(self) -> None:
            self.active = False
            await asyncio.Event().wait()

        signals_io.StreamWatch.run = no_notifications
        router, worker = await run_router(settings, pool)
        router.stats["entries"] = total
        await sparse_and_idle(router, pool, redis, symbols, total, f"polling every {router.options.poll_ms} ms")
    finally:
        await stop_router(router, worker)
        await redis.aclose()
        server.cleanup()
        await pool.close()
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
