"""The fault-injection harness: the whole daemon, as a process, replays real market data
with its Redis and PostgreSQL behind TCP proxies; afterwards every stored candle,
indicator value, gap-log row and announcement is compared with the archive and TA-Lib,
and each scenario adds a row to the summary table printed at the end of the run."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from daemon import DaemonProcess
from redis.asyncio import Redis
from replay import (
    HISTORY_M1,
    M1,
    START,
    SYMBOLS,
    candle_mismatches,
    daemon_env,
    diagnose,
    pause_mid_minute,
    unannounced,
    until,
    until_sim,
)
from tcp_proxy import TcpProxy

import core_io
from candles import datetime_to_ms
from fake_exchange import ArchiveSource, FakeExchange
from tests.indicator_reference import COMMON_CASES, configure, talib_mismatches

SUMMARY: list[dict[str, object]] = []  # printed by conftest's pytest_terminal_summary


def proxied(url: str, proxy: TcpProxy) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)
    host = f"127.0.0.1:{proxy.port}"
    return urlunsplit(parts._replace(netloc=f"{netloc[0]}@{host}" if len(netloc) == 2 else host))


async def start_proxy(url: str) -> TcpProxy:
    parts = urlsplit(url)
    return await TcpProxy(parts.hostname or "127.0.0.1", parts.port or 0).start()


@dataclass
class FaultRun:
    """One scenario: the daemon, the exchange, the proxies, and what was done to them."""

    name: str
    source: ArchiveSource
    exchange: FakeExchange
    daemon: DaemonProcess
    pool: asyncpg.Pool
    redis: Redis
    redis_proxy: TcpProxy
    pg_proxy: TcpProxy
    symbols: list[str]
    faults: list[str] = field(default_factory=list)
    recoveries: list[float] = field(default_factory=list)
    announced_since: int = 0  # candles older than this may have been wiped from the streams
    other_mismatches: list[tuple] = field(default_factory=list)  # a scenario's own checks (e.g. signals)

    def inject(self, description: str) -> None:
        self.faults.append(description)

    async def at_minute(self, minute: int) -> None:
        """Wait until the exchange's clock reaches START + minute (the daemon must be up)."""
        await until_sim(self.exchange, START + minute * M1, self.daemon)

    async def sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            assert self.daemon.alive(), self.daemon.output()[-3000:]
            await asyncio.sleep(0.1)

    async def caught_up(self) -> bool:
        """Every symbol stored the newest closed minute and computed its indicators."""
        target = (self.exchange.clock.now_ms() - 5_000) // M1 * M1 - M1
        try:
            return await _stored_up_to(self, target)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            return False  # the test's own connections to a server that was restarted

    async def ready(self, timeout: float = 90) -> None:
        """The daemon is up, has its history and keeps up (not a recovery: not recorded)."""
        await until(self.caught_up, timeout, f"{self.name}: the daemon to be ready", interval=0.1)

    async def recovered(self, since: float | None = None, timeout: float = 120) -> float:
        """Seconds from `since` (default now) until the daemon caught up; recorded."""
        started = time.monotonic() if since is None else since
        await until(self.caught_up, timeout, f"{self.name}: the daemon to catch up", interval=0.1)
        took = time.monotonic() - started
        self.recoveries.append(took)
        return took

    async def finish(self) -> None:
        """Stop the exchange mid-minute, let the daemon settle, stop it with SIGTERM,
        compare everything and record the row; any mismatch fails the scenario."""
        last_closed = await pause_mid_minute(self.exchange)
        try:
            await until(lambda: _stored_up_to(self, last_closed), 120, f"{self.name}: the daemon to settle")
        except AssertionError:
            print(await diagnose(self.pool, self.daemon, last_closed))
            raise
        try:  # in a thread: the proxies live on this event loop and must keep serving
            code = await asyncio.to_thread(self.daemon.terminate)
        except subprocess.TimeoutExpired:
            code = None
        assert code == 0, f"SIGTERM gave {code}:\n{self.daemon.output()[-6000:]}"
        expected, stored, mismatches = await compare_with_source(self, last_closed)
        mismatches += self.other_mismatches
        SUMMARY.append(
            {
                "scenario": self.name,
                "faults": "; ".join(self.faults),
                "expected": expected,
                "stored": stored,
                "mismatches": len(mismatches),
                "recovery_s": max(self.recoveries) if self.recoveries else None,
            }
        )
        assert not mismatches, f"{len(mismatches)} mismatches, e.g. {mismatches[:10]}"
        assert expected == stored


