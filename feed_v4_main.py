"""Entry point of the feed_v4 daemon.

    python feed_v4_main.py            run the daemon
    python feed_v4_main.py migrate    apply the SQL migrations and exit

Boot order: settings, PostgreSQL, Redis, migrations, tickers from SYMBOLS, restore of
the Redis cache; then the workers, each under `run_safe_loop`. A config or boot
problem stops the process with exit code 2 and one line on stderr.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import asyncpg
from redis.asyncio import Redis

import core_io
from feed_and_aggregate import Feed, FeedSettings
from indicators_main import IndicatorOptions, IndicatorWorker
from infra import (
    BootError,
    ConfigError,
    Settings,
    connect_pg,
    connect_redis,
    env_bool,
    load_settings,
    log_system_event,
    run_safe_loop,
    setup_logging,
    system_event_log,
)
from migrations import apply_migrations
from restore_redis_from_pg import restore_redis_from_pg
from signals_v4_main import SignalRouter, load_router_options

log = logging.getLogger("MAIN")

EXIT_BOOT_FAILURE = 2
SHUTDOWN_FLUSH_TIMEOUT_S = 5.0


@dataclass
class Runtime:
    """The connections every worker shares."""

    settings: Settings
    pool: asyncpg.Pool
    redis: Redis
    store: core_io.CandleStore

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(system_event_log.flush(self.pool)), SHUTDOWN_FLUSH_TIMEOUT_S)
        await self.redis.aclose()
        await self.pool.close()


async def boot(settings: Settings) -> Runtime:
    pool = await connect_pg(settings)
    try:
        redis, use_ts = await connect_redis(settings)
    except BaseException:
        await pool.close()
        raise
    runtime = Runtime(settings, pool, redis, core_io.make_candle_store(redis, use_ts, settings.redis_candles))
    await apply_migrations(pool)
    if settings.symbols:
        await core_io.enable_symbols(pool, settings.symbols)
    await restore_redis_from_pg(pool, redis, runtime.store, settings.redis_candles)
    log.info("booted: %s", settings.describe())
    return runtime


Worker = Callable[[], Awaitable[None]]


def workers_for(runtime: Runtime) -> tuple[dict[str, Worker], list[Callable[[], None]]]:
    """The guarded workers of this process by name, and how to ask them to stop."""

    async def system_log_flusher() -> None:
        await system_event_log.run_flusher(runtime.pool)

    workers: dict[str, Worker] = {"SYSTEM_LOG": system_log_flusher}
    stoppers: list[Callable[[], None]] = []
    if env_bool(os.environ, "FEED_ENABLED", True):
        feed = Feed(
            runtime.settings, FeedSettings.from_env(runtime.settings), runtime.pool, runtime.redis, runtime.store
        )
        workers.update(feed.workers())
    if env_bool(os.environ, "INDICATORS_ENABLED", True):
        indicators = IndicatorWorker(runtime.settings, runtime.pool, runtime.redis, IndicatorOptions.from_env())
        workers.update(indicators.workers())
        stoppers.append(indicators.close)
    if env_bool(os.environ, "SIGNALS_ENABLED", True):
        router = SignalRouter(runtime.settings, runtime.pool, load_router_options())
        workers["SIGNALS"] = router.run
        stoppers.append(router.stop)
    return workers, stoppers


async def run_daemon(settings: Settings) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runtime = await boot(settings)
    # What boot allocated lives for the whole run: keep the cyclic collector from
    # rescanning it (a full collection over it stalled the loop for ~0.4 s at bar close).
    gc.collect()
    gc.freeze()
    workers, stoppers = workers_for(runtime)
    tasks = [asyncio.create_task(run_safe_loop(fn, name), name=name) for name, fn in workers.items()]
    log_system_event("INFO", "MAIN", "daemon started", {"workers": sorted(workers)})
    try:
        await stop.wait()
        log.info("stop requested; shutting down")
    finally:
        for request_stop in stoppers:
            request_stop()  # e.g. the router finishes and acks the batch in hand
        await asyncio.sleep(0.2)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        log_system_event("INFO", "MAIN", "daemon stopped")
        await runtime.close()
    return 0


async def run_migrate(settings: Settings) -> int:
    pool = await connect_pg(settings)
    try:
        applied = await apply_migrations(pool)
    finally:
        await pool.close()
    print(f"migrations applied: {', '.join(applied) if applied else 'none (schema up to date)'}")
    return 0


COMMANDS = {"run": run_daemon, "migrate": run_migrate}


def main(argv: list[str]) -> int:
    command = argv[1] if len(argv) > 1 else "run"
    if command not in COMMANDS:
        print(f"feed_v4: unknown command {command!r}; use one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return EXIT_BOOT_FAILURE
    try:
        settings = load_settings()
        setup_logging(settings.debug_mode)
        return asyncio.run(COMMANDS[command](settings))
    except (ConfigError, BootError) as exc:
        print(f"feed_v4: {exc}", file=sys.stderr)
        return EXIT_BOOT_FAILURE
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
