"""Read API and chart page benchmark (issue 19). Prints:

1. time to the first full render of the chart page in headless Chromium (Debian's,
   driven by Playwright): 1,000 M1 bars of candles with their indicators (EMA, Bollinger,
   SuperTrend, RSI, MACD), order flow (delta, CVD) and footprints, from navigation to
   the page's `feedChart.firstRenderMs` (budget <= 500 ms), over fresh page loads;
2. API latency with 50 concurrent clients (one connection each) looping over the
   common reads (candles, indicators, order flow, footprints, book, features) for
   `--seconds`: count, p50 and p99 per read (the clients share this machine's two
   cores with the server);
3. bytes a second pushed per symbol at live pace (`--live-seconds`, 0 skips it):
   `scripts/demo.py --speed 1` (the fake exchange, the daemon and the web process, the
   first symbol with its book and trades on), one WebSocket client subscribed to all of
   that symbol's channels (m1, m5, m15, book, features), bytes received per channel.

Parts 1 and 2 run `feed_v4_main.py web` against a scratch database filled with 3,000
synthetic M1 bars (a random walk, ~200 aggTrades a minute folded by the daemon's own
code into footprints) and a private Redis Stack. Printed, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import statistics
import sys
import time
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import aiohttp
import asyncpg
import numpy as np
import orjson
import talib
from playwright.async_api import async_playwright

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import core_io  # noqa: E402
from bench.soak_bench import percentile  # noqa: E402
from binance.book import depth_snapshot_of, parse_depth_frame  # noqa: E402
from book.features import range_bounds  # noqa: E402
from book.store import book_document  # noqa: E402
from book.sync import BookSync  # noqa: E402
from candles import Candle  # noqa: E402
from infra import make_redis  # noqa: E402
from market_data import recorded_book_frames  # noqa: E402
from migrations import apply_migrations  # noqa: E402
from orderflow.fold import AggTrade, fold, to_units  # noqa: E402
from orderflow.output import CvdChain, FinalBar  # noqa: E402
from orderflow.profile import ImbalanceRules  # noqa: E402
from orderflow.store import upsert_bars  # noqa: E402
from tests.browser import launch  # noqa: E402
from tests.servers import RedisServer, drop_database, free_port, recreate_database, setting  # noqa: E402

SYMBOL = "BTCUSDT"
BARS = 3_000
M1 = 60_000
T0 = 1_770_163_200_000
TOKEN = "bench-token-0123456789abcdef"
DATABASE = "feed_v4_web_bench"


# --------------------------------------------------------------------------- data


def walk() -> tuple[list[Candle], list[FinalBar]]:
    """3,000 M1 candles and their order flow, the candles made from the trades."""
    rng, chain = random.Random(19), CvdChain()
    price, candles, bars, agg_id = 65_000.0, [], [], 0
    row = to_units("5")
    for m in range(BARS):
        t0 = T0 + m * M1
        trades = []
        for i in range(rng.randint(120, 280)):
            price = max(1000.0, price + rng.gauss(0, 4.0))
            qty = round(rng.expovariate(20), 3) or 0.001
            trades.append(
                AggTrade(
                    agg_id,
                    to_units(f"{price:.1f}"),
                    to_units(f"{qty:.3f}"),
                    agg_id,
                    agg_id,
                    t0 + i * 200,
                    rng.random() < 0.5,
                )
            )
            agg_id += 1
        bar = fold(t0, row, trades)
        bars.append(FinalBar.of(SYMBOL, "m1", bar, chain, ImbalanceRules()))
        prices = [Decimal(t.price) / 10**8 for t in trades]
        volume = sum(Decimal(t.qty) for t in trades) / 10**8
        candles.append(
            Candle(
                SYMBOL,
                "m1",
                t0,
                prices[0],
                max(prices),
                min(prices),
                prices[-1],
                volume,
                volume * prices[-1],
                len(trades),
                Decimal(bar.buy) / 10**8,
                Decimal(0),
            )
        )
    return candles, bars


def indicator_values(candles: list[Candle], instance: int) -> list[core_io.IndicatorValue]:
    close = np.array([float(c.close) for c in candles])
    high, low = np.array([float(c.high) for c in candles]), np.array([float(c.low) for c in candles])
    atr = talib.ATR(high, low, close, 7)
    upper, middle, lower = talib.BBANDS(close, 20, 2.0, 2.0)
    macd, signal, hist = talib.MACD(close, 12, 26, 9)
    trend = talib.EMA(close, 10)
    series = {
        "EMA_9": talib.EMA(close, 9),
        "EMA_21": talib.EMA(close, 21),
        "EMA_50": talib.EMA(close, 50),
        "BBL_20_2.0_2.0": lower,
        "BBM_20_2.0_2.0": middle,
        "BBU_20_2.0_2.0": upper,
        "SUPERT_7_3.0": np.where(close > trend, close - 3 * atr, close + 3 * atr),
        "SUPERTd_7_3.0": np.where(close > trend, 1.0, -1.0),
        "RSI_14": talib.RSI(close, 14),
        "MACD_12_26_9": macd,
        "MACDs_12_26_9": signal,
        "MACDh_12_26_9": hist,
    }
    return [
        core_io.IndicatorValue(instance, SYMBOL, "m1", c.open_time, name, float(values[i]))
        for name, values in series.items()
        for i, c in enumerate(candles)
        if np.isfinite(values[i])
    ]


async def fill(pg_url: str, redis_url: str) -> None:
    pool = await asyncpg.create_pool(pg_url, min_size=1, max_size=4)
    try:
        await apply_migrations(pool)
        await core_io.enable_symbols(pool, [SYMBOL])
        candles, bars = walk()
        await core_io.upsert_candles(pool, candles)
        instance = await pool.fetchval("SELECT id FROM indicator_instances_v4 WHERE timeframe = 'm1' LIMIT 1")
        values = indicator_values(candles, instance)
        for i in range(0, len(values), 20_000):
            await core_io.upsert_indicator_values(pool, values[i : i + 20_000])
        for i in range(0, len(bars), 500):
            await upsert_bars(pool, bars[i : i + 500])
    finally:
        await pool.close()
    redis = make_redis(redis_url)
    last = float(candles[-1].close)
    levels = (
        [to_units(f"{last - 0.1 * i:.1f}") for i in range(1, 200)],
        [to_units(f"{last + 0.1 * i:.1f}") for i in range(200)],
    )
    qty = [to_units("0.5")] * 199, [to_units("0.7")] * 200
    await redis.set(f"book:{SYMBOL}", orjson.dumps(book_document(levels[0], qty[0], levels[1], qty[1], 1, T0)))
    await redis.aclose()
    print(
        f"filled: {BARS} M1 bars, {len(values)} indicator values, {sum(len(b.bar.rows) for b in bars)} footprint rows"
    )


# --------------------------------------------------------------------------- measures


async def render_times(base: str, loads: int) -> None:
    async with async_playwright() as p:
        browser = await launch(p)
        times, shown = [], {}
        for _ in range(loads):
            page = await browser.new_page(viewport={"width": 1400, "height": 900})
            await page.goto(f"{base}/?symbol={SYMBOL}&tf=m1#token={TOKEN}")
            await page.wait_for_function("() => window.feedChart && window.feedChart.ready", timeout=30_000)
            shown = await page.evaluate(
                "({ms: feedChart.firstRenderMs, bars: feedChart.bars, fp: feedChart.footprints})"
            )
            times.append(shown["ms"])
            await page.close()
        await browser.close()
    warm = times[1:]
    print(
        f"first full render, {shown['bars']} M1 bars with {shown['fp']} footprints (budget <= 500 ms): "
        f"cold (the web process's first answer for this range) {times[0]:.0f} ms; then "
        f"median {statistics.median(warm):.0f} ms, best {min(warm):.0f}, worst {max(warm):.0f} over {len(warm)} loads"
    )


READS = {
    "candles 500": ("candles", {"symbol": SYMBOL, "limit": 500}),
    "indicators 500": ("indicators", {"symbol": SYMBOL, "limit": 500}),
    "orderflow 500": ("orderflow", {"symbol": SYMBOL, "limit": 500}),
    "footprints 100": ("footprints", {"symbol": SYMBOL, "limit": 100}),
    "book": ("book", {"symbol": SYMBOL}),
    "candles 1000 older": ("candles", {"symbol": SYMBOL, "limit": 1000, "end": T0 + 1500 * M1}),
}


async def api_latency(base: str, clients: int, seconds: float) -> None:
    latencies: dict[str, list[float]] = {name: [] for name in READS}
    headers = {"Authorization": f"Bearer {TOKEN}"}
    stop = time.monotonic() + seconds

    async def client(i: int) -> None:
        names = list(READS)
        async with aiohttp.ClientSession(headers=headers, connector=aiohttp.TCPConnector(limit=1)) as s:
            n = i
            while time.monotonic() < stop:
                name = names[n % len(names)]
                path, params = READS[name]
                began = time.perf_counter()
                async with s.get(f"{base}/api/v1/{path}", params=params) as r:
                    await r.read()
                    assert r.status == 200, (name, r.status)
                latencies[name].append((time.perf_counter() - began) * 1000)
                n += 1

    await asyncio.gather(*(client(i) for i in range(clients)))
    total = sum(len(v) for v in latencies.values())
    print(f"API, {clients} concurrent clients for {seconds:g} s: {total / seconds:.0f} requests/s in all")
    for name, values in latencies.items():
        p50, p99 = percentile(values, 0.5), percentile(values, 0.99)
        print(f"  {name:20} n={len(values):6}  p50 {p50:7.1f} ms  p99 {p99:7.1f} ms")


async def live_bytes(redis_url: str, pg_url: str, seconds: float) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "POSTGRES_URL", "DATABASE_URL")}
    env.update(
        REDIS_URL=redis_url,
        POSTGRES_URL=pg_url,
        DEMO_DATABASE="feed_v4_web_bench_demo",
        DEMO_DIR=str(ROOT / ".local" / "web_bench_demo"),
    )
    demo = await asyncio.create_subprocess_exec(
        sys.executable,
        str(ROOT / "scripts" / "demo.py"),
        "--fresh",
        "--speed",
        "1",
        "--web-port",
        str(port),
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        url = None
        while url is None:
            line = (await demo.stdout.readline()).decode()
            if not line:
                raise RuntimeError("the demo stopped")
            if m := re.search(r"chart\s+: (\S+)", line):
                url = m.group(1)
        drain = asyncio.create_task(demo.stdout.read())  # keeps the pipe from filling
        base, token = url.split("/#token=")
        headers = {"Authorization": f"Bearer {token}"}
        async with aiohttp.ClientSession(headers=headers) as s:
            symbol = None
            for _ in range(240):
                try:
                    async with s.get(f"{base}/api/v1/symbols") as r:
                        listed = await r.json() if r.status == 200 else []
                    first = listed[0]["symbol"] if listed else None
                    if first:
                        async with s.get(f"{base}/api/v1/book", params={"symbol": first}) as r:
                            if r.status == 200:
                                symbol = first
                                break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(1.0)
            if symbol is None:
                raise RuntimeError("the demo's first symbol never got a book")
            channels = [
                f"{k}:{symbol}:{tf}"
                for k in ("candles", "indicators", "orderflow", "footprint")
                for tf in ("m1", "m5", "m15")
            ] + [f"book:{symbol}", f"features:{symbol}"]
            sizes: dict[str, int] = {}
            async with s.ws_connect(f"{base}/api/v1/ws?token={token}") as ws:
                await ws.send_json({"subscribe": channels})
                stop = time.monotonic() + seconds
                while (left := stop - time.monotonic()) > 0:
                    try:
                        msg = await ws.receive(timeout=left)
                    except TimeoutError:
                        break
                    if msg.type != aiohttp.WSMsgType.TEXT:
                        break
                    kind = orjson.loads(msg.data).get("channel", "control").split(":")[0]
                    sizes[kind] = sizes.get(kind, 0) + len(msg.data)
        total = sum(sizes.values())
        print(
            f"pushed at live pace, one symbol ({symbol}: trades, book ticker and depth on), {seconds:g} s: "
            f"{total / seconds / 1024:.1f} KiB/s in all"
        )
        for kind, size in sorted(sizes.items(), key=lambda kv: -kv[1]):
            print(f"  {kind:12} {size / seconds / 1024:8.2f} KiB/s")
        drain.cancel()
    finally:
        demo.terminate()
        await asyncio.wait_for(demo.wait(), 30)


def busy_book_bytes(symbol: str = "BTCUSDT", range_pct: Fraction = Fraction(1)) -> None:
    """The depth filter's pushes for a busy contract: the real 2024-07-19 recording's
    book, as the daemon filters it (±1 %), one document per 250 ms of event time when
    it changed (what `book:<S>` carries, at most four times a second)."""
    sync, pushed, sizes, first, last = BookSync(), 0, [], None, None
    for kind, text in recorded_book_frames(symbol):
        if kind == "snapshot":
            sync.on_snapshot(depth_snapshot_of(text))
            continue
        if kind != "depth":
            continue
        diff = parse_depth_frame(text)[1]
        sync.on_diff(diff)
        if sync.state != "synced" or sync.book is None:
            continue
        event_ms = orjson.loads(text)["data"]["E"]
        first = first or event_ms
        last = event_ms
        if event_ms - pushed >= 250:
            pushed = event_ms
            book = sync.book
            columns = book.within(*range_bounds(book.best_bid()[0], book.best_ask()[0], range_pct))
            sizes.append(len(orjson.dumps(book_document(*columns, book.update_id, event_ms))))
    seconds = (last - first) / 1000
    print(
        f"  {symbol}'s depth filter (±{range_pct} %, the real recording, {seconds:.0f} s): {len(sizes)} documents, "
        f"mean {statistics.mean(sizes) / 1024:.1f} KiB, max {max(sizes) / 1024:.1f} KiB: "
        f"{sum(sizes) / seconds / 1024:.1f} KiB/s to a client subscribed to book:{symbol}"
    )


async def main(args: argparse.Namespace) -> None:
    redis_server = RedisServer(with_timeseries=True)
    redis_server.start()
    base_url = setting("POSTGRES_URL")
    pg_url = await recreate_database(base_url, DATABASE)
    web = None
    try:
        await fill(pg_url, redis_server.url)
        port = free_port()
        env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "POSTGRES_URL", "DATABASE_URL")}
        env.update(
            REDIS_URL=redis_server.url,
            POSTGRES_URL=pg_url,
            WEB_PORT=str(port),
            WEB_TOKEN=TOKEN,
            WEB_RATE="1000000",
            WEB_BURST="1000000",
            WEB_WS_PER_CLIENT="1000",
        )
        web = await asyncio.create_subprocess_exec(
            sys.executable,
            str(ROOT / "feed_v4_main.py"),
            "web",
            cwd=ROOT,
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.STDOUT,
        )
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as s:
            for _ in range(100):
                try:
                    async with s.get(f"{base}/api/v1/health") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.2)
        await render_times(base, args.loads)
        await api_latency(base, args.clients, args.seconds)
    finally:
        if web is not None:
            web.terminate()
            await asyncio.wait_for(web.wait(), 10)
        await drop_database(base_url, DATABASE)
    if args.live_seconds:
        await live_bytes(redis_server.url, base_url, args.live_seconds)
    busy_book_bytes()
    await asyncio.to_thread(redis_server.cleanup)
    print("machine:", os.cpu_count(), "cores")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loads", type=int, default=8, help="page loads timed (2 at least)")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=10.0, help="API load duration")
    parser.add_argument("--live-seconds", type=float, default=60.0, help="live-pace push measure (0 skips)")
    asyncio.run(main(parser.parse_args()))
