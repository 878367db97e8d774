"""The daemon at real speed for the whole test session: closes once a minute, all symbols
together, as on Binance (accelerated replays hide what only a real minute shows, e.g. a
fallback timer shorter than the time between closes).

conftest starts a `LivePaceRun` when tests/test_live_pace.py is collected; it runs on
its own thread (the fake exchange on its own event loop, the daemon as a process with
its own Redis and database, so no other test can disturb it) while the rest of the
suite goes on, and test_live_pace checks it once it has run long enough.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time

import asyncpg
from daemon import DaemonProcess
from replay import HISTORY_M1, M1, START, SYMBOLS, daemon_env
from servers import RedisServer, drop_database, recreate_database, setting

from fake_exchange import ArchiveSource, FakeExchange

LIVE_MINUTES = 30  # the archive window served (the run lasts as long as the session)
DATABASE = f"feed_v4_live_{os.getpid()}"


class LivePaceRun:
    """The fake exchange at speed 1 and the daemon with its production defaults."""

    def __init__(self) -> None:
        # Start 35 s into a minute: the first boundary comes soon, and boot is done by then.
        self.start_ms = START + 35_000
        self.source = ArchiveSource(SYMBOLS, start_ms=START - (HISTORY_M1 + 30) * M1, end_ms=START + LIVE_MINUTES * M1)
        self.redis = RedisServer(with_timeseries=True)
        self.pg_url = ""
        self.exchange: FakeExchange | None = None
        self.daemon: DaemonProcess | None = None
        self.started_at = 0.0  # local clock, once the daemon runs
        self.klines_after_boot: int | None = None  # REST klines requests once boot's history was in
        self.error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="live-pace", daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._ready.wait(60)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported by the test
            self.error = exc
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self.redis.start()
        self.pg_url = await recreate_database(setting("POSTGRES_URL"), DATABASE)
        self.exchange = FakeExchange(self.source, start_ms=self.start_ms, speed=1.0, seed=11)
        await self.exchange.start()
        # Production settings: only the servers, the symbols and the history depth are given.
        env = daemon_env(self.exchange, self.redis.url, self.pg_url, SYMBOLS)
        env = {k: env[k] for k in ("REDIS_URL", "POSTGRES_URL", "BINANCE_WS_URL", "BINANCE_REST_URL", "SYMBOLS")}
        env["INITIAL_HISTORY_M1"] = str(HISTORY_M1)
        self.daemon = DaemonProcess(env)
        self.daemon.start()
        self.started_at = time.monotonic()
        self._ready.set()
        watcher = asyncio.create_task(self._note_boot_done())
        try:
            await self._stop.wait()
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
            await self.exchange.stop()

    async def _note_boot_done(self) -> None:
        """The REST klines count once every symbol has the minute before the start:
        boot's history and catch-up are in, anything later is a live catch-up."""
        assert self.exchange is not None
        pool = await asyncpg.create_pool(self.pg_url, min_size=1, max_size=1)
        try:
            while True:
                await asyncio.sleep(1.0)
                try:
                    count = await pool.fetchval(
                        "SELECT count(DISTINCT symbol) FROM ohlcv4_m1 WHERE open_time >= to_timestamp($1 / 1000.0)",
                        START - M1,
                    )
                except asyncpg.UndefinedTableError:
                    continue
                if count == len(SYMBOLS):
                    await asyncio.sleep(2.0)  # the backfiller settles its last round
                    self.klines_after_boot = self.exchange.stats.rest_klines
                    return
        finally:
            await pool.close()

    def sim_now_ms(self) -> int:
        assert self.exchange is not None
        return self.exchange.clock.now_ms()

    def pause(self) -> None:
        """Stop the exchange's clock (on its own loop, where its scheduler listens)."""
        assert self._loop is not None and self.exchange is not None
        done = threading.Event()
        self._loop.call_soon_threadsafe(lambda: (self.exchange.clock.pause(), done.set()))
        done.wait(5)

    def rest_klines(self) -> int:
        assert self.exchange is not None
        return self.exchange.stats.rest_klines

    def stop(self) -> int | None:
        """SIGTERM the daemon (its exit code), stop the exchange, drop the servers."""
        code = None
        if self.daemon is not None and self.daemon.alive():
            code = self.daemon.terminate()
        if self._thread.is_alive() and self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):  # its loop closed meanwhile
                self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(30)
        return code

    def cleanup(self) -> None:
        self.stop()
        if self.daemon is not None:
            self.daemon.cleanup()
        self.redis.cleanup()
        if self.pg_url:
            asyncio.run(drop_database(setting("POSTGRES_URL"), DATABASE))
