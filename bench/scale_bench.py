"""Scale-out benchmark (issue 20). Prints, for 1, 2 and 3 processes sharing 789 symbols
(kline + aggTrade):

1. throughput and CPU per process: each process is the daemon's feed (`Feed`: frame
   parsing, candle intake into PostgreSQL and Redis, M5/M15 aggregation, order flow and
   footprints, its lease round; every worker but the WebSocket connections, whose
   frames come from memory instead), taking its share of the symbols through the real
   leases in Redis. Once the shares are settled, every process is handed the same
   made-up market for its own symbols (`--minutes` simulated minutes: per symbol and
   minute `--trades` aggTrades, 2 forming klines and the closing one, consistent with
   the trades) and takes it in as fast as it can, until every candle and order-flow
   bar is written, and (unless `--no-indicators`) every indicator value of its symbols'
   bars computed and in PostgreSQL: each process's indicator worker reads every candle
   event through its own group and computes its own share (indicators/groups.py).
   Throughput = all frames / the slowest process's time. Printed: the speed-up with 2
   processes on this machine (budget >= 1.7x) and the coordination overhead, CPU per
   symbol-minute with 3 processes against 1 (budget within 10 %). Frames are made
   before the clock starts;
2. takeover: `kill -9` of one of the 3 processes, time until the other two follow every
   symbol (budget 10 s);
3. with real daemons (`python feed_v4_main.py`, 3 of them, every worker) against the fake
   exchange serving the 789 symbols with trades at live pace: Binance connection
   attempts across all processes over `--daemon-minutes` (default 5), counted by the
   exchange, scaled to 5 minutes (Binance's limit: 300 per IP), and the CPU of each.

A private Redis Stack and a scratch PostgreSQL database per run; the processes' console
logs go to scale_bench_workers.log in the temporary directory. Printed, never asserted.

    .venv/bin/python bench/scale_bench.py [--symbols 789] [--minutes 10] [--daemon-minutes 5]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import asyncpg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import core_io  # noqa: E402
import infra  # noqa: E402
from binance.trades import agg_trade_stream  # noqa: E402
from candles import Candle  # noqa: E402
from fake_exchange import FakeExchange, SyntheticSource  # noqa: E402
from fake_exchange.frames import kline_event  # noqa: E402
from feed_and_aggregate import Feed, FeedSettings  # noqa: E402
from indicators_main import IndicatorOptions, IndicatorWorker  # noqa: E402
from infra import load_settings, make_redis, run_safe_loop  # noqa: E402
from migrations import apply_migrations  # noqa: E402
from orderflow.fold import units_text  # noqa: E402
from tests.daemon import DaemonProcess  # noqa: E402
from tests.servers import RedisServer, drop_database, recreate_database, setting  # noqa: E402

M1 = 60_000
START_MS = int(datetime(2026, 2, 6, tzinfo=UTC).timestamp() * 1000)  # the exchange's clock, about
DATABASE = "feed_v4_scale_bench"
WORKER_LOG = Path(tempfile.gettempdir()) / "scale_bench_workers.log"  # their console logs
SKIPPED_WORKERS = {"FEED_CONNECTIONS", "FEED_REST_FALLBACK"}  # frames come from memory
SPEEDUP_BUDGET, OVERHEAD_BUDGET, TAKEOVER_BUDGET_S = 1.7, 10.0, 10.0


def symbols_of(count: int) -> list[str]:
    return SyntheticSource(count).symbols


# --------------------------------------------------------------------------- the market


def market_frames(symbols: list[str], first_minute: int, minutes: int, trades: int) -> list[bytes]:
    """Each symbol's aggTrades, two forming klines and its closing kline per minute, as
    raw frames in time order; the closes carry the minute's first and last trade ids and
    totals, so the order flow finds every minute complete."""
    frames: list[bytes] = []
    rng = random.Random(7)
    state = {s: (10_000_000_000 + 1_000_000 * (sum(map(ord, s)) % 500), 1_000_000) for s in symbols}
    for m in range(minutes):
        minute = first_minute + m * M1
        bars: dict[str, list[int]] = {}
        for k in range(trades):
            at = minute + (k * 59_000) // trades + 100
            for symbol in symbols:
                price, agg_id = state[symbol]
                price = max(1_000_000, price + rng.randrange(-3, 4) * 1_000_000)
                qty = rng.randrange(1, 500) * 1_000_000
                sold = rng.random() < 0.5
                state[symbol] = (price, agg_id + 1)
                bar = bars.setdefault(symbol, [price, price, price, price, 0, 0, 0, agg_id, agg_id])
                bar[1], bar[2], bar[3] = max(bar[1], price), min(bar[2], price), price
                bar[4] += qty
                bar[5] += 0 if sold else qty
                bar[6] += 1
                bar[8] = agg_id
                event = {"e": "aggTrade", "E": at, "s": symbol, "a": agg_id, "p": units_text(price)}
                event |= {"q": units_text(qty), "f": agg_id, "l": agg_id, "T": at, "m": sold}
                frames.append(json.dumps({"stream": agg_trade_stream(symbol), "data": event}).encode())
            if k in (trades // 3, 2 * trades // 3):
                frames += [_kline(symbol, minute, bars[symbol], at, False) for symbol in symbols]
        frames += [_kline(symbol, minute, bars[symbol], minute + M1 + 200, True) for symbol in symbols]
    return frames


def _kline(symbol: str, minute: int, bar: list[int], at: int, closed: bool) -> bytes:
    o, h, lo, c, volume, buy, count, first, last = bar
    d = [_decimal(v) for v in (o, h, lo, c, volume, buy)]
    candle = Candle(symbol, "m1", minute, d[0], d[1], d[2], d[3], d[4], d[4] * d[3], count, d[5], d[5] * d[3])
    data = kline_event(candle, at, closed, (first, last))
    return b'{"stream":"' + f"{symbol.lower()}@kline_1m".encode() + b'","data":' + data + b"}"


def _decimal(units: int) -> Decimal:
    return Decimal(units_text(units))


# --------------------------------------------------------------------------- one process


def settled(feed: Feed) -> bool:
    """Everything taken in is written (the feed's shutdown drain, without leaving)."""
    intake, flow = feed.intake, feed.orderflow
    return not (
        not feed.closed.empty()
        or feed.batch
        or intake.buckets_due
        or intake.aggregating
        or intake.held
        or intake.to_settle
        or flow.finals
        or flow.to_write
        or flow.to_publish
    )


async def run_worker(args: argparse.Namespace) -> None:
    """One process of the deployment, told what to do on stdin (GO, START), reporting
    on stdout (one JSON object a line)."""
    env = {
        "REDIS_URL": args.redis,
        "POSTGRES_URL": args.pg,
        "BINANCE_REST_URL": args.rest,
        "BINANCE_WS_URL": "ws://127.0.0.1:9/market",
        "INITIAL_HISTORY_M1": "3",
        "FRAME_TIME_TOLERANCE_S": "86400",
        "TICKER_REFRESH_S": "0.5",
    }
    settings = load_settings(env)
    feed_settings = FeedSettings.from_env(settings, env)
    pool = await asyncpg.create_pool(args.pg, min_size=2, max_size=8)
    redis = make_redis(args.redis)
    feed = Feed(settings, feed_settings, pool, redis, core_io.make_candle_store(redis, True, settings.redis_candles))
    workers = {name: fn for name, fn in feed.workers().items() if name not in SKIPPED_WORKERS}
    indicators = None
    if args.indicators:  # as the daemon wires them (feed_v4_main.Daemon)
        indicators = IndicatorWorker(settings, pool, redis, IndicatorOptions())
        indicators.share(feed.ownership)
        workers |= indicators.workers()
    tasks = [asyncio.create_task(run_safe_loop(fn, name, 1.0)) for name, fn in workers.items()]
    lines = asyncio.Queue()
    loop = asyncio.get_running_loop()
    loop.add_reader(sys.stdin.fileno(), lambda: lines.put_nowait(sys.stdin.readline().strip()))
    reporter = asyncio.create_task(report_share(feed))
    first_minute = int((await lines.get()).split()[1])  # GO <minute>
    reporter.cancel()
    owned = sorted(feed.symbols)
    frames = market_frames(owned, first_minute, args.minutes, args.trades)
    print(json.dumps({"made": len(frames), "symbols": len(owned)}), flush=True)
    await lines.get()  # START
    reporter = asyncio.create_task(report_share(feed))
    cpu, began, stored = time.process_time(), time.monotonic(), feed.intake.stored_m1
    for i, raw in enumerate(frames):
        feed.handle_frame(raw)
        if i % 500 == 499:
            await asyncio.sleep(0)
            while feed.closed.qsize() > 20_000:
                await asyncio.sleep(0.01)
    while not settled(feed):
        await asyncio.sleep(0.005)
    while indicators is not None and not await indicators_settled(redis, indicators):
        await asyncio.sleep(0.01)
    wall, cpu = time.monotonic() - began, time.process_time() - cpu
    stats = {"frames": len(frames), "wall_s": wall, "cpu_s": cpu, "symbols": len(owned)}
    stats["indicator_bars"] = indicators.stats["bars"] if indicators else 0
    stats |= {"stored_m1": feed.intake.stored_m1 - stored, "bad_frames": feed.stats.bad_frames}
    print(json.dumps({"done": stats}), flush=True)
    await lines.get()  # a takeover run: the parent kills some, the others go on reporting
    for task in tasks:
        task.cancel()


async def indicators_settled(redis, worker: IndicatorWorker) -> bool:
    """Its group has read every candle event, every value of its bars is in PostgreSQL."""
    if worker.pending or worker.pending.held():
        return False
    for stream in core_io.CANDLE_STREAMS.values():
        newest = await redis.xrevrange(stream, count=1)
        group = next(g for g in await redis.xinfo_groups(stream) if g["name"] == worker.group)
        delivered = core_io.stream_id(group["last-delivered-id"])
        if group["pending"] or (newest and core_io.stream_id(newest[0][0]) > delivered):
            return False
    return True


async def report_share(feed: Feed) -> None:
    while True:
        print(json.dumps({"share": sorted(feed.symbols)}), flush=True)
        await asyncio.sleep(0.1)


# --------------------------------------------------------------------------- the parent


class Worker:
    def __init__(self, redis_url: str, pg_url: str, rest_url: str, args: argparse.Namespace) -> None:
        command = [sys.executable, __file__, "--worker", "--redis", redis_url, "--pg", pg_url, "--rest", rest_url]
        command += ["--minutes", str(args.minutes), "--trades", str(args.trades)]
        command += [] if args.indicators else ["--no-indicators"]
        self.process = subprocess.Popen(
            command, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=WORKER_LOG.open("a"), text=True
        )
        self.share: set[str] = set()
        self.messages: asyncio.Queue = asyncio.Queue()
        asyncio.get_running_loop().add_reader(self.process.stdout.fileno(), self._read)

    def _read(self) -> None:
        line = self.process.stdout.readline()
        if not line:
            asyncio.get_running_loop().remove_reader(self.process.stdout.fileno())
            return
        if not line.startswith("{"):
            return  # the process's console log
        message = json.loads(line)
        if "share" in message:
            self.share = set(message["share"])
        else:
            self.messages.put_nowait(message)

    def tell(self, line: str) -> None:
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def stop(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            asyncio.get_running_loop().remove_reader(self.process.stdout.fileno())
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


def split_done(workers: list[Worker], symbols: list[str]) -> bool:
    shares = [w.share for w in workers]
    return all(shares) and sorted(s for share in shares for s in share) == sorted(symbols)


async def wait_for(predicate, timeout: float, what: str) -> float:
    began = time.monotonic()
    while not predicate():
        if time.monotonic() - began > timeout:
            raise SystemExit(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)
    return time.monotonic() - began


async def fresh_servers(symbols: list[str]) -> tuple[RedisServer, str]:
    redis_server = RedisServer(with_timeseries=True)
    redis_server.start()
    url = await recreate_database(setting("POSTGRES_URL"), DATABASE)
    pool = await asyncpg.create_pool(url, min_size=1, max_size=2)
    try:
        await apply_migrations(pool)
        await pool.execute(
            "INSERT INTO tickers (symbol, trades) SELECT unnest($1::text[]), true "
            "ON CONFLICT (symbol) DO UPDATE SET trades = true, status = 'enabled'",
            symbols,
        )
    finally:
        await pool.close()
    return redis_server, url


async def intake_run(count: int, symbols: list[str], exchange: FakeExchange, args, takeover: bool) -> dict:
    redis_server, pg_url = await fresh_servers(symbols)
    workers = [Worker(redis_server.url, pg_url, exchange.rest_url, args) for _ in range(count)]
    try:
        await wait_for(lambda: split_done(workers, symbols), 300, f"{count} processes to split the symbols")
        await history_stored(pg_url, symbols, START_MS - M1)  # the boot's catch-up over REST is done
        await asyncio.sleep(2)
        await wait_for(lambda: split_done(workers, symbols), 60, "a settled split")
        first_minute = START_MS  # the exchange's forming minute: the history ends just before it
        for worker in workers:
            worker.tell(f"GO {first_minute}")
        made = [await worker.messages.get() for worker in workers]
        for worker in workers:
            worker.tell("START")
        done = [(await worker.messages.get())["done"] for worker in workers]
        result = {"made": made, "done": done}
        if takeover:
            victim, survivors = workers[0], workers[1:]
            killed_at = time.monotonic()
            os.kill(victim.process.pid, signal.SIGKILL)
            await wait_for(lambda: sorted(s for w in survivors for s in w.share) == sorted(symbols), 60, "the takeover")
            result["takeover_s"] = time.monotonic() - killed_at
        return result
    finally:
        for worker in workers:
            worker.stop()
        redis_server.cleanup()
        await drop_database(setting("POSTGRES_URL"), DATABASE)


async def history_stored(pg_url: str, symbols: list[str], last_closed: int) -> None:
    """Every symbol's history stored up to `last_closed` (the REST weight limit paces it)."""
    pool = await asyncpg.create_pool(pg_url, min_size=1, max_size=1)
    try:
        at = core_io.ms_to_datetime(last_closed)
        for _ in range(3000):
            found = await pool.fetchval("SELECT count(DISTINCT symbol) FROM ohlcv4_m1 WHERE open_time = $1", at)
            if found == len(symbols):
                return
            await asyncio.sleep(0.1)
        raise SystemExit(f"the history of {len(symbols) - found} symbols was not stored in 300 s")
    finally:
        await pool.close()


def report_intake(runs: dict[int, list[dict]], symbol_count: int, minutes: int, indicators: bool) -> None:
    """Each process count's best round (the least disturbed by the machine's other work):
    its throughput, and its CPU per symbol-minute."""
    print(
        f"\n1. intake, {symbol_count} symbols x {minutes} simulated minutes (kline + aggTrade"
        f"{', with the indicators' if indicators else ', the feed alone'}), the best of "
        f"{len(runs[1])} round(s) per process count:"
    )
    throughput: dict[int, float] = {}
    cpu_per: dict[int, float] = {}
    for count, rounds in runs.items():
        figures = []
        for run in rounds:
            done = run["done"]
            frames = sum(d["frames"] for d in done)
            slowest = max(d["wall_s"] for d in done)
            cpu = sum(d["cpu_s"] for d in done)
            figures.append((frames / slowest, cpu / (symbol_count * minutes) * 1e3, frames, slowest, done))
        best = max(figures, key=lambda f: f[0])
        throughput[count], cpu_per[count] = best[0], min(f[1] for f in figures)
        print(
            f"  {count} process(es): {best[2]:,} frames in {best[3]:.2f} s = {best[0]:,.0f} frames/s "
            f"(rounds: {', '.join(f'{f[0]:,.0f}' for f in figures)}); "
            f"CPU {cpu_per[count]:.3f} ms per symbol-minute (rounds: {', '.join(f'{f[1]:.3f}' for f in figures)})"
        )
        for i, d in enumerate(best[4]):
            print(
                f"    process {i + 1}: {d['symbols']} symbols, {d['frames']:,} frames in {d['wall_s']:.2f} s, "
                f"CPU {d['cpu_s']:.2f} s ({d['cpu_s'] / d['wall_s']:.0%} of a core), "
                f"{d['stored_m1']:,} M1 stored, {d['indicator_bars']:,} indicator bars computed, "
                f"{d['bad_frames']} bad frames"
            )
    speedup = throughput[2] / throughput[1]
    print(f"  speed-up with 2 processes: {speedup:.2f}x (budget >= {SPEEDUP_BUDGET}x; {os.cpu_count()} cores)")
    overhead = (cpu_per[3] / cpu_per[1] - 1) * 100
    print(f"  CPU per symbol, 3 processes against 1: {overhead:+.1f} % (budget within {OVERHEAD_BUDGET:.0f} %)")
    takeover_s = runs[3][0]["takeover_s"]
    print(f"\n2. takeover after kill -9 of 1 of 3 processes: {takeover_s:.1f} s (budget {TAKEOVER_BUDGET_S:.0f} s)")


# --------------------------------------------------------------------------- real daemons


async def daemons_run(symbols: list[str], minutes: float) -> None:
    """3 real daemons from boot for `minutes`: one is killed (-9) once they have split
    the symbols and a replacement started once the others have taken its share, as a
    platform restarts a dead worker."""
    source = SyntheticSource(len(symbols), seed=3)
    exchange = FakeExchange(source, start_ms=START_MS, speed=1, trades_per_agg=50, books=False)
    await exchange.start()
    redis_server, pg_url = await fresh_servers(symbols)
    redis = make_redis(redis_server.url)
    env = {
        "REDIS_URL": redis_server.url,
        "POSTGRES_URL": pg_url,
        "BINANCE_WS_URL": exchange.ws_url,
        "BINANCE_REST_URL": exchange.rest_url,
        "SYMBOLS": ",".join(symbols),
        "INITIAL_HISTORY_M1": "30",
        "BOOT_WAIT_S": "10",
    }
    daemons = [DaemonProcess(env) for _ in range(3)]
    try:
        began = time.monotonic()
        started = dict.fromkeys(daemons, began)
        for daemon in daemons:
            daemon.start()
        await until_followed(redis, daemons, symbols, 600)
        split_s = time.monotonic() - began
        victim = daemons[0]
        killed_at = time.monotonic()
        victim.kill()
        await until_followed(redis, daemons[1:], symbols, 60)
        takeover_s = time.monotonic() - killed_at
        daemons.append(DaemonProcess(env))
        daemons[-1].start()
        started[daemons[-1]] = time.monotonic()
        await until_followed(redis, daemons[1:], symbols, 300)
        rejoined_s = time.monotonic() - killed_at
        await asyncio.sleep(max(0.0, began + minutes * 60 - time.monotonic()))
        wall = time.monotonic() - began
        attempts = exchange.stats.connections_opened
        print(
            f"\n3. real daemons (python feed_v4_main.py, every worker), {len(symbols)} symbols with trades at live "
            f"pace, {wall / 60:.1f} minutes from boot: 3 processes split the symbols {split_s:.0f} s after boot; "
            f"kill -9 of one: the other two follow every symbol {takeover_s:.1f} s later (budget "
            f"{TAKEOVER_BUDGET_S:.0f} s); a replacement has its share {rejoined_s:.0f} s after the kill.\n"
            f"  Binance connection attempts across all processes: {attempts} in those {wall / 60:.1f} minutes "
            f"(Binance: 300 per 5 minutes per IP; each process keeps to BINANCE_CONNECT_LIMIT, 240, and the "
            f"group's window)"
        )
        for i, daemon in enumerate(daemons[1:]):
            lived = time.monotonic() - started[daemon]
            print(f"    daemon {i + 2}: CPU {cpu_seconds(daemon.process.pid) / lived:.0%} of a core since its start")
    finally:
        for daemon in daemons:
            daemon.cleanup()
        await redis.aclose()
        await exchange.stop()
        redis_server.cleanup()
        await drop_database(setting("POSTGRES_URL"), DATABASE)


async def until_followed(redis, daemons: list[DaemonProcess], symbols: list[str], timeout: float) -> None:
    """The `daemons` follow every symbol between them, each once, by their heartbeats (a
    killed one's heartbeat outlives it by HEARTBEAT_TTL_S: not counted)."""
    pids = {str(d.process.pid) for d in daemons}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        beats = [b for b in (await infra.read_heartbeats(redis)).values() if b.get("pid") in pids]
        shares = [b.get("symbols", "").split(",") for b in beats]
        followed = sorted(s for share in shares for s in share if s)
        if len(beats) == len(pids) and all(shares) and followed == sorted(symbols):
            return
        await asyncio.sleep(0.1)
    raise SystemExit(f"timed out: {len(pids)} daemons did not come to follow every symbol")


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def main(args: argparse.Namespace) -> None:
    symbols = symbols_of(args.symbols)
    source = SyntheticSource(len(symbols), seed=3)
    exchange = FakeExchange(source, start_ms=START_MS, speed=0.01, books=False)  # REST only: history, listings
    await exchange.start()
    runs: dict[int, list[dict]] = {1: [], 2: [], 3: []}
    try:
        for round_ in range(args.repeat):
            for count in runs:
                takeover = count == 3 and round_ == 0
                runs[count].append(await intake_run(count, symbols, exchange, args, takeover))
                print(f"  (round {round_ + 1}: {count} process(es) done)", flush=True)
    finally:
        await exchange.stop()
    report_intake(runs, args.symbols, args.minutes, args.indicators)
    if args.daemon_minutes > 0:
        await daemons_run(symbols, args.daemon_minutes)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--symbols", type=int, default=789)
    parser.add_argument("--minutes", type=int, default=10, help="simulated minutes of frames per run")
    parser.add_argument(
        "--trades", type=int, default=120, help="aggTrades per symbol and minute (120: 1,600 a second for 789)"
    )
    parser.add_argument("--repeat", type=int, default=2, help="rounds of 1, 2 and 3 processes")
    parser.add_argument(
        "--no-indicators", dest="indicators", action="store_false", help="the feed alone, without the indicators"
    )
    parser.add_argument("--daemon-minutes", type=float, default=5.0, help="the real daemons' run (0: skip it)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--redis", help=argparse.SUPPRESS)
    parser.add_argument("--pg", help=argparse.SUPPRESS)
    parser.add_argument("--rest", help=argparse.SUPPRESS)
    return parser.parse_args()


if __name__ == "__main__":
    import uvloop

    arguments = parse_args()
    uvloop.run(run_worker(arguments) if arguments.worker else main(arguments))
