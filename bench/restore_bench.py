"""Restore time for 500 symbols × 3 timeframes × 250 candles (budget: under 1 s, issue 14).

Seeds a scratch database with synthetic candles and indicator values, then times
`restore_redis_from_pg` into a private Redis Stack and a private plain Redis.
Prints one line per store.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from decimal import Decimal
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import core_io
from candles import TF_MS, TIMEFRAMES, Candle
from infra import make_redis
from migrations import apply_migrations
from restore_redis_from_pg import restore_redis_from_pg
from tests.servers import RedisServer, recreate_database, setting

SYMBOLS = 500
BARS = 250
T0 = 1_769_904_000_000


def synthetic_candles(symbol: str, tf: str, rng: random.Random) -> list[Candle]:
    price = rng.uniform(1, 1000)
    out = []
    for i in range(BARS):
        price *= 1 + rng.gauss(0, 0.001)
        p = Decimal(f"{price:.4f}")
        out.append(
            Candle(
                symbol,
                tf,
                T0 + i * TF_MS[tf],
                p,
                p + Decimal("0.5"),
                p - Decimal("0.5"),
                p,
                Decimal(f"{rng.uniform(0, 1e4):.3f}"),
                m1_count=None if tf == "m1" else 5 if tf == "m5" else 15,
            )
        )
    return out


async def seed(pool: asyncpg.Pool, symbols: list[str]) -> None:
    rng = random.Random(7)
    await core_io.enable_symbols(pool, symbols)
    for tf in TIMEFRAMES:
        batch = [c for symbol in symbols for c in synthetic_candles(symbol, tf, rng)]
        for i in range(0, len(batch), 25_000):
            await core_io.upsert_candles(pool, batch[i : i + 25_000])
    instances = await pool.fetch("SELECT id, timeframe FROM indicator_instances_v4")
    values = [
        core_io.IndicatorValue(r["id"], symbol, r["timeframe"], T0 + k * TF_MS[r["timeframe"]], name, rng.random())
        for r in instances
        for symbol in symbols
        for k in (BARS - 2, BARS - 1)
        for name in ("A", "B")
    ]
    for i in range(0, len(values), 50_000):
        await core_io.upsert_indicator_values(pool, values[i : i + 50_000])


async def main() -> None:
    url = await recreate_database(setting("POSTGRES_URL"), "feed_v4_bench")
    pool = await asyncpg.create_pool(url, min_size=4, max_size=8)
    await apply_migrations(pool)
    symbols = [f"SYM{i:03d}USDT" for i in range(SYMBOLS)]
    started = time.perf_counter()
    await seed(pool, symbols)
    print(f"seeded {SYMBOLS * 3 * BARS} candles in {time.perf_counter() - started:.1f} s")
    for use_ts in (True, False):
        server = RedisServer(with_timeseries=use_ts)
        server.start()
        redis = make_redis(server.url)
        store = core_io.make_candle_store(redis, use_ts, BARS)
        timings = []
        for _ in range(3):
            await redis.flushall()
            report = await restore_redis_from_pg(pool, redis, store, BARS)
            timings.append(report.seconds)
        check = await store.read_last_many([(symbols[-1], "m15")], BARS)
        assert len(check[(symbols[-1], "m15")]) == BARS
        print(
            f"restore {store.name:>10}: {SYMBOLS} symbols x 3 tf x {BARS} candles "
            f"+ {report.indicator_values} indicator values: best {min(timings):.2f} s, "
            f"worst {max(timings):.2f} s (budget 1 s)"
        )
        await redis.aclose()
        server.cleanup()
    await pool.close()


if __name__ == "__main__":
    asyncio.run(main())
