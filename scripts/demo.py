"""`make demo`: the daemon against the built-in fake exchange, with live progress.

    .venv/bin/python scripts/demo.py [--seconds N] [--speed X] [--fresh]

Needs no internet: the fake exchange replays the February 2026 archive from
`../shared/data` (or a synthetic walk when the archive is absent) faster than real time.
The demo keeps its data apart from the live daemon's: PostgreSQL database
`feed_v4_demo` (DEMO_DATABASE) on the server of POSTGRES_URL, and Redis logical db 1 of
REDIS_URL (flushed at start: it is only a cache, rebuilt from PostgreSQL at boot). A
later run resumes the replay where the last one stopped, so stored history stays in
order; `--fresh` starts over with an empty database.

Environment: REDIS_URL, POSTGRES_URL (or DATABASE_URL; else `.local/services.env`),
DEMO_DATABASE (default feed_v4_demo), DEMO_DIR (logs and demo.env, default .local/demo).
Exit code: 0 when the daemon stopped cleanly (exit 0) on request, 1 otherwise, 2 on a
set-up problem.

The module is pure helpers plus a thin asyncio/subprocess shell (`run_demo`), so the
helpers can be tested without servers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import IO, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

PROJECT_DIR = Path(__file__).resolve().parents[1]
if str(PROJECT_DIR) not in sys.path:  # `python scripts/demo.py` puts scripts/ first, not the project
    sys.path.insert(0, str(PROJECT_DIR))

import aiohttp  # noqa: E402
import asyncpg  # noqa: E402
import orjson  # noqa: E402

import core_io  # noqa: E402
from candles import datetime_to_ms, ms_to_datetime  # noqa: E402
from infra import ConfigError, load_settings, make_redis, mask_url  # noqa: E402
from market_data import ARCHIVE_DIR, archive_symbols  # noqa: E402

DEFAULT_DATABASE = "feed_v4_demo"
DEFAULT_DIR = PROJECT_DIR / ".local" / "demo"
DEFAULT_START = "2026-02-08T00:00"  # a week into the archive: room for the warm-up history
DEFAULT_SPEED = 60.0
SYNTHETIC_SYMBOLS = 20
INITIAL_HISTORY_M1 = 3000  # past EMA 200's warm-up (2,814 bars), yet a quick first fetch
MINUTE_MS = 60_000
RUNWAY_MS = 6 * 3_600_000  # a resumed replay needs at least this much archive ahead of it
REFRESH_S = 2.0
STOP_TIMEOUT_S = 15.0
EXCHANGE_START_TIMEOUT_S = 60.0
EXIT_OK, EXIT_FAILED, EXIT_SETUP = 0, 1, 2


class SetupError(Exception):
    """The demo cannot start; the message says what to do."""


# --------------------------------------------------------------------------- pure helpers


def redis_db_of(url: str) -> int:
    """The logical db a Redis URL selects (path `/N`, or `?db=N` for unix sockets)."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    if "db" in query:
        return int(query["db"])
    path = parts.path.strip("/")
    return int(path) if parts.scheme != "unix" and path.isdigit() else 0


def with_redis_db(url: str, db: int) -> str:
    parts = urlsplit(url)
    if parts.scheme == "unix":
        query = dict(parse_qsl(parts.query))
        query["db"] = str(db)
        return urlunsplit(parts._replace(query=urlencode(query)))
    return urlunsplit(parts._replace(path=f"/{db}"))


def demo_redis_url(live_url: str) -> str:
    """Db 1 of the live server; db 2 if the live daemon itself already lives in db 1.

    The demo flushes its db at start, so it must never be the live one.
    """
    return with_redis_db(live_url, 2 if redis_db_of(live_url) == 1 else 1)


def database_of(pg_url: str) -> str:
    return urlsplit(pg_url).path.lstrip("/")


def with_database(pg_url: str, name: str) -> str:
    return urlunsplit(urlsplit(pg_url)._replace(path=f"/{name}"))


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def parse_exchange_urls(text: str) -> dict[str, str] | None:
    """BINANCE_WS_URL / BINANCE_REST_URL from the fake exchange's output, once both are printed."""
    urls = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and key in ("BINANCE_WS_URL", "BINANCE_REST_URL") and value:
            urls[key] = value
    return urls if len(urls) == 2 else None


