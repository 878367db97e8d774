"""Entry point of the feed_v4 daemon.

    python feed_v4_main.py            run the daemon
    python feed_v4_main.py migrate    apply the SQL migrations and the storage mode, and exit
    python feed_v4_main.py status     print the state from Redis and PostgreSQL (--json)

Boot order: settings (every option checked before any connection), PostgreSQL,
Redis, migrations, tickers from SYMBOLS, restore of the Redis cache; then the workers,
each under `run_safe_loop`, with a heartbeat and a watchdog. A config or boot problem
stops the process with exit code 2 and one line on stderr; a stale feed ends it with
exit code 3 so the platform restarts it; SIGTERM/SIGINT end it with 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import asyncpg
import uvloop
from redis.asyncio import Redis

import core_io
import feed_v4_cli
import infra
from alerts import TelegramAlerts
from book.intake import BOOK_SOURCES, BookIntake, BookSettings, public_url
from connections import connect_pg, connect_redis, refused_at_boot, wait_for_schema
from feed_and_aggregate import Feed, FeedSettings
from indicators_main import IndicatorOptions, IndicatorWorker
from infra import (
    REDIS_DOWN_ERRORS,
    REDIS_RETRY_ERRORS,
    BootError,
    ConfigError,
    Settings,
    env_bool,
    env_number,
    load_settings,
    log_system_event,
    run_safe_loop,
    setup_logging,
    system_event_log,
)
from migrations import apply_migrations, migration_status
from ops.drain import run_drain_command
from restore_redis_from_pg import restore_redis_from_pg
from retention import RetentionOptions, run_retention
from signals_v4_main import RouterOptions, SignalRouter, load_router_options
from status_report import run_status
from storage.setup import apply_storage, timescaledb_setting

if TYPE_CHECKING:
    from metrics.exporter import MetricsExporter

log = logging.getLogger("MAIN")

EXIT_BOOT_FAILURE = 2
EXIT_STALE_FEED = 3


@dataclass(frozen=True)
class DaemonOptions:
    """What this process runs and how it watches itself; all read before connecting."""

    feed: FeedSettings | None
    indicators: IndicatorOptions | None
    router: RouterOptions | None
    retention: RetentionOptions = dataclasses.field(default_factory=lambda: RetentionOptions.from_env({}))
    book: BookSettings | None = None  # BOOK=off: no book streams even where tickers ask
    heartbeat_interval_s: float = 2.0
    heartbeat_ttl_s: int = 30
    watchdog_stale_s: float = 180.0
    shutdown_timeout_s: float = 8.0
    worker_retry_s: float = 5.0
    metrics_port: int = 0  # 0: no metrics endpoint
    metrics_host: str = "0.0.0.0"

    @classmethod
    def from_env(cls, settings: Settings, env: Mapping[str, str] | None = None) -> DaemonOptions:
        env = os.environ if env is None else env
        return cls(
            feed=FeedSettings.from_env(settings, env) if env_bool(env, "FEED_ENABLED", True) else None,
            indicators=IndicatorOptions.from_env(env) if env_bool(env, "INDICATORS_ENABLED", True) else None,
            router=load_router_options(env) if env_bool(env, "SIGNALS_ENABLED", True) else None,
            retention=RetentionOptions.from_env(env),
            book=BookSettings.from_env(env) if env_bool(env, "BOOK", True) else None,
            heartbeat_interval_s=env_number(env, "HEARTBEAT_INTERVAL_S", 2.0, float, 0.1, 60.0),
            heartbeat_ttl_s=env_number(env, "HEARTBEAT_TTL_S", 30, int, 2, 3600),
            watchdog_stale_s=env_number(env, "WATCHDOG_STALE_S", 180.0, float, 0.0, 86_400.0),
            shutdown_timeout_s=env_number(env, "SHUTDOWN_TIMEOUT_S", 8.0, float, 1.0, 60.0),
            worker_retry_s=env_number(env, "WORKER_RETRY_S", 5.0, float, 0.1, 600.0),
            metrics_port=metrics_port_setting(env),
            metrics_host=metrics_host_setting(env),
        )


def metrics_port_setting(env: Mapping[str, str]) -> int:
    """METRICS_PORT: unset, 0 or off for no endpoint, else a port."""
    if env.get("METRICS_PORT", "").strip().lower() in ("", "0", "off"):
        return 0
    return env_number(env, "METRICS_PORT", 0, int, 1, 65535)


def metrics_host_setting(env: Mapping[str, str]) -> str:
    """METRICS_HOST: an address or host name to listen on (all interfaces by default)."""
    host = env.get("METRICS_HOST", "").strip() or DaemonOptions.metrics_host
    if len(host) > 253 or any(ch.isspace() or ch in "/@#?[]" for ch in host):
        raise ConfigError(f"METRICS_HOST={host[:60]!r} is not an address: use e.g. 0.0.0.0, 127.0.0.1 or ::")
    return host


@dataclass
class Runtime:
    """The connections every worker shares."""

    settings: Settings
    pool: asyncpg.Pool
    redis: Redis
    store: core_io.CandleStore

    async def close(self, timeout_s: float) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(system_event_log.flush(self.pool)), timeout_s)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.redis.aclose(), 0.5)
        try:
            await asyncio.wait_for(self.pool.close(), 0.5)
        except Exception:
            self.pool.terminate()  # a connection still busy: no more waiting


async def boot(settings: Settings) -> Runtime:
    timescaledb = timescaledb_setting(os.environ)
    pool = await connect_pg(settings)
    redis: Redis | None = None
    try:
        redis, use_ts = await connect_redis(settings)
        runtime = Runtime(settings, pool, redis, core_io.make_candle_store(redis, use_ts, settings.redis_candles))
        with refused_at_boot("applying the migrations"):
            await apply_migrations(pool)
        if settings.symbols:
            with refused_at_boot("enabling SYMBOLS"):
                disabled = await core_io.apply_symbols_setting(pool, settings.symbols)
            if disabled:
                log_system_event(
                    "INFO", "MAIN", f"disabled {len(disabled)} tickers SYMBOLS no longer lists", {"symbols": disabled}
                )
        with refused_at_boot("restoring Redis from PostgreSQL"):
            await restore_redis_from_pg(pool, redis, runtime.store, settings.redis_candles)
        with refused_at_boot("setting up the storage mode"):
            storage = await apply_storage(pool, timescaledb)
    except BaseException:
        if redis is not None:
            await redis.aclose()
        await pool.close()
        raise
    log_system_event(
        "INFO",
        "MAIN",
        f"booted: {settings.describe()} (candle store in use: {runtime.store.name}; storage: {storage.describe()})",
        {"storage": storage.as_json(), "candle_store": runtime.store.name},
    )
    return runtime


Worker = Callable[[], Awaitable[None]]


class Daemon:
    """The workers of this process, their liveness signals and their orderly stop."""

    def __init__(
        self,
        runtime: Runtime,
        options: DaemonOptions,
        alerts: TelegramAlerts | None = None,
        stop_requested: asyncio.Event | None = None,
    ) -> None:
        self.runtime, self.options, self.alerts = runtime, options, alerts
        settings, pool, redis = runtime.settings, runtime.pool, runtime.redis
        self.feed = Feed(settings, options.feed, pool, redis, runtime.store) if options.feed else None
        self.book: BookIntake | None = None
        if self.feed and options.feed and options.book:
            self.book = BookIntake(
                pool,
                redis,
                self.feed.rest,
                options.book,
                public_url(settings.binance_ws_url),
                options.feed,
                settings.stream_maxlen,
                options.feed.ticker_refresh_s,
                self.feed.attempts,
            )
            self.feed.orderflow.trade_listener = self.book.on_trade
            self.book.owns = self.feed.ownership.may_write
        self.indicators = IndicatorWorker(settings, pool, redis, options.indicators) if options.indicators else None
        if self.feed and self.indicators:  # each process computes the symbols it holds
            self.indicators.share(self.feed.ownership)
        self.router = SignalRouter(settings, pool, options.router) if options.router else None
        self.stop_requested = stop_requested or asyncio.Event()
        self.exit_code = 0
        self.tasks: dict[str, asyncio.Task] = {}
        self.started_ms = int(time.time() * 1000)
        self.host = socket.gethostname()
        self.heartbeat_key = infra.heartbeat_key(self.host, os.getpid())
        self._cpu_mark = (time.process_time(), time.monotonic())
        self.loop_lag_ms = 0.0
        # METRICS_PORT: a Prometheus endpoint with this daemon's own registry.
        self.metrics: MetricsExporter | None = None
        if options.metrics_port:
            from metrics.exporter import MetricsExporter  # aiohttp.web and the client library only when on

            self.metrics = MetricsExporter(self, options.metrics_host, options.metrics_port)

    def workers(self) -> dict[str, Worker]:
        workers: dict[str, Worker] = {
            "SYSTEM_LOG": lambda: system_event_log.run_flusher(self.runtime.pool),
            "RETENTION": lambda: run_retention(self.runtime.pool, self.options.retention),
        }
        if self.feed:
            workers.update(self.feed.workers())
            if self.book:
                workers.update(self.book.workers())
            if self.options.watchdog_stale_s > 0:
                workers["WATCHDOG"] = self.watch_feed
        if self.indicators:
            workers.update(self.indicators.workers())
        if self.router:
            workers["SIGNALS"] = self.router.run
        if self.alerts:
            workers["ALERTS"] = self.alerts.run
        workers["HEARTBEAT"] = self.beat
        if self.metrics:
            workers["METRICS"] = self.metrics.run
        if self.feed or self.indicators:
            workers["REDIS_GUARD"] = self.guard_redis
        return workers

    def start(self) -> None:
        if self.metrics:
            self.metrics.bind()  # a port in use: BootError (exit 2) before any worker starts
        for name, fn in self.workers().items():
            self.tasks[name] = asyncio.create_task(run_safe_loop(fn, name, self.options.worker_retry_s), name=name)
        log_system_event("INFO", "MAIN", "daemon started", {"workers": sorted(self.tasks)})

    def request_stop(self, exit_code: int = 0) -> None:
        if not self.stop_requested.is_set():
            self.exit_code = exit_code
            self.stop_requested.set()

    # ---- liveness

    def heartbeat_fields(self) -> dict[str, str | int]:
        feed_stats = self.feed.stats if self.feed else None
        ownership = self.feed.ownership if self.feed else None
        cpu_s, wall_s = time.process_time(), time.monotonic()
        last_cpu_s, last_wall_s = self._cpu_mark
        self._cpu_mark = (cpu_s, wall_s)
        return {
            "host": self.host,
            "pid": os.getpid(),
            "started_at": self.started_ms,
            "updated_at": int(time.time() * 1000),
            "exchange_time": feed_stats.event_time if feed_stats and feed_stats.event_time else "",
            "workers": ",".join(sorted(self.tasks)),
            "candles_stored": self.feed.intake.stored_m1 if self.feed else 0,
            "indicator_bars": self.indicators.stats["bars"] if self.indicators else 0,
            "symbols": ",".join(sorted(self.feed.symbols)) if self.feed else "",  # the ones it follows
            "member": ownership.id if ownership else "",
            "draining": int(bool(ownership and ownership.draining)),
            # Load: this process's CPU (every thread, not the pandas-ta workers) as a share
            # of one core since the last beat, and how late the event loop woke the beat.
            "cpu": f"{(cpu_s - last_cpu_s) / max(wall_s - last_wall_s, 1e-3):.3f}",
            "loop_lag_ms": f"{self.loop_lag_ms:.1f}",
        }

    async def beat(self) -> None:
        """Liveness for RedisInsight and `status`: a hash that expires unless refreshed.
        Once a minute, mid-minute (far from the boundaries), the heap is tidied (collected,
        frozen, trimmed); once an hour the frozen part is collected too."""
        trimmed_minute = 0
        with contextlib.suppress(*REDIS_RETRY_ERRORS):  # a request left on a dead namesake's
            await self.runtime.redis.hdel(self.heartbeat_key, infra.DRAIN_FIELD)  # (a container's pid 1)
        while True:
            with contextlib.suppress(*REDIS_RETRY_ERRORS):
                drain = await infra.write_heartbeat(
                    self.runtime.redis, self.heartbeat_key, self.heartbeat_fields(), self.options.heartbeat_ttl_s
                )
                await self._follow_drain_request(drain)
            minute, second = divmod(time.time(), 60)
            if 15 <= second < 45 and minute != trimmed_minute:
                infra.tidy_heap(full=int(minute) % 60 == 0)
                trimmed_minute = minute
            asleep = time.monotonic()
            await asyncio.sleep(self.options.heartbeat_interval_s)
            self.loop_lag_ms = max(0.0, (time.monotonic() - asleep - self.options.heartbeat_interval_s) * 1000)

    async def _follow_drain_request(self, requested: bool) -> None:
        """`feed_v4_cli.py drain` (ops/drain.py): hand every symbol to the other processes
        and follow nothing until the request is withdrawn (`drain --cancel`) or the
        process stops."""
        ownership = self.feed.ownership if self.feed else None
        if ownership is None or requested == ownership.draining:
            return
        if requested:
            held = sorted(ownership.owned())
            log_system_event(
                "WARNING",
                "MAIN",
                f"drain requested: handing {len(held)} symbols to the other processes",
                {"symbols": held},
            )
            await ownership.drain()
        else:
            log_system_event("INFO", "MAIN", "drain withdrawn: taking a share of the symbols again")
            ownership.resume()

    async def guard_redis(self) -> None:
        """Redis came back empty (restarted without persistence, or FLUSHALL): refill it
        from PostgreSQL, the source of truth, as at boot."""
        runtime = self.runtime
        while True:
            await asyncio.sleep(self.options.heartbeat_interval_s)
            try:
                if await runtime.redis.exists(core_io.RESTORED_KEY):
                    continue
            except REDIS_DOWN_ERRORS:
                continue  # away: the feed and the workers hold their writes meanwhile
            log_system_event("WARNING", "MAIN", "Redis lost its data (restart, FLUSHALL): refilling it from PostgreSQL")
            settings = runtime.settings
            report = await restore_redis_from_pg(runtime.pool, runtime.redis, runtime.store, settings.redis_candles)
            log_system_event("INFO", "MAIN", "Redis refilled from PostgreSQL", dataclasses.asdict(report))

    async def watch_feed(self) -> None:
        """No closed kline stored (from the WebSocket or REST) for too long while symbols
        are followed: end the process (exit 3) so the platform restarts it on a fresh
        connection. Counted on what was stored, not received: a feed that receives but
        cannot store is stuck too. While PostgreSQL is away the intake holds what it
        receives (the documented outage behaviour), which is not a stall."""
        assert self.feed is not None
        limit = self.options.watchdog_stale_s
        followed_since = time.monotonic()  # closes are only expected while symbols are followed
        while True:
            await asyncio.sleep(min(1.0, limit / 4))
            if not self.feed.symbols or self.feed.intake.pg_outage.active:
                followed_since = time.monotonic()
                continue
            newest = max(self.feed.intake.last_stored_at, self.feed.backfiller.last_stored_at, followed_since)
            silent_for = time.monotonic() - newest
            if silent_for > limit:
                log_system_event(
                    "CRITICAL",
                    "WATCHDOG",
                    f"no closed kline stored (WebSocket or REST) for {silent_for:.0f}s (limit "
                    f"WATCHDOG_STALE_S={limit:g}); exiting with code {EXIT_STALE_FEED} so the worker is restarted",
                    {"symbols": len(self.feed.symbols), "closes": self.feed.stats.closes},
                )
                self.request_stop(EXIT_STALE_FEED)
                return

    # ---- shutdown

    async def shutdown(self) -> None:
        """Stop intake, store what was received, let the indicators finish and persist
        what the streams hold, let the router ack its batch; all within the deadline."""
        loop = asyncio.get_running_loop()
        began = loop.time()
        deadline = began + self.options.shutdown_timeout_s
        phases: dict[str, float] = {}

        def left(reserve: float) -> float:
            return max(0.0, deadline - reserve - loop.time())

        async def phase(what: str, awaitable: Awaitable, timeout_s: float) -> None:
            started = loop.time()
            try:
                await asyncio.wait_for(awaitable, timeout_s)
            except TimeoutError:
                log_system_event("WARNING", "MAIN", f"shutdown: gave up {what} after {timeout_s:.1f}s")
            except Exception as exc:
                log_system_event("WARNING", "MAIN", f"shutdown: {what} failed: {exc!r}")
            phases[what] = round(loop.time() - started, 3)

        if self.feed:
            await phase("closing the connections", self._cancel(Feed.SOURCES + BOOK_SOURCES), left(6.0))
            await phase("storing received candles", self.feed.drain(), left(4.0))
            if self.book:
                await phase("storing the finished seconds", self.book.drain(), left(3.5))
            # (The lease rounds go on until the symbols are handed over, below: the
            # indicators' last batch is still computed under valid leases.)
            await self._cancel([n for n in self.tasks if n.startswith(("FEED_", "BOOK_")) and n != "FEED_SHARDS"])
        if self.router:
            self.router.stop()
        if self.indicators:
            self.indicators.stop()
            if task := self.tasks.get("INDICATORS"):
                await phase("computing the last indicators", asyncio.shield(task), left(2.5))
            await phase("persisting indicator values", self.indicators.flush(), left(1.5))
        if self.feed:  # everything written (candles, book seconds, indicators): the symbols pass on now
            await self._cancel(["FEED_SHARDS"])
            await phase("handing the symbols over", self.feed.ownership.leave(), max(0.1, min(1.0, left(1.2))))
        if (task := self.tasks.get("SIGNALS")) and self.router and self.router.running:
            await phase("routing the signals in hand", asyncio.shield(task), left(1.5))
        if self.alerts:
            await phase("sending the queued alerts", self.alerts.drain(), min(2.0, left(1.0)))
        await phase("stopping the other workers", self._cancel(list(self.tasks)), left(0.5))
        if self.feed:  # a backfill after the connections closed may have opened a session again
            await phase("closing the REST client", self.feed.rest.close(), max(0.1, min(0.5, left(0.4))))
        if self.metrics:
            await phase("closing the metrics endpoint", self.metrics.stop(), max(0.1, min(1.0, left(0.4))))
        if self.indicators:
            self.indicators.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.runtime.redis.delete(self.heartbeat_key), left(0.3))
        log_system_event(
            "INFO",
            "MAIN",
            f"daemon stopped in {loop.time() - began:.2f}s (exit code {self.exit_code})",
            {"exit_code": self.exit_code, "phases_s": phases},
        )
        await self.runtime.close(left(0.3))
        if self.alerts:
            logging.getLogger().removeHandler(self.alerts.handler)
            await self.alerts.close()

    async def _cancel(self, names: list[str] | tuple[str, ...]) -> None:
        tasks = [self.tasks[name] for name in names if name in self.tasks and not self.tasks[name].done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=2.0)


async def run_daemon(settings: Settings) -> int:
    options = DaemonOptions.from_env(settings)
    alerts = TelegramAlerts.from_settings(settings)
    if alerts:
        logging.getLogger().addHandler(alerts.handler)
    stop = asyncio.Event()  # set by SIGTERM/SIGINT (exit 0) or the watchdog (exit 3)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # A stop during boot (which may wait BOOT_WAIT_S for a server) ends it at once.
    booting = asyncio.create_task(boot(settings))
    signalled = asyncio.create_task(stop.wait())
    await asyncio.wait([booting, signalled], return_when=asyncio.FIRST_COMPLETED)
    signalled.cancel()
    if not booting.done():
        booting.cancel()
        await asyncio.gather(booting, return_exceptions=True)
        log.info("stop requested during boot; exiting")
        return 0
    runtime = booting.result()
    # What boot allocated lives for the whole run: keep the cyclic collector from
    # rescanning it (a full collection over it stalled the loop for ~0.4 s at bar close).
    infra.tidy_heap()
    daemon = Daemon(runtime, options, alerts, stop)
    daemon.start()
    await stop.wait()
    log.info("stop requested; shutting down")
    await daemon.shutdown()
    return daemon.exit_code


async def run_migrate(settings: Settings, args: argparse.Namespace) -> int:
    """Apply the pending migrations; with --status only list them (exit 1 if any is pending)."""
    pool = await connect_pg(settings)
    try:
        if args.status:
            listed = await migration_status(pool)
            for name, applied_at in listed:
                print(f"{'applied ' + f'{applied_at:%Y-%m-%d %H:%M:%S}Z' if applied_at else 'pending':28} {name}")
            pending = sum(applied_at is None for _, applied_at in listed)
            print(f"{pending} pending" if pending else "schema up to date")
            return 1 if pending else 0
        with refused_at_boot("applying the migrations"):
            applied = await apply_migrations(pool)
        with refused_at_boot("setting up the storage mode"):
            storage = await apply_storage(pool, timescaledb_setting(os.environ))
    finally:
        await pool.close()
    print(f"migrations applied: {', '.join(applied) if applied else 'none (schema up to date)'}")
    print(f"storage: {storage.describe()}")
    return 0


async def run_status_command(settings: Settings, args: argparse.Namespace) -> int:
    return await run_status(settings, ["--json"] if args.json else [])


async def run_restore_command(settings: Settings, args: argparse.Namespace) -> int:
    """Rebuild Redis from PostgreSQL once (what boot does before the workers start)."""
    pool = await connect_pg(settings)
    try:
        redis, use_ts = await connect_redis(settings)
        try:
            store = core_io.make_candle_store(redis, use_ts, settings.redis_candles)
            with refused_at_boot("restoring Redis from PostgreSQL"):
                await restore_redis_from_pg(pool, redis, store, settings.redis_candles)
        finally:
            await redis.aclose()
    finally:
        await pool.close()
    return 0


async def run_web_command(settings: Settings, args: argparse.Namespace) -> int:
    """The read API and chart (web/app.py): its own process, read only."""
    from web.app import WebSettings, run_web

    web_settings = WebSettings.from_env()
    pool = await connect_pg(settings, max_size=web_settings.pool_max)
    redis: Redis | None = None
    try:
        redis, use_ts = await connect_redis(settings)
        await wait_for_schema(pool, settings.boot_wait_s)
        store = core_io.make_candle_store(redis, use_ts, settings.redis_candles)
        raw = await infra.open_redis(settings.redis_url, decode_responses=False)  # documents pass through as bytes
        try:
            return await run_web(pool, raw, store, web_settings)
        finally:
            await raw.aclose()
    finally:
        if redis is not None:
            await redis.aclose()
        await pool.close()


async def run_tickers_command(settings: Settings, args: argparse.Namespace) -> int:
    from ops.tickers_cli import run_tickers

    return await run_tickers(settings, args)


async def run_import_command(settings: Settings, args: argparse.Namespace) -> int:
    from archive.cli import run_import

    return await run_import(settings, args)


async def run_daemon_command(settings: Settings, args: argparse.Namespace) -> int:
    return await run_daemon(settings)


COMMANDS = {
    "run": run_daemon_command,
    "migrate": run_migrate,
    "status": run_status_command,
    "restore": run_restore_command,
    "web": run_web_command,
    "tickers": run_tickers_command,
    "import": run_import_command,
    "drain": run_drain_command,
}


def run_command(command: str, args: argparse.Namespace) -> int:
    """A parsed command line (feed_v4_cli.py) carried out: settings, logging, the loop."""
    if command == "config":  # reports bad settings instead of stopping on the first
        from ops.config_report import run_config

        return run_config(args)
    try:
        settings = load_settings()
        setup_logging(settings.debug_mode)
        return asyncio.run(COMMANDS[command](settings, args), loop_factory=uvloop.new_event_loop)
    except (ConfigError, BootError) as exc:
        print(f"feed_v4: {exc}", file=sys.stderr)
        return EXIT_BOOT_FAILURE
    except KeyboardInterrupt:
        return 0


def main(argv: list[str]) -> int:
    return feed_v4_cli.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv))
