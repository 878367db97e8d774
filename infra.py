"""Infrastructure shared by every worker: settings, clients, logging, supervision.

Exceptions raised here:
    ConfigError   a setting is wrong; the daemon stops at boot with one line.
    BootError     a server is unreachable or unsuitable at boot; same treatment.
Once the daemon runs, faults are never fatal: workers run under `run_safe_loop`
and problems are recorded through `log_system_event`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import gc
import logging
import os
import random
import re
import sys
import time
import traceback
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import orjson
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ClusterDownError, MasterDownError, ResponseError, SlotNotCoveredError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from binance.protocol import valid_symbol
from shards.cluster import FeedRedisCluster

PROJECT_DIR = Path(__file__).resolve().parent
LOCAL_SERVICES_FILE = PROJECT_DIR / ".local" / "services.env"

CANDLE_STORES = ("auto", "timeseries", "zset")
PG_POOLER_MODES = ("auto", "yes", "no")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

# A Redis Cluster failover longer than the cluster client's own retries.
CLUSTER_DOWN_ERRORS: tuple[type[BaseException], ...] = (ClusterDownError, MasterDownError, SlotNotCoveredError)

# redis-py 8.1 on 3.12 can surface a server-reset idle connection as AttributeError,
# TypeError or (uvloop) RuntimeError, which its default retry ignores (ENVIRONMENT.md).
REDIS_RETRY_ERRORS: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    ConnectionError,
    TimeoutError,
    AttributeError,
    TypeError,
    RuntimeError,
    *CLUSTER_DOWN_ERRORS,
)

# A server that is away (down, restarting, black-holed, or our connection killed; on a
# Redis Cluster, a failover longer than the client's own retries), as opposed to a bug or
# a refused request: what is being written is held and retried. (Not the redis-py bug's
# AttributeError/TypeError/RuntimeError: the client's retry handles those, and a worker
# must not mistake a bug of its own for an outage.)
REDIS_DOWN_ERRORS: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    OSError,
    TimeoutError,
    *CLUSTER_DOWN_ERRORS,
)
PG_DOWN_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.OperatorInterventionError,  # shut down, restarting, pg_terminate_backend
    asyncpg.InternalClientError,  # a connection confused by a reset in the middle of an operation
)
# PostgreSQL refusing a value, not being away: retrying the same rows gives the same
# answer, so the writer isolates the row and goes on. asyncpg has two DataErrors: the
# server's (SQLSTATE 22) and the client's encoding one, which is an InterfaceError and
# would otherwise pass for an outage (a trade count over 2^31 did).
PG_REJECTED_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.DataError,
    asyncpg.exceptions._base.DataError,
    asyncpg.IntegrityConstraintViolationError,
)
REDIS_SOCKET_TIMEOUT_S = 5.0  # a black-holed Redis fails a command instead of hanging it


class ConfigError(Exception):
    """A setting is missing or malformed; the message says how to fix it."""


class BootError(Exception):
    """A server cannot be used at boot; the message says which and why."""


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    """Every setting of the daemon, read once from the environment."""

    redis_url: str = field(repr=False)
    postgres_url: str = field(repr=False)
    debug_mode: bool = False
    symbols: tuple[str, ...] = ()
    binance_ws_url: str = "wss://fstream.binance.com/market"
    binance_rest_url: str = "https://fapi.binance.com"
    redis_candles: int = 250
    indicator_retention_days: int = 14
    candle_store: str = "auto"
    redis_hash_tags: bool = False  # single Redis named as a cluster is (a cluster always is)
    boot_wait_s: float = 30.0
    stream_maxlen: int = 100_000
    system_log_buffer: int = 10_000
    pg_pool_max: int = 10
    telegram_bot_token: str | None = field(default=None, repr=False)
    telegram_chat_id: str | None = None
    telegram_api_url: str = "https://api.telegram.org"
    postgres_pooler: str = "auto"  # "auto" (detected), "yes" (PgBouncer/Supavisor in transaction mode), "no"

    def describe(self) -> str:
        """One log line with the servers in use, passwords masked."""
        return (
            f"redis={mask_url(self.redis_url)} postgres={mask_url(self.postgres_url)} "
            f"candle_store={self.candle_store} redis_candles={self.redis_candles}"
        )


_SECRET_QUERY = re.compile(r"([?&;](?:password|pass|pwd|sslpassword|token|secret|api_?key)=)[^&;#]*", re.IGNORECASE)


def mask_url(url: str) -> str:
    """The URL with its secrets replaced by ***, even when it does not parse (an
    unencoded '@', '/' or '#' in a password): whatever lies between the user name and
    the last '@' goes, and so do password-like query parameters."""
    scheme, sep, rest = url.partition("://")
    if sep:
        at = rest.rfind("@")
        if at >= 0:
            user, colon, _ = rest[:at].partition(":")
            rest = f"{user}{':***' if colon else ''}{rest[at:]}"
        url = scheme + sep + rest
    return _SECRET_QUERY.sub(r"\1***", url)


def read_local_services(path: Path = LOCAL_SERVICES_FILE) -> dict[str, str]:
    """What `make services` recorded: the URLs of the servers it started or found (the
    documented defaults) and the tests' Redis binaries. Lines are `export NAME=VALUE` or,
    for the URLs, `[ -n "${NAME:-}" ] || export NAME=VALUE` (applied only when unset);
    VALUE is one shell word (quoted or escaped)."""
    import shlex  # here: this function is the only user

    values: dict[str, str] = {}
    if not path.is_file():
        return values
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("[") and "] || " in line:  # the guard: the environment wins, as here
            line = line.partition("] || ")[2].strip()
        line = line.removeprefix("export ").strip()
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            try:
                words = shlex.split(value, comments=True)
            except ValueError:  # unbalanced quotes: the text as it is
                words = [value.strip().strip("'\"")]
            values[key.strip()] = words[0] if words else ""
    return values


def env_bool(env: Mapping[str, str], key: str, default: bool) -> bool:
    raw = env.get(key, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{key}={raw!r} is not a boolean: use true or false")


def env_number(env: Mapping[str, str], key: str, default: float, kind: type, low: float, high: float):
    raw = env.get(key, "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ConfigError(f"{key}={raw!r} is not a {kind.__name__}") from None
    if not low <= value <= high:
        raise ConfigError(f"{key}={raw!r} is out of range: use a value from {low} to {high}")
    return value


ENCODE_HINT = "special characters in a user or password must be percent-encoded (@ %40, : %3A, / %2F, # %23, ? %3F)"


def _checked_url(key: str, url: str, schemes: tuple[str, ...], hint: str) -> str:
    try:
        parts = urlsplit(url)
        port = parts.port  # raises ValueError on a malformed port
    except ValueError:  # its text may hold the password: never shown
        raise ConfigError(f"{key} is not a valid URL ({mask_url(url)!r}): {ENCODE_HINT}") from None
    if parts.scheme not in schemes:
        raise ConfigError(
            f"{key} must start with {' or '.join(s + '://' for s in schemes)}, got {mask_url(url)!r}: {hint}"
        )
    if parts.netloc.count("@") > 1:
        raise ConfigError(f"{key} has an unencoded '@' in its user or password ({mask_url(url)!r}): {ENCODE_HINT}")
    if parts.scheme != "unix" and not parts.hostname:
        raise ConfigError(f"{key} has no host: {mask_url(url)!r}: {hint}")
    if port == 0:
        raise ConfigError(f"{key} has port 0: {hint}")
    return url


def _checked_telegram_url(url: str) -> str:
    """The bot token travels in the path: plain http only to this machine (tests)."""
    parts = urlsplit(_checked_url("TELEGRAM_API_URL", url, ("https", "http"), "e.g. https://api.telegram.org"))
    if parts.scheme == "http" and parts.hostname not in ("127.0.0.1", "::1", "localhost"):
        raise ConfigError(
            f"TELEGRAM_API_URL={mask_url(url)!r} is plain http: the bot token would travel in clear; use https://"
        )
    return url.rstrip("/")


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Build the settings from the environment; raise ConfigError naming the bad key."""
    env = os.environ if env is None else env
    local = read_local_services()
    services_hint = "set it, or run `make services` to start local servers"
    redis_url = env.get("REDIS_URL") or local.get("REDIS_URL")
    postgres_url = env.get("POSTGRES_URL") or env.get("DATABASE_URL") or local.get("POSTGRES_URL")
    if not redis_url:
        raise ConfigError(f"REDIS_URL is not set: {services_hint}")
    if not postgres_url:
        raise ConfigError(f"POSTGRES_URL is not set: {services_hint}")
    candle_store = env.get("REDIS_CANDLE_STORE", "auto").strip().lower() or "auto"
    if candle_store not in CANDLE_STORES:
        raise ConfigError(f"REDIS_CANDLE_STORE={candle_store!r}: use one of {', '.join(CANDLE_STORES)}")
    symbols = tuple(dict.fromkeys(s.strip().upper() for s in env.get("SYMBOLS", "").split(",") if s.strip()))
    for symbol in symbols:
        if not valid_symbol(symbol):
            raise ConfigError(
                f"SYMBOLS has an invalid symbol {symbol[:50]!r}: letters, digits and '_' only, as Binance writes them"
            )
    pooler = env.get("POSTGRES_POOLER", "auto").strip().lower() or "auto"
    if pooler not in PG_POOLER_MODES:
        raise ConfigError(f"POSTGRES_POOLER={pooler!r}: use one of {', '.join(PG_POOLER_MODES)}")
    return Settings(
        redis_url=_checked_url("REDIS_URL", redis_url, ("redis", "rediss", "unix"), services_hint),
        postgres_url=_checked_url("POSTGRES_URL", postgres_url, ("postgres", "postgresql"), services_hint),
        debug_mode=env_bool(env, "DEBUG_MODE", False),
        symbols=symbols,
        binance_ws_url=_checked_url(
            "BINANCE_WS_URL", env.get("BINANCE_WS_URL") or Settings.binance_ws_url, ("ws", "wss"), "see BINANCE.md"
        ).rstrip("/"),
        binance_rest_url=_checked_url(
            "BINANCE_REST_URL",
            env.get("BINANCE_REST_URL") or Settings.binance_rest_url,
            ("http", "https"),
            "see README",
        ).rstrip("/"),
        redis_candles=env_number(env, "REDIS_CANDLES", 250, int, 1, 100_000),
        indicator_retention_days=env_number(env, "INDICATOR_RETENTION_DAYS", 14, int, 1, 3650),
        candle_store=candle_store,
        redis_hash_tags=env_bool(env, "REDIS_HASH_TAGS", False),
        boot_wait_s=env_number(env, "BOOT_WAIT_S", 30.0, float, 0.0, 3600.0),
        stream_maxlen=env_number(env, "STREAM_MAXLEN", 100_000, int, 100, 100_000_000),
        system_log_buffer=env_number(env, "SYSTEM_LOG_BUFFER", 10_000, int, 10, 10_000_000),
        pg_pool_max=env_number(env, "PG_POOL_MAX", 10, int, 2, 200),
        telegram_bot_token=env.get("TELEGRAM_BOT_TOKEN") or None,
        telegram_chat_id=env.get("TELEGRAM_CHAT_ID") or None,
        telegram_api_url=_checked_telegram_url(env.get("TELEGRAM_API_URL") or Settings.telegram_api_url),
        postgres_pooler=pooler,
    )