def exchange_command(source: str, speed: float, start: str, port: int, symbols: int | None = None) -> list[str]:
    command = [sys.executable, "-m", "fake_exchange", "--source", source]
    if symbols is not None:
        command += ["--symbols", str(symbols)]
    return [*command, "--speed", f"{speed:g}", "--start", start, "--port", str(port)]


def daemon_env(
    base: Mapping[str, str], redis_url: str, pg_url: str, exchange_urls: Mapping[str, str], symbols: Sequence[str]
) -> dict[str, str]:
    """The daemon's environment: the demo servers and exchange, whatever the caller had set."""
    env = {k: v for k, v in base.items() if k not in ("DATABASE_URL", "DEMO_DATABASE", "DEMO_DIR")}
    env.update(exchange_urls)
    env.update(
        REDIS_URL=redis_url,
        POSTGRES_URL=pg_url,
        SYMBOLS=",".join(symbols),
        INITIAL_HISTORY_M1=str(INITIAL_HISTORY_M1),
        PYTHONUNBUFFERED="1",
    )
    return env


def iso_minute(ms: int) -> str:
    return f"{ms_to_datetime(ms):%Y-%m-%dT%H:%M}"


def choose_start(default_ms: int, newest_m1_ms: int | None, source_end_ms: int) -> tuple[int, bool]:
    """Where the replay starts, and whether the demo database must be emptied first.

    Replaying minutes older than what is stored would feed the daemon history backwards,
    so a later run resumes just after the newest stored M1; when the source has too little
    left after that point, the demo starts over.
    """
    if newest_m1_ms is None or newest_m1_ms < default_ms:
        return default_ms, False
    resume = newest_m1_ms + MINUTE_MS
    if resume + RUNWAY_MS > source_end_ms:
        return default_ms, True
    return resume, False


def env_file_text(redis_url: str, pg_url: str) -> str:
    return (
        "# Written by scripts/demo.py: the demo's servers. Source it: . .local/demo/demo.env\n"
        f"export REDIS_URL={shlex.quote(redis_url)}\n"
        f"export POSTGRES_URL={shlex.quote(pg_url)}\n"
    )


def is_error_line(line: str) -> bool:
    """A console log line at ERROR or CRITICAL (`ts | LEVEL    | MODULE | message`)."""
    fields = line.split("|", 2)
    return len(fields) >= 3 and fields[0][:1].isdigit() and fields[1].strip() in ("ERROR", "CRITICAL")


@dataclass
class Progress:
    """One refresh of what the daemon has stored so far."""

    elapsed_s: float
    sim_ms: int | None = None
    m1: int | None = None
    m5: int | None = None
    m15: int | None = None
    indicator_values: int | None = None
    ready_stream: int | None = None
    newest_m1_ms: int | None = None
    oldest_newest_m1_ms: int | None = None  # the newest M1 of the symbol that is furthest behind
    open_gaps: int | None = None
    footprints: int | None = None  # order-flow bars stored (orderflow4)
    last_error: str | None = None
    note: str | None = None


def _count(value: int | None) -> str:
    return "-" if value is None else str(value)


def lag_s(sim_ms: int | None, newest_open_ms: int | None) -> float | None:
    """Simulated seconds since the newest stored M1 closed (its open + 1 min)."""
    if sim_ms is None or newest_open_ms is None:
        return None
    return max(0.0, (sim_ms - (newest_open_ms + MINUTE_MS)) / 1000)


