"""Order book benchmark (issue 16). Prints:

1. events applied per second on one core: the real 2024-07-19 BTCUSDT and ETHUSDT book
   ticker and diff depth frames, each parsed (binance/book.py) and applied to the
   symbol's book and one-second bars (book/symbol.py), seconds closed as the clock
   moves; book tickers and depth diffs apart (a diff carries ~40 levels);
2. live pace (`--live-minutes`, 3 by default; 0 skips it): the daemon's book intake
   (book/intake.py: its `/public` connections, snapshots, publisher, writer and the
   depth filter) in this process on uvloop, against a private Redis and a scratch
   PostgreSQL database. A feeder in its own process (this file with `--serve`) replays
   the recorded frames over real WebSockets, re-stamped to now: book ticker for
   `--tickers` symbols (200) and depth for the first `--depth` of them (20), each
   symbol replaying BTCUSDT's or ETHUSDT's recording at its recorded rate (~100 book
   tickers a second on average, bursts of up to 948 in a second, and ~19 diffs: the
   busiest contracts', an upper bound for most). The book-ticker-only symbols start at
   13 points spread over the 8-minute recordings and go round, so that their bursts
   do not all fall in one second (~21,000 frames a second in all, the recordings'
   average); the depth symbols start at the beginning, a quarter second apart, and
   `GET /fapi/v1/depth` answers with the book as its diffs have made it. Prints the
   intake's CPU (this process) per 10 s and its mean (budget: under 50 % of one core),
   RSS per 10 s (budget: flat), the latency from a second's last event (received here)
   to that second's features in Redis (budget p99 <= 100 ms), with the event loop's
   stalls and the collector's pauses.

Printed, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import subprocess
import sys
import time
import timeit
from array import array
from fractions import Fraction
from pathlib import Path

import asyncpg
import orjson
import uvloop
from aiohttp import web

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.orderflow_bench import machine_speed, rss_mb  # noqa: E402
from bench.soak_bench import percentile  # noqa: E402
from binance.book import depth_snapshot_of, parse_book_ticker_frame, parse_depth_frame  # noqa: E402
from binance.rest import RestClient, WeightLimiter  # noqa: E402
from binance.settings import FeedSettings  # noqa: E402
from book.intake import BookIntake, BookSettings  # noqa: E402
from book.symbol import SymbolSeconds  # noqa: E402
from book.sync import BookSync  # noqa: E402
from infra import make_redis, tidy_heap  # noqa: E402
from market_data import recorded_book_frames  # noqa: E402
from migrations import apply_migrations  # noqa: E402
from orderflow.fold import units_text  # noqa: E402
from tests.servers import RedisServer, drop_database, free_port, recreate_database, setting  # noqa: E402

DATABASE = "feed_v4_book_bench"
CPU_BUDGET = 50.0
LATENCY_BUDGET_MS = 100.0
RECORDED = ("BTCUSDT", "ETHUSDT")


@functools.cache
def recorded(symbol: str) -> list[tuple[str, str]]:
    return list(recorded_book_frames(symbol))


@functools.cache
def recorded_events(symbol: str) -> list[tuple[str, str | dict]]:
    """The recording's snapshot as its text, its stream events parsed (once)."""
    return [(kind, text if kind == "snapshot" else orjson.loads(text)["data"]) for kind, text in recorded(symbol)]


def bench_apply() -> None:
    """Parse and apply every recorded book frame, best of 5 rounds."""
    for kinds, label in ((("ticker",), "book tickers"), (("depth",), "depth diffs")):
        rates = []
        for _ in range(5):
            count = levels = 0
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
                        diff = parse_depth_frame(text)[1]
                        state.on_diff(diff)
                        state.close_through(diff.event_ms)
                        count += 1
                        levels += len(diff.bids) + len(diff.asks)
            rates.append((count / (time.perf_counter() - started), levels / max(count, 1)))
        best = max(r for r, _ in rates)
        median = sorted(r for r, _ in rates)[2]
        extra = f" (~{rates[0][1]:.0f} levels each)" if "depth" in kinds else ""
        print(f"{label} parsed and applied{extra}: {median:,.0f}/s median, {best:,.0f}/s best of 5 rounds, one core")


# --------------------------------------------------------------------------- the feeder process


