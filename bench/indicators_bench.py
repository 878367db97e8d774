"""Indicator benchmark: 500 symbols x m1/m5/m15 x the default set (14 instances per
timeframe, sql/002_default_indicators.sql), at the worst minute boundary, where M1, M5
and M15 close together (1500 series step at once). Prints:

1. engine compute time for one worst boundary: every kernel of the 1500 series, opened
   from ~3000 bars of real archive history, steps one new bar (median and max over
   consecutive boundaries);
2. the time pandas-ta (TA-Lib mode) takes to recompute the same set over a 250-bar
   window for the 1500 series, and its ratio to the engine;
3. closing kline frame -> `indicators_ready_stream` latency, end to end: the fake
   exchange in its own process (500 synthetic symbols at 4x speed), the feed and the
   indicator worker in this one, a private Redis Stack and a scratch PostgreSQL database,
   over several minute boundaries including one where M1, M5 and M15 close together.

Budgets: compute <= 20 ms per worst boundary; pandas-ta at least 50x slower than the
engine; p99 latency <= 250 ms.
"""

from __future__ import annotations

import asyncio
import gc
import math
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from decimal import Decimal
from pathlib import Path

import asyncpg
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import core_io  # noqa: E402
import indicators_main  # noqa: E402
from aggregation import aggregate  # noqa: E402
from candles import TF_MS, TIMEFRAMES, Candle, bucket_start, ms_to_datetime  # noqa: E402
from fake_exchange import SyntheticSource  # noqa: E402
from feed_and_aggregate import Feed, FeedSettings  # noqa: E402
from indicators.kernels import BarArrays, Kernel  # noqa: E402
from indicators.registry import parse_common  # noqa: E402
from infra import load_settings, make_redis, run_safe_loop  # noqa: E402
from market_data import archive_symbols, read_archive  # noqa: E402
from migrations import apply_migrations  # noqa: E402
from tests.servers import (  # noqa: E402
    RedisServer,
    free_port,
    recreate_database,
    setting,
    start_fake_exchange,
    time_closes,
)

SYMBOLS = 500
M1 = 60_000
# The default set of sql/002_default_indicators.sql, as (indicator, params) rows.
DEFAULT_SET: list[tuple[str, dict[str, str]]] = [
    ("ema", {"length": "9"}),
    ("ema", {"length": "21"}),
    ("ema", {"length": "50"}),
    ("ema", {"length": "200"}),
    ("sma", {"length": "20"}),
    ("rsi", {"length": "14"}),
    ("macd", {"fast": "12", "slow": "26", "signal": "9"}),
    ("bbands", {"length": "20", "lower_std": "2", "upper_std": "2"}),
    ("atr", {"length": "14"}),
    ("adx", {"length": "14"}),
    ("stoch", {"k": "14", "d": "3", "smooth_k": "3"}),
    ("supertrend", {"length": "10", "multiplier": "3"}),
    ("vwap", {"anchor": "D"}),
    ("obv", {}),
]
HISTORY = 3000  # bars each series is opened from (fewer on m15: the archives hold one month)
STEPS = 20  # consecutive worst boundaries timed
WINDOW = 250  # bars pandas-ta recomputes over (IndicatorOptions.slow_window)
COMPUTE_BUDGET_MS = 20.0
RATIO_BUDGET = 50.0

# End to end: the exchange starts 3 minutes before an M15 boundary, so the measured
# boundaries (the first live one is skipped) include one where M1, M5 and M15 close.
T0 = 1_770_336_000_000  # 2026-02-06 00:00 UTC: M1, M5 and M15 close together
START = T0 - 3 * M1  # exchange start
SPEED = 4.0  # one minute lasts 15 s
BOUNDARIES = 4  # live minute boundaries measured, after the first
SEED_M1 = 300  # M1 minutes seeded before START
WARM_BARS = 250  # M5/M15 bars per series: older bars pad the seeded ones (REDIS_CANDLES, as at a first boot)
LATENCY_BUDGET_MS = 250.0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, int(len(ordered) * q + 0.5) - 1)]


# --------------------------------------------------------------------------- 1. engine compute