def format_duration(seconds: float | None) -> str:
    """Compact and sortable by eye: 42s, 3m05s, 2h07m, 3d04h."""
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86_400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86_400}d{s % 86_400 // 3600:02d}h"


# --------------------------------------------------------------------------- logging

_COLOURS = {
    "DEBUG": "\033[90m",
    "INFO": "\033[32m",
    "WARNING": "\033[33m",
    "ERROR": "\033[31m",
    "CRITICAL": "\033[97;41m",
}
_RESET = "\033[0m"


class ConsoleFormatter(logging.Formatter):
    """`2025-05-16 13:44:21 | INFO     | AGGREGATOR | message`, UTC, optionally coloured."""

    converter = time.gmtime

    def __init__(self, colour: bool) -> None:
        super().__init__("%(asctime)s | %(levelname)-8s | %(name)s | %(message)s", "%Y-%m-%d %H:%M:%S")
        self.colour = colour

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        if self.colour:
            return f"{_COLOURS.get(record.levelname, '')}{line}{_RESET}"
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line for log shippers (LOG_FORMAT=json):
    `{"ts": "2025-05-16T13:44:21.123Z", "level": "INFO", "logger": "AGGREGATOR",
    "message": "...", "exception": "Traceback ..."}` (`exception` and `stack` only when
    the record has them)."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.fromtimestamp(record.created, UTC)
        entry: dict[str, Any] = {
            "ts": f"{stamp:%Y-%m-%dT%H:%M:%S}.{stamp.microsecond // 1000:03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            if not record.exc_text:
                record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        try:
            return orjson.dumps(entry, default=str).decode()
        except TypeError:  # a lone surrogate or the like: never lose the line
            return orjson.dumps({k: ascii(v) if isinstance(v, str) else v for k, v in entry.items()}).decode()


LOG_FORMATS = ("text", "json")


def log_options(env: Mapping[str, str] | None = None, debug: bool = False) -> tuple[int, str]:
    """(level, format) from LOG_LEVEL and LOG_FORMAT. LOG_LEVEL wins over DEBUG_MODE;
    without it DEBUG_MODE=true means DEBUG, else INFO. A bad value is a ConfigError."""
    env = os.environ if env is None else env
    raw_level = env.get("LOG_LEVEL", "").strip().upper()
    if raw_level and raw_level not in LOG_LEVELS:
        raise ConfigError(f"LOG_LEVEL={raw_level[:40]!r}: use one of {', '.join(LOG_LEVELS)}")
    level = logging.getLevelName(raw_level) if raw_level else (logging.DEBUG if debug else logging.INFO)
    fmt = env.get("LOG_FORMAT", "").strip().lower() or "text"
    if fmt not in LOG_FORMATS:
        raise ConfigError(f"LOG_FORMAT={fmt[:40]!r}: use text or json")
    return level, fmt


def setup_logging(
    debug: bool = False,
    stream=None,
    *,
    level: int | str | None = None,
    fmt: str | None = None,
    env: Mapping[str, str] | None = None,
) -> None:
    """Console logging for the process. LOG_LEVEL and LOG_FORMAT are read from `env`
    (the process environment by default) unless `level` / `fmt` are given; a bad value
    raises ConfigError (exit 2 at boot)."""
    env_level, env_fmt = log_options(env, debug)
    level = env_level if level is None else level
    fmt = env_fmt if fmt is None else fmt
    if fmt not in LOG_FORMATS:
        raise ConfigError(f"LOG_FORMAT={fmt!r}: use text or json")
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(ConsoleFormatter(colour=hasattr(stream, "isatty") and stream.isatty()))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    numeric = level if isinstance(level, int) else logging.getLevelName(str(level).upper())
    for noisy in ("asyncio", "websockets", "aiohttp"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, numeric))
    # Its reconnect attempts during an outage, with tracebacks: the workers log the outage once.
    logging.getLogger("asyncpg.pool").setLevel(max(logging.ERROR, numeric))


# --------------------------------------------------------------------------- system log


class SystemEventLog:
    """Buffers `system_log_v4` rows in memory and writes them in batches.

    Recording never blocks and never raises. While PostgreSQL is away the rows wait
    in a bounded buffer (oldest dropped first, counted, and reported once back).
    """

    INSERT_SQL = """
        INSERT INTO system_log_v4 (ts, level, module, message, details)
        SELECT ts, level, module, message, details::jsonb
        FROM unnest($1::timestamptz[], $2::text[], $3::text[], $4::text[], $5::text[])
             AS t(ts, level, module, message, details)
    """

    def __init__(self, capacity: int = 10_000, batch_size: int = 1000) -> None:
        self.capacity = capacity
        self.batch_size = batch_size
        self.pending: deque[tuple] = deque()
        self.dropped = 0
        self.written = 0
        self._wake: asyncio.Event | None = None

    MAX_MESSAGE_CHARS = 2000
    MAX_DETAILS_CHARS = 16_000

    def record(self, level: str, module: str, message: str, details: Mapping[str, Any] | None = None) -> None:
        try:
            level = level.upper() if level.upper() in LOG_LEVELS else "INFO"
            payload = None if details is None else _safe_json(details, self.MAX_DETAILS_CHARS)
            if len(self.pending) >= self.capacity:
                self.pending.popleft()
                self.dropped += 1
            row = (datetime.now(UTC), level, _safe_text(module, 100), _safe_text(message, self.MAX_MESSAGE_CHARS))
            self.pending.append((*row, payload))
            if self._wake is not None and len(self.pending) >= self.batch_size:
                self._wake.set()
        except Exception:
            pass

    async def flush(self, pool: asyncpg.Pool) -> int:
        """Write everything buffered; on failure the rows stay queued, in order."""
        total = 0
        if self.dropped:
            lost, self.dropped = self.dropped, 0
            self.pending.appendleft(
                (
                    datetime.now(UTC),
                    "WARNING",
                    "SYSTEM_LOG",
                    f"{lost} system log events were dropped while PostgreSQL was unreachable",
                    None,
                )
            )
        while self.pending:
            batch = [self.pending[i] for i in range(min(self.batch_size, len(self.pending)))]
            try:
                await pool.execute(self.INSERT_SQL, *zip(*batch), timeout=10)
            except PG_REJECTED_ERRORS:
                await self._write_one_by_one(pool, batch)
            for _ in batch:
                self.pending.popleft()
            total += len(batch)
        self.written += total
        return total

    async def _write_one_by_one(self, pool: asyncpg.Pool, batch: list[tuple]) -> None:
        """A row PostgreSQL refuses (whatever slipped past the sanitising) is replaced by
        a note saying so: it must not hold up the log behind it."""
        for row in batch:
            try:
                await pool.execute(self.INSERT_SQL, *([value] for value in row), timeout=10)
            except PG_REJECTED_ERRORS as exc:
                note = f"a {row[1]} log row from {row[2]} was refused by PostgreSQL ({type(exc).__name__})"
                await pool.execute(self.INSERT_SQL, [row[0]], ["WARNING"], ["SYSTEM_LOG"], [note], [None], timeout=10)

    async def run_flusher(self, pool: asyncpg.Pool, interval_s: float = 0.5) -> None:
        """Flush forever; a PostgreSQL outage only slows the retries down."""
        self._wake = asyncio.Event()
        delay = interval_s
        log = logging.getLogger("SYSTEM_LOG")
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=delay)
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.flush(pool)
                delay = interval_s
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
                if delay == interval_s:
                    log.warning("cannot write system_log_v4 (%s); %d events buffered", exc, len(self.pending))
                delay = min(delay * 2, 10.0)