def minutes_behind(sim_ms: int | None, newest_open_ms: int | None) -> int | None:
    """Closed minutes not stored yet (the lag in seconds saw-tooths 0..60 even when on time)."""
    if sim_ms is None or newest_open_ms is None:
        return None
    last_closed_open = sim_ms - sim_ms % MINUTE_MS - MINUTE_MS
    return max(0, (last_closed_open - newest_open_ms) // MINUTE_MS)


def format_progress(p: Progress, max_error: int = 160) -> str:
    """One plain line, key=value, easy on the eye and for a test to parse."""
    sim = f"{ms_to_datetime(p.sim_ms):%Y-%m-%d %H:%M:%S}" if p.sim_ms is not None else "-"
    parts = [f"[{p.elapsed_s:5.0f}s] sim {sim}"]
    parts.append(f"candles m1={_count(p.m1)} m5={_count(p.m5)} m15={_count(p.m15)}")
    parts.append(f"indicators values={_count(p.indicator_values)} ready_stream={_count(p.ready_stream)}")
    if p.newest_m1_ms is not None:
        laggard = p.oldest_newest_m1_ms if p.oldest_newest_m1_ms is not None else p.newest_m1_ms
        lag, behind = lag_s(p.sim_ms, laggard), minutes_behind(p.sim_ms, laggard)
        parts.append(
            f"newest m1 {ms_to_datetime(p.newest_m1_ms):%H:%M} lag={'-' if lag is None else f'{lag:.0f}s'}"
            f" behind={'-' if behind is None else behind}"
        )
    else:
        parts.append("newest m1 - lag=- behind=-")
    parts.append(f"gaps={_count(p.open_gaps)} footprints={_count(p.footprints)}")
    if p.note:
        parts.append(p.note)
    if p.last_error:
        error = p.last_error if len(p.last_error) <= max_error else p.last_error[: max_error - 3] + "..."
        parts.append(f"last error: {error}")
    return " | ".join(parts)


def banner(
    source: str,
    symbols: Sequence[str],
    speed: float,
    start: str,
    exchange_urls: Mapping[str, str],
    redis_url: str,
    pg_url: str,
    demo_dir: Path,
    seconds: float | None,
    chart_url: str | None = None,
) -> str:
    shown_redis, shown_pg = mask_url(redis_url), mask_url(pg_url)
    env_file = demo_dir / "demo.env"
    listed = ", ".join(symbols[:8]) + (", ..." if len(symbols) > 8 else "")
    lines = [
        "feed_v4 demo: the daemon against the built-in fake Binance exchange (no internet needed)",
        f"  exchange : {source}, {len(symbols)} symbols ({listed}), {speed:g}x from {start}Z"
        f" at {exchange_urls.get('BINANCE_REST_URL', '?')}",
        f"  daemon   : python feed_v4_main.py, INITIAL_HISTORY_M1={INITIAL_HISTORY_M1}",
        f"  redis    : {shown_redis}   (demo cache, flushed at start)",
        f"  postgres : {shown_pg}   (demo data, apart from the live database)",
        f"  logs     : {demo_dir / 'daemon.log'}  {demo_dir / 'exchange.log'}",
        f"  inspect  : REDIS_URL={shown_redis} POSTGRES_URL={shown_pg} .venv/bin/python feed_v4_main.py status",
        f"             (or: source {env_file} && .venv/bin/python feed_v4_main.py status)",
        f"  RedisInsight: add database by URL {shown_redis}",
        *([f"  chart    : {chart_url}   (read API and page: python feed_v4_main.py web)"] if chart_url else []),
        "  stop     : "
        + (f"by itself after {seconds:g} s, or Ctrl-C" if seconds else "Ctrl-C (or SIGTERM); stops the daemon cleanly"),
    ]
    return "\n".join(lines)


def render_footprint(symbol: str, document: Mapping[str, Any], width: int = 24) -> str:
    """A footprint as traders draw it: one line per row, highest price first, taker
    sells (bid) left of taker buys (ask), a bar of the row's volume, the POC marked."""
    rows = sorted(document.get("rows", []), key=lambda r: Decimal(r["price"]), reverse=True)
    when = f"{ms_to_datetime(document['open_time']):%Y-%m-%d %H:%M}"
    lines = [f"footprint {symbol} m1 {when} (row {document.get('row_size')}; bid x ask = taker sold x taker bought)"]
    volumes = [Decimal(r["bid_volume"]) + Decimal(r["ask_volume"]) for r in rows]
    top = max(volumes, default=Decimal(0)) or Decimal(1)
    for row, volume in zip(rows, volumes):
        mark = " POC" if row["price"] == document.get("poc") else ""
        bar = "#" * max(1, round(width * volume / top)) if volume else ""
        lines.append(f"  {row['price']:>14}  {row['bid_volume']:>14} x {row['ask_volume']:<14} {bar}{mark}")
    return "\n".join(lines)


class LogTail:
    """Follows a growing log file and keeps its last ERROR/CRITICAL line."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.partial = ""
        self.last_error: str | None = None

    def poll(self) -> str | None:
        try:
            with open(self.path, encoding="utf-8", errors="replace") as handle:
                handle.seek(self.offset)
                chunk = handle.read()
                self.offset = handle.tell()
        except FileNotFoundError:
            return self.last_error
        lines = (self.partial + chunk).split("\n")
        self.partial = lines.pop()
        for line in lines:
            if is_error_line(line):
                self.last_error = line.strip()
        return self.last_error


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def live_urls(env: Mapping[str, str]) -> tuple[str, str]:
    """The operator's servers, found as the daemon finds them (environment, then what
    `make services` wrote)."""
    try:
        settings = load_settings(env)
    except ConfigError as exc:
        raise SetupError(str(exc)) from None
    return settings.redis_url, settings.postgres_url


# --------------------------------------------------------------------------- servers


async def ensure_database(server_url: str, name: str, recreate: bool = False) -> None:
    """Create the demo database on the server of `server_url` (via asyncpg, no psql needed)."""
    conn = None
    errors = []
    for candidate in (server_url, with_database(server_url, "postgres")):
        try:
            conn = await asyncpg.connect(candidate, timeout=10)
            break
        except (OSError, asyncpg.PostgresError) as exc:
            errors.append(f"{mask_url(candidate)}: {exc}")
    if conn is None:
        raise SetupError(f"cannot reach PostgreSQL ({'; '.join(errors)}): run `make services` or fix POSTGRES_URL")
    try:
        if recreate:
            await conn.execute(f"DROP DATABASE IF EXISTS {quote_ident(name)} WITH (FORCE)")
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            try:
                await conn.execute(f"CREATE DATABASE {quote_ident(name)}")
            except asyncpg.DuplicateDatabaseError:
                pass  # created meanwhile by a concurrent run
            except asyncpg.PostgresError as exc:
                raise SetupError(f"cannot create database {name!r}: {exc} (grant CREATEDB or create it)") from None
    finally:
        await conn.close()


async def newest_stored_m1(pg_url: str, symbols: Sequence[str]) -> int | None:
    """Newest M1 open time (ms) the demo database holds for these symbols, None if empty."""
    conn = await asyncpg.connect(pg_url, timeout=10)
    try:
        if not await conn.fetchval("SELECT to_regclass('ohlcv4_m1') IS NOT NULL"):
            return None
        return max((await core_io.last_m1_open_times(conn, symbols)).values(), default=None)
    finally:
        await conn.close()


async def disable_other_tickers(pg_url: str, symbols: Sequence[str]) -> None:
    """A previous demo with another source left its symbols enabled; the exchange lacks them."""
    conn = await asyncpg.connect(pg_url, timeout=10)
    try:
        if await conn.fetchval("SELECT to_regclass('tickers') IS NOT NULL"):
            await conn.execute(
                "UPDATE tickers SET status = 'disabled', updated_at = now()"
                " WHERE status = 'enabled' AND symbol <> ALL($1::text[])",
                list(symbols),
            )
    finally:
        await conn.close()


async def flush_redis_db(url: str) -> None:
    client = make_redis(url)
    try:
        await client.flushdb()
    except Exception as exc:
        raise SetupError(f"cannot flush the demo Redis db {mask_url(url)}: {exc}") from None
    finally:
        await client.aclose()


# Counts of the demo's sizes are cheap; the newest M1 is looked up per enabled ticker so
# each is one index probe, and the laggard's gives the lag.
PROGRESS_SQL = """
WITH newest AS (
    SELECT (SELECT max(open_time) FROM ohlcv4_m1 o WHERE o.symbol = t.symbol) AS m
    FROM tickers t WHERE t.status = 'enabled'
)
SELECT (SELECT count(*) FROM ohlcv4_m1) AS m1,
       (SELECT count(*) FROM ohlcv4_m5) AS m5,
       (SELECT count(*) FROM ohlcv4_m15) AS m15,
       (SELECT count(*) FROM indicator_values_v4) AS ind_values,
       (SELECT count(*) FROM missing_m1_log_v4 WHERE status = 'missing') AS gaps,
       (SELECT count(*) FROM orderflow4) AS footprints,
       (SELECT max(m) FROM newest) AS newest,
       (SELECT min(m) FROM newest) AS laggard
