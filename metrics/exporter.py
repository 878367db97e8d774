"""The metrics endpoint's I/O: the HTTP server, the scrape-time snapshot of the daemon's
state and the poller of what lives in the servers (Redis streams, the gap log).

The endpoint is an aiohttp server in the daemon's own event loop, so a scrape reads the
workers' state with no thread in between; rendering costs ~1-2 ms per scrape. The
listening socket is bound synchronously at start, so a port in use is a boot error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, GCCollector, PlatformCollector, ProcessCollector, generate_latest

import core_io
import infra
from candles import datetime_to_ms
from infra import REDIS_DOWN_ERRORS, BootError, system_event_log
from metrics.definitions import (
    TIMEFRAMES,
    DaemonMetrics,
    Snapshot,
    SnapshotCollector,
    StreamInfo,
    bar_end,
    candle_lag,
)

if TYPE_CHECKING:
    from feed_v4_main import Daemon

log = logging.getLogger("METRICS")

STREAMS_EVERY_S = 5.0
GAPS_EVERY_S = 15.0


def bind_socket(host: str, port: int) -> socket.socket:
    """The listening socket, bound now: a port in use is a BootError (exit 2)."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise BootError(f"METRICS_HOST={host!r} cannot be resolved ({exc.strerror})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(64)
    except OSError as exc:
        sock.close()
        raise BootError(
            f"METRICS_PORT={port}: cannot listen on {host}:{port} ({exc.strerror or exc}); "
            "choose a free port, or unset METRICS_PORT to turn the endpoint off"
        ) from None
    sock.setblocking(False)
    return sock


class MetricsServer:
    """`GET /metrics` in the text exposition format, from one registry."""

    def __init__(self, registry: Any, sock: socket.socket) -> None:
        self.registry, self.sock = registry, sock
        self.runner: web.AppRunner | None = None

    @property
    def port(self) -> int:
        return self.sock.getsockname()[1]

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self.handle)
        app.router.add_get("/", self.index)
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self.runner.setup()
        await web.SockSite(self.runner, self.sock).start()

    async def handle(self, request: web.Request) -> web.Response:
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def index(self, request: web.Request) -> web.Response:
        return web.Response(text="feed_v4 metrics: /metrics\n")

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
        with contextlib.suppress(OSError):
            self.sock.close()