def _safe_text(text: Any, limit: int) -> str:
    """Text PostgreSQL stores (no NUL), cut to `limit` characters."""
    text = str(text)
    return (text if len(text) <= limit else text[: limit - 1] + "…").replace("\x00", "\ufffd")


def _safe_json(details: Mapping[str, Any], limit: int) -> str:
    """`details` as JSON jsonb accepts (no \\u0000), at most `limit` characters."""
    payload = orjson.dumps(details, default=str).decode().replace("\\u0000", "\\ufffd")
    if len(payload) > limit:
        payload = orjson.dumps({"truncated": payload[:limit]}).decode()
    return payload


system_event_log = SystemEventLog()


def log_system_event(level: str, module: str, message: str, details: Mapping[str, Any] | None = None) -> None:
    """Log to the console and queue a `system_log_v4` row; never blocks, never raises."""
    try:
        logging.getLogger(module).log(
            logging.getLevelName(level.upper()) if level.upper() in LOG_LEVELS else logging.INFO, message
        )
    except Exception:
        pass
    system_event_log.record(level, module, message, details)


# --------------------------------------------------------------------------- supervision

# Crashes per worker name since the process started (the metrics endpoint exports them).
WORKER_RESTARTS: Counter[str] = Counter()


async def run_safe_loop(
    coro_fn: Callable[[], Awaitable[Any]],
    name: str,
    retry_delay: float = 5.0,
    *,
    max_delay: float = 60.0,
    healthy_after_s: float = 60.0,
) -> None:
    """Run a worker forever: log each crash and restart it after a growing backoff.

    The delay doubles on every failure up to `max_delay` (with ±20 % jitter) and goes
    back to `retry_delay` after a run that lasted `healthy_after_s`. A worker that
    returns normally is finished; cancellation propagates.
    """
    delay = retry_delay
    loop = asyncio.get_running_loop()
    while True:
        started = loop.time()
        try:
            await coro_fn()
            logging.getLogger(name).info("worker finished")
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if loop.time() - started >= healthy_after_s:
                delay = retry_delay
            WORKER_RESTARTS[name] += 1
            log_system_event(
                "ERROR",
                name,
                f"worker crashed: {type(exc).__name__}: {exc}; restarting in {delay:.1f}s",
                {"traceback": traceback.format_exc(limit=8)},
            )
        await asyncio.sleep(delay * random.uniform(0.8, 1.2))
        delay = min(delay * 2, max_delay)


