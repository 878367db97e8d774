"""Soak benchmark: the whole daemon (`python feed_v4_main.py`, every worker: feed,
aggregation, indicators with the default set the migrations install, signal router) as a
subprocess, against the fake exchange with 500 synthetic symbols, on a scratch
PostgreSQL database and a private Redis Stack server of its own. Two modes:

  --mode live   speed 1 (live pace) for --minutes (default 10) after the daemon is ready;
  --mode day    speed 60 for --hours simulated hours (default 24: 24 real minutes);
  --mode both   (default) live, then day, each on fresh servers.

    .venv/bin/python bench/soak_bench.py --mode live --minutes 2
    .venv/bin/python bench/soak_bench.py --mode day --hours 1

The exchange starts at a fixed simulated time (START); the daemon fetches
INITIAL_HISTORY_M1 = 300 minutes of history at boot; at live pace WS_SILENCE_S is 45 s
(see LIVE_WS_SILENCE_S), everything else is the daemon's defaults. "Ready" (see
wait_ready) is when every symbol's M1 history is complete and at the live edge in
PostgreSQL, its M1 indicator hash in Redis is at the edge too, and the indicator worker
has no backlog on the candle streams; that boot/catch-up time is reported on its own and
excluded from the figures. The full day leaves ~24 million indicator rows (several GB)
in the scratch database until it is dropped at the end.

Every 10 s (live) / 5 s (day) it samples, from /proc: the daemon's CPU (its process and
any child, e.g. the pandas-ta slow workers) as a share of one core over the interval,
and its resident memory (rss of /proc/<pid>/stat, process + children); the same CPU
share for the PostgreSQL backends serving the scratch database, the Redis server and the
fake exchange (the figure that matters is the daemon's). Lags are in simulated seconds,
against the exchange clock (`/fapi/v1/time`):

  m1 lag    exchange clock - close time of the newest M1 in ohlcv4_m1 (a sawtooth between
            ~0 and ~60 s when keeping up: a new bar closes every minute);
  m1 worst  the same for the symbol whose newest stored M1 is oldest;
  ind lag   the same for the oldest `indicator:<SYMBOL>:m1` hash (open_time) of all symbols;
  ind PG    the same for the newest row of indicator_values_v4 (the persistence path).

Latency (real ms) of every bar closing during the run: from the bar's close on the
exchange clock (mapped to local time; includes the exchange's 200-2000 ms simulated
close delay) and from the closing kline frame as received by the bench's own WebSocket
connection to the exchange (all symbols live, 50 at 60x), to the arrival of the bar's
entries on `ohlcv_m1_ready` and `indicators_ready_stream` (a stream entry id's ms part is
its arrival time on the Redis server, same host).

Budgets at live pace: daemon CPU < 25 % of one core (mean); RSS < 400 MB and flat.
Latency budgets of the other benches: frame -> ohlcv_m1_ready p99 <= 100 ms,
frame -> indicators_ready_stream p99 <= 250 ms. Verdicts are printed, never asserted.

Redis outage (day mode, `--redis-outage-min N`, real minutes):

    .venv/bin/python bench/soak_bench.py --mode day --redis-outage-min 3

The daemon's REDIS_URL then goes through a TcpProxy (tests/tcp_proxy.py) running on an
event loop of its own in a thread of the bench (so nothing the bench's main loop does
delays the daemon's Redis traffic; the bench's CPU figure includes it); the bench's own
probes go to Redis directly. In the middle of the measured day (centred) the proxy black-
holes for N real minutes (connections stay open, nothing is forwarded, like a network
dropping packets), then passes again. At 60x, 3 real minutes are 180 simulated minutes x
500 symbols = 90,000 M1 + 18,000 M5 + 6,000 M15 candles stored in PostgreSQL and held for
Redis: past FEED_BUFFER_MAX_CANDLES (50,000 by default since 4020d9f, 100,000 before) the
oldest are let go and re-announced from PostgreSQL when Redis is back.

Reported: the daemon's RSS before/during/after the outage and the slopes; how long after
the outage it caught up (every symbol's newest M1 in PostgreSQL and its
`indicator:<SYMBOL>:m1` hash at the live edge, the indicator group's backlog drained;
polled every real second); and at the end a completeness check: no hole in any symbol's
M1 rows, every M1 bar stored from the outage on announced on `ohlcv_m1_ready` (checked
against the bench's own follower of the stream, whose reads are counted against the
stream's entries-added, and against XRANGE 20 s after the catch-up and at the end, each
over the window the STREAM_MAXLEN trim leaves), and no 'missing' row in
missing_m1_log_v4. Bars closing from the outage start until the catch-up are left out of
the latency figures. Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import asyncpg
import orjson
from websockets.asyncio.client import connect as ws_connect

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import core_io  # noqa: E402
from candles import TF_MS, TIMEFRAMES  # noqa: E402
from feed_and_aggregate import FeedSettings  # noqa: E402
from infra import Settings, make_redis  # noqa: E402
from tests.daemon import DaemonProcess  # noqa: E402
from tests.servers import (  # noqa: E402
    RedisServer,
    drop_database,
    free_port,
    recreate_database,
    setting,
    start_fake_exchange,
)
from tests.tcp_proxy import TcpProxy  # noqa: E402

M1 = 60_000
SYMBOLS = 500
HISTORY_M1 = 300
START = "2026-03-02T00:00"  # a Monday 00:00 UTC, inside the synthetic source's year
LIVE_SPEED, DAY_SPEED = 1.0, 60.0
LIVE_SAMPLE_S, DAY_SAMPLE_S = 10.0, 5.0
LISTEN_SYMBOLS_ACCELERATED = 50  # closing frames the bench itself listens to at 60x
READY_TIMEOUT_S = 600.0
BACKLOG_CAP = 2000  # unread entries counted per stream at most
# The fake exchange pushes 4 kline updates a minute (at 0.3, 19.3, 38.3, 57.3 s) and a close,
# so a connection carrying only klines is quiet for ~19 s at a time at live pace, longer
# than the daemon's default silence watchdog (WS_SILENCE_S=15): with the default it
# reconnects its kline-only connections every 20-40 s (18 reconnects in 3 minutes seen).
# Binance pushes klines every 250 ms, so this is the fake's cadence, not production's.
LIVE_WS_SILENCE_S = 45
CLOSE_DELAY_MS = (200, 2000)  # the fake exchange's close delay (simulated ms)
CPU_BUDGET_PCT = 25.0
RSS_BUDGET_MB = 400.0
RSS_FLAT_MB_PER_DAY = 40.0  # "flat": the second-half slope adds < 10 % of the budget per simulated day
FEED_P99_BUDGET_MS = 100.0
INDICATOR_P99_BUDGET_MS = 250.0
APP_NAME = "soak_bench"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_MB = os.sysconf("SC_PAGE_SIZE") / 2**20


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, int(len(ordered) * q + 0.5) - 1)]


def fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def sim_text(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%m-%d %H:%M:%S")


# --------------------------------------------------------------------------- /proc


def proc_cpu_rss(pid: int) -> tuple[int, float] | None:
    """(CPU ticks user+system, RSS MB) of one process, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # After "pid (comm)": state=0, ..., utime=11, stime=12, ..., rss (pages)=21.
    return int(fields[11]) + int(fields[12]), int(fields[21]) * PAGE_MB


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc/<pid>/task/<tid>/children; a /proc scan if absent)."""
    out: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        kids: list[int] = []
        try:
            for tid in os.listdir(f"/proc/{parent}/task"):
                with open(f"/proc/{parent}/task/{tid}/children") as f:
                    kids += [int(x) for x in f.read().split()]
        except FileNotFoundError:
            kids = scan_children(parent)
        except OSError:
            kids = []
        out += kids
        todo += kids
    return out


def scan_children(parent: int) -> list[int]:
    kids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                with open(f"/proc/{name}/stat", "rb") as f:
                    if int(f.read().rsplit(b")", 1)[1].split()[1]) == parent:
                        kids.append(int(name))
    return kids


class CpuMeter:
    """CPU share of one core used by a group of processes since the previous reading.

    A process first seen after the baseline counts from zero (it was born in the
    interval); one that exited between readings loses its last partial interval."""

    def __init__(self) -> None:
        self.ticks: dict[int, int] = {}
        self.at: float | None = None

    def read(self, pids: list[int]) -> tuple[float | None, float, float]:
        """(CPU % of one core since the last call, CPU seconds in the interval, RSS MB now)."""
        now = time.monotonic()
        ticks: dict[int, int] = {}
        rss = 0.0
        for pid in pids:
            got = proc_cpu_rss(pid)
            if got is not None:
                ticks[pid], mb = got
                rss += mb
        used = sum(t - self.ticks.get(pid, 0 if self.at is not None else t) for pid, t in ticks.items())
        share = None if self.at is None or now <= self.at else used / CLK_TCK / (now - self.at) * 100
        self.ticks, self.at = ticks, now
        return share, used / CLK_TCK, rss


def total_cpu_s(pids: list[int]) -> float:
    return sum(got[0] for pid in pids if (got := proc_cpu_rss(pid)) is not None) / CLK_TCK


# --------------------------------------------------------------------------- exchange clock


@dataclass
class ExchangeClock:
    """Maps the exchange's simulated clock to local wall time (the SimClock is linear)."""

    session: aiohttp.ClientSession
    rest_url: str
    speed: float
    sim0: int = 0
    wall0: float = 0.0  # local epoch ms at sim0

    async def now(self) -> int:
        async with self.session.get(f"{self.rest_url}/fapi/v1/time") as response:
            return int((await response.json())["serverTime"])

    async def calibrate(self, tries: int = 7) -> float:
        """Anchor on the quickest of a few round trips; returns its RTT in ms."""
        best = None
        for _ in range(tries):
            before = time.time() * 1000
            sim = await self.now()
            after = time.time() * 1000
            if best is None or after - before < best[0]:
                best = (after - before, sim, (before + after) / 2)
        assert best is not None
        _, self.sim0, self.wall0 = best
        return best[0]

    def wall_ms(self, sim_ms: int) -> float:
        return self.wall0 + (sim_ms - self.sim0) / self.speed