async def _stored_up_to(run: FaultRun, last_closed: int) -> bool:
    newest = await core_io.last_m1_open_times(run.pool, run.symbols)
    if any(newest.get(s, 0) < last_closed for s in run.symbols):
        return False
    if await run.pool.fetchval("SELECT count(*) FROM missing_m1_log_v4 WHERE status = 'missing'"):
        return False
    for symbol in run.symbols:
        if int(await run.redis.hget(core_io.indicator_key(symbol, "m1"), "open_time") or 0) < last_closed:
            return False
    return True


async def compare_with_source(run: FaultRun, last_closed: int) -> tuple[int, int, list[tuple]]:
    """(candles expected, candles stored, every mismatch): the candles and their Redis
    caches, the newest indicator hashes, announcements, the gap log, TA-Lib."""
    expected, stored, wrong = await candle_mismatches(run.pool, run.redis, run.source, run.symbols, last_closed)
    newest = await run.pool.fetch(
        "SELECT 'm1' AS tf, symbol, max(open_time) AS t FROM ohlcv4_m1 GROUP BY symbol UNION ALL "
        "SELECT 'm5', symbol, max(open_time) FROM ohlcv4_m5 GROUP BY symbol UNION ALL "
        "SELECT 'm15', symbol, max(open_time) FROM ohlcv4_m15 GROUP BY symbol"
    )
    for row in newest:
        value_at = int(await run.redis.hget(core_io.indicator_key(row["symbol"], row["tf"]), "open_time") or 0)
        if value_at != datetime_to_ms(row["t"]):
            wrong.append((row["symbol"], row["tf"], "Redis indicators are not at the newest bar", value_at))
    wrong += await unannounced(run.pool, run.redis, run.announced_since)
    gaps = await run.pool.fetch("SELECT symbol, open_time, status FROM missing_m1_log_v4 WHERE status <> 'backfilled'")
    wrong += [(r["symbol"], r["open_time"], f"gap left {r['status']}") for r in gaps]
    _, indicator_wrong = await talib_mismatches(run.pool, run.symbols)
    return expected, stored, wrong + indicator_wrong


@asynccontextmanager
async def fault_run(
    name: str,
    pool: asyncpg.Pool,
    redis: Redis,
    redis_url: str,
    pg_url: str,
    *,
    minutes: int,
    speed: float = 60,
    seed: int = 21,
    symbols: list[str] = SYMBOLS,
    env: dict[str, str] | None = None,
) -> AsyncIterator[FaultRun]:
    """The daemon (not yet started) with its servers behind proxies, the exchange running."""
    source = ArchiveSource(symbols, start_ms=START - (HISTORY_M1 + 30) * M1, end_ms=START + minutes * M1)
    exchange = FakeExchange(source, start_ms=START, speed=speed, seed=seed)
    await exchange.start()
    await configure(pool, COMMON_CASES)
    redis_proxy = await start_proxy(redis_url)
    pg_proxy = await start_proxy(pg_url)
    daemon_settings = daemon_env(exchange, proxied(redis_url, redis_proxy), proxied(pg_url, pg_proxy), symbols)
    daemon = DaemonProcess({**daemon_settings, **(env or {})})
    run = FaultRun(name, source, exchange, daemon, pool, redis, redis_proxy, pg_proxy, list(symbols))
    try:
        yield run
    finally:
        daemon.cleanup()
        await redis_proxy.close()
        await pg_proxy.close()
        await exchange.stop()


def summary_lines() -> list[str]:
    header = ("scenario", "faults injected", "candles expected", "stored", "mismatches", "recovery")
    rows = [
        (
            str(r["scenario"]),
            str(r["faults"]),
            str(r["expected"]),
            str(r["stored"]),
            str(r["mismatches"]),
            "-" if r["recovery_s"] is None else f"{r['recovery_s']:.1f} s",
        )
        for r in SUMMARY
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, tuple("-" * w for w in widths), *rows]:
        lines.append(" | ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)))
    return lines
