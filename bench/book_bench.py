"""Order book benchmark (issue 16). Prints:

1. events applied per second on one core: the real 2024-07-19 BTCUSDT and ETHUSDT book
   ticker and diff depth frames, each parsed (binance/book.py) and applied to the
   symbol's book and one-second bars (book/symbol.py), seconds closed as the clock
   moves; book tickers and depth diffs apart (a diff carries ~10 levels);
2. live pace (`--live-minutes`, 3 by default; 0 skips it): the daemon's book intake
   (book/intake.py: its publisher, writer and the depth filter) in this process on
   uvloop, against a private Redis and a scratch PostgreSQL database, fed in real time
   the recorded frames re-stamped to now: book ticker for `--tickers` symbols (200) and
   depth for the first `--depth` of them (20), each replaying BTCUSDT's or ETHUSDT's
   recording at its recorded rate (~100 book tickers and ~19 diffs a second: the
   busiest contracts', so an upper bound for most), starting up to a second apart. The
   snapshot is the recorded one, handed over where the recording took it. Prints the
   intake's CPU (this process, less the time spent re-stamping frames) per 10 s and its
   mean (budget: under 50 % of one core), RSS at the start and end (budget: flat), and
   the latency from a second's last event (when the bench handed it over) to that
   second's features in Redis (budget p99 <= 100 ms).

Printed, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from fractions import Fraction
from pathlib import Path

import asyncpg
import orjson
import uvloop

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.orderflow_bench import machine_speed, rss_mb  # noqa: E402
from bench.soak_bench import percentile  # noqa: E402
from binance.book import depth_snapshot_of, parse_book_ticker_frame, parse_depth_frame  # noqa: E402
from binance.rest import RestClient, WeightLimiter  # noqa: E402
from binance.settings import FeedSettings  # noqa: E402
from book.intake import BookIntake, BookSettings  # noqa: E402
from book.symbol import SymbolSeconds  # noqa: E402
from infra import make_redis, tidy_heap  # noqa: E402
from market_data import recorded_book_frames  # noqa: E402
from migrations import apply_migrations  # noqa: E402
from tests.servers import RedisServer, drop_database, recreate_database, setting  # noqa: E402

DATABASE = "feed_v4_book_bench"
CPU_BUDGET = 50.0
LATENCY_BUDGET_MS = 100.0
RECORDED = ("BTCUSDT", "ETHUSDT")


def recorded(symbol: str) -> list[tuple[str, str]]:
    return list(recorded_book_frames(symbol))


def bench_apply() -> None:
    """Parse and apply every recorded book frame, best of 5 rounds."""
    for kinds, label in ((("ticker",), "book tickers"), (("depth",), "depth diffs")):
        rates = []
        for _ in range(5):
            count = 0
            levels = 0
            started = time.perf_counter()
            for symbol in RECORDED:
                state = SymbolSeconds(symbol, frozenset(kinds), Fraction(1), None)
                for kind, text in recorded(symbol):
                    if kind == "snapshot":
                        state.on_snapshot(depth_snapshot_of(text))
                    elif kind == "bookTicker" and "ticker" in kinds:
                        tick = parse_book_ticker_frame(text)[1]
                        state.on_tick(tick)
                        state.close_through(tick.event_ms)
                        count += 1
                    elif kind == "depth" and "depth" in kinds:
                        diff = parse_depth_frame(text.replace("@depth@0ms", "@depth@100ms", 1))[1]
                        state.on_diff(diff)
                        state.close_through(diff.event_ms)
                        count += 1
                        levels += len(diff.bids) + len(diff.asks)
            rates.append((count / (time.perf_counter() - started), levels / max(count, 1)))
        best = max(r for r, _ in rates)
        median = sorted(r for r, _ in rates)[2]
        extra = f" (~{rates[0][1]:.0f} levels each)" if "depth" in kinds else ""
        print(f"{label} parsed and applied{extra}: {median:,.0f}/s median, {best:,.0f}/s best of 5 rounds, one core")


class Replay:
    """One symbol replaying a recording, re-stamped: E and T moved by `shift_ms`."""

    def __init__(self, symbol: str, frames: list[tuple[str, dict | str]], shift_ms: int) -> None:
        self.symbol, self.frames, self.shift_ms, self.at = symbol, frames, shift_ms, 0
        self.stream = symbol.lower()

    def due(self, now_ms: int) -> list[tuple[str, bytes | str, int]]:
        out: list[tuple[str, bytes | str, int]] = []
        while self.at < len(self.frames):
            kind, event = self.frames[self.at]
            if kind == "snapshot":
                out.append(("snapshot", event, 0))
                self.at += 1
                continue
            assert isinstance(event, dict)
            if event["E"] + self.shift_ms > now_ms:
                break
            data = dict(event, s=self.symbol, E=event["E"] + self.shift_ms, T=event["T"] + self.shift_ms)
            name = "@bookTicker" if kind == "bookTicker" else "@depth@100ms"
            out.append((kind, orjson.dumps({"stream": self.stream + name, "data": data}), data["E"]))
            self.at += 1
        return out


async def no_connections(added: object, removed: object) -> None:
    return None


def templates(symbol: str, depth: bool) -> list[tuple[str, dict | str]]:
    out: list[tuple[str, dict | str]] = []
    for kind, text in recorded(symbol):
        if kind == "snapshot":
            if depth:
                out.append((kind, text))
        elif kind == "bookTicker" or depth:
            out.append((kind, orjson.loads(text)["data"]))
    return out


async def bench_live(ticker_count: int, depth_count: int, minutes: float) -> None:
    redis_server = RedisServer(with_timeseries=False)
    redis_server.start()
    url = await recreate_database(setting("POSTGRES_URL"), DATABASE)
    pool = await asyncpg.create_pool(url, min_size=2, max_size=6)
    redis = make_redis(redis_server.url)
    tasks: list[asyncio.Task] = []
    try:
        await apply_migrations(pool)
        symbols = [f"B{i:03d}USDT" for i in range(ticker_count)]
        await pool.execute(
            "INSERT INTO tickers (symbol, trades, book_ticker, depth) "
            "SELECT s, false, true, i <= $2 FROM unnest($1::text[]) WITH ORDINALITY AS t(s, i)",
            symbols,
            depth_count,
        )
        rest = RestClient("http://127.0.0.1:9", WeightLimiter(2400, 60))  # snapshots are handed over
        intake = BookIntake(pool, redis, rest, BookSettings(), "ws://127.0.0.1:9/public", FeedSettings(), 100_000)
        intake.published = []
        intake.streams.update = no_connections  # frames are handed over, not received
        await intake.follow(await intake.read_tickers())
        for name, worker in intake.workers().items():
            if name in ("BOOK_PUBLISH", "BOOK_WRITE"):
                tasks.append(asyncio.create_task(worker()))
        shapes = {(s, d): templates(s, d) for s in RECORDED for d in (False, True)}
        start_ms = int(time.time() * 1000)
        rng = random.Random(7)
        replays = []
        for index, symbol in enumerate(symbols):
            base = RECORDED[index % 2]
            frames = shapes[(base, index < depth_count)]
            first = next(e["E"] for k, e in frames if k != "snapshot")
            replays.append(Replay(symbol, frames, start_ms + rng.randrange(1000) - first))
        last_event: dict[tuple[str, int], float] = {}
        windows: list[tuple[float, float, float]] = []
        window_cpu, window_made, window_at = time.process_time(), 0.0, time.monotonic()
        rss_start = rss_mb()
        began = time.monotonic()
        applied = 0
        tidied = 0.0
        while time.monotonic() - began < minutes * 60:
            now = time.time()
            now_ms = int(now * 1000)
            made = time.process_time()
            due = [(replay.symbol, replay.due(now_ms)) for replay in replays]
            window_made += time.process_time() - made
            for symbol, frames in due:
                for kind, raw, event_ms in frames:
                    if kind == "snapshot":
                        intake.symbols[symbol].on_snapshot(depth_snapshot_of(raw))
                        continue
                    intake.on_frame(raw)
                    applied += 1
                    last_event[(symbol, event_ms - event_ms % 1000)] = time.time()
            if time.monotonic() - tidied > 30:
                tidy_heap()
                tidied = time.monotonic()
            if time.monotonic() - window_at >= 10:
                windows.append((time.process_time() - window_cpu, window_made, time.monotonic() - window_at))
                window_cpu, window_made, window_at = time.process_time(), 0.0, time.monotonic()
            await asyncio.sleep(0.005)
        await asyncio.sleep(2)
        rss_end = rss_mb()
        report(ticker_count, depth_count, windows, rss_start, rss_end, last_event, intake, applied, minutes)
        stored = await pool.fetchval("SELECT count(*) FROM book_ticker_1s_v4")
        print(f"  stored: {stored:,} book ticker seconds; intake: {intake.stats}")
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await redis.aclose()
        await pool.close()
        redis_server.cleanup()
        await drop_database(setting("POSTGRES_URL"), DATABASE)


def report(tickers, depth, windows, rss_start, rss_end, last_event, intake, applied, minutes) -> None:
    shares = [(cpu - made) / wall * 100 for cpu, made, wall in windows]
    mean = sum(shares) / len(shares) if shares else 0.0
    print(
        f"live pace, book ticker for {tickers} symbols, depth for {depth}, {minutes:g} min: "
        f"{applied / (minutes * 60):,.0f} events/s"
    )
    print("  intake CPU % of one core per 10 s: " + " ".join(f"{s:.0f}" for s in shares))
    print(f"  mean {mean:.1f} % (budget {CPU_BUDGET:.0f}): {'OK' if mean < CPU_BUDGET else 'OVER'}")
    print(f"  RSS {rss_start:.0f} -> {rss_end:.0f} MB (growth {rss_end - rss_start:.0f} MB; budget: flat)")
    latencies = []
    for symbol, ts, published in intake.published or ():
        handed = last_event.get((symbol, ts))
        if handed is not None:
            latencies.append((published - handed) * 1000)
    latencies.sort()
    if latencies:
        p50, p99 = percentile(latencies, 0.5), percentile(latencies, 0.99)
        print(
            f"  a second's last event -> its features in Redis: p50 {p50:.0f} ms, p99 {p99:.0f} ms, "
            f"max {latencies[-1]:.0f} ms over {len(latencies):,} seconds (budget {LATENCY_BUDGET_MS:.0f} ms): "
            f"{'OK' if p99 <= LATENCY_BUDGET_MS else 'OVER'}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tickers", type=int, default=200)
    parser.add_argument("--depth", type=int, default=20)
    parser.add_argument("--live-minutes", type=float, default=3.0)
    args = parser.parse_args()
    machine_speed()
    bench_apply()
    if args.live_minutes > 0:
        asyncio.run(bench_live(args.tickers, args.depth, args.live_minutes), loop_factory=uvloop.new_event_loop)