def archive_bars() -> dict[str, dict[str, BarArrays]]:
    """Each archive symbol's month as M1 bars, and M5/M15 by reshaping (epoch-aligned, gap-free)."""
    out: dict[str, dict[str, BarArrays]] = {}
    for symbol in archive_symbols():
        rows = [
            (float(c.open), float(c.high), float(c.low), float(c.close), float(c.volume), c.open_time)
            for c in read_archive(symbol)
        ]
        m1 = BarArrays.from_rows(rows)
        if np.any(np.diff(m1.open_time) != M1):
            raise RuntimeError(f"{symbol}: the archive has gaps; reshaping needs contiguous minutes")
        by_tf = {"m1": m1}
        for tf in ("m5", "m15"):
            k = TF_MS[tf] // M1
            first = int(np.argmax(m1.open_time % TF_MS[tf] == 0))
            n = (m1.size - first) // k * k
            cut = m1.tail(first)

            def shaped(column: np.ndarray, k: int = k, n: int = n) -> np.ndarray:
                return column[:n].reshape(-1, k)

            by_tf[tf] = BarArrays(
                shaped(cut.open_time)[:, 0].copy(),
                shaped(cut.open)[:, 0].copy(),
                shaped(cut.high).max(axis=1),
                shaped(cut.low).min(axis=1),
                shaped(cut.close)[:, -1].copy(),
                shaped(cut.volume).sum(axis=1),
            )
        out[symbol] = by_tf
    return out