_DIGITS = re.compile(r"\d+")


class RateLimitedLog:
    """One console/system-log line per reason per interval, with a count of the rest.

    Reasons are keyed with their digits folded (so "row 12" and "row 13" are one
    reason) and at most `max_reasons` are tracked: text that varies cannot grow it."""

    def __init__(self, module: str, interval_s: float = 60.0, level: str = "WARNING", max_reasons: int = 256) -> None:
        self.module, self.interval_s, self.level, self.max_reasons = module, interval_s, level, max_reasons
        self.last: dict[str, float] = {}
        self.suppressed: dict[str, int] = {}

    def warn(self, reason: str, message: str, details: Mapping[str, Any] | None = None) -> None:
        now = time.monotonic()
        key = _DIGITS.sub("#", reason[:200])[:80]
        if now - self.last.get(key, -1e9) < self.interval_s:
            self.suppressed[key] = self.suppressed.get(key, 0) + 1
            return
        skipped = self.suppressed.pop(key, 0)
        self.last.pop(key, None)
        self.last[key] = now  # newest last: the oldest reason is the first to go
        while len(self.last) > self.max_reasons:
            oldest = next(iter(self.last))
            del self.last[oldest]
            self.suppressed.pop(oldest, None)
        suffix = f" ({skipped} more since the last report)" if skipped else ""
        log_system_event(self.level, self.module, message + suffix, details)