async def wait_exchange(clock: ExchangeClock, exchange: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if exchange.poll() is not None:
            raise RuntimeError(f"the fake exchange exited with code {exchange.returncode}")
        with contextlib.suppress(aiohttp.ClientError, OSError):
            await clock.now()
            return
        if time.monotonic() > deadline:
            raise RuntimeError("the fake exchange did not answer within 60 s")
        await asyncio.sleep(0.2)


# --------------------------------------------------------------------------- probes

M1_EDGE_SQL = """
SELECT count(m.mx) AS have, min(m.mx) AS worst, max(m.mx) AS newest
FROM tickers t CROSS JOIN LATERAL (SELECT max(open_time) AS mx FROM ohlcv4_m1 WHERE symbol = t.symbol) m
WHERE t.status = 'enabled'
"""


async def m1_edge(pool: asyncpg.Pool) -> tuple[int, int | None, int | None]:
    """(symbols with an M1, oldest newest-M1 open time, newest open time) in ms."""
    row = await pool.fetchrow(M1_EDGE_SQL)
    return row["have"], ms(row["worst"]), ms(row["newest"])


def ms(moment: datetime | None) -> int | None:
    return None if moment is None else int(moment.timestamp() * 1000)


def datetime_from_ms(value: int) -> datetime:
    return datetime.fromtimestamp(value / 1000, UTC)


COMPLETE_HISTORY_SQL = """
SELECT count(*) FROM (
    SELECT count(*) AS n, min(open_time) AS first, max(open_time) AS last FROM ohlcv4_m1 GROUP BY symbol
) s WHERE first <= $1 AND n = round(extract(epoch FROM last - first) / 60)::int + 1
"""


async def indicator_backlog(redis, cap: int = BACKLOG_CAP) -> int | None:
    """Candle-stream entries the indicator group has not read yet or not acknowledged, over
    the three streams (unread counted up to `cap` per stream); None if a group is missing.

    Not XINFO GROUPS `lag`: once the stream has been trimmed it stays wrong (seen: 40032
    with last-delivered-id equal to last-generated-id)."""
    total = 0
    for stream in core_io.CANDLE_STREAMS.values():
        try:
            groups = await redis.xinfo_groups(stream)
        except Exception:
            return None
        group = next((g for g in groups if g.get("name") == core_io.INDICATOR_GROUP), None)
        if group is None:
            return None
        total += int(group.get("pending") or 0)
        delivered = group.get("last-delivered-id") or "0-0"
        last = ((await redis.xrevrange(stream, count=1)) or [(delivered, {})])[0][0]
        if core_io.stream_id(last) > core_io.stream_id(delivered):
            total += len(await redis.xrange(stream, min=f"({delivered}", max="+", count=cap))
    return total


async def indicator_edge(redis, symbols: list[str]) -> tuple[int, int | None]:
    """(symbols with an M1 indicator hash, the oldest of their open times)."""
    pipe = redis.pipeline(transaction=False)
    for symbol in symbols:
        pipe.hget(core_io.indicator_key(symbol, "m1"), "open_time")
    times = [int(x) for x in await pipe.execute() if x is not None]
    return len(times), min(times) if times else None


def lag_s(sim_now: int, open_time: int | None, tf_ms: int = M1) -> float | None:
    return None if open_time is None else (sim_now - open_time - tf_ms) / 1000


async def pg_backends(pool: asyncpg.Pool, database: str) -> list[int]:
    rows = await pool.fetch(
        "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND coalesce(application_name, '') <> $2",
        database,
        APP_NAME,
    )
    return [r["pid"] for r in rows]


async def table_counts(pool: asyncpg.Pool) -> dict[str, int]:
    out = {}
    for table in ("ohlcv4_m1", "ohlcv4_m5", "ohlcv4_m15", "indicator_values_v4"):
        out[table] = await pool.fetchval(f"SELECT count(*) FROM {table}")
    return out


# --------------------------------------------------------------------------- latency


@dataclass
class Latency:
    """Arrival times (local epoch ms) of closing frames and of the daemon's announcements."""

    since_sim: int  # only bars closing at or after this simulated instant
    frames: dict[tuple[str, int], float] = field(default_factory=dict)  # (symbol, M1 open) -> ms
    m1_ready: dict[tuple[str, int], int] = field(default_factory=dict)  # (symbol, open) -> entry ms
    ind_ready: dict[tuple[str, str, int], int] = field(default_factory=dict)  # (symbol, tf, open) -> entry ms
    listener_errors: int = 0
    # Accounting of the follower's reads of ohlcv_m1_ready against XINFO STREAM entries-added:
    # what was added and never read was trimmed before the follower got to it.
    m1_added0: int | None = None  # entries-added when following began
    m1_last: str = "0-0"  # the last entry read
    m1_read: int = 0  # entries read


async def listen_closes(ws_base: str, symbols: list[str], latency: Latency) -> None:
    """The bench's own combined-stream connection: the wall time of every closing kline frame."""
    url = f"{ws_base}/stream?streams=" + "/".join(f"{s.lower()}@kline_1m" for s in symbols)
    while True:
        try:
            async with ws_connect(url, max_size=None, open_timeout=10) as ws:
                async for message in ws:
                    now = time.time() * 1000
                    data = orjson.loads(message).get("data") or {}
                    k = data.get("k")
                    if k and k.get("x"):
                        latency.frames.setdefault((k["s"], int(k["t"])), now)
        except asyncio.CancelledError:
            raise
        except Exception:
            latency.listener_errors += 1
            await asyncio.sleep(1.0)


async def read_announcements(redis_url: str, latency: Latency) -> None:
    redis = make_redis(redis_url)
    try:
        await follow_announcements(redis, latency)
    finally:
        await redis.aclose()


async def follow_announcements(redis, latency: Latency) -> None:
    m1_stream = core_io.CANDLE_STREAMS["m1"]
    info = await redis.xinfo_stream(m1_stream)  # the restore created it (with the group)
    latency.m1_added0, latency.m1_last = int(info["entries-added"]), info["last-generated-id"]
    last = {
        m1_stream: latency.m1_last,
        core_io.INDICATORS_READY_STREAM: (
            (await redis.xrevrange(core_io.INDICATORS_READY_STREAM, count=1)) or [("0-0", {})]
        )[0][0],
    }
    while True:
        reply = await redis.xread(last, count=20_000, block=1000)
        for stream, entries in reply or []:
            last[stream] = entries[-1][0]
            take_announcements(latency, stream, entries)


def take_announcements(latency: Latency, stream: str, entries: list) -> None:
    for entry_id, fields in entries:
        arrived = int(entry_id.split("-", 1)[0])
        if stream == core_io.CANDLE_STREAMS["m1"]:
            latency.m1_last = entry_id
            latency.m1_read += 1
        symbol, tf, open_time = fields.get("symbol"), fields.get("tf", "m1"), int(fields.get("open_time", 0))
        if tf not in TF_MS or open_time + TF_MS[tf] < latency.since_sim:
            continue
        if stream == core_io.INDICATORS_READY_STREAM:
            latency.ind_ready.setdefault((symbol, tf, open_time), arrived)
        else:
            latency.m1_ready.setdefault((symbol, open_time), arrived)


async def drain_m1_announcements(redis, latency: Latency) -> int:
    """After the follower stopped: read what it had not read yet, up to the stream's last id
    now; returns how many entries were added since following began and never read."""
    stream = core_io.CANDLE_STREAMS["m1"]
    info = await redis.xinfo_stream(stream)
    upto = info["last-generated-id"]
    while core_io.stream_id(latency.m1_last) < core_io.stream_id(upto):
        entries = await redis.xrange(stream, min=f"({latency.m1_last}", max=upto, count=10_000)
        if not entries:
            break
        take_announcements(latency, stream, entries)
        latency.m1_last = entries[-1][0]
    return int(info["entries-added"]) - (latency.m1_added0 or 0) - latency.m1_read


def figures(values: list[float]) -> str:
    if not values:
        return "no bars"
    return (
        f"{len(values)} bars: p50 {statistics.median(values):.1f} ms, p99 {percentile(values, 0.99):.1f} ms, "
        f"max {max(values):.1f} ms"
    )


def verdict(ok: bool) -> str:
    return "OK" if ok else "OVER"


def budget_text(values: list[float], budget_ms: float, speed: float) -> str:
    if not values:
        return ""
    text = f" [budget p99 <= {budget_ms:.0f} ms: {verdict(percentile(values, 0.99) <= budget_ms)}"
    # At 60x the 500 closes of a minute land within ~30 ms real, every second.
    return text + ("]" if speed <= 1 else "; the budget is for live pace]")


def report_latency(latency: Latency, clock: ExchangeClock, listened: int) -> None:
    speed = clock.speed
    delay = f"{CLOSE_DELAY_MS[0] / speed:.0f}-{CLOSE_DELAY_MS[1] / speed:.0f} ms real"
    from_close = [arrived - clock.wall_ms(t + M1) for (_, t), arrived in latency.m1_ready.items()]
    print(f"  latency bar close (exchange clock) -> ohlcv_m1_ready: {figures(from_close)} (includes the exchange's")
    print(f"      close delay, {delay})")
    for tf in TIMEFRAMES:
        values = [a - clock.wall_ms(t + TF_MS[tf]) for (_, f, t), a in latency.ind_ready.items() if f == tf]
        print(f"  latency bar close (exchange clock) -> indicators_ready_stream [{tf}]: {figures(values)}")
    feed = [a - latency.frames[k] for k, a in latency.m1_ready.items() if k in latency.frames]
    print(
        f"  latency closing frame ({listened} symbols, bench's own connection) -> ohlcv_m1_ready: {figures(feed)}"
        + budget_text(feed, FEED_P99_BUDGET_MS, speed)
    )
    for tf in TIMEFRAMES:
        values = [
            a - latency.frames[(s, t + TF_MS[tf] - M1)]
            for (s, f, t), a in latency.ind_ready.items()
            if f == tf and (s, t + TF_MS[tf] - M1) in latency.frames
        ]
        print(
            f"  latency closing frame -> indicators_ready_stream [{tf}]: {figures(values)}"
            + budget_text(values, INDICATOR_P99_BUDGET_MS, speed)
        )
    worker = [
        a - latency.m1_ready[(s, t)]
        for (s, f, t), a in latency.ind_ready.items()
        if f == "m1" and (s, t) in latency.m1_ready
    ]
    print(f"  ohlcv_m1_ready -> indicators_ready_stream [m1] (indicator worker's share): {figures(worker)}")
    if latency.listener_errors:
        print(f"  (the bench's WebSocket listener reconnected {latency.listener_errors} time(s))")


# --------------------------------------------------------------------------- Redis outage

# The daemon inherits the bench's environment; else the product's defaults.
HELD_BOUND = int(os.environ.get("FEED_BUFFER_MAX_CANDLES", FeedSettings.buffer_max_candles))
STREAM_MAXLEN = int(os.environ.get("STREAM_MAXLEN", Settings.stream_maxlen))  # approximate ("~"): at least this many
SNAPSHOT_DELAY_S = 20.0  # real seconds after the catch-up: the re-announcement from PostgreSQL is in by then


class ProxyThread:
    """A TcpProxy on an event loop of its own, in a thread: nothing the bench's main loop does
    (parsing 20,000 stream entries at once, waiting on PostgreSQL) delays the daemon's Redis
    traffic, which all goes through it."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="redis-proxy", daemon=True)
        self.proxy: TcpProxy | None = None

    async def start(self) -> int:
        self.thread.start()
        future = asyncio.run_coroutine_threadsafe(TcpProxy(*self.target).start(), self.loop)
        self.proxy = await asyncio.wrap_future(future)
        return self.proxy.port

    def set_mode(self, mode: str) -> None:
        assert self.proxy is not None
        self.loop.call_soon_threadsafe(self.proxy.set_mode, mode)

    def links(self) -> int:
        """Pump tasks alive (two per proxied connection)."""
        return len(self.proxy._links) if self.proxy is not None else 0

    async def close(self) -> None:
        if not self.thread.is_alive():
            return
        if self.proxy is not None:
            with contextlib.suppress(Exception):
                future = asyncio.run_coroutine_threadsafe(self.proxy.close(), self.loop)
                await asyncio.wait_for(asyncio.wrap_future(future), 10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        await asyncio.to_thread(self.thread.join, 10)
        if not self.thread.is_alive():
            self.loop.close()


@dataclass
class StreamSnapshot:
    """The M1 announcements XRANGE finds in ohlcv_m1_ready at one moment."""

    elapsed: float  # real s after t0
    entries: int
    keys: set[tuple[str, int]]
    first_arrival: int | None  # ms part of the first (oldest) entry id: the trim's edge
    newest_open: int | None


async def snapshot_m1_stream(redis, elapsed: float) -> StreamSnapshot:
    stream = core_io.CANDLE_STREAMS["m1"]
    snap = StreamSnapshot(elapsed, 0, set(), None, None)
    start = "-"
    while True:
        page = await redis.xrange(stream, min=start, count=10_000)
        for entry_id, fields in page:
            if snap.first_arrival is None:
                snap.first_arrival = int(entry_id.split("-", 1)[0])
            snap.entries += 1
            if "symbol" in fields and "open_time" in fields:
                open_time = int(fields["open_time"])
                snap.keys.add((fields["symbol"], open_time))
                snap.newest_open = max(open_time, snap.newest_open or open_time)
        if len(page) < 10_000:
            return snap
        start = "(" + page[-1][0]


def snapshot_window(snap: StreamSnapshot, clock: ExchangeClock) -> tuple[int, int] | None:
    """Open times whose announcement this snapshot must hold, if one was made.

    From: a bar closing (exchange clock, mapped to local time) after the oldest entry left by
    the trim arrived cannot have been announced before it (+1 bar for the clock mapping).
    To: two bars before the newest open time in the snapshot (held candles go out in order)."""
    if snap.first_arrival is None or snap.newest_open is None:
        return None
    edge_sim = clock.sim0 + (snap.first_arrival - clock.wall0) * clock.speed
    return int(edge_sim) // M1 * M1 + M1, snap.newest_open - 2 * M1


@dataclass
class OutagePlan:
    start_s: float  # real seconds after t0 (the sampling baseline, at ready)
    duration_s: float
    started: float | None = None  # real s after t0: when the proxy black-holed
    ended: float | None = None  # ... and passed again
    start_sim: int | None = None
    end_sim: int | None = None
    start_ts: datetime | None = None  # local wall time, for system_log_v4
    proxy_links: int = 0  # the proxy's pump tasks when it passed again (two per connection held)
    # After the outage (real s after t0; polled every real second), the first moment when:
    m1_at: float | None = None  # every symbol's newest M1 in PostgreSQL is at the live edge,
    ind_at: float | None = None  # every symbol's indicator:<S>:m1 hash is at the live edge,
    backlog_at: float | None = None  # the indicator group's backlog is below two events per symbol,
    caught_up_at: float | None = None  # all three at once
    caught_up_sim: int | None = None
    caught_up_ts: datetime | None = None
    snapshot: StreamSnapshot | None = None


async def run_outage(
    plan: OutagePlan,
    proxy: ProxyThread,
    t0: float,
    mode: Mode,
    pool: asyncpg.Pool,
    redis,
    clock: ExchangeClock,
    symbols: list[str],
) -> None:
    await asyncio.sleep(max(0.0, t0 + plan.start_s - time.monotonic()))
    proxy.set_mode("blackhole")
    plan.started, plan.start_ts = time.monotonic() - t0, datetime.now(UTC)
    plan.start_sim = await clock.now()
    print(
        f"  >>> +{plan.started:.0f} s, sim {sim_text(plan.start_sim)}, {plan.start_ts:%H:%M:%S} UTC: the daemon's "
        f"Redis proxy black-holes for {plan.duration_s:.0f} s",
        flush=True,
    )
    await asyncio.sleep(max(0.0, t0 + plan.start_s + plan.duration_s - time.monotonic()))
    plan.proxy_links = proxy.links()
    proxy.set_mode("pass")
    plan.ended = time.monotonic() - t0
    plan.end_sim = await clock.now()
    print(
        f"  >>> +{plan.ended:.0f} s, sim {sim_text(plan.end_sim)}, {datetime.now(UTC):%H:%M:%S} UTC: the proxy passes "
        f"again ({plan.proxy_links // 2} connections were held open in the black hole)",
        flush=True,
    )
    edge = 62 + mode.speed  # one bar + the close delay + one real second, as "stale" in lag_line
    settled = min(2 * len(symbols), BACKLOG_CAP)
    last_print = plan.ended
    while True:
        await asyncio.sleep(1.0)
        try:
            sim = await clock.now()
            elapsed = time.monotonic() - t0
            _, worst_m1, _ = await m1_edge(pool)
            _, worst_ind = await indicator_edge(redis, symbols)
            backlog = await indicator_backlog(redis)
        except Exception as exc:
            print(f"  >>> catch-up probe failed: {exc!r}", flush=True)
            continue
        m1_lag, ind_lag = lag_s(sim, worst_m1), lag_s(sim, worst_ind)
        m1_ok = m1_lag is not None and m1_lag <= edge
        ind_ok = ind_lag is not None and ind_lag <= edge
        backlog_ok = backlog is not None and backlog < settled
        if m1_ok and plan.m1_at is None:
            plan.m1_at = elapsed
        if ind_ok and plan.ind_at is None:
            plan.ind_at = elapsed
        if backlog_ok and plan.backlog_at is None:
            plan.backlog_at = elapsed
        if m1_ok and ind_ok and backlog_ok:
            plan.caught_up_at, plan.caught_up_sim, plan.caught_up_ts = elapsed, sim, datetime.now(UTC)
            print(
                f"  >>> +{elapsed:.0f} s, {plan.caught_up_ts:%H:%M:%S} UTC: caught up {elapsed - plan.ended:.1f} s "
                f"after the outage (M1 worst lag {m1_lag:.0f} s, indicator lag {ind_lag:.0f} s, backlog {backlog})",
                flush=True,
            )
            break
        if elapsed - last_print >= 10:
            last_print = elapsed
            print(
                f"  >>> +{elapsed:.0f} s, {elapsed - plan.ended:.0f} s after the outage: M1 worst lag "
                f"{fmt(m1_lag, '.0f')} s, indicator lag {fmt(ind_lag, '.0f')} s, backlog {backlog} events",
                flush=True,
            )
    await asyncio.sleep(SNAPSHOT_DELAY_S)
    plan.snapshot = await snapshot_m1_stream(redis, time.monotonic() - t0)
    print(f"  >>> XRANGE ohlcv_m1_ready {SNAPSHOT_DELAY_S:.0f} s after the catch-up: {plan.snapshot.entries:,} entries")


def lsq_slope(samples: list[Sample]) -> float | None:
    """Least-squares RSS slope, MB per real hour."""
    if len(samples) < 3:
        return None
    xs = [s.elapsed / 3600 for s in samples]
    ys = [s.rss for s in samples]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return None if den == 0 else sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den


def slope_text(samples: list[Sample], speed: float) -> str:
    slope = lsq_slope(samples)
    if slope is None:
        return "too few samples"
    span = samples[-1].elapsed - samples[0].elapsed
    return (
        f"{slope:+.1f} MB per real hour = {slope * 24 / speed:+.1f} MB per simulated day "
        f"({len(samples)} samples over {span:.0f} s)"
    )


def rss_max_text(samples: list[Sample]) -> str:
    if not samples:
        return "no samples"
    top = max(samples, key=lambda s: s.rss)
    return f"{top.rss:.1f} MB (at +{top.elapsed:.0f} s)"


def minute_ranges(times: list[int]) -> str:
    """Sorted open times (ms) as "HH:MM-HH:MM" runs."""
    runs: list[list[int]] = []
    for t in times:
        if runs and t == runs[-1][1] + M1:
            runs[-1][1] = t
        else:
            runs.append([t, t])
    return ", ".join(sim_text(a)[:-3] + ("" if a == b else "-" + sim_text(b)[6:-3]) for a, b in runs)


def describe_missing(missing: set[tuple[str, int]]) -> str:
    if not missing:
        return "none"
    minutes: dict[int, int] = {}
    for _, t in missing:
        minutes[t] = minutes.get(t, 0) + 1
    symbols = len({s for s, _ in missing})
    example = ", ".join(f"{sim_text(t)[:-3]} x{n}" for t, n in sorted(minutes.items())[:6])
    return (
        f"{len(missing):,} bars of {symbols} symbols in {len(minutes)} minutes "
        f"({minute_ranges(sorted(minutes))[:300]}); per minute: {example}"
    )


HOLES_SQL = """
SELECT symbol, min(open_time) AS first, max(open_time) AS last, count(*) AS n
FROM ohlcv4_m1 WHERE open_time <= $1 GROUP BY symbol
"""
MISSING_MINUTES_SQL = """
SELECT g FROM generate_series($2::timestamptz, $3::timestamptz, interval '1 minute') g
WHERE NOT EXISTS (SELECT 1 FROM ohlcv4_m1 m WHERE m.symbol = $1 AND m.open_time = g) ORDER BY g
"""
STORED_SQL = """
SELECT symbol, (extract(epoch FROM open_time) * 1000)::bigint AS t FROM ohlcv4_m1 WHERE open_time BETWEEN $1 AND $2
"""


async def report_outage(
    plan: OutagePlan,
    samples: list[Sample],
    mode: Mode,
    pool: asyncpg.Pool,
    redis,
    latency: Latency,
    clock: ExchangeClock,
    symbols: list[str],
) -> None:
    print(f"--- Redis outage ({mode.name}, {len(samples)} samples)")
    if plan.started is None or plan.ended is None or plan.start_sim is None or plan.end_sim is None:
        print("  the outage did not complete before the run ended")
        return
    table: list[tuple[str, str]] = []

    def add(name: str, value: str) -> None:
        table.append((name, value))
        print(f"  {name:<44} {value}", flush=True)

    sim_min = plan.duration_s * mode.speed / 60
    m1_n = int(sim_min) * mode.symbols
    total = m1_n + m1_n // 5 + m1_n // 15
    add(
        "outage (proxy black hole)",
        f"+{plan.started:.0f} s to +{plan.ended:.0f} s after ready: {plan.ended - plan.started:.0f} s real = "
        f"{sim_min:.0f} simulated min (sim {sim_text(plan.start_sim)} to {sim_text(plan.end_sim)})",
    )
    add(
        "candles to hold for Redis (estimate)",
        f"~{m1_n:,} M1 + {m1_n // 5:,} M5 + {m1_n // 15:,} M15 = {total:,} (bound {HELD_BOUND:,}: "
        + (f"~{total - HELD_BOUND:,} let go, to be re-announced from PostgreSQL)" if total > HELD_BOUND else "within)"),
    )
    add("connections held in the black hole", f"{plan.proxy_links // 2}")
    before = [s for s in samples if s.elapsed < plan.started]
    during = [s for s in samples if plan.started <= s.elapsed <= plan.ended]
    after = [s for s in samples if s.elapsed > plan.ended]
    settled = [s for s in samples if plan.caught_up_at is not None and s.elapsed >= plan.caught_up_at]
    if before:
        add(
            "RSS before the outage (last sample)",
            f"{before[-1].rss:.1f} MB (before: min {min(s.rss for s in before):.1f}, "
            f"max {max(s.rss for s in before):.1f})",
        )
    add("RSS max during the outage", rss_max_text(during))
    add("RSS max after the outage", rss_max_text(after))
    add("RSS at the end", f"{samples[-1].rss:.1f} MB (at +{samples[-1].elapsed:.0f} s)")
    add("RSS slope before the outage", slope_text(before, mode.speed))
    add("RSS slope from the catch-up to the end", slope_text(settled, mode.speed))
    add("RSS slope over the whole run", slope_text(samples, mode.speed))
    m1_during = [s.m1_worst for s in during if s.m1_worst is not None]
    ind_during = [s.ind_lag for s in during + after if s.ind_lag is not None]
    add(
        "M1 worst lag (PostgreSQL) during outage",
        f"max {max(m1_during):.0f} s simulated (5 s samples)" if m1_during else "no samples",
    )
    add("indicator lag (Redis hash), max from outage", f"{max(ind_during):.0f} s simulated" if ind_during else "-")

    def after_text(at: float | None) -> str:
        return f"+{at - plan.ended:.1f} s real" if at is not None else "NOT by the end of the run"

    add("caught up: every newest M1 in PG at edge", after_text(plan.m1_at))
    add("caught up: every M1 indicator hash at edge", after_text(plan.ind_at))
    add("caught up: indicator backlog settled", after_text(plan.backlog_at))
    add(
        "CAUGHT UP after the outage (all three)",
        after_text(plan.caught_up_at)
        + (
            f" = {(plan.caught_up_at - plan.ended) * mode.speed / 60:.0f} simulated min"
            if plan.caught_up_at is not None
            else ""
        ),
    )

    # Completeness, up to three bars before the exchange clock now.
    now_sim = await clock.now()
    hi = now_sim // M1 * M1 - 3 * M1
    rows = await pool.fetch(HOLES_SQL, datetime_from_ms(hi))
    by_symbol = {r["symbol"]: r for r in rows}
    absent = [s for s in symbols if s not in by_symbol]
    holed: list[tuple[str, int, int, int]] = []  # symbol, first, last, missing inside
    tails = 0
    for symbol in symbols:
        r = by_symbol.get(symbol)
        if r is None:
            continue
        first, last = ms(r["first"]), ms(r["last"])
        assert first is not None and last is not None
        inside = (last - first) // M1 + 1 - r["n"]
        if inside:
            holed.append((symbol, first, last, inside))
        if last < hi:
            tails += 1
    firsts = [ms(r["first"]) for r in rows]
    span = f"{sim_text(min(firsts))[:-3]} .. {sim_text(max(firsts))[:-3]}" if firsts else "-"
    add(
        "M1 holes, every symbol, up to " + sim_text(hi)[:-3],
        f"{'OK' if not holed and not absent and not tails else 'FAIL'}: {len(holed)} symbols with holes "
        f"({sum(h[3] for h in holed):,} minutes), {len(absent)} absent, {tails} short of the end; "
        f"first bars {span}",
    )
    for symbol, first, last, _ in holed[:10]:
        gaps = await pool.fetch(MISSING_MINUTES_SQL, symbol, datetime_from_ms(first), datetime_from_ms(last))
        print(f"      {symbol}: missing {minute_ranges([ms(g['g']) or 0 for g in gaps])[:400]}")

    # Announcements: every M1 stored from two bars before the outage on.
    print(
        f"  (ohlcv_m1_ready is trimmed to ~{STREAM_MAXLEN:,} entries: an XRANGE vouches only for the bars the trim "
        "left, given below; the bench's follower read every entry as it came, counted against entries-added)"
    )
    lo = plan.start_sim // M1 * M1 - 2 * M1
    stored = {(r["symbol"], r["t"]) for r in await pool.fetch(STORED_SQL, datetime_from_ms(lo), datetime_from_ms(hi))}
    missed = await drain_m1_announcements(redis, latency)
    unseen = stored - latency.m1_ready.keys()
    add(
        f"M1 stored {sim_text(lo)[:-3]} .. {sim_text(hi)[:-3]}",
        f"{len(stored):,} bars (expected {((hi - lo) // M1 + 1) * len(symbols):,})",
    )
    add(
        "  announced (bench's follower of the stream)",
        f"{'OK' if not unseen and missed == 0 else 'FAIL'}: not announced {describe_missing(unseen)}; "
        f"the follower read {latency.m1_read:,} entries, {missed:,} added were trimmed before it read them",
    )
    for name, snap in (
        (f"XRANGE {SNAPSHOT_DELAY_S:.0f} s after catch-up", plan.snapshot),
        ("XRANGE at the end", await snapshot_m1_stream(redis, time.monotonic())),
    ):
        window = None if snap is None else snapshot_window(snap, clock)
        if snap is None or window is None:
            add(f"  announced ({name})", "no snapshot")
            continue
        a, b = max(lo, window[0]), min(hi, window[1])
        if a > b:
            add(
                f"  announced ({name})",
                f"{snap.entries:,} entries cover bars {sim_text(window[0])[:-3]} .. {sim_text(window[1])[:-3]}: "
                "nothing from the outage on left by the trim",
            )
            continue
        checked = {k for k in stored if a <= k[1] <= b}
        absent_in = checked - snap.keys
        add(
            f"  announced ({name})",
            f"{'OK' if not absent_in else 'FAIL'}: {len(checked):,} bars {sim_text(a)[:-3]} .. {sim_text(b)[:-3]} "
            f"(the {snap.entries:,} entries the trim left cover from {sim_text(window[0])[:-3]}); not in the stream: "
            f"{describe_missing(absent_in)}",
        )
    gaps = await pool.fetch("SELECT status, count(*) FROM missing_m1_log_v4 GROUP BY 1 ORDER BY 1")
    counts = {r[0]: r[1] for r in gaps}
    add(
        "missing_m1_log_v4",
        f"{'OK' if not counts.get('missing') else 'FAIL'}: {counts.get('missing', 0)} 'missing' rows "
        f"(by status: {', '.join(f'{k} {v}' for k, v in counts.items()) or 'empty'})",
    )
    intake = await pool.fetchrow(
        "SELECT count(*) FILTER (WHERE message LIKE 'more than % candles held%') AS let_go, "
        "count(*) FILTER (WHERE message LIKE 'announced % candles a previous run%') AS rounds, "
        "coalesce(sum(substring(message FROM '^announced ([0-9]+) candles')::bigint), 0) AS reannounced "
        "FROM system_log_v4 WHERE module = 'INTAKE' AND ts >= $1",
        plan.start_ts,
    )
    add(
        "INTAKE from the outage on (system_log_v4)",
        f"held bound exceeded {intake['let_go']} time(s); {intake['reannounced']:,} candles re-announced from "
        f"PostgreSQL in {intake['rounds']} round(s)",
    )
    until = plan.caught_up_ts or datetime.now(UTC)
    logged = await pool.fetch(
        "SELECT ts, level, module, message, left(details::text, 220) AS details FROM system_log_v4 "
        "WHERE ts BETWEEN $1 AND $2 ORDER BY ts LIMIT 40",
        plan.start_ts - timedelta(seconds=5) if plan.start_ts else until,
        until + timedelta(seconds=SNAPSHOT_DELAY_S + 60),
    )
    print(f"  system_log_v4 from the outage to {SNAPSHOT_DELAY_S + 60:.0f} s after the catch-up ({len(logged)} rows):")
    for r in logged:
        print(f"    {r['ts']:%H:%M:%S} {r['level']} {r['module']}: {r['message'][:160]} {r['details'] or ''}")


# --------------------------------------------------------------------------- one mode


@dataclass
class Sample:
    elapsed: float
    sim: int
    cpu: float | None
    rss: float
    children: int
    m1_lag: float | None
    m1_worst: float | None
    ind_lag: float | None
    ind_pg: float | None
    backlog: int | None
    pg: float | None
    redis: float | None
    exchange: float | None
    bench: float | None


HEADER = (
    f"{'elapsed':>8} {'sim time':>14} {'cpu %':>6} {'rss MB':>7} {'m1 lag':>7} {'m1 worst':>8} {'ind lag':>7} "
    f"{'ind PG':>7} {'backlog':>7} | {'pg %':>5} {'redis %':>7} {'exch %':>6} {'bench %':>7}"
)


def row(s: Sample) -> str:
    rss = f"{s.rss:.1f}" + (f"+{s.children}p" if s.children else "")
    return (
        f"{s.elapsed:>7.0f}s {sim_text(s.sim):>14} {fmt(s.cpu):>6} {rss:>7} {fmt(s.m1_lag, '.0f'):>7} "
        f"{fmt(s.m1_worst, '.0f'):>8} {fmt(s.ind_lag, '.0f'):>7} {fmt(s.ind_pg, '.0f'):>7} "
        f"{fmt(s.backlog, 'd'):>7} | {fmt(s.pg):>5} "
        f"{fmt(s.redis):>7} {fmt(s.exchange):>6} {fmt(s.bench):>7}"
    )


def slope_mb_per_h(samples: list[Sample]) -> float | None:
    """Least-squares RSS slope (MB per real hour) over the second half of the run."""
    return lsq_slope(samples[len(samples) // 2 :])


def log_level_counts(text: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split(" | ", 3)
        if len(parts) >= 3 and parts[1].strip() in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            counts[parts[1].strip()] = counts.get(parts[1].strip(), 0) + 1
    return counts


@dataclass
class Mode:
    name: str
    speed: float
    sample_s: float
    duration_s: float  # real seconds measured after ready
    symbols: int
    outage_s: float = 0.0  # real seconds of Redis black hole in the middle (day mode)


async def run_mode(mode: Mode) -> None:
    database = f"feed_v4_soak_{mode.name}"
    sim_minutes = mode.duration_s * mode.speed / 60
    print(
        f"\n=== {mode.name}: {mode.symbols} synthetic symbols at speed {mode.speed:g}, {mode.duration_s / 60:.1f} real "
        f"min ({sim_minutes / 60:.2f} simulated h) after ready; exchange starts at {START}Z; "
        f"INITIAL_HISTORY_M1={HISTORY_M1}"
        + (f"; Redis outage of {mode.outage_s:.0f} s real in the middle" if mode.outage_s else ""),
        flush=True,
    )
    base_url = setting("POSTGRES_URL")
    redis_server = RedisServer(with_timeseries=True)
    exchange: subprocess.Popen | None = None
    daemon: DaemonProcess | None = None
    pool: asyncpg.Pool | None = None
    redis = None
    session: aiohttp.ClientSession | None = None
    proxy: ProxyThread | None = None
    tasks: list[asyncio.Task] = []
    try:
        await asyncio.to_thread(redis_server.start)
        daemon_redis_url = redis_server.url
        if mode.outage_s:
            proxy = ProxyThread("127.0.0.1", redis_server.port)
            daemon_redis_url = f"redis://127.0.0.1:{await proxy.start()}/0"
        url = await recreate_database(base_url, database)
        pool = await asyncpg.create_pool(url, min_size=1, max_size=3, server_settings={"application_name": APP_NAME})
        redis = make_redis(redis_server.url)
        port = free_port()
        exchange = start_fake_exchange(mode.symbols, mode.speed, START, port, seed=3)
        session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        clock = ExchangeClock(session, f"http://127.0.0.1:{port}", mode.speed)
        await wait_exchange(clock, exchange)
        rtt = await clock.calibrate()
        symbols = [f"SYN{i:04d}USDT" for i in range(1, mode.symbols + 1)]
        ws_base = f"ws://127.0.0.1:{port}/market"
        daemon = DaemonProcess(
            {
                "REDIS_URL": daemon_redis_url,
                "POSTGRES_URL": url,
                "BINANCE_WS_URL": ws_base,
                "BINANCE_REST_URL": clock.rest_url,
                "SYMBOLS": ",".join(symbols),
                "INITIAL_HISTORY_M1": str(HISTORY_M1),
                "DEBUG_MODE": "false",
                **({"WS_SILENCE_S": str(LIVE_WS_SILENCE_S)} if mode.speed <= 1 else {}),
            }
        )
        started = time.monotonic()
        daemon.start()
        assert daemon.process is not None
        pid = daemon.process.pid
        print(
            f"servers: redis pid {redis_server.process.pid if redis_server.process else '?'}, fake exchange pid "
            f"{exchange.pid} (clock calibrated, RTT {rtt:.1f} ms), daemon pid {pid} (log {daemon.log_path})"
            + (f"; the daemon's Redis goes through the bench's proxy ({daemon_redis_url})" if proxy else ""),
            flush=True,
        )
        ready_at_sim = await wait_ready(mode, daemon, pool, redis, clock, symbols, started)
        boot_s = time.monotonic() - started
        boot_cpu = total_cpu_s([pid, *descendants(pid)])
        # Lifetime CPU of what the boot kept busy (backends opened during boot, the exchange's REST).
        pg_boot = total_cpu_s(await pg_backends(pool, database))
        exchange_boot = total_cpu_s([exchange.pid])
        before = await table_counts(pool)
        ready_ts = await pool.fetchval("SELECT now()")
        print(
            f"ready after {boot_s:.1f} s (boot + catch-up of {HISTORY_M1} M1 x {mode.symbols} symbols and their "
            f"indicators; sim {sim_text(ready_at_sim)}); CPU during boot: daemon {boot_cpu:.1f} s "
            f"({boot_cpu / boot_s * 100:.0f} % of one core), its PostgreSQL backends {pg_boot:.1f} s, fake exchange "
            f"{exchange_boot:.1f} s; excluded below",
            flush=True,
        )
        latency = Latency(since_sim=ready_at_sim)
        listened = symbols if mode.speed <= 1 else symbols[:LISTEN_SYMBOLS_ACCELERATED]
        tasks = [
            asyncio.create_task(listen_closes(ws_base, listened, latency)),
            asyncio.create_task(read_announcements(redis_server.url, latency)),
        ]
        t0 = time.monotonic()
        plan: OutagePlan | None = None
        if proxy is not None:
            plan = OutagePlan((mode.duration_s - mode.outage_s) / 2, mode.outage_s)
            tasks.append(asyncio.create_task(run_outage(plan, proxy, t0, mode, pool, redis, clock, symbols)))
        samples = await sample_loop(mode, daemon, pool, redis, clock, symbols, database, exchange, redis_server, t0)
        for task in tasks:
            task.cancel()
        for task, result in zip(tasks, await asyncio.gather(*tasks, return_exceptions=True)):
            if isinstance(result, Exception):
                print(f"  a bench task failed: {task.get_coro().__name__}: {result!r}")  # type: ignore[union-attr]
        tasks = []
        after = await table_counts(pool)
        exclude = None
        if plan is not None and plan.start_sim is not None:
            end_sim = samples[-1].sim if samples else plan.start_sim
            exclude = (plan.start_sim, plan.caught_up_sim or end_sim)
        await summarise(mode, samples, before, after, pool, latency, clock, len(listened), daemon, ready_ts, exclude)
        if plan is not None and samples:
            await report_outage(plan, samples, mode, pool, redis, latency, clock, symbols)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await cleanup(daemon, exchange, redis_server, pool, redis, session, base_url, database, proxy)


async def wait_ready(
    mode: Mode,
    daemon: DaemonProcess,
    pool: asyncpg.Pool,
    redis,
    clock: ExchangeClock,
    symbols: list[str],
    started: float,
) -> int:
    """Until the history is in and both pipelines are at the live edge. Returns the sim time.

    Feed: every symbol's M1 run in PostgreSQL is complete (no hole, starting near
    START - INITIAL_HISTORY_M1), its newest M1 is within one bar + the close delay + 10 real
    seconds of the exchange clock, and no minute is still 'missing'. Indicators: every
    symbol's `indicator:<SYMBOL>:m1` hash is as recent, and the indicator group's backlog
    on the candle streams (unread + unacknowledged entries) is below two events per symbol:
    the live closes arrive before the REST history, which the worker then processes as
    late corrections, so a recent hash alone does not mean the catch-up is over."""
    edge_s = 62 + 10 * mode.speed
    history_from = datetime_from_ms(clock.sim0 - (HISTORY_M1 - 30) * M1)
    booted = feed_ready = None
    last_print = 0.0
    while True:
        if not daemon.alive():
            raise RuntimeError(f"the daemon exited during boot:\n{daemon.output()[-3000:]}")
        elapsed = time.monotonic() - started
        if booted is None and "booted:" in daemon.output():
            booted = elapsed
            print(f"  boot: 'booted' logged after {booted:.1f} s (migrations, tickers, restore)", flush=True)
        if booted is None:  # the tables exist once the daemon's migrations ran
            await asyncio.sleep(0.5)
            continue
        sim = await clock.now()
        complete = await pool.fetchval(COMPLETE_HISTORY_SQL, history_from)
        missing = await pool.fetchval("SELECT count(*) FROM missing_m1_log_v4 WHERE status = 'missing'")
        have_m1, worst_m1, _ = await m1_edge(pool)
        have_ind, worst_ind = await indicator_edge(redis, symbols)
        backlog = await indicator_backlog(redis)
        m1_lag, ind_lag = lag_s(sim, worst_m1), lag_s(sim, worst_ind)
        if (
            feed_ready is None
            and complete == len(symbols)
            and missing == 0
            and have_m1 == len(symbols)
            and m1_lag is not None
            and m1_lag <= edge_s
        ):
            feed_ready = elapsed
            print(f"  boot: M1 history complete and at the live edge, all symbols, after {elapsed:.1f} s", flush=True)
        if (
            feed_ready is not None
            and have_ind == len(symbols)
            and ind_lag is not None
            and ind_lag <= edge_s
            and backlog is not None
            and backlog < min(2 * len(symbols), BACKLOG_CAP)
        ):
            print(f"  boot: indicators caught up (backlog {backlog} events) after {elapsed:.1f} s", flush=True)
            return sim
        if elapsed > READY_TIMEOUT_S:
            print(f"  boot: NOT caught up after {READY_TIMEOUT_S:.0f} s; measuring from here anyway", flush=True)
            return sim
        if elapsed - last_print >= 15:
            last_print = elapsed
            print(
                f"  boot: {elapsed:.0f} s, sim {sim_text(sim)}: M1 history complete for {complete}/{len(symbols)} "
                f"symbols ({missing} minutes missing), newest M1 worst lag {fmt(m1_lag, '.0f')} s; M1 indicator "
                f"hashes {have_ind} (worst lag {fmt(ind_lag, '.0f')} s), indicator backlog {backlog} events "
                f"(unread counted up to {BACKLOG_CAP} per stream)",
                flush=True,
            )
        await asyncio.sleep(1.0)


async def sample_loop(
    mode: Mode,
    daemon: DaemonProcess,
    pool: asyncpg.Pool,
    redis,
    clock: ExchangeClock,
    symbols: list[str],
    database: str,
    exchange: subprocess.Popen,
    redis_server: RedisServer,
    t0: float,
) -> list[Sample]:
    assert daemon.process is not None and redis_server.process is not None
    pid = daemon.process.pid
    meters = {name: CpuMeter() for name in ("daemon", "pg", "redis", "exchange", "bench")}
    backends = await pg_backends(pool, database)
    meters["daemon"].read([pid, *descendants(pid)])
    meters["pg"].read(backends)
    meters["redis"].read([redis_server.process.pid])
    meters["exchange"].read([exchange.pid])
    meters["bench"].read([os.getpid()])
    print(
        f"time series (every {mode.sample_s:g} s; cpu % of one core over the interval; rss = daemon's resident "
        f"memory, +Np = N child processes included; lags in simulated seconds; pg = its backends for this database"
        + ("; sampling instants walk through the bar" if mode.speed > 1 else "")
        + ")"
    )
    print(HEADER, flush=True)
    samples: list[Sample] = []
    n = 0
    while True:
        n += 1
        due = t0 + n * mode.sample_s
        if mode.speed > 1:  # 5 s is a whole number of bars at 60x: walk the instant through the bar
            due += (n * 0.618034) % 1.0 * min(1.0, 60 / mode.speed)
        if due > t0 + mode.duration_s + 0.5:
            break
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        if not daemon.alive():
            print(f"the daemon exited (code {daemon.process.returncode}):\n{daemon.output()[-3000:]}", flush=True)
            break
        children = descendants(pid)
        cpu, _, rss = meters["daemon"].read([pid, *children])
        pg, _, _ = meters["pg"].read(backends)
        redis_cpu, _, _ = meters["redis"].read([redis_server.process.pid])
        exch, _, _ = meters["exchange"].read([exchange.pid])
        bench, _, _ = meters["bench"].read([os.getpid()])
        elapsed = time.monotonic() - t0
        sim = await clock.now()
        _, worst_m1, newest_m1 = await m1_edge(pool)
        _, worst_ind = await indicator_edge(redis, symbols)
        newest_pg = ms(await pool.fetchval("SELECT max(open_time) FROM indicator_values_v4"))
        backlog = await indicator_backlog(redis)
        backends = await pg_backends(pool, database)
        sample = Sample(
            elapsed,
            sim,
            cpu,
            rss,
            len(children),
            lag_s(sim, newest_m1),
            lag_s(sim, worst_m1),
            lag_s(sim, worst_ind),
            lag_s(sim, newest_pg),
            backlog,
            pg,
            redis_cpu,
            exch,
            bench,
        )
        samples.append(sample)
        print(row(sample), flush=True)
    return samples


def lag_line(name: str, values: list[float | None], speed: float, count_stale: bool = True) -> str:
    got = [v for v in values if v is not None]
    if not got:
        return f"  {name}: no samples"
    text = f"  {name}: p50 {statistics.median(got):.0f} s, p99 {percentile(got, 0.99):.0f} s, max {max(got):.0f} s"
    if speed > 1:
        text += f" (p99 = {percentile(got, 0.99) / speed:.1f} s real)"
    if count_stale:
        stale = 62 + speed  # one bar + the close delay + one real second
        text += f"; samples more than one bar behind (> {stale:.0f} s): {sum(1 for v in got if v > stale)}/{len(got)}"
    return text


async def summarise(
    mode: Mode,
    samples: list[Sample],
    before: dict[str, int],
    after: dict[str, int],
    pool: asyncpg.Pool,
    latency: Latency,
    clock: ExchangeClock,
    listened: int,
    daemon: DaemonProcess,
    ready_ts: datetime,
    exclude: tuple[int, int] | None = None,
) -> None:
    print(f"--- summary {mode.name} (speed {mode.speed:g}, {len(samples)} samples)")
    if not samples:
        print("  no samples")
        return
    cpu = [s.cpu for s in samples if s.cpu is not None]
    mean_cpu = statistics.fmean(cpu)
    budget = f"[budget mean < {CPU_BUDGET_PCT:.0f} %: {verdict(mean_cpu < CPU_BUDGET_PCT)}]"
    if mode.speed > 1:
        budget += " (the budget is for live pace; at this speed for information)"
    print(
        f"  daemon CPU, % of one core: mean {mean_cpu:.1f}, p95 {percentile(cpu, 0.95):.1f}, max {max(cpu):.1f} "
        f"{budget}"
    )
    others = []
    for name, values in (
        ("its PostgreSQL backends", [s.pg for s in samples]),
        ("redis-server", [s.redis for s in samples]),
        ("fake exchange", [s.exchange for s in samples]),
        ("this bench", [s.bench for s in samples]),
    ):
        got = [v for v in values if v is not None]
        if got:
            others.append(f"{name} {statistics.fmean(got):.1f} (p95 {percentile(got, 0.95):.1f})")
    print(f"  others, mean % of one core: {', '.join(others)}")
    rss = [s.rss for s in samples]
    slope = slope_mb_per_h(samples)
    if slope is None:
        growth = "slope: too few samples"
    else:
        per_sim_day = slope * 24 / mode.speed
        flat = "FLAT" if per_sim_day < RSS_FLAT_MB_PER_DAY else "GROWING"
        growth = (
            f"slope over the second half {slope:+.1f} MB per real hour = {per_sim_day:+.1f} MB per simulated day "
            f"[flat: < {RSS_FLAT_MB_PER_DAY:.0f} MB/day: {flat}]"
        )
        if samples[-1].elapsed < 1800:
            growth += f" (second half only {samples[-1].elapsed / 120:.1f} min: indicative)"
    print(
        f"  daemon RSS MB: first {rss[0]:.1f}, last {rss[-1]:.1f}, max {max(rss):.1f} "
        f"[budget < {RSS_BUDGET_MB:.0f} MB: {verdict(max(rss) < RSS_BUDGET_MB)}]"
    )
    print(f"    {growth}")
    if any(s.children for s in samples):
        print(f"    (includes up to {max(s.children for s in samples)} child process(es), e.g. pandas-ta workers)")
    print(lag_line("M1 lag (newest stored M1 close vs exchange clock)", [s.m1_lag for s in samples], mode.speed))
    print(lag_line("M1 lag, worst symbol", [s.m1_worst for s in samples], mode.speed))
    print(lag_line("indicator lag, worst symbol (Redis m1 hash)", [s.ind_lag for s in samples], mode.speed))
    print(
        lag_line(
            "indicator persistence lag (newest indicator_values_v4 row)", [s.ind_pg for s in samples], mode.speed, False
        )
    )
    backlogs = [s.backlog for s in samples if s.backlog is not None]
    if backlogs:
        print(
            f"  indicator group backlog (candle events unread or unacknowledged): "
            f"p50 {statistics.median(backlogs):.0f}, max {max(backlogs)}"
        )
    if exclude is not None:
        lo, hi = exclude
        kept = Latency(
            latency.since_sim,
            latency.frames,
            {k: v for k, v in latency.m1_ready.items() if not lo <= k[1] + M1 <= hi},
            {k: v for k, v in latency.ind_ready.items() if not lo <= k[2] + TF_MS[k[1]] <= hi},
            latency.listener_errors,
        )
        print(
            f"  (latency figures leave out the {len(latency.m1_ready) - len(kept.m1_ready):,} M1 bars closing from the "
            f"Redis outage's start to the catch-up, sim {sim_text(lo)} to {sim_text(hi)})"
        )
        latency = kept
    report_latency(latency, clock, listened)
    # Minutes that closed between ready and the last sample (less the exchange's close delay).
    closed_minutes = (samples[-1].sim - CLOSE_DELAY_MS[1]) // M1 - latency.since_sim // M1
    counts = ", ".join(
        f"{t} {after[t]:,} (+{after[t] - before[t]:,})" for t in ("ohlcv4_m1", "ohlcv4_m5", "ohlcv4_m15")
    )
    print(
        f"  candles stored, total (+ during the run): {counts}; expected during the run about "
        f"{closed_minutes * mode.symbols:,} M1"
    )
    added = after["indicator_values_v4"] - before["indicator_values_v4"]
    first_open = -(-(latency.since_sim - M1) // M1) * M1  # the first M1 that closed during the run
    bars = await pool.fetchval("SELECT count(*) FROM ohlcv4_m1 WHERE open_time >= $1", datetime_from_ms(first_open))
    values = await pool.fetchval(
        "SELECT count(*) FROM indicator_values_v4 WHERE open_time >= $1", datetime_from_ms(first_open)
    )
    print(
        f"  indicator values stored: {after['indicator_values_v4']:,} (+{added:,} "
        f"since ready, including the tail of the boot's persistence); for bars closed during the run: {values:,} "
        f"({values / bars if bars else 0:.1f} per M1 candle, all timeframes)"
    )
    gaps = await pool.fetch(
        "SELECT status, count(*), count(*) FILTER (WHERE detected_at >= $1) FROM missing_m1_log_v4 GROUP BY 1 "
        "ORDER BY 1",
        ready_ts,
    )
    print(
        "  missing_m1_log_v4 by status, total (detected during the run): "
        f"{', '.join(f'{r[0]} {r[1]} ({r[2]})' for r in gaps) or 'empty'}"
    )
    await report_errors(pool, daemon, ready_ts)


async def report_errors(pool: asyncpg.Pool, daemon: DaemonProcess, ready_ts: datetime) -> None:
    size = await pool.fetchval("SELECT pg_size_pretty(pg_database_size(current_database()))")
    print(f"  scratch database size: {size}")
    levels = await pool.fetch(
        "SELECT level, count(*), count(*) FILTER (WHERE ts >= $1) FROM system_log_v4 GROUP BY 1 ORDER BY 1", ready_ts
    )
    print(
        "  system_log_v4 by level, total (during the run): "
        f"{', '.join(f'{r[0]} {r[1]} ({r[2]})' for r in levels) or 'empty'}"
    )
    top = await pool.fetch(
        "SELECT level, module, left(message, 100) AS message, count(*) AS n, count(*) FILTER (WHERE ts >= $1) AS run "
        "FROM system_log_v4 WHERE level IN ('WARNING', 'ERROR', 'CRITICAL') GROUP BY 1, 2, 3 ORDER BY 4 DESC LIMIT 8",
        ready_ts,
    )
    for r in top:
        print(f"    {r['n']:>5} x ({r['run']} during the run) {r['level']} {r['module']}: {r['message']}")
    console = log_level_counts(daemon.output())
    print(f"  daemon console log lines by level: {', '.join(f'{k} {v}' for k, v in sorted(console.items()))}")


async def cleanup(
    daemon: DaemonProcess | None,
    exchange: subprocess.Popen | None,
    redis_server: RedisServer,
    pool: asyncpg.Pool | None,
    redis,
    session: aiohttp.ClientSession | None,
    base_url: str,
    database: str,
    proxy: ProxyThread | None = None,
) -> None:
    """Everything this mode started, whatever happened (also on Ctrl-C). Process waits go to a
    thread, never on the event loop."""
    if daemon is not None and daemon.process is not None:
        try:
            if daemon.alive():
                started = time.monotonic()
                daemon.process.send_signal(signal.SIGTERM)
                code = await asyncio.to_thread(daemon.process.wait, 15)
                print(f"  daemon stopped on SIGTERM: exit {code} in {time.monotonic() - started:.1f} s")
        except subprocess.TimeoutExpired:
            print("  daemon did not stop within 15 s of SIGTERM: killed")
        except BaseException as exc:
            print(f"  cleanup (daemon): {exc!r}")
        finally:
            await asyncio.to_thread(daemon.cleanup)
    if proxy is not None:
        with contextlib.suppress(BaseException):
            await proxy.close()
    if exchange is not None and exchange.poll() is None:
        exchange.terminate()
        try:
            await asyncio.to_thread(exchange.wait, 10)
        except subprocess.TimeoutExpired:
            exchange.kill()
            await asyncio.to_thread(exchange.wait, 5)
    if pool is not None:
        pool.terminate()  # at once: a query cut short by Ctrl-C may still hold a connection
    for closing in (
        session.close() if session is not None else None,
        redis.aclose() if redis is not None else None,
    ):
        if closing is not None:
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(closing, 5)
    await asyncio.to_thread(redis_server.cleanup)
    try:
        await drop_database(base_url, database)
    except BaseException as exc:
        print(f"  cleanup: could not drop database {database}: {exc!r}")


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("live", "day", "both"), default="both")
    parser.add_argument("--minutes", type=float, default=10.0, help="live mode: real minutes after ready")
    parser.add_argument("--hours", type=float, default=24.0, help="day mode: simulated hours after ready (at 60x)")
    parser.add_argument("--symbols", type=int, default=SYMBOLS, help="synthetic symbols (default 500)")
    parser.add_argument(
        "--redis-outage-min",
        type=float,
        default=0.0,
        help="day mode: real minutes the daemon's Redis is black-holed (through a proxy), in the middle of the day",
    )
    args = parser.parse_args(argv)
    if args.redis_outage_min < 0:
        parser.error("--redis-outage-min must be >= 0")
    if args.redis_outage_min > 0:
        if args.mode != "day":
            parser.error("--redis-outage-min is for --mode day")
        if args.redis_outage_min * 60 + 60 > args.hours * 3600 / DAY_SPEED:
            parser.error("--redis-outage-min must leave at least a real minute of the day around it")
    return args


interrupted = False


async def run(args: argparse.Namespace) -> None:
    main_task = asyncio.current_task()
    assert main_task is not None

    def interrupt() -> None:
        # A terminal's Ctrl-C also reaches the servers (same process group): they stop on
        # their own, and a probe may fail on a dead server before this cancel lands.
        global interrupted
        interrupted = True
        main_task.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, interrupt)
    modes = []
    if args.mode in ("live", "both"):
        modes.append(Mode("live", LIVE_SPEED, LIVE_SAMPLE_S, args.minutes * 60, args.symbols))
    if args.mode in ("day", "both"):
        day_s = args.hours * 3600 / DAY_SPEED
        modes.append(Mode("day", DAY_SPEED, DAY_SAMPLE_S, day_s, args.symbols, args.redis_outage_min * 60))
    print(f"soak bench: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start")
    for mode in modes:
        await run_mode(mode)
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end (other work on this machine skews the figures)")


def main() -> None:
    args = parse_args()
    try:
        asyncio.run(run(args))
    except BaseException as exc:
        if not (interrupted or isinstance(exc, (KeyboardInterrupt, asyncio.CancelledError))):
            raise
        print("\ninterrupted: processes stopped and scratch databases dropped", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
