"""Known data for the read API's tests, written with the daemon's own writers into the
real servers, and the API itself served in-process on a real socket."""

from __future__ import annotations

import contextlib
import random
from collections.abc import AsyncIterator
from decimal import Decimal

import asyncpg
import orjson
from aiohttp import web
from redis.asyncio import Redis

import core_io
from book.store import book_document, features_key
from candle_stores import make_candle_store
from candles import Candle
from infra import make_redis
from orderflow.fold import AggTrade, fold, to_units
from orderflow.output import CvdChain, FinalBar
from orderflow.profile import ImbalanceRules
from orderflow.render import FootprintRenderer
from orderflow.store import footprint_key, upsert_bars
from storage import partitions
from web.app import ReadApi, WebSettings

TOKEN = "test-token-0123456789abcdef"
M1 = 60_000
T0 = 1_770_163_200_000  # 2026-02-04 00:00 UTC
BARS = 60
FLOW_BARS = 30
SYMBOL, OTHER = "BTCUSDT", "ETHUSDT"
ROW = to_units("0.5")


def candle(symbol: str, minute: int, rng: random.Random) -> Candle:
    base = Decimal(65000) + Decimal(minute % 17) * Decimal("3.1")
    high, low = base + Decimal(rng.randint(1, 40)) / 10, base - Decimal(rng.randint(1, 40)) / 10
    return Candle(
        symbol=symbol,
        tf="m1",
        open_time=T0 + minute * M1,
        open=base,
        high=high,
        low=low,
        close=base + Decimal("0.3"),
        volume=Decimal(rng.randint(100, 999)) / 1000,
        quote_volume=Decimal("12345.678"),
        trades=rng.randint(10, 99),
        taker_buy_volume=Decimal("0.1"),
        taker_buy_quote_volume=Decimal("6500.5"),
    )


def trades_of(minute: int, rng: random.Random, first_id: int) -> list[AggTrade]:
    out = []
    for i in range(40):
        price = to_units("65000") + rng.randint(-30, 30) * to_units("0.1")
        t = T0 + minute * M1 + i * 1000
        out.append(AggTrade(first_id + i, price, to_units("0.013") * rng.randint(1, 9), i, i, t, rng.random() < 0.5))
    return out


def flow_bars(symbol: str) -> list[FinalBar]:
    rng, chain, bars = random.Random(7), CvdChain(), []
    for minute in range(FLOW_BARS):
        bar = fold(T0 + minute * M1, ROW, trades_of(minute, rng, minute * 100))
        bars.append(FinalBar.of(symbol, "m1", bar, chain, ImbalanceRules()))
    return bars


async def seed(pool: asyncpg.Pool, redis: Redis) -> dict:
    """Candles (60 M1), indicator values (PostgreSQL up to bar 58, Redis's hash at bar
    59), order flow and footprints (30 M1, and a forming one), a book and features."""
    rng = random.Random(1)
    await core_io.enable_symbols(pool, [SYMBOL, OTHER])
    candles = [candle(s, m, rng) for s in (SYMBOL, OTHER) for m in range(BARS)]
    await core_io.upsert_candles(pool, candles)
    ema = await pool.fetchval(
        "SELECT id FROM indicator_instances_v4 WHERE indicator = 'ema' AND timeframe = 'm1' LIMIT 1"
    )
    rsi = await pool.fetchval(
        "SELECT id FROM indicator_instances_v4 WHERE indicator = 'rsi' AND timeframe = 'm1' LIMIT 1"
    )
    values = []
    for m in range(BARS - 1):
        t = T0 + m * M1
        values.append(core_io.IndicatorValue(ema, SYMBOL, "m1", t, "EMA_TEST", 65000.0 + m / 8))
        if m >= 14:  # RSI's warm-up: no value stored before
            values.append(core_io.IndicatorValue(rsi, SYMBOL, "m1", t, "RSI_TEST", 40.0 + m / 4))
    await core_io.upsert_indicator_values(pool, values)
    await redis.hset(
        core_io.indicator_key(SYMBOL, "m1"),
        mapping={"open_time": T0 + (BARS - 1) * M1, "EMA_TEST": "65010.5", "RSI_TEST": "", "MACD_TEST": "0.25"},
    )
    bars = flow_bars(SYMBOL)
    await upsert_bars(pool, bars)
    forming = fold(T0 + FLOW_BARS * M1, ROW, trades_of(FLOW_BARS, random.Random(9), 10_000))
    await redis.set(footprint_key(SYMBOL, "m1", True), FootprintRenderer().document((SYMBOL, "m1"), forming, None))
    book = book_document(
        [to_units("64999.9"), to_units("64999.5")],
        [to_units("1.5"), to_units("0.25")],
        [to_units("65000"), to_units("65000.7")],
        [to_units("2"), to_units("0.003")],
        123456,
        T0 + 5 * M1,
    )
    await redis.set(f"book:{SYMBOL}", orjson.dumps(book))
    second0 = T0 + 10 * M1
    # Made whatever this process remembers: other tests drop partitions behind its memo.
    partitions.forget(pool, "features_1s4")
    await partitions.ensure(pool, "features_1s4", [second0], ahead=False)
    await pool.executemany(
        "INSERT INTO features_1s4 (symbol, ts, microprice, i1) VALUES ($1, to_timestamp($2 / 1000.0), $3, $4)",
        [(SYMBOL, second0 + s * 1000, 65000.0 + s, 0.1 * s) for s in range(10)],
    )
    await redis.hset(features_key(SYMBOL), mapping={"ts": second0 + 10_000, "microprice": "65010.5", "i1": "0.5"})
    return {"candles": candles, "bars": bars, "book": orjson.loads(orjson.dumps(book)), "second0": second0}


@contextlib.asynccontextmanager
async def serve(pool: asyncpg.Pool, redis: Redis, **settings) -> AsyncIterator[tuple[str, ReadApi]]:
    """The API in this process on 127.0.0.1 (a free port): its base URL and the ReadApi."""
    kwargs = redis.connection_pool.connection_kwargs
    raw = make_redis(f"redis://{kwargs['host']}:{kwargs['port']}/{kwargs.get('db', 0)}", decode_responses=False)
    api = ReadApi(WebSettings(**{"token": TOKEN, **settings}), pool, raw, make_candle_store(redis, True, 250))
    runner = web.AppRunner(api.app(), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}", api
    finally:
        await runner.cleanup()
        await raw.aclose()