def make_series(archives: dict[str, dict[str, BarArrays]]) -> list[tuple[str, str, BarArrays, int]]:
    """(symbol, tf, bars, open_at) per series: symbol i takes archive i % 7, a price scale
    and a start offset of its own; the series opens from bars[:open_at] and steps the rest."""
    names = sorted(archives)
    variants = -(-SYMBOLS // len(names))
    series = []
    for i in range(SYMBOLS):
        variant = i // len(names)
        scale = 1.0 + 0.37 * variant / variants
        for tf in TIMEFRAMES:
            bars = archives[names[i % len(names)]][tf]
            history = min(HISTORY, bars.size - STEPS - variants)
            window = bars.tail(variant)
            window = BarArrays(
                window.open_time[: history + STEPS],
                *(column[: history + STEPS] * scale for column in window[1:5]),
                window.volume[: history + STEPS].copy(),
            )
            series.append((f"S{i:04d}", tf, window, history))
    return series


def bench_engine() -> tuple[float, list[tuple[str, BarArrays, int]]]:
    started = time.perf_counter()
    archives = archive_bars()
    specs = make_series(archives)
    loaded = time.perf_counter() - started
    instances = {
        tf: [
            parse_common(n, indicator, tf, TF_MS[tf] // 60_000, params)
            for n, (indicator, params) in enumerate(DEFAULT_SET, 1)
        ]
        for tf in TIMEFRAMES
    }
    if any(i is None for tf in TIMEFRAMES for i in instances[tf]):
        raise RuntimeError("an instance of the default set is not in the incremental set")
    started = time.perf_counter()
    opened: list[tuple[list[Kernel], list[tuple]]] = []
    for _, tf, bars, at in specs:
        kernels = [instance.make_kernel() for instance in instances[tf]]  # type: ignore[union-attr]
        history = BarArrays(*(column[:at] for column in bars))
        for kernel in kernels:
            kernel.fill(history)
        new = list(
            zip(
                bars.open[at:].tolist(),
                bars.high[at:].tolist(),
                bars.low[at:].tolist(),
                bars.close[at:].tolist(),
                bars.volume[at:].tolist(),
                bars.open_time[at:].tolist(),
            )
        )
        opened.append((kernels, new))
    open_s = time.perf_counter() - started
    outputs = sum(len(k.names) for k in opened[0][0])
    sizes = {tf: at for _, tf, _, at in specs}
    print(
        f"engine: {len(specs)} series ({SYMBOLS} symbols x {len(TIMEFRAMES)} timeframes) x {len(DEFAULT_SET)} "
        f"instances ({outputs} outputs per series), from real archives ({len(archives)} symbols, {loaded:.1f} s to "
        f"load); opened from {sizes['m1']}/{sizes['m5']}/{sizes['m15']} bars (m1/m5/m15) in {open_s:.1f} s"
    )
    timings: list[float] = []
    for step in range(STEPS):
        started = time.perf_counter()
        for kernels, new in opened:
            bar = new[step]
            values: list[float] = []
            for kernel in kernels:
                values.extend(kernel.step(bar))
        timings.append((time.perf_counter() - started) * 1000)
    median = statistics.median(timings)
    print(
        f"engine compute, one worst boundary ({len(specs)} series step one bar): median {median:.2f} ms, "
        f"max {max(timings):.2f} ms over {STEPS} consecutive boundaries (budget <= {COMPUTE_BUDGET_MS:.0f} ms)"
    )
    return median, [(tf, bars, at) for _, tf, bars, at in specs]


# --------------------------------------------------------------------------- 2. pandas-ta


def bench_pandas_ta(engine_median_ms: float, specs: list[tuple[str, BarArrays, int]]) -> None:
    warnings.filterwarnings("ignore")
    import pandas as pd
    import pandas_ta  # registers the DataFrame.ta accessor

    started = time.perf_counter()
    frames = []
    for _, bars, at in specs:
        part = slice(at + 1 - WINDOW, at + 1)  # the window ending at the first new bar
        frames.append(
            pd.DataFrame(
                {
                    "open": bars.open[part],
                    "high": bars.high[part],
                    "low": bars.low[part],
                    "close": bars.close[part],
                    "volume": bars.volume[part],
                },
                index=pd.to_datetime(bars.open_time[part], unit="ms", utc=True),
            )
        )
    build_s = time.perf_counter() - started
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        started = time.perf_counter()
        for df in frames:
            df.ta.ema(length=9)
            df.ta.ema(length=21)
            df.ta.ema(length=50)
            df.ta.ema(length=200)
            df.ta.sma(length=20)
            df.ta.rsi(length=14)
            df.ta.macd(fast=12, slow=26, signal=9)
            df.ta.bbands(length=20, lower_std=2, upper_std=2)
            df.ta.atr(length=14)
            df.ta.adx(length=14)
            df.ta.stoch(k=14, d=3, smooth_k=3)
            df.ta.supertrend(length=10, multiplier=3)
            df.ta.vwap(anchor="D")
            df.ta.obv()
        total = time.perf_counter() - started
    ratio = total * 1000 / engine_median_ms
    print(
        f"pandas-ta {pandas_ta.version} (TA-Lib mode) recomputing the same set over a {WINDOW}-bar window for "
        f"{len(frames)} series: {total:.2f} s ({total / len(frames) * 1000:.2f} ms per series; DataFrames built "
        f"beforehand in {build_s:.2f} s); pandas-ta / engine median = {ratio:,.0f}x (budget >= {RATIO_BUDGET:.0f}x)"
    )


# --------------------------------------------------------------------------- 3. end to end


def padding(index: int, tf: str, first: Candle, count: int) -> list[Candle]:
    """`count` older bars of `tf` before `first`: a seeded random walk ending at its open."""
    rng = np.random.default_rng(1000 + index)
    minutes = TF_MS[tf] // M1
    sigma = 0.0015 * minutes**0.5
    steps = np.exp(rng.normal(0, sigma, count))
    close = float(first.open) / np.cumprod(steps[::-1])[::-1] * steps  # close[-1] = first.open
    open_ = np.concatenate(([close[0] / steps[0]], close[:-1]))
    wick = np.abs(rng.normal(0, sigma / 2, (2, count)))
    high = np.maximum(open_, close) * (1 + wick[0])
    low = np.minimum(open_, close) * (1 - wick[1])
    volume = rng.gamma(2.0, 500.0 * minutes, count)
    out = []
    for k in range(count):
        o, h, lo, c = (Decimal(f"{x:.8g}") for x in (open_[k], high[k], low[k], close[k]))
        out.append(
            Candle(
                first.symbol,
                tf,
                first.open_time - (count - k) * TF_MS[tf],
                o,
                max(o, h, c),
                min(o, lo, c),
                c,
                Decimal(f"{volume[k]:.3f}"),
                trades=100,
                m1_count=minutes,
            )
        )
    return out


def seed_symbols(source: SyntheticSource, indexed: list[tuple[int, str]]) -> list[Candle]:
    """For these symbols: SEED_M1 minutes of M1 up to START - 1 min, their complete M5/M15
    buckets, and older M5/M15 bars up to WARM_BARS, so that every timeframe opens warm."""
    batch: list[Candle] = []
    for index, symbol in indexed:
        m1 = [c for c in (source.candle(symbol, t) for t in range(START - SEED_M1 * M1, START, M1)) if c]
        batch += m1
        for tf in ("m5", "m15"):
            buckets: dict[int, list[Candle]] = {}
            for c in m1:
                buckets.setdefault(bucket_start(c.open_time, tf), []).append(c)
            per_bucket = TF_MS[tf] // M1
            complete = [aggregate(tf, b, m) for b, m in sorted(buckets.items()) if len(m) == per_bucket]
            batch += padding(index, tf, complete[0], WARM_BARS - len(complete)) + complete
    return batch


async def seed_history(pool: asyncpg.Pool, source: SyntheticSource, since: int) -> tuple[int, list[Candle]]:
    """The database as a previous run left it; returns the number of candles and those
    from `since` on (the ones that run announced within the feed's reconcile window)."""
    await core_io.enable_symbols(pool, source.symbols)
    indexed = list(enumerate(source.symbols))
    recent: list[Candle] = []
    rows = 0
    for first in range(0, len(indexed), 50):
        batch = seed_symbols(source, indexed[first : first + 50])
        recent += [c for c in batch if c.open_time >= since]
        rows += len(batch)
        await core_io.upsert_candles(pool, batch)
    return rows, recent


async def announce_as_before(redis, candles: list[Candle], maxlen: int) -> None:
    """The candle streams as the previous run left them: its recent announcements, all
    consumed by the indicator group. Without them the feed's boot reconcile announces
    every seeded candle of its window again (~83,000 events), which the indicator worker
    takes for corrections of past bars."""
    for tf, stream in core_io.CANDLE_STREAMS.items():
        events = [core_io.candle_event(c) for c in sorted(candles, key=lambda c: c.open_time) if c.tf == tf]
        for first in range(0, len(events), 10_000):
            await core_io.publish(redis, stream, events[first : first + 10_000], maxlen)
        await redis.xgroup_create(stream, core_io.INDICATOR_GROUP, id="$", mkstream=True)


crashes: list[tuple[str, str]] = []  # (worker, traceback)


def traced(fn, name: str):
    """The worker, with any crash's traceback printed (run_safe_loop only logs it)."""

    async def run() -> None:
        try:
            await fn()
        except asyncio.CancelledError:
            raise
        except Exception:
            print(f"--- worker {name} crashed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
            crashes.append((name, traceback.format_exc()))
            raise

    return run


async def bench_end_to_end() -> None:
    source = SyntheticSource(SYMBOLS, seed=3)
    redis_server = RedisServer(with_timeseries=True)
    exchange: subprocess.Popen | None = None
    pool: asyncpg.Pool | None = None
    redis = None
    worker: indicators_main.IndicatorWorker | None = None
    tasks: list[asyncio.Task] = []
    try:
        redis_server.start()
        url = await recreate_database(setting("POSTGRES_URL"), "feed_v4_ind_bench")
        pool = await asyncpg.create_pool(url, min_size=2, max_size=10)
        await apply_migrations(pool)
        port = free_port()
        settings = load_settings(
            {
                "REDIS_URL": redis_server.url,
                "POSTGRES_URL": url,
                "BINANCE_WS_URL": f"ws://127.0.0.1:{port}/market",
                "BINANCE_REST_URL": f"http://127.0.0.1:{port}",
            }
        )
        feed_settings = FeedSettings.from_env(settings, {})
        newest = START - M1
        since = newest - feed_settings.reconcile_window_m1 * M1
        since -= since % TF_MS["m15"]
        started = time.perf_counter()
        rows, recent = await seed_history(pool, source, since)
        redis = make_redis(redis_server.url)
        await announce_as_before(redis, recent, settings.stream_maxlen)
        print(
            f"e2e: seeded {rows:,} candles ({SEED_M1} M1 minutes per symbol up to "
            f"{ms_to_datetime(newest):%H:%M}, their M5/M15 buckets, older M5/M15 bars up to {WARM_BARS}) and announced "
            f"{len(recent):,} of them (since {ms_to_datetime(since):%H:%M}) in {time.perf_counter() - started:.1f} s"
        )
        del recent
        exchange = start_fake_exchange(SYMBOLS, SPEED, f"{ms_to_datetime(START):%Y-%m-%dT%H:%M}", port)
        feed = Feed(
            settings,
            feed_settings,
            pool,
            redis,
            core_io.make_candle_store(redis, True, settings.redis_candles),
        )
        received = time_closes(feed)
        worker = indicators_main.IndicatorWorker(settings, pool, redis, indicators_main.IndicatorOptions())
        batches: list[tuple[float, int, float]] = []  # (time, entries, compute s)
        handle = worker.handle

        async def timed_handle(entries) -> None:
            await handle(entries)
            batches.append((time.time(), len(entries), worker.last_compute_s))

        worker.handle = timed_handle  # type: ignore[method-assign]
        await asyncio.sleep(1.0)  # the exchange process starts
        started = time.monotonic()
        workers = {**feed.workers(), **worker.workers()}
        tasks = [asyncio.create_task(run_safe_loop(traced(fn, name), name, 1.0)) for name, fn in workers.items()]
        ready = asyncio.create_task(worker.ready.wait())
        await asyncio.wait([ready, *tasks], timeout=60, return_when=asyncio.FIRST_COMPLETED)
        if not worker.ready.is_set():
            ready.cancel()
            raise RuntimeError("the indicator worker did not open its series within 60 s")
        print(
            f"e2e: indicator worker ready ({len(worker.series)} series opened) {time.monotonic() - started:.1f} s "
            f"after start"
        )
        await measure_latency(redis, received, batches)
        print(
            f"e2e: worker stats {worker.stats}; last_compute_s {worker.last_compute_s * 1000:.2f} ms; "
            f"feed frames {feed.stats.frames}, bad {feed.stats.bad_frames}"
        )
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if worker is not None:
            worker.close()
        if redis is not None:
            await redis.aclose()
        if pool is not None:
            await pool.close()
        redis_server.cleanup()
        if exchange is not None:
            exchange.terminate()
            try:
                exchange.wait(10)
            except subprocess.TimeoutExpired:
                exchange.kill()
    if crashes:
        print(f"e2e: {len(crashes)} worker crash(es): {', '.join(name for name, _ in crashes)} (tracebacks on stderr)")


def figures(values: list[float]) -> str:
    return f"p50 {statistics.median(values):.1f} ms, p99 {percentile(values, 0.99):.1f} ms, max {max(values):.1f} ms"


async def measure_latency(redis, received: dict[tuple[str, int], float], batches: list) -> None:
    """Closing M1 frame (wall time at intake) -> `indicators_ready_stream` entry (its id's
    ms), split at the `ohlcv_<tf>_ready` entry into the feed's share and the worker's."""
    ready_stream = core_io.INDICATORS_READY_STREAM
    streams = [*core_io.CANDLE_STREAMS.values(), ready_stream]
    last_ids = {}
    for stream in streams:
        last_ids[stream] = (await redis.xrevrange(stream, count=1) or [("0-0", {})])[0][0]
    candle_ms: dict[tuple[str, str, int], int] = {}  # (symbol, tf, open_time) -> ohlcv_<tf>_ready entry ms
    ready: list[tuple[str, str, int, int]] = []  # (symbol, tf, open_time, indicators_ready_stream entry ms)
    targets: list[int] = []  # minute boundaries measured (ms)
    stop_at: float | None = None
    deadline = time.monotonic() + (BOUNDARIES + 3) * 60 / SPEED + 30
    while time.monotonic() < deadline and (stop_at is None or time.monotonic() < stop_at):
        reply = await redis.xread(last_ids, count=10_000, block=500)
        for stream, entries in reply or []:
            for entry_id, fields in entries:
                last_ids[stream] = entry_id
                key = (fields["symbol"], fields["tf"], int(fields["open_time"]))
                if stream == ready_stream:
                    ready.append((*key, int(entry_id.split("-")[0])))
                else:
                    candle_ms[key] = int(entry_id.split("-")[0])
        if received and not targets:
            first_live = min(t for _, t in received) + M1  # skipped: it overlaps the start
            targets = [first_live + k * M1 for k in range(1, BOUNDARIES + 1)]
            while not any(b % TF_MS["m15"] == 0 for b in targets):
                targets.append(targets[-1] + M1)
        if targets and stop_at is None:
            expected = {b: SYMBOLS * sum(1 for tf in TIMEFRAMES if b % TF_MS[tf] == 0) for b in targets}
            for symbol, tf, t, _ in ready:
                boundary = t + TF_MS[tf]
                if boundary in expected and (symbol, boundary - M1) in received:
                    expected[boundary] -= 1
            if all(n <= 0 for n in expected.values()):
                stop_at = time.monotonic() + 1.0  # stragglers
    # (boundary, tf, total, feed share, worker share), ms
    samples: list[tuple[int, str, float, float, float]] = []
    for symbol, tf, t, at_ms in ready:
        if tf not in TF_MS or t + TF_MS[tf] not in targets:
            continue
        frame = received.get((symbol, t + TF_MS[tf] - M1))
        if frame is None:
            continue  # not a live close (seeded, backfilled, or before the feed connected)
        announced = candle_ms.get((symbol, tf, t), math.nan)
        samples.append((t + TF_MS[tf], tf, at_ms - frame * 1000, announced - frame * 1000, at_ms - announced))
    name = "latency closing kline frame -> indicators_ready_stream"
    if not samples:
        print(f"{name}: no live closes measured")
        return
    for tf in TIMEFRAMES:
        rows = [x for x in samples if x[1] == tf]
        if rows:
            shares = [x for x in rows if x[3] == x[3]]
            feed = [x[3] for x in shares]
            own = [x[4] for x in shares]
            print(
                f"{name} [{tf}]: {len(rows)} bars: {figures([x[2] for x in rows])}; of which frame -> "
                f"{core_io.CANDLE_STREAMS[tf]} p50 {statistics.median(feed):.1f} / p99 {percentile(feed, 0.99):.1f} "
                f"ms, then -> {ready_stream} p50 {statistics.median(own):.1f} / p99 {percentile(own, 0.99):.1f} ms"
            )
    print(
        f"{name} [all]: {len(samples)} bars over {len(targets)} minute boundaries of {SYMBOLS} symbols: "
        f"{figures([x[2] for x in samples])} (budget p99 <= {LATENCY_BUDGET_MS:.0f} ms)"
    )
    worst = None
    for b in targets:
        values = [x[2] for x in samples if x[0] == b]
        if not values:
            print(f"  boundary {ms_to_datetime(b):%H:%M}: no live closes")
            continue
        closing = "+".join(tf for tf in TIMEFRAMES if b % TF_MS[tf] == 0)
        # The worker's batches from this boundary's first closing frame until the next minute.
        first_frame = min(at for (_, t), at in received.items() if t == b - M1)
        span = [(n, c) for t, n, c in batches if first_frame <= t < first_frame + 60 / SPEED]
        print(
            f"  boundary {ms_to_datetime(b):%H:%M} ({closing}): {len(values)} bars, {figures(values)}; worker "
            f"compute (last_compute_s) {sum(c for _, c in span) * 1000:.2f} ms in {len(span)} batches of "
            f"{sum(n for n, _ in span)} events"
        )
        p99 = percentile(values, 0.99)
        if worst is None or p99 > worst[1]:
            worst = (b, p99, closing)
    if worst is not None:
        b, p99, closing = worst
        print(
            f"{name}, worst boundary {ms_to_datetime(b):%H:%M} ({closing}): p99 {p99:.1f} ms "
            f"(budget p99 <= {LATENCY_BUDGET_MS:.0f} ms)"
        )


def main() -> None:
    engine_median_ms, specs = bench_engine()
    bench_pandas_ta(engine_median_ms, specs)
    del specs
    # The engine and pandas-ta parts leave millions of objects behind that the daemon
    # would not hold; like the daemon after boot, move them out of the collector's way.
    gc.collect()
    gc.freeze()
    asyncio.run(bench_end_to_end())


if __name__ == "__main__":
    main()