class Outage:
    """Logs a server fault once when it starts and once when it ends, not on every retry."""

    def __init__(self, module: str, what: str) -> None:
        self.module, self.what = module, what
        self.since: float | None = None
        self.retries = 0

    def fail(self, exc: BaseException, doing: str, details: dict | None = None) -> None:
        if self.since is None:
            self.since = time.monotonic()
            log_system_event(
                "WARNING",
                self.module,
                f"{self.what} unreachable while {doing} ({type(exc).__name__}: {exc}); holding and retrying",
                {"server": self.what, "doing": doing, "error": repr(exc), **(details or {})},
            )
        self.retries += 1

    def ok(self, details: dict | None = None) -> None:
        if self.since is not None:
            seconds = time.monotonic() - self.since
            log_system_event(
                "INFO",
                self.module,
                f"{self.what} back after {seconds:.1f} s ({self.retries} retries)",
                {"server": self.what, "seconds": round(seconds, 3), "retries": self.retries, **(details or {})},
            )
            self.since, self.retries = None, 0

    @property
    def active(self) -> bool:
        return self.since is not None


# --------------------------------------------------------------------------- clients


def _client_options(overrides: dict[str, Any]) -> dict[str, Any]:
    """The options of every Redis client, single or cluster, with `overrides` applied."""
    # Two retries: enough for the reset-connection bug; a server that is away is the
    # caller's to handle (hold and retry), not something to sit out inside one call.
    retry = Retry(ExponentialBackoff(cap=0.5, base=0.02), retries=2, supported_errors=REDIS_RETRY_ERRORS)
    options: dict[str, Any] = dict(
        decode_responses=True,
        retry=retry,
        retry_on_error=list(REDIS_RETRY_ERRORS),
        socket_connect_timeout=5,
        socket_timeout=REDIS_SOCKET_TIMEOUT_S,
        socket_keepalive=True,
        health_check_interval=15,
    )
    options.update(overrides)
    return options