PHASES_MS = (0, 250, 500, 750)  # depth symbols start a quarter second apart (E stays the send time)
# Book-ticker-only symbols start this far into the recording and go round: 200 symbols
# replaying two recordings in step would burst together (BTCUSDT had 948 tickers in one
# second: 100 copies at once are 95,000 frames in a second, no market's shape).
ROTATIONS_S = tuple(range(0, 480, 37))


class Replay:
    """One symbol replaying a recording, pre-rendered: E and T already moved to now
    (plus its phase), the base symbol's name swapped in as each frame goes out; its
    book kept as its diffs make it, for the snapshots asked of the feeder."""

    def __init__(self, symbol: str, base: str, frames: list[tuple[str, int, str]]) -> None:
        self.symbol, self.frames, self.at = symbol, frames, 0
        self.names = ((base.lower(), symbol.lower()), (base, symbol))
        self.sync = BookSync()
        self.snapshot_text: str | None = None

    def due(self, now_ms: int) -> list[tuple[str, str]]:
        """(stream, frame text) of the events due by `now_ms`."""
        out = []
        (lower_from, lower_to), (upper_from, upper_to) = self.names
        while self.at < len(self.frames):
            kind, event_ms, text = self.frames[self.at]
            if kind == "snapshot":
                self.snapshot_text = text
                self.sync.on_snapshot(depth_snapshot_of(text))
                self.at += 1
                continue
            if event_ms > now_ms:
                break
            text = text.replace(lower_from, lower_to, 1).replace(upper_from, upper_to, 1)
            if kind == "depth":
                self.sync.on_diff(parse_depth_frame(text)[1])
                stream = lower_to + "@depth@100ms"
            else:
                stream = lower_to + "@bookTicker"
            out.append((stream, text))
            self.at += 1
        return out

    def snapshot(self) -> bytes:
        book = self.sync.book if self.sync.state == "synced" else None
        if book is None:  # not synchronised yet: the recorded snapshot, as taken
            return (self.snapshot_text or "").encode()
        bids, asks = book.levels()
        now_ms = int(time.time() * 1000)
        return orjson.dumps(
            {
                "lastUpdateId": book.update_id,
                "E": now_ms,
                "T": now_ms,
                "bids": [[units_text(p), units_text(q)] for p, q in reversed(bids)],
                "asks": [[units_text(p), units_text(q)] for p, q in asks],
            }
        )


def rendered(symbol: str, depth: bool, start_ms: int, rotate_s: int = 0) -> list[tuple[str, int, str]]:
    """The recording's frames re-stamped to begin at `start_ms` (depth under the @100ms
    name). `rotate_s`: begin that far in and go round (book tickers only: a depth
    chain cannot wrap), so that symbols replaying one recording burst at different times."""
    events = recorded_events(symbol)
    stamped = [e["E"] for _, e in events if isinstance(e, dict)]
    first, length = stamped[0], stamped[-1] - stamped[0] + 1000
    cut = first + rotate_s * 1000
    out: list[tuple[str, int, str]] = []
    for kind, event in events:
        if isinstance(event, str):
            if depth:
                out.append((kind, 0, event))
        elif kind == "bookTicker" or depth:
            moved = event["E"] - cut if event["E"] >= cut else event["E"] - cut + length
            shift = start_ms + moved - event["E"]
            data = dict(event, E=event["E"] + shift, T=event["T"] + shift)
            stream = symbol.lower() + ("@bookTicker" if kind == "bookTicker" else "@depth@100ms")
            out.append((kind, data["E"], orjson.dumps({"stream": stream, "data": data}).decode()))
    if rotate_s:
        out.sort(key=lambda frame: frame[1])
    return out


def text_frame(payload: bytes) -> bytes:
    """A server's unmasked, uncompressed WebSocket text frame (RFC 6455 section 5.2)."""
    size = len(payload)
    if size < 126:
        return bytes((0x81, size)) + payload
    if size < 65_536:
        return bytes((0x81, 126)) + size.to_bytes(2, "big") + payload
    return bytes((0x81, 127)) + size.to_bytes(8, "big") + payload


def bench_symbols(count: int) -> list[str]:
    return [f"B{i:03d}USDT" for i in range(count)]


