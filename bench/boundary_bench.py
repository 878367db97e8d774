"""Boundary benchmark: what a user gets at the worst minute boundary.

The daemon (`python feed_v4_main.py`, every worker, its default settings and indicator
set) runs as a subprocess against the fake exchange (its own process) at **real speed**
with 500 synthetic symbols whose closing klines all go out within the same ~50 ms
(`--close-delay-ms 200,250`), forming-kline updates every 250 ms and mark prices in
between, as Binance sends them; PostgreSQL is pre-seeded with `--history` (2,000) M1
candles per symbol and their M5/M15; Redis Stack and PostgreSQL are real and local.

Latency is measured from the moment the exchange published each closing frame (its own
log, GET /fake/closes: the bench listens to no frames itself) to the entry's arrival on
`ohlcv_m1_ready` and `indicators_ready_stream` (a stream entry id's ms part is its
arrival on the Redis server, same host). An M5/M15 bar is measured from the closing
frame of its last minute. Per boundary (the minute that just ended): p50/p99 of
`ohlcv_m1_ready`, of the M1 indicators and of all timeframes' indicators closing there,
the daemon's CPU over the minute and its RSS; then the first boundary after boot within
the budget and the RSS slope.

    .venv/bin/python bench/boundary_bench.py                 # 18 minutes: :00 right after boot, :15 later
    .venv/bin/python bench/boundary_bench.py --minutes 62    # RSS flat over an hour

Budgets (issue 14): at the :00/:15/:30/:45 boundaries (M1+M5+M15 close together) every
timeframe's indicators p99 <= 100 ms and `ohlcv_m1_ready` p99 <= 50 ms, from the second
boundary after boot on; RSS <= 300 MB and flat. Printed, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import asyncpg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import core_io  # noqa: E402
from aggregation import aggregate  # noqa: E402
from bench.soak_bench import CLK_TCK, CpuMeter, descendants, percentile, proc_cpu_rss  # noqa: E402
from candles import TF_MS, bucket_start, datetime_to_ms, ms_to_datetime  # noqa: E402
from fake_exchange import SyntheticSource  # noqa: E402
from infra import make_redis  # noqa: E402
from migrations import apply_migrations  # noqa: E402
from tests.daemon import DaemonProcess  # noqa: E402
from tests.servers import (  # noqa: E402
    RedisServer,
    database_url,
    drop_database,
    free_port,
    recreate_database,
    setting,
    start_fake_exchange,
)

M1 = 60_000
START = "2026-03-01T23:58:00"  # two minutes before 00:00, where M1, M5 and M15 close together
DATABASE = "feed_v4_boundary_bench"
M1_READY_BUDGET_MS = 50.0
ALL_TF_BUDGET_MS = 100.0
RSS_BUDGET_MB = 300.0
SAMPLE_S = 5.0


@dataclass
class Arrivals:
    frames: dict[tuple[str, int], float] = field(default_factory=dict)  # (symbol, M1 open) -> local ms
    # Every arrival, by key: a bar may be announced before its close frame (a partial M15
    # bucket at boot) and again after it; the latency is to the first one after the frame.
    m1_ready: dict[tuple[str, int], list[int]] = field(default_factory=lambda: defaultdict(list))
    ind_ready: dict[tuple[str, str, int], list[int]] = field(default_factory=lambda: defaultdict(list))


@dataclass
class Sample:
    at: float  # local epoch s
    cpu_pct: float | None
    rss_mb: float


# --------------------------------------------------------------------------- seeding


async def seed(pool: asyncpg.Pool, source: SyntheticSource, first: int, last: int) -> int:
    """`first`..`last` M1 for every symbol, and the M5/M15 they make, by COPY."""
    await core_io.enable_symbols(pool, source.symbols)
    columns = ["symbol", "open_time", "open", "high", "low", "close", "volume", "quote_volume", "trades"]
    columns += ["taker_buy_volume", "taker_buy_quote_volume"]
    total = 0
    for symbol in source.symbols:
        m1 = [c for t in range(first, last + M1, M1) if (c := source.candle(symbol, t)) is not None]
        rows = {"m1": m1}
        for tf in ("m5", "m15"):
            by_bucket: dict[int, list] = defaultdict(list)
            for c in m1:
                by_bucket[bucket_start(c.open_time, tf)].append(c)
            size = TF_MS[tf] // M1  # only complete buckets: the live minutes complete the last one
            rows[tf] = [aggregate(tf, b, members) for b, members in sorted(by_bucket.items()) if len(members) == size]
        for tf, candles in rows.items():
            records = [
                (
                    c.symbol,
                    ms_to_datetime(c.open_time),
                    c.open,
                    c.high,
                    c.low,
                    c.close,
                    c.volume,
                    c.quote_volume,
                    c.trades,
                    c.taker_buy_volume,
                    c.taker_buy_quote_volume,
                    *((c.m1_count,) if tf != "m1" else ()),
                )
                for c in candles
            ]
            await pool.copy_records_to_table(
                core_io.candle_table(tf), records=records, columns=columns + (["m1_count"] if tf != "m1" else [])
            )
            total += len(records)
    return total


async def database_from_seed(source: SyntheticSource, start_ms: int, args: argparse.Namespace) -> str:
    """A fresh copy of the seeded database. Seeding 1.3 M candles takes minutes, so the
    seed is kept (one database per symbols/history/start) and copied by CREATE DATABASE
    ... TEMPLATE, which takes seconds; `--reseed` makes it again."""
    admin_url = setting("POSTGRES_URL")
    seed_name = f"feed_v4_boundary_seed2_{args.symbols}_{args.history}_{start_ms // M1}"
    conn = await asyncpg.connect(database_url(admin_url, "postgres"))
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", seed_name)
    finally:
        await conn.close()
    if not exists or args.reseed:
        seed_url = await recreate_database(admin_url, seed_name)
        pool = await asyncpg.create_pool(seed_url, min_size=1, max_size=2)
        try:
            await apply_migrations(pool)
            began = time.monotonic()
            seeded = await seed(pool, source, start_ms - args.history * M1, start_ms - M1)
            await pool.execute("VACUUM ANALYZE")
        finally:
            await pool.close()
        print(
            f"seeded {seeded:,} candles ({args.history} M1 per symbol and their M5/M15) in "
            f"{time.monotonic() - began:.0f} s (kept as {seed_name})"
        )
    return await recreate_database(admin_url, DATABASE, template=seed_name)


# --------------------------------------------------------------------------- observing


async def poll_closes(rest_url: str, arrivals: Arrivals) -> None:
    """When each closing kline frame left the exchange, from its own log (GET /fake/closes,
    once a second). The bench listens to no frames: its own connection to 500 streams made
    the exchange send every frame twice and took CPU from the daemon at each boundary."""
    next_entry = 0
    async with aiohttp.ClientSession() as session:
        while True:
            try:
                async with session.get(f"{rest_url}/fake/closes", params={"from": str(next_entry)}) as response:
                    body = await response.json()
                for symbol, open_time, sent_ms in body["closes"]:
                    arrivals.frames.setdefault((symbol, open_time), sent_ms)
                next_entry = body["next"]
            except asyncio.CancelledError:
                raise
            except Exception:
                pass  # the exchange is starting or going: asked again next second
            await asyncio.sleep(1.0)


async def follow_announcements(redis_url: str, arrivals: Arrivals) -> None:
    redis = make_redis(redis_url)
    try:
        last = {core_io.CANDLE_STREAMS["m1"]: "$", core_io.INDICATORS_READY_STREAM: "$"}
        while True:
            reply = await redis.xread(last, count=20_000, block=1000)
            for stream, entries in reply or []:
                last[stream] = entries[-1][0]
                for entry_id, fields in entries:
                    arrived = int(entry_id.split("-", 1)[0])
                    symbol, tf, open_time = fields["symbol"], fields.get("tf", "m1"), int(fields["open_time"])
                    if stream == core_io.INDICATORS_READY_STREAM:
                        if fields.get("set") != "pandas-ta":
                            arrivals.ind_ready[(symbol, tf, open_time)].append(arrived)
                    else:
                        arrivals.m1_ready[(symbol, open_time)].append(arrived)
    finally:
        await redis.aclose()


async def sample(pid: int, samples: list[Sample]) -> None:
    meter = CpuMeter()
    while True:
        share, _, rss = meter.read([pid, *descendants(pid)])
        samples.append(Sample(time.time(), share, rss))
        await asyncio.sleep(SAMPLE_S)


# --------------------------------------------------------------------------- the machine at a boundary

MACHINE_GROUPS = ("daemon", "exchange", "redis", "postgres")


@dataclass
class MachineSample:
    at: float  # local epoch s
    ticks: dict[str, int]  # CPU ticks so far, per group of processes
    busy: int  # the machine's busy ticks so far (all cores)
    cores: int


def machine_ticks() -> tuple[int, int]:
    """(busy ticks of all cores, cores) from /proc/stat."""
    with open("/proc/stat") as f:
        lines = f.read().splitlines()
    user, nice, system, _idle, _iowait, *rest = (int(x) for x in lines[0].split()[1:])
    return user + nice + system + sum(rest[:3]), sum(1 for line in lines if line[:3] == "cpu" and line[3:4].isdigit())


def postgres_pids() -> list[int]:
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/comm") as f:
                    if f.read().strip() == "postgres":
                        pids.append(int(name))
            except OSError:
                pass
    return pids


async def watch_machine(
    groups: dict[str, Callable[[], list[int]]], arrivals: Arrivals, out: list[MachineSample]
) -> None:
    """Every process group's CPU and the machine's, every 20 ms from 0.5 s before each
    boundary to 1.5 s after it (elsewhere idle: the watching costs CPU too). Whether a
    boundary's latency is the daemon's or the machine's shows here: the work of every
    process between the first close sent and the p99 announcement, against 2 cores."""
    while not arrivals.frames:
        await asyncio.sleep(0.2)
    boundary = min(arrivals.frames.values()) / 1000  # the first boundary's first close; then a minute on
    while True:
        boundary += M1 / 1000
        await asyncio.sleep(max(0.0, boundary - 0.5 - time.time()))
        pids = {name: find() for name, find in groups.items()}
        while time.time() < boundary + 1.5:
            busy, cores = machine_ticks()
            ticks = {
                name: sum(got[0] for pid in group if (got := proc_cpu_rss(pid)) is not None)
                for name, group in pids.items()
            }
            out.append(MachineSample(time.time(), ticks, busy, cores))
            await asyncio.sleep(0.02)


def machine_use(samples: list[MachineSample], start: float, end: float) -> str:
    """CPU ms each group and the machine used between start and end (local epoch s)."""
    inside = [s for s in samples if start - 0.02 <= s.at <= end + 0.02]
    if len(inside) < 2:
        return "machine: not sampled"
    first, last = inside[0], inside[-1]
    ms = 1000 / CLK_TCK
    groups = "  ".join(f"{name} {(last.ticks[name] - first.ticks[name]) * ms:.0f}" for name in MACHINE_GROUPS)
    wall = (last.at - first.at) * 1000
    busy = (last.busy - first.busy) * ms
    return f"CPU ms over {wall:.0f} ms: {groups}; machine {busy:.0f} of {wall * last.cores:.0f} ({last.cores} cores)"


# --------------------------------------------------------------------------- profile


async def profile_boundary(pid: int, boundary_ms: int, arrivals: Arrivals, out: Path, seconds: float) -> None:
    """py-spy on the daemon from 0.5 s before the boundary `boundary_ms` (simulated) on,
    timed from the first boundary the bench saw (the exchange's clock runs at speed 1)."""
    while not arrivals.frames:
        await asyncio.sleep(0.2)
    first_wall = min(arrivals.frames.values()) / 1000
    first_end = min(t for _, t in arrivals.frames) + M1
    delay = first_wall + (boundary_ms - first_end) / 1000 - 0.7 - time.time()
    if delay < 0:
        print(f"profile: boundary {boundary_ms} already passed")
        return
    await asyncio.sleep(delay)
    command = ["py-spy", "record", "-p", str(pid), "--duration", str(int(seconds)), "--rate", "1000"]
    command += ["--format", "raw", "--nonblocking", "-o", str(out)]
    py_spy = Path(sys.executable).with_name("py-spy")
    command[0] = str(py_spy) if py_spy.exists() else "py-spy"
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    await process.wait()


# Where a sample's time goes: the deepest of these functions on its stack names its stage.
STAGES = [
    ("StreamConnection._serve", "frames: WebSocket reads, parsing, the intake queue"),
    ("StreamConnection._open", "frames: WebSocket reads, parsing, the intake queue"),
    ("ResponseHandler.data_received", "frames: WebSocket reads, parsing, the intake queue"),
    ("ClientWebSocketResponse.receive", "frames: WebSocket reads, parsing, the intake queue"),
    ("parse_frame", "frames: WebSocket reads, parsing, the intake queue"),
    ("Feed.intake_loop", "candles to PostgreSQL (M1 + the M5/M15 they complete, one statement)"),
    ("CandleIntake.run_publisher", "candles to Redis (series + `ohlcv_<tf>_ready`, one round)"),
    ("CandleIntake.run_aggregator", "M5/M15 rebuilt from PostgreSQL (aggregator)"),
    ("IndicatorWorker._flush_redis", "indicators to Redis (HSET + `indicators_ready_stream` + XACK)"),
    ("IndicatorWorker.run", "indicators: reading events, stepping the series"),
    ("IndicatorWorker.run_persister", "indicators to PostgreSQL (write-behind)"),
]


def profile_tables(path: Path, top: int = 20) -> str:
    """From py-spy's raw (collapsed) output: CPU per stage of the boundary, then the
    inclusive share of the busiest functions."""
    inclusive: dict[str, int] = defaultdict(int)
    stages: dict[str, int] = defaultdict(int)
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        total += int(count)
        names = [frame.split(" (")[0] for frame in stack.split(";")]
        stage = next((label for name in reversed(names) for key, label in STAGES if name == key), None)
        if stage is None:
            stage = "the event loop itself (uvloop: sockets, timers)" if names[-1] == "Runner.run" else "the rest"
        stages[stage] += int(count)
        seen = set()
        for frame in stack.split(";"):
            name = frame.split(" (")[0]
            where = frame.split(" (")[1].split(":")[0] if " (" in frame else ""
            key = f"{name} ({Path(where).name})"
            if key not in seen:
                seen.add(key)
                inclusive[key] += int(count)
    lines = [f"{total} samples ({total / 1000:.2f} s of CPU at 1 kHz)", "", "CPU ms  share  stage"]
    for label, count in sorted(stages.items(), key=lambda item: -item[1]):
        lines.append(f"{count:6d}  {100 * count / total:4.0f}%  {label}")
    lines += ["", "share  function (inclusive)"]
    for key, count in sorted(inclusive.items(), key=lambda item: -item[1])[:top]:
        lines.append(f"{100 * count / total:5.1f}%  {key}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- report


def p(values: list[float], q: float) -> str:
    return "-" if not values else f"{(statistics.median(values) if q == 0.5 else percentile(values, q)):.0f}"


def after(times: list[int], frame_ms: float) -> float | None:
    """Latency to the first arrival after the frame (None: never announced after it)."""
    later = [t for t in times if t >= frame_ms - 1]  # entry ids have ms resolution
    return min(later) - frame_ms if later else None


def boundary_rows(arrivals: Arrivals, symbols: list[str]) -> list[dict]:
    """One row per boundary (the end of a minute) that every symbol's close passed."""
    ends = sorted({t + M1 for _, t in arrivals.frames})
    rows = []
    for end in ends:
        frames = {s: arrivals.frames.get((s, end - M1)) for s in symbols}
        if any(f is None for f in frames.values()):
            continue  # a partial boundary (the bench connected in the middle of it)
        m1 = [v for s in symbols if (v := after(arrivals.m1_ready.get((s, end - M1), []), frames[s])) is not None]
        tfs = [tf for tf in ("m1", "m5", "m15") if end % TF_MS[tf] == 0]
        by_tf = {
            tf: [
                v
                for s in symbols
                if (v := after(arrivals.ind_ready.get((s, tf, end - TF_MS[tf]), []), frames[s])) is not None
            ]
            for tf in tfs
        }
        every = [v for values in by_tf.values() for v in values]
        expected = len(symbols) * len(tfs)
        rows.append(
            {
                "end": end,
                "label": datetime.fromtimestamp(end / 1000, UTC).strftime("%H:%M"),
                "tfs": tfs,
                "frames_at": min(frames.values()) / 1000,
                "m1": m1,
                "ind_m1": by_tf["m1"],
                "all": every,
                "complete": len(m1) == len(symbols) and len(every) == expected,
            }
        )
    return rows


def within_budget(row: dict) -> bool:
    return (
        row["complete"]
        and percentile(row["m1"], 0.99) <= M1_READY_BUDGET_MS
        and percentile(row["all"], 0.99) <= ALL_TF_BUDGET_MS
    )


def report(rows: list[dict], samples: list[Sample], booted_at: float, machine: list[MachineSample]) -> None:
    print(
        "\nboundary  closing      after boot  m1_ready p50/p99  M1 ind p50/p99  all tf ind p50/p99"
        "  CPU %  RSS MB  budget"
    )
    first_ok = None
    for index, row in enumerate(rows):
        window = [s for s in samples if row["frames_at"] - 30 <= s.at < row["frames_at"] + 30 and s.cpu_pct is not None]
        cpu = statistics.mean(s.cpu_pct for s in window) if window else None
        rss = max((s.rss_mb for s in window), default=None)
        ok = within_budget(row)
        if ok and first_ok is None:
            first_ok = (index, row)
        worst = len(row["tfs"]) == 3
        print(
            f"{row['label']:>8}  {'+'.join(row['tfs']):<11}  {row['frames_at'] - booted_at:>8.0f} s"
            f"  {p(row['m1'], 0.5):>6} /{p(row['m1'], 0.99):>6}"
            f"    {p(row['ind_m1'], 0.5):>5} /{p(row['ind_m1'], 0.99):>6}"
            f"    {p(row['all'], 0.5):>7} /{p(row['all'], 0.99):>6}      {'-' if cpu is None else f'{cpu:.0f}':>4}"
            f"  {'-' if rss is None else f'{rss:.0f}':>6}  {'OK' if ok else 'OVER'}{' (worst)' if worst else ''}"
            f"{'' if row['complete'] else ' (incomplete)'}"
        )
    if first_ok is None:
        print("no boundary within the budget")
    else:
        index, row = first_ok
        print(
            f"first boundary within budget: #{index + 1} ({row['label']}), "
            f"{row['frames_at'] - booted_at:.0f} s after boot"
        )
    worst_rows = [r for r in rows[1:] if len(r["tfs"]) == 3]
    for row in worst_rows:
        print(
            f"worst boundary {row['label']}: all timeframes p99 {p(row['all'], 0.99)} ms "
            f"(budget {ALL_TF_BUDGET_MS:.0f}), "
            f"ohlcv_m1_ready p99 {p(row['m1'], 0.99)} ms (budget {M1_READY_BUDGET_MS:.0f}): "
            f"{'OK' if within_budget(row) else 'OVER'}"
        )
        if row["all"]:
            end = row["frames_at"] + percentile(row["all"], 0.99) / 1000
            print(f"  from its first close to its p99: {machine_use(machine, row['frames_at'], end)}")
    steady = [s for s in samples if s.at >= booted_at + 120]
    if steady:
        half = len(steady) // 2
        first_half = statistics.mean(s.rss_mb for s in steady[:half] or steady)
        second_half = statistics.mean(s.rss_mb for s in steady[half:])
        cpu = [s.cpu_pct for s in steady if s.cpu_pct is not None]
        print(
            f"daemon after boot: CPU mean {statistics.mean(cpu):.1f} % of one core; RSS max "
            f"{max(s.rss_mb for s in steady):.0f} MB (budget {RSS_BUDGET_MB:.0f}), "
            f"first half mean {first_half:.0f} MB, "
            f"second half {second_half:.0f} MB"
        )


# --------------------------------------------------------------------------- run


async def run(args: argparse.Namespace) -> None:
    source = SyntheticSource(args.symbols, seed=3)
    start_ms = datetime_to_ms(datetime.fromisoformat(args.start).replace(tzinfo=UTC))
    redis_server = RedisServer(with_timeseries=True)
    redis_server.start()
    url = await database_from_seed(source, start_ms, args)
    exchange = daemon = None
    tasks: list[asyncio.Task] = []
    try:
        port = free_port()
        extra = ("--close-delay-ms", args.close_delay_ms, "--updates-per-minute", str(args.updates_per_minute))
        exchange = start_fake_exchange(args.symbols, 1.0, args.start, port, extra=extra)
        await asyncio.sleep(1.5)
        arrivals = Arrivals()
        samples: list[Sample] = []
        tasks.append(asyncio.create_task(poll_closes(f"http://127.0.0.1:{port}", arrivals)))
        daemon = DaemonProcess(
            {
                "REDIS_URL": redis_server.url,
                "POSTGRES_URL": url,
                "BINANCE_WS_URL": f"ws://127.0.0.1:{port}/market",
                "BINANCE_REST_URL": f"http://127.0.0.1:{port}",
            }
        )
        daemon.start()
        booted_at = time.time()
        tasks.append(asyncio.create_task(sample(daemon.process.pid, samples)))
        machine: list[MachineSample] = []
        groups = {
            "daemon": lambda: [daemon.process.pid, *descendants(daemon.process.pid)],
            "exchange": lambda: [exchange.pid],
            "redis": lambda: [redis_server.process.pid],
            "postgres": postgres_pids,
        }
        tasks.append(asyncio.create_task(watch_machine(groups, arrivals, machine)))
        await asyncio.sleep(3)
        tasks.append(asyncio.create_task(follow_announcements(redis_server.url, arrivals)))
        profile_out = (
            Path("/tmp") / f"boundary_profile_{args.profile_at.replace(':', '')}.txt" if args.profile_at else None
        )
        if profile_out is not None:
            hour, minute = (int(x) for x in args.profile_at.split(":"))
            day = start_ms - start_ms % 86_400_000
            target = day + (hour * 60 + minute) * M1
            target += 86_400_000 if target < start_ms else 0
            tasks.append(
                asyncio.create_task(profile_boundary(daemon.process.pid, target, arrivals, profile_out, args.profile_s))
            )
        deadline = time.monotonic() + args.minutes * 60
        while time.monotonic() < deadline:
            assert daemon.alive(), daemon.output()[-3000:]
            await asyncio.sleep(1)
        await asyncio.sleep(5)  # the last boundary's M15 values
        report(boundary_rows(arrivals, source.symbols), samples, booted_at, machine)
        if profile_out is not None and profile_out.exists():
            print(f"\nprofile of the daemon from 0.7 s before {args.profile_at} for {args.profile_s:g} s:")
            print(profile_tables(profile_out))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if daemon is not None:
            if daemon.alive():
                print(f"daemon stopped with {daemon.terminate(30)}")
            daemon.cleanup()
        if exchange is not None:
            exchange.terminate()
            exchange.wait(10)
        redis_server.cleanup()
        await drop_database(setting("POSTGRES_URL"), DATABASE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--symbols", type=int, default=500)
    parser.add_argument("--history", type=int, default=2000, help="M1 candles per symbol seeded before the start")
    parser.add_argument("--minutes", type=float, default=18, help="real minutes the daemon runs")
    parser.add_argument("--start", default=START, help="the exchange's simulated start (UTC)")
    parser.add_argument("--close-delay-ms", default="200,250")
    parser.add_argument("--updates-per-minute", type=int, default=240)
    parser.add_argument("--reseed", action="store_true", help="seed the history again (it is kept between runs)")
    parser.add_argument("--profile-at", default="", help="HH:MM: py-spy the daemon around that boundary")
    parser.add_argument("--profile-s", type=float, default=3.0)
    asyncio.run(main_async(parser.parse_args()))


async def main_async(args: argparse.Namespace) -> None:
    await run(args)


if __name__ == "__main__":
    main()