def make_redis(url: str, **overrides: Any) -> Redis:
    """Asyncio Redis client whose retries survive the redis-py 8.1 reset-connection bug."""
    return Redis.from_url(url, **_client_options(overrides))


def make_cluster_redis(url: str, **overrides: Any) -> RedisCluster:
    """`make_redis` for a Redis Cluster: the client follows MOVED/ASK and re-reads the
    slot map after a failover (its own retries, `cluster_error_retry_attempts`)."""
    return FeedRedisCluster.from_url(url, **_client_options(overrides))


async def cluster_aware(redis: Redis, url: str, **overrides: Any) -> Redis | RedisCluster:
    """`redis` itself, or a cluster client in its place (`redis` closed) when its server
    is a Redis Cluster node: SPEC 17, a cluster is recognised from the server."""
    try:
        await redis.execute_command("CLUSTER", "INFO")  # not @dangerous, unlike INFO: restricted users may
    except ResponseError:  # "cluster support disabled", or a user refused even that: one server
        return redis
    await redis.aclose()
    return make_cluster_redis(url, **overrides)


async def open_redis(url: str, **overrides: Any) -> Redis | RedisCluster:
    """A client of the server at `url`, of the kind it is."""
    redis = make_redis(url, **overrides)
    try:
        return await cluster_aware(redis, url, **overrides)
    except BaseException:
        await redis.aclose()
        raise