async def serve(port: int, ticker_count: int, depth_count: int) -> None:
    """The feeder: the recordings for every symbol on `/public`, snapshots on REST."""
    for base in RECORDED:
        recorded_events(base)  # read once, before the clock starts
    start_ms = int(time.time() * 1000) + 3000  # rendering takes a few seconds
    shapes = {(base, True, phase): rendered(base, True, start_ms + phase) for base in RECORDED for phase in PHASES_MS}
    shapes |= {
        (base, False, rotate): rendered(base, False, start_ms + rotate % 1000, rotate)
        for base in RECORDED
        for rotate in ROTATIONS_S
    }
    replays: dict[str, Replay] = {}
    for index, symbol in enumerate(bench_symbols(ticker_count)):
        base = RECORDED[index % 2]
        if index < depth_count:
            phase = PHASES_MS[(index // 2) % len(PHASES_MS)]
            replays[symbol] = Replay(symbol, base, shapes[(base, True, phase)])
        else:
            rotate = ROTATIONS_S[(index // 2) % len(ROTATIONS_S)]
            replays[symbol] = Replay(symbol, base, shapes[(base, False, rotate)])
    listeners: list[tuple[web.WebSocketResponse, set[str], asyncio.Transport]] = []

    async def stream(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=2**22, compress=False)  # as the fake exchange (no deflate)
        await ws.prepare(request)
        entry = (ws, set(request.query.get("streams", "").split("/")), request.transport)
        listeners.append(entry)
        try:
            async for message in ws:
                request_body = orjson.loads(message.data)
                if request_body.get("method") == "SUBSCRIBE":
                    entry[1].update(request_body.get("params", []))
                await ws.send_str(orjson.dumps({"result": None, "id": request_body.get("id")}).decode())
        finally:
            listeners.remove(entry)
        return ws

    async def depth(request: web.Request) -> web.Response:
        replay = replays.get(request.query.get("symbol", ""))
        if replay is None:
            return web.json_response({"code": -1121, "msg": "Invalid symbol."}, status=400)
        return web.Response(body=replay.snapshot(), content_type="application/json")

    async def pump() -> None:
        """Every 5 ms, what is due, as text frames written straight to each socket in one
        write (aiohttp's sender costs ~10 µs a frame: at 21,000 frames a second the feeder
        fell up to a second behind on this 2-core machine)."""
        while True:
            now_ms = int(time.time() * 1000)
            batches: list[list[bytes]] = [[] for _ in listeners]
            for replay in replays.values():
                for stream_name, text in replay.due(now_ms):
                    frame = text_frame(text.encode())
                    for batch, (_, streams, _) in zip(batches, listeners, strict=True):
                        if stream_name in streams:
                            batch.append(frame)
            for batch, (ws, _, transport) in zip(batches, listeners, strict=True):
                if batch and not ws.closed and not transport.is_closing():
                    transport.write(b"".join(batch))
            await asyncio.sleep(0.005)

    app = web.Application()
    app.router.add_get("/public/stream", stream)
    app.router.add_get("/fapi/v1/depth", depth)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await pump()


# --------------------------------------------------------------------------- the intake under load


def stamp(raw: str | bytes, last_event: dict[tuple[str, int], float], late: list) -> None:
    """The receipt time of each (symbol, second)'s newest event, and the feeder's lag."""
    text = raw if isinstance(raw, str) else raw.decode()
    at = text.find('"E":')
    if at > 0 and text.startswith('{"stream":"'):
        event_ms = int(text[at + 4 : at + 17])
        symbol = text[11 : text.index("@")].upper()
        now = time.time()
        last_event[(symbol, event_ms - event_ms % 1000)] = now
        lag_ms = now * 1000 - event_ms
        late[min(int(lag_ms) // 10, len(late) - 1) if lag_ms > 0 else 0] += 1


async def bench_live(ticker_count: int, depth_count: int, minutes: float) -> None:
    port = free_port()
    command = [sys.executable, __file__, "--serve", str(port), "--tickers", str(ticker_count)]
    command += ["--depth", str(depth_count)]
    feeder = subprocess.Popen(command, cwd=ROOT)  # noqa: ASYNC220 (once, before anything runs)
    redis_server = RedisServer(with_timeseries=False)
    redis_server.start()
    url = await recreate_database(setting("POSTGRES_URL"), DATABASE)
    pool = await asyncpg.create_pool(url, min_size=2, max_size=6)
    redis = make_redis(redis_server.url)
    rest = RestClient(f"http://127.0.0.1:{port}", WeightLimiter(2400, 60))
    tasks: list[asyncio.Task] = []
    try:
        await apply_migrations(pool)
        symbols = bench_symbols(ticker_count)
        await pool.execute(
            "INSERT INTO tickers (symbol, trades, book_ticker, depth) "
            "SELECT s, false, true, i <= $2 FROM unnest($1::text[]) WITH ORDINALITY AS t(s, i)",
            symbols,
            depth_count,
        )
        await asyncio.sleep(3.0)  # the feeder is up and has rendered its frames
        intake = BookIntake(pool, redis, rest, BookSettings(), f"ws://127.0.0.1:{port}/public", FeedSettings(), 100_000)
        intake.published = []
        last_event: dict[tuple[str, int], float] = {}
        late = [0] * 101  # frames by how late they came after their E, 10 ms steps (the last: 1 s or more)
        on_frame = intake.on_frame

        def timed(raw: str | bytes) -> None:
            on_frame(raw)
            stamp(raw, last_event, late)

        intake.streams.on_frame = timed
        # What `stamp` adds to each frame, taken off the intake's CPU below.
        sample, scratch = recorded(RECORDED[0])[5][1], [0] * 101
        timing_s = min(timeit.repeat(lambda: stamp(sample, {}, scratch), number=20_000, repeat=3)) / 20_000
        await intake.follow(await intake.read_tickers())
        for name, worker in intake.workers().items():
            if name != "BOOK_TICKERS":
                tasks.append(asyncio.create_task(worker()))
        await asyncio.sleep(5)  # connected and synchronised: measured from here
        windows: list[tuple[float, float]] = []
        window_cpu, window_at = time.process_time(), time.monotonic()
        frames_at_start = window_frames = intake.stats["frames"]
        intake.published = []
        rss_start = rss_mb()
        late[:] = [0] * len(late)
        pauses = GcPauses()
        began = time.monotonic()
        latencies = Latencies()
        stalls = [0] * 7  # the event loop's stalls: a 1 ms sleep overshooting by <1, <5, <20, <50, <100, <500, more ms
        tasks.append(asyncio.create_task(watch_loop(stalls)))
        rss_windows = []
        while time.monotonic() - began < minutes * 60:
            while time.monotonic() - window_at < 10:
                await asyncio.sleep(1)
                latencies.take(intake, last_event)  # bounded: what is measured is let go
            frames = intake.stats["frames"]
            windows.append(
                (time.process_time() - window_cpu - (frames - window_frames) * timing_s, time.monotonic() - window_at)
            )
            window_cpu, window_at, window_frames = time.process_time(), time.monotonic(), frames
            tidy_heap()
            rss_windows.append(rss_mb())
        rate = (intake.stats["frames"] - frames_at_start) / (time.monotonic() - began)
        report(ticker_count, depth_count, windows, rss_start, rss_windows, latencies, late, intake, rate, minutes)
        print(f"  (the bench's own stamping of each frame, {timing_s * 1e6:.1f} µs, is taken off the CPU above)")
        print(f"  garbage collector: {pauses.report()}")
        bounds = ("1", "5", "20", "50", "100", "500", "more")
        print(
            "  event loop stalls (ms: count): " + ", ".join(f"<{b}: {n}" for b, n in zip(bounds, stalls, strict=True))
        )
        pauses.close()
        stored = await pool.fetchval("SELECT count(*) FROM book_ticker_1s_v4")
        print(f"  stored: {stored:,} book ticker seconds; intake: {intake.stats}")
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        feeder.terminate()
        feeder.wait(10)
        await rest.close()
        await redis.aclose()
        await pool.close()
        redis_server.cleanup()
        await drop_database(setting("POSTGRES_URL"), DATABASE)


async def watch_loop(stalls: list[int]) -> None:
    limits = (1, 5, 20, 50, 100, 500)
    while True:
        started = time.perf_counter()
        await asyncio.sleep(0.001)
        over = (time.perf_counter() - started) * 1000 - 1
        stalls[next((i for i, limit in enumerate(limits) if over < limit), len(limits))] += 1


class GcPauses:
    """The cyclic collector's pauses while measured: they stall the loop that reads the frames."""

    def __init__(self) -> None:
        self.started = 0.0
        self.pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
        gc.callbacks.append(self.callback)

    def callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self.started = time.perf_counter()
        else:
            self.pauses[info["generation"]].append((time.perf_counter() - self.started) * 1000)

    def report(self) -> str:
        return ", ".join(
            f"gen{g} {len(p)}x (max {max(p, default=0):.1f} ms, total {sum(p):.0f} ms)" for g, p in self.pauses.items()
        )

    def close(self) -> None:
        gc.callbacks.remove(self.callback)


class Latencies:
    """Per published second, ms: from the frame that finished it, from its last event
    (or its end, if later), from its end."""

    def __init__(self) -> None:
        self.own, self.after_last, self.after_end = array("d"), array("d"), array("d")

    def take(self, intake: BookIntake, last_event: dict[tuple[str, int], float]) -> None:
        published, intake.published = intake.published or [], []
        for symbol, ts, finishing, done in published:
            end = (ts + 1000) / 1000
            self.own.append((done - finishing) * 1000)
            self.after_end.append((done - end) * 1000)
            handed = last_event.pop((symbol, ts), None)
            if handed is not None:
                self.after_last.append((done - max(handed, end)) * 1000)
        if len(last_event) > 50_000:  # seconds never published (a hole): let go
            horizon = (time.time() - 60) * 1000
            for key in [k for k in last_event if k[1] < horizon]:
                del last_event[key]


def report(tickers, depth, windows, rss_start, rss_windows, latencies, late, intake, rate, minutes) -> None:
    shares = [cpu / wall * 100 for cpu, wall in windows]
    mean = sum(shares) / len(shares) if shares else 0.0
    print(
        f"live pace over real WebSockets, book ticker for {tickers} symbols, depth for {depth}, {minutes:g} min: "
        f"{rate:,.0f} frames/s received"
    )
    print("  intake CPU % of one core per 10 s: " + " ".join(f"{s:.0f}" for s in shares))
    print(f"  mean {mean:.1f} % (budget {CPU_BUDGET:.0f}): {'OK' if mean < CPU_BUDGET else 'OVER'}")
    print(f"  RSS MB at the start {rss_start:.0f}, then per 10 s: " + " ".join(f"{r:.0f}" for r in rss_windows))
    print(
        "  frames received after their event time (the feeder's lag and this loop's), share within "
        + ", ".join(f"{(n + 1) * 10} ms {sum(late[: n + 1]) / max(sum(late), 1):.1%}" for n in (1, 4, 9, 19, 49))
    )
    grace = intake.settings.book_grace_ms
    for label, values, budget in (
        (
            "the frame that finishes a second (its time past the second's end + grace) -> features in Redis",
            latencies.own,
            True,
        ),
        (
            f"a second's last event received (or its end, if later) -> features in Redis (incl. {grace} ms grace)",
            latencies.after_last,
            True,
        ),
        ("the second's end (exchange time, same host clock) -> features in Redis", latencies.after_end, False),
    ):
        if values:
            ordered = sorted(values)
            p50, p99 = percentile(ordered, 0.5), percentile(ordered, 0.99)
            verdict = f" (budget p99 {LATENCY_BUDGET_MS:.0f} ms): {'OK' if p99 <= LATENCY_BUDGET_MS else 'OVER'}"
            print(
                f"  {label}: p50 {p50:.0f} ms, p99 {p99:.0f} ms, max {ordered[-1]:.0f} ms over {len(ordered):,} "
                "seconds" + (verdict if budget else "")
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tickers", type=int, default=200)
    parser.add_argument("--depth", type=int, default=20)
    parser.add_argument("--live-minutes", type=float, default=3.0)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)  # the feeder process, on this port
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(args.serve, args.tickers, args.depth), loop_factory=uvloop.new_event_loop)
        sys.exit(0)
    machine_speed()
    bench_apply()
    if args.live_minutes > 0:
        asyncio.run(bench_live(args.tickers, args.depth, args.live_minutes), loop_factory=uvloop.new_event_loop)