class MetricsExporter:
    """A daemon's registry (its own, not the process-global one), endpoint and poller."""

    def __init__(self, daemon: Daemon, host: str, port: int) -> None:
        self.daemon = daemon
        self.metrics = DaemonMetrics(time_indicators=daemon.indicators is not None)
        registry = self.metrics.registry
        ProcessCollector(registry=registry)  # process_resident_memory_bytes, CPU, fds
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
        registry.register(SnapshotCollector(self.snapshot))
        self.host, self.port = host, port
        self.server: MetricsServer | None = None
        self.streams: dict[str, StreamInfo] = {}
        self.gaps_open: int | None = None
        self.poll_errors = 0
        self.seeded = False
        # The hooks: the feed's intake and the indicator worker report into this registry.
        if daemon.feed is not None:
            daemon.feed.intake.metrics = self.metrics
        if daemon.indicators is not None:
            daemon.indicators.metrics = self.metrics

    def bind(self) -> None:
        self.server = MetricsServer(self.metrics.registry, bind_socket(self.host, self.port))

    async def start(self) -> None:
        assert self.server is not None
        await self.server.start()
        log.info("metrics on http://%s:%d/metrics", self.host, self.server.port)

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop()

    # ---- scrape time (in the event loop)

    def snapshot(self) -> Snapshot:
        daemon = self.daemon
        self.metrics.flush()
        snap = Snapshot(
            streams=self.streams,
            gaps_open=self.gaps_open,
            poll_errors=self.poll_errors,
            worker_restarts={name: 0 for name in daemon.tasks} | dict(infra.WORKER_RESTARTS),
            workers_running=sum(not task.done() for task in daemon.tasks.values()),
        )
        held = snap.held
        held["system_log"] = len(system_event_log.pending)
        feed = daemon.feed
        if feed is not None:
            stats = feed.stats
            snap.exchange_time_ms = stats.event_time
            snap.frames, snap.bad_frames, snap.closes = stats.frames, stats.bad_frames, stats.closes
            snap.gaps_detected = stats.gaps_detected
            snap.followed_symbols = len(feed.symbols)
            now_ms = stats.event_time or int(time.time() * 1000)
            grace = getattr(feed.feed_settings, "gap_grace_ms", 0)
            snap.lag_s, snap.behind = candle_lag(self.metrics.newest_stored, feed.symbols, now_ms, grace)
            routes = {"market": feed.streams}
            if daemon.book is not None:
                routes["public"] = daemon.book.streams
            for route, pool in routes.items():
                connections = getattr(pool, "connections", [])
                snap.reconnects[route] = sum(getattr(c, "reconnects", 0) for c in connections)
                snap.connections[route] = sum(getattr(c, "ws", None) is not None for c in connections)
            limiter = feed.rest.limiter
            now = time.monotonic()
            snap.rest_weight_used = limiter._used(now)
            snap.rest_weight_limit = limiter.limit
            snap.rest_weight_total = getattr(limiter, "total", 0)
            snap.rest_blocked_s = max(0.0, limiter.blocked_until - now)
            intake = feed.intake
            held["closes_for_postgres"] = feed.closed.qsize() + len(feed.batch)
            held["candles_for_redis"] = intake.held_candles
            held["frames_ahead_of_clock"] = len(feed.ahead)
            flow = feed.orderflow
            held["orderflow_bars_for_postgres"] = len(flow.finals) + len(flow.to_write)
            held["orderflow_bars_for_redis"] = sum(count for count, _ in flow.to_publish)
            snap.outages[("INTAKE", "PostgreSQL")] = intake.pg_outage.active
            snap.outages[("INTAKE", "Redis")] = intake.redis_outage.active
            snap.outages[("ORDERFLOW", "PostgreSQL")] = flow.pg_outage.active
            snap.outages[("ORDERFLOW", "Redis")] = flow.redis_outage.active
        if daemon.book is not None:
            book = daemon.book
            held["book_seconds_for_redis"] = len(book.finished)
            held["book_seconds_for_postgres"] = len(book.to_write)
            snap.outages[("BOOK", "PostgreSQL")] = book.pg_outage.active
            snap.outages[("BOOK", "Redis")] = book.redis_outage.active
        indicators = daemon.indicators
        if indicators is not None:
            held["indicator_values_for_postgres"] = indicators.pending.rows
            snap.indicator_bars = indicators.stats["bars"]
            snap.indicator_values_persisted = indicators.stats["persisted_rows"]
            snap.outages[("INDICATORS", "Redis")] = indicators.redis_outage.active
            snap.outages[("INDICATORS", "PostgreSQL")] = indicators.pg_outage.active or indicators.persist_outage.active
        return snap

    async def run(self) -> None:
        """The METRICS worker: serve the endpoint (once), then poll forever."""
        assert self.server is not None, "bind() first"
        if self.server.runner is None:
            await self.start()
        await self.run_poller()

    # ---- the poller (a worker: METRICS)

    async def run_poller(self) -> None:
        """Redis streams every 5 s (XLEN + XINFO GROUPS, one round), the gap log's open
        rows every 15 s (a partial index), stale arrivals pruned; never per event."""
        if not self.seeded:
            with contextlib.suppress(*infra.PG_DOWN_ERRORS):
                await self.seed_newest()
            self.seeded = True
        next_gaps = 0.0
        while True:
            now = time.monotonic()
            try:
                await self.poll_streams()
            except REDIS_DOWN_ERRORS:
                self.poll_errors += 1
            if now >= next_gaps:
                next_gaps = now + GAPS_EVERY_S
                try:
                    self.gaps_open = await self.daemon.runtime.pool.fetchval(
                        "SELECT count(*) FROM missing_m1_log_v4 WHERE status = 'missing'", timeout=5
                    )
                except infra.PG_DOWN_ERRORS:
                    self.poll_errors += 1
            self.metrics.prune()
            await asyncio.sleep(STREAMS_EVERY_S)

    async def poll_streams(self) -> None:
        redis = self.daemon.runtime.redis
        indicators = self.daemon.indicators
        names = sorted(core_io.CONSUMER_GROUPS)
        pipe = redis.pipeline(transaction=False)
        for stream in names:
            pipe.xlen(stream)
            pipe.xinfo_groups(stream)
        replies = await pipe.execute(raise_on_error=False)
        streams: dict[str, StreamInfo] = {}
        for i, stream in enumerate(names):
            length, groups = replies[2 * i], replies[2 * i + 1]
            info = StreamInfo(length=length if isinstance(length, int) else None)
            if isinstance(groups, list):
                for group in groups:
                    name = group.get("name")
                    if indicators is not None and name == indicators.group:
                        name = core_io.INDICATOR_GROUP  # this process's own: one series per role
                    if name in core_io.CONSUMER_GROUPS[stream] or name == core_io.INDICATOR_GROUP:
                        lag = group.get("lag")
                        info.groups[str(name)] = (int(group.get("pending") or 0), None if lag is None else int(lag))
            streams[stream] = info
        self.streams = streams

    async def seed_newest(self) -> None:
        """Each followed symbol's newest stored bar per timeframe, once at start (one
        index probe per symbol), so the lag is known before the first new bar."""
        feed = self.daemon.feed
        if feed is None:
            return
        symbols = await core_io.enabled_symbols(self.daemon.runtime.pool)
        if not symbols:
            return
        for tf in TIMEFRAMES:
            rows = await self.daemon.runtime.pool.fetch(
                f"""SELECT s.symbol, (SELECT max(open_time) FROM {core_io.candle_table(tf)} c
                                      WHERE c.symbol = s.symbol) AS newest
                    FROM unnest($1::text[]) AS s(symbol)""",
                symbols,
                timeout=10,
            )
            for row in rows:
                if row["newest"] is not None:
                    end = bar_end(tf, datetime_to_ms(row["newest"]))
                    key = (tf, row["symbol"])
                    if self.metrics.newest_stored.get(key, 0) < end:
                        self.metrics.newest_stored[key] = end