# --------------------------------------------------------------------------- heartbeat

HEARTBEAT_PREFIX = "heartbeat:"


def heartbeat_key(host: str, pid: int) -> str:
    return f"{HEARTBEAT_PREFIX}{host}:{pid}"


DRAIN_FIELD = "drain_requested"  # set in a process's heartbeat by `feed_v4_cli.py drain`


async def write_heartbeat(redis: Redis, key: str, fields: Mapping[str, Any], ttl_s: int) -> bool:
    """One hash per daemon process; it expires when the process stops beating. True
    while a drain of the process is requested (the same round trip reads it)."""
    pipe = redis.pipeline(transaction=False)
    pipe.hset(key, mapping=dict(fields))
    pipe.expire(key, ttl_s)
    pipe.hget(key, DRAIN_FIELD)
    *_, drain = await pipe.execute()
    return bool(drain)


async def read_heartbeats(redis: Redis) -> dict[str, dict[str, str]]:
    """Every live daemon process's heartbeat, by key."""
    keys = sorted([key async for key in redis.scan_iter(match=f"{HEARTBEAT_PREFIX}*", count=1000)])
    if not keys:
        return {}
    pipe = redis.pipeline(transaction=False)
    for key in keys:
        pipe.hgetall(key)
    return {key: fields for key, fields in zip(keys, await pipe.execute()) if fields}


def exchange_now_from_heartbeats(beats: Iterable[Mapping[str, str]], local_now_ms: int) -> int | None:
    """The exchange's time as the freshest heartbeat that knows it says, moved on by the
    heartbeat's age: for a process that joins a deployment and cannot ask the exchange
    (a replay's exchange time is not the local clock)."""
    known = []
    for beat in beats:
        with contextlib.suppress(KeyError, ValueError):
            exchange_ms, updated_ms = int(beat["exchange_time"]), int(beat["updated_at"])
            if exchange_ms > 0:
                known.append(exchange_ms + max(0, local_now_ms - updated_ms))
    return max(known, default=None)


# --------------------------------------------------------------------------- memory


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None  # not glibc (musl, macOS): nothing to do


_MALLOC_TRIM = _malloc_trim()


def release_free_memory() -> None:
    """Hand the heap's free pages back to the OS. glibc keeps what Python and numpy free
    (boot opens 1,500 series from ~2,000 bars each, ~90 MB of transient arrays), so RSS
    would stay at its peak; a trim takes ~8 ms after boot, well under 1 ms later."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def tidy_heap(full: bool = False) -> None:
    """Mid-minute upkeep, far from any boundary: collect, then freeze what survived, so
    the cyclic collector never rescans the long-lived heap (the indicator worker opens
    its 1,500 series after boot's freeze: a full collection over them stalled the loop
    ~0.1 s wherever it fell, a bar close included). `full` thaws the frozen heap first,
    so cycles among objects frozen earlier are collected too. Then free heap goes back
    to the OS."""
    if full:
        gc.unfreeze()
    gc.collect()
    gc.freeze()
    release_free_memory()