"""


class Observer:
    """Reads the progress figures from the exchange, PostgreSQL and Redis."""

    def __init__(self, rest_url: str, pg_url: str, redis_url: str, log_path: Path) -> None:
        self.rest_url, self.pg_url = rest_url, pg_url
        self.redis = make_redis(redis_url)
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2))
        self.conn: asyncpg.Connection | None = None
        self.log = LogTail(log_path)

    async def close(self) -> None:
        await self.http.close()
        await self.redis.aclose()
        if self.conn is not None:
            with contextlib.suppress(Exception):
                await self.conn.close()

    async def sim_time(self) -> int | None:
        try:
            async with self.http.get(f"{self.rest_url}/fapi/v1/time") as response:
                return int((await response.json())["serverTime"])
        except (aiohttp.ClientError, TimeoutError, KeyError, ValueError):
            return None

    async def footprint(self, symbol: str) -> str | None:
        """The newest closed M1 footprint of `symbol`, drawn; None if there is none yet."""
        with contextlib.suppress(Exception):
            raw = await self.redis.get(f"footprint:{symbol}:m1")
            if raw:
                return render_footprint(symbol, orjson.loads(raw))
        return None

    async def follow_book(self, symbol: str) -> bool:
        """Switches the book streams on for `symbol` once the daemon made its ticker row
        (the chart's ladder shows its depth filter); True once done."""
        with contextlib.suppress(Exception):
            if self.conn is not None and not self.conn.is_closed():
                done = await self.conn.execute(
                    "UPDATE tickers SET depth = true, book_ticker = true WHERE symbol = $1", symbol, timeout=5
                )
                return done != "UPDATE 0"
        return False

    async def snapshot(self, elapsed_s: float) -> Progress:
        progress = Progress(elapsed_s=elapsed_s, sim_ms=await self.sim_time(), last_error=self.log.poll())
        with contextlib.suppress(Exception):
            progress.ready_stream = int(await self.redis.xlen("indicators_ready_stream"))
        try:
            await self._read_pg(progress)
        except asyncpg.UndefinedTableError:
            progress.note = "waiting for the schema"
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            progress.note = f"postgres: {type(exc).__name__}"
            if self.conn is not None:
                with contextlib.suppress(Exception):
                    self.conn.terminate()
                self.conn = None
        return progress

    async def _read_pg(self, progress: Progress) -> None:
        if self.conn is None or self.conn.is_closed():
            self.conn = await asyncpg.connect(self.pg_url, timeout=5)
        row = await self.conn.fetchrow(PROGRESS_SQL, timeout=5)
        progress.m1, progress.m5, progress.m15 = row["m1"], row["m5"], row["m15"]
        progress.indicator_values, progress.open_gaps = row["ind_values"], row["gaps"]
        progress.footprints = row["footprints"]
        if row["newest"] is not None:
            progress.newest_m1_ms = datetime_to_ms(row["newest"])
            progress.oldest_newest_m1_ms = datetime_to_ms(row["laggard"])


# --------------------------------------------------------------------------- processes


@dataclass
class Plan:
    """What this run replays: decided before anything is started."""

    source: str  # "archive" or "synthetic"
    symbols: list[str]
    default_start_ms: int
    source_end_ms: int
    synthetic_count: int | None = None


def plan_source() -> Plan:
    """The real archive when `market_data` finds it (../shared/data), else a synthetic walk."""
    from fake_exchange.sources import SYNTHETIC_END_MS, SyntheticSource
    from market_data import read_archive

    default_start = datetime_to_ms(datetime.fromisoformat(DEFAULT_START).replace(tzinfo=UTC))
    symbols = archive_symbols() if ARCHIVE_DIR.is_dir() else []
    if symbols:
        last = None
        for candle in read_archive(symbols[0]):
            last = candle.open_time
        return Plan("archive", symbols, default_start, last or default_start)
    synthetic = SyntheticSource(SYNTHETIC_SYMBOLS)
    return Plan("synthetic", synthetic.symbols, default_start, SYNTHETIC_END_MS, SYNTHETIC_SYMBOLS)


def spawn(command: list[str], log_path: Path, env: Mapping[str, str] | None = None) -> subprocess.Popen:
    """A child in its own process group: Ctrl-C reaches only the demo, which stops the
    daemon first (cleanly) and the exchange after it."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            command,
            cwd=PROJECT_DIR,
            env=dict(env) if env is not None else None,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            process_group=0,
        )


async def wait_exit(process: subprocess.Popen, timeout_s: float) -> int | None:
    deadline = time.monotonic() + timeout_s
    while process.poll() is None and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    return process.poll()


async def stop_process(process: subprocess.Popen, timeout_s: float) -> tuple[int, bool]:
    """SIGTERM, wait, then SIGKILL; returns (exit code, whether it stopped in time)."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
    code = await wait_exit(process, timeout_s)
    if code is not None:
        return code, True
    with contextlib.suppress(ProcessLookupError):
        process.kill()
    return await asyncio.to_thread(process.wait), False


def read_from(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


@dataclass
class DemoFiles:
    """The demo's directory: this run's logs and the env file for the operator."""

    dir: Path
    exchange_log: Path
    daemon_log: Path
    env_file: Path
    web_log: Path

    @classmethod
    def prepare(cls, directory: Path, redis_url: str, pg_url: str) -> DemoFiles:
        directory.mkdir(parents=True, exist_ok=True)
        files = cls(
            directory,
            directory / "exchange.log",
            directory / "daemon.log",
            directory / "demo.env",
            directory / "web.log",
        )
        # Owner-only (0600): the URLs may hold passwords. The umask covers a new file, the
        # fchmod (before any byte is written) one left by an earlier run with a wider mode.
        old_umask = os.umask(0o077)
        try:
            with open(files.env_file, "w") as handle:
                os.fchmod(handle.fileno(), 0o600)
                handle.write(env_file_text(redis_url, pg_url))
        finally:
            os.umask(old_umask)
        for log in (files.exchange_log, files.daemon_log, files.web_log):
            log.write_text("")  # this run's only: the URLs parsed and the last ERROR shown are from now
        return files


async def wait_exchange_urls(process: subprocess.Popen, log_path: Path, stop: asyncio.Event) -> dict[str, str] | None:
    """The exchange's URLs once it listens; None if a stop was requested meanwhile."""
    deadline = time.monotonic() + EXCHANGE_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if stop.is_set():
            return None
        urls = parse_exchange_urls(read_from(log_path))
        if urls:
            return urls
        if process.poll() is not None:
            raise SetupError(f"the fake exchange exited with code {process.returncode}: see {log_path}")
        await asyncio.sleep(0.1)
    raise SetupError(f"the fake exchange printed no URLs within {EXCHANGE_START_TIMEOUT_S:g} s: see {log_path}")


class Screen:
    """Plain lines when stdout is not a terminal; one line redrawn in place when it is."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.pending = False

    def progress(self, line: str) -> None:
        if self.tty:
            width = shutil.get_terminal_size((160, 24)).columns - 1
            self.stream.write("\r\x1b[2K" + line[:width])
            self.pending = True
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def say(self, text: str) -> None:
        if self.pending:
            self.stream.write("\n")
            self.pending = False
        self.stream.write(text + "\n")
        self.stream.flush()


async def run_demo(args: argparse.Namespace, env: Mapping[str, str] = os.environ) -> int:
    screen = Screen(sys.stdout)
    live_redis, live_pg = live_urls(env)
    db_name = env.get("DEMO_DATABASE") or DEFAULT_DATABASE
    if db_name == database_of(live_pg):
        raise SetupError(f"DEMO_DATABASE={db_name!r} is the live database of POSTGRES_URL: choose another name")
    demo_dir = Path(env.get("DEMO_DIR") or DEFAULT_DIR)
    redis_url, pg_url = demo_redis_url(live_redis), with_database(live_pg, db_name)

    plan = plan_source()
    await ensure_database(live_pg, db_name, recreate=args.fresh)
    newest = None if args.fresh else await newest_stored_m1(pg_url, plan.symbols)
    start_ms, reset = choose_start(plan.default_start_ms, newest, plan.source_end_ms)
    if reset:
        screen.say(f"demo: the stored replay reached {iso_minute(newest or 0)}Z, near the source's end: starting over")
        await ensure_database(live_pg, db_name, recreate=True)
    elif start_ms != plan.default_start_ms:
        screen.say(f"demo: resuming after the stored history (newest M1 {iso_minute(newest or 0)}Z); --fresh restarts")
    await disable_other_tickers(pg_url, plan.symbols)
    await flush_redis_db(redis_url)
    files = DemoFiles.prepare(demo_dir, redis_url, pg_url)
    exchange_log, daemon_log = files.exchange_log, files.daemon_log
    start = iso_minute(start_ms)
    exchange = spawn(
        exchange_command(plan.source, args.speed, start, free_port(), plan.synthetic_count), exchange_log, env
    )
    daemon: subprocess.Popen | None = None
    web: subprocess.Popen | None = None
    observer: Observer | None = None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        urls = await wait_exchange_urls(exchange, exchange_log, stop)
        if urls is None:
            screen.say("demo: stop requested before the daemon started")
            return EXIT_FAILED
        daemon = spawn(
            [sys.executable, str(PROJECT_DIR / "feed_v4_main.py")],
            daemon_log,
            daemon_env(env, redis_url, pg_url, urls, plan.symbols),
        )
        chart_url = None
        if args.web_port:
            token = secrets.token_hex(16)
            web_env = daemon_env(env, redis_url, pg_url, urls, plan.symbols)
            web_env.update(WEB_HOST="127.0.0.1", WEB_PORT=str(args.web_port), WEB_TOKEN=token)
            web = spawn([sys.executable, str(PROJECT_DIR / "feed_v4_main.py"), "web"], files.web_log, web_env)
            chart_url = f"http://127.0.0.1:{args.web_port}/#token={token}"
        screen.say(
            banner(
                plan.source, plan.symbols, args.speed, start, urls, redis_url, pg_url, demo_dir, args.seconds, chart_url
            )
        )
        observer = Observer(urls["BINANCE_REST_URL"], pg_url, redis_url, daemon_log)
        began, failed, book_on = time.monotonic(), False, False
        while True:
            screen.progress(format_progress(await observer.snapshot(time.monotonic() - began)))
            book_on = book_on or await observer.follow_book(plan.symbols[0])
            if web is not None and web.poll() is not None:
                screen.say(f"demo: the chart's web process exited with code {web.returncode}: see {files.web_log}")
                web = None
            left = REFRESH_S if args.seconds is None else min(REFRESH_S, args.seconds - (time.monotonic() - began))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, left))
            if stop.is_set():
                screen.say("demo: stop requested")
                break
            if args.seconds is not None and time.monotonic() - began >= args.seconds:
                screen.say(f"demo: {args.seconds:g} s elapsed")
                break
            if daemon.poll() is not None:
                screen.say(f"demo: the daemon exited by itself with code {daemon.returncode}: see {daemon_log}")
                return EXIT_FAILED
            if exchange.poll() is not None:
                screen.say(f"demo: the fake exchange exited with code {exchange.returncode}: see {exchange_log}")
                failed = True
                break
        screen.say(format_progress(await observer.snapshot(time.monotonic() - began)))
        drawn = await observer.footprint(plan.symbols[0])
        screen.say(drawn or f"demo: no footprint of {plan.symbols[0]} yet")
        screen.say(f"demo: stopping the daemon (SIGTERM, up to {STOP_TIMEOUT_S:g} s)")
        code, in_time = await stop_process(daemon, STOP_TIMEOUT_S)
        screen.say(f"demo: daemon exited with code {code}" + ("" if in_time else " (killed: it did not stop in time)"))
        return EXIT_OK if code == 0 and in_time and not failed else EXIT_FAILED
    finally:
        if web is not None:
            await stop_process(web, 5.0)
        if daemon is not None and daemon.poll() is None:
            await stop_process(daemon, STOP_TIMEOUT_S)
        exchange_code, _ = await stop_process(exchange, 5.0)
        screen.say(f"demo: fake exchange stopped (code {exchange_code}); logs in {demo_dir}")
        if observer is not None:
            await observer.close()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/demo.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=None, help="stop by itself after N seconds (tests, CI)")
    parser.add_argument("--speed", type=float, default=DEFAULT_SPEED, help="simulated seconds per real second")
    parser.add_argument("--fresh", action="store_true", help="empty the demo database first instead of resuming")
    parser.add_argument(
        "--web-port", type=int, default=8080, help="the chart and read API on 127.0.0.1:PORT (0: not started)"
    )
    args = parser.parse_args(argv)
    if args.speed <= 0:
        parser.error("--speed must be positive")
    if not 0 <= args.web_port <= 65_535:
        parser.error("--web-port must be a port number (0: no chart)")
    if args.seconds is not None and args.seconds <= 0:
        parser.error("--seconds must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return asyncio.run(run_demo(args))
    except SetupError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return EXIT_SETUP
    except KeyboardInterrupt:  # Ctrl-C while setting up, before anything was started
        print("demo: interrupted", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
