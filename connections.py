"""Connecting to Redis and PostgreSQL at boot, as hosted plans hand them out.

A server that is away is waited for (BOOT_WAIT_S); a mistake waiting cannot cure (a
wrong password, TLS on one side only, an untrusted certificate, a missing CA file, a
Redis user without TimeSeries while that store is demanded) stops the boot at once
with one line saying what to change, never the password. Hosted specifics: a
PostgreSQL pooler in transaction mode (no cached statements), libpq-only URL
parameters (Neon's `channel_binding`), Redis ACLs that refuse TimeSeries (the
sorted-set store takes over).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import AuthenticationError as RedisAuthenticationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoPermissionError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from infra import (
    ENCODE_HINT,
    BootError,
    ConfigError,
    Settings,
    cluster_aware,
    log_system_event,
    make_cluster_redis,
    make_redis,
    mask_url,
)
from migrations import pending_migrations
from shards.cluster import migrate_key_names
from shards.keys import use_hash_tags


async def timeseries_problem(redis: Redis) -> str | None:
    """Why the TimeSeries store cannot be used, or None. Probed with the very commands
    the store sends, on a key of its own: a server may lack the module (plain Redis,
    Valkey), or refuse its commands (an ACL without them, Upstash "not available")."""
    key = f"feed_v4:probe:timeseries:{os.getpid()}"
    try:
        await redis.delete(key)
        await redis.execute_command("TS.CREATE", key, "RETENTION", 60_000, "DUPLICATE_POLICY", "LAST")
        await redis.execute_command("TS.MADD", key, 60_000, 1.0)
        await redis.execute_command("TS.REVRANGE", key, "-", "+", "COUNT", 1)
    except NoPermissionError as exc:
        return f"the user may not run the TimeSeries commands: {exc}"
    except ResponseError as exc:
        if "unknown command" in str(exc).lower():
            return "no TimeSeries module"
        return f"TimeSeries refused: {str(exc)[:200]}"
    finally:
        with contextlib.suppress(ResponseError):
            await redis.delete(key)
    return None


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception and those it was raised from or during (an SSL error hides there)."""
    seen: list[BaseException] = []
    while exc is not None and exc not in seen and len(seen) < 10:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return seen


class TlsMismatch(Exception):
    """One side speaks TLS and the other does not (found by probing the server); the
    message is the fix."""


def permanent_problem(exc: BaseException) -> str | None:
    """A connection failure that waiting will not cure, as the fix to make; None when
    the server may simply be away (down, restarting, not yet started)."""
    if isinstance(exc, TlsMismatch):
        return str(exc)
    text = " ".join(str(e) for e in _chain(exc))
    lowered = text.lower()
    if any(isinstance(e, ssl.SSLCertVerificationError) for e in _chain(exc)) or "certificate_verify_failed" in lowered:
        return (
            "its TLS certificate is not trusted: name the CA file (POSTGRES_URL: sslrootcert=<file>; "
            "REDIS_URL: ssl_ca_certs=<file>)"
        )
    if "wrong version number" in lowered or "record layer failure" in lowered or "packet length too long" in lowered:
        return "it does not speak TLS: use redis:// instead of rediss:// (or drop sslmode=require)"
    if "rejected ssl upgrade" in lowered:
        return "it does not accept TLS: drop sslmode=require from POSTGRES_URL (or use sslmode=prefer)"
    if isinstance(exc, asyncpg.InvalidPasswordError):
        return f"the password was refused ({exc}): fix it in POSTGRES_URL; {ENCODE_HINT}"
    if isinstance(exc, asyncpg.InvalidAuthorizationSpecificationError):
        if "no encryption" in lowered or "ssl off" in lowered:
            return f"it accepts only encrypted connections ({exc}): add ?sslmode=require to POSTGRES_URL"
        return f"the user was refused ({exc}): check the user in POSTGRES_URL"
    if isinstance(exc, asyncpg.InvalidCatalogNameError):
        return f"{exc}: create the database or fix its name in POSTGRES_URL"
    if isinstance(exc, asyncpg.OperatorInterventionError | asyncpg.TooManyConnectionsError):
        return None  # starting up, shutting down, full: it may pass
    if isinstance(exc, asyncpg.ClientConfigurationError) and "root certificate file" in lowered:
        return (
            "sslmode=verify-ca/verify-full needs the server's CA certificate: add sslrootcert=<ca file> to "
            "POSTGRES_URL (or use sslmode=require, which encrypts without verifying)"
        )
    if isinstance(exc, asyncpg.ClientConfigurationError | asyncpg.PostgresError):
        return f"it refused the connection ({type(exc).__name__}: {exc})"
    if isinstance(exc, RedisAuthenticationError):
        return f"the user or password was refused ({exc}): fix it in REDIS_URL; {ENCODE_HINT}"
    if isinstance(exc, ResponseError):
        if "noauth" in lowered:
            return "it requires a password: put it in REDIS_URL (redis://:PASSWORD@host:port/0)"
        return f"it refused us ({exc})"
    if isinstance(exc, TypeError) and "ssl" in lowered:
        return f"an ssl_* parameter needs a rediss:// URL ({exc})"
    return None


def one_line(text: str) -> str:
    """The exit-2 message is one line: a driver's message may hold newlines (asyncpg's
    "...\nHINT: ...")."""
    return " ".join(text.split())


@contextlib.contextmanager
def refused_at_boot(doing: str) -> Iterator[None]:
    """A server that answers but refuses what boot needs (a Redis user without a
    command, a PostgreSQL user without CREATE) stops the boot with one line."""
    try:
        yield
    except NoPermissionError as exc:
        raise BootError(
            one_line(
                f"Redis refused a command while {doing} ({exc}): the REDIS_URL user needs streams, hashes, "
                "sorted sets and scripts (e.g. ACL +@all -@admin -@dangerous)"
            )
        ) from None
    except asyncpg.InsufficientPrivilegeError as exc:
        raise BootError(
            one_line(
                f"PostgreSQL refused while {doing} ({exc}): the POSTGRES_URL user needs to create tables in its "
                "database"
            )
        ) from None
    except (asyncpg.PostgresError, ResponseError) as exc:
        raise BootError(one_line(f"the server refused us while {doing} ({type(exc).__name__}: {exc})")) from None


TRANSIENT_BOOT_ERRORS: tuple[type[BaseException], ...] = (
    TimeoutError,
    OSError,
    RedisConnectionError,
    RedisTimeoutError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
)


# Query parameters naming files the TLS set-up reads (asyncpg, redis-py).
CERTIFICATE_PARAMS = {
    "POSTGRES_URL": ("sslrootcert", "sslcert", "sslkey", "sslcrl"),
    "REDIS_URL": ("ssl_ca_certs", "ssl_ca_path", "ssl_certfile", "ssl_keyfile"),
}


def check_certificate_files(key: str, url: str) -> None:
    """BootError when a certificate or key file the URL names cannot be read: the
    driver would report it as a connection failure (ENOENT) and boot would wait."""
    for name, value in parse_qsl(urlsplit(url).query, keep_blank_values=True):
        if name in CERTIFICATE_PARAMS[key] and value and not os.access(value, os.R_OK):
            problem = "does not exist" if not os.path.exists(value) else "cannot be read by this user"
            raise BootError(f"{key} names {name}={value!r}, which {problem}: fix the path (an absolute one)")


async def _wait_for(what: str, url: str, attempt: Callable[[], Awaitable[Any]], wait_s: float, hint: str) -> Any:
    """Retry `attempt` until it succeeds or `wait_s` has passed, then raise BootError.
    A failure waiting cannot cure (a wrong password, TLS on one side only) is a
    BootError at once, with the fix."""
    log = logging.getLogger("BOOT")
    deadline = time.monotonic() + wait_s
    tries = 0
    while True:
        tries += 1
        try:
            return await attempt()
        except Exception as exc:
            problem = permanent_problem(exc)
            if problem is not None:
                raise BootError(one_line(f"{what} at {mask_url(url)}: {mask_text(problem, url)}")) from None
            if not isinstance(exc, TRANSIENT_BOOT_ERRORS):
                raise
            left = deadline - time.monotonic()
            if left <= 0:
                reset = "reset by peer" in str(exc).lower() or "closed by server" in str(exc).lower()
                tls = " (if the server requires TLS, use rediss://)" if reset and what == "Redis" else ""
                raise BootError(
                    one_line(
                        f"{what} at {mask_url(url)} unreachable after {tries} tries "
                        f"({type(exc).__name__}: {mask_text(str(exc), url)}){tls}: {hint}"
                    )
                ) from None
            log.warning("%s not reachable yet (%s); retrying for %.0f s more", what, mask_text(str(exc), url), left)
            await asyncio.sleep(min(1.0, max(left, 0.05)))


def mask_text(text: str, url: str) -> str:
    """`text` without the URL's password (a driver's message may quote its DSN)."""
    password = urlsplit(url).password if url.count("@") == 1 else None
    return text.replace(password, "***") if password else text


PROBE_TIMEOUT_S = 1.0  # a probe of what the server speaks; inconclusive past this


async def _probe(host: str, port: int, request: bytes = b"", tls: bool = False) -> bytes | None:
    """Connect (with a TLS handshake whose certificate is not checked, if `tls`), send
    `request` and read one line; None when any of it fails within PROBE_TIMEOUT_S."""
    context = None
    if tls:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    writer: asyncio.StreamWriter | None = None
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=context, server_hostname=host if tls else None), PROBE_TIMEOUT_S
        )
        if not request:
            return b""
        writer.write(request)
        return await asyncio.wait_for(reader.readline(), PROBE_TIMEOUT_S)
    except (OSError, TimeoutError, ValueError, ssl.SSLError, asyncio.IncompleteReadError):
        return None
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), PROBE_TIMEOUT_S)


async def _plain_redis_answers(host: str, port: int) -> bool:
    """Whether a plain-text Redis answers PING on host:port (+PONG, or -NOAUTH / -ERR
    from one that wants a password). A TLS server answers a TLS alert or hangs up."""
    reply = await _probe(host, port, b"PING\r\n")
    return reply is not None and reply.endswith(b"\r\n") and reply.startswith((b"+PONG", b"-"))


async def _tls_answers(host: str, port: int) -> bool:
    """Whether host:port completes a TLS handshake (only whether it speaks TLS at all)."""
    return await _probe(host, port, tls=True) is not None


def _redis_ping_checking_tls(redis: Redis, url: str) -> Callable[[], Awaitable[Any]]:
    """`redis.ping`, telling a TLS mismatch (permanent) from a server that is away:
    - rediss:// to a plain Redis: the server reads the TLS hello as an unfinished inline
      command and the handshake hangs until the connect timeout (5 s, times the retries);
      if the ping has not answered within PROBE_TIMEOUT_S, a plain PING is tried;
    - redis:// to a TLS port: the server resets the connection; a TLS handshake is tried.
    The probes run only on a slow or failed ping, never on a healthy boot."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 6379

    async def ping() -> Any:
        if parts.scheme == "unix":
            return await redis.ping()
        pinging = asyncio.ensure_future(redis.ping())
        try:
            if parts.scheme == "rediss":
                await asyncio.wait({pinging}, timeout=PROBE_TIMEOUT_S)
                if not pinging.done() and await _plain_redis_answers(host, port):
                    raise TlsMismatch(
                        "a plain Redis answers there, it does not speak TLS: use redis:// instead of rediss://"
                    )
            return await pinging
        except (RedisConnectionError, OSError) as exc:
            text = " ".join(str(e) for e in _chain(exc)).lower()
            reset = "reset by peer" in text or "closed by server" in text or "connection closed" in text
            if parts.scheme == "redis" and reset and await _tls_answers(host, port):
                raise TlsMismatch(
                    "it speaks only TLS: use rediss:// instead of redis:// (with ?ssl_ca_certs=<file> if its "
                    "certificate comes from a private CA)"
                ) from None
            raise
        finally:
            if not pinging.done():
                pinging.cancel()
                await asyncio.gather(pinging, return_exceptions=True)

    return ping


async def _name_keys(settings: Settings, redis: Redis) -> Redis | RedisCluster:
    """The client of the server's kind, and this process's key names: hash-tagged on a
    Redis Cluster (or with REDIS_HASH_TAGS=on); keys stored under the other names are
    moved once (shards/cluster.py)."""
    client = await cluster_aware(redis, settings.redis_url)
    tagged = isinstance(client, RedisCluster) or settings.redis_hash_tags
    use_hash_tags(tagged)
    raw = make_cluster_redis if isinstance(client, RedisCluster) else make_redis
    try:
        if isinstance(client, RedisCluster):
            await client.initialize()
            masters = len(client.get_primaries())
            log_system_event("INFO", "BOOT", f"Redis Cluster of {masters} masters: per-symbol keys carry a hash tag")
        moved = await migrate_key_names(client, lambda: raw(settings.redis_url, decode_responses=False), tagged)
    except BaseException:
        await client.aclose()
        raise
    if moved:
        scheme = "with hash tags (`ohlcv:{SYMBOL}:...`)" if tagged else "without hash tags (`ohlcv:SYMBOL:...`)"
        log_system_event("INFO", "BOOT", f"renamed {moved} Redis keys to their names {scheme}")
    return client


async def connect_redis(settings: Settings) -> tuple[Redis, bool]:
    """Connect at boot; return the client and whether TimeSeries is to be used."""
    check_certificate_files("REDIS_URL", settings.redis_url)
    redis = make_redis(settings.redis_url)
    hint = "check REDIS_URL or run `make services`"
    try:
        ping = _redis_ping_checking_tls(redis, settings.redis_url)
        await _wait_for("Redis", settings.redis_url, ping, settings.boot_wait_s, hint)
        redis = await _name_keys(settings, redis)
        if settings.candle_store == "zset":
            log_system_event("INFO", "BOOT", "REDIS_CANDLE_STORE=zset: candles go to the sorted-set store")
            return redis, False
        problem = await timeseries_problem(redis)
    except BaseException:
        await redis.aclose()
        raise
    if settings.candle_store == "timeseries" and problem:
        await redis.aclose()
        raise BootError(
            f"Redis at {mask_url(settings.redis_url)} cannot be used for TimeSeries ({problem}) and "
            "REDIS_CANDLE_STORE=timeseries: use Redis Stack (redistimeseries.so) with a user allowed the TS.* "
            "commands, or set REDIS_CANDLE_STORE=auto to use the sorted-set store"
        )
    if problem:
        log_system_event(
            "WARNING", "BOOT", f"Redis without usable TimeSeries ({problem}): candles go to the sorted-set store"
        )
    return redis, problem is None


# Query parameters libpq knows and asyncpg does not: asyncpg would send them to the
# server as settings, which refuses them ("unrecognized configuration parameter").
LIBPQ_ONLY_PARAMS = frozenset(
    {
        "channel_binding",
        "client_encoding",
        "fallback_application_name",
        "gssdelegation",
        "gssencmode",
        "hostaddr",
        "keepalives",
        "keepalives_count",
        "keepalives_idle",
        "keepalives_interval",
        "load_balance_hosts",
        "replication",
        "require_auth",
        "requiressl",
        "sslcertmode",
        "sslcompression",
        "sslsni",
        "tcp_user_timeout",
    }
)


def pg_connect_options(url: str) -> tuple[str, dict[str, Any], list[str]]:
    """(DSN for asyncpg, connect options, libpq-only parameters left out) from a URL
    as hosted providers hand them out (Neon: `sslmode=require&channel_binding=require`)."""
    parts = urlsplit(url)
    kept: list[tuple[str, str]] = []
    options: dict[str, Any] = {"timeout": 10.0}
    dropped: list[str] = []
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name == "connect_timeout":
            try:
                seconds = float(value)
            except ValueError:
                raise ConfigError(f"POSTGRES_URL has connect_timeout={value!r}: use a number of seconds") from None
            if seconds > 0:
                options["timeout"] = seconds
        elif name in LIBPQ_ONLY_PARAMS:
            dropped.append(name)
        else:
            kept.append((name, value))
    return urlunsplit(parts._replace(query=urlencode(kept))), options, dropped


async def behind_pooler(conn: asyncpg.Connection) -> bool:
    """PgBouncer and its kind answer the startup with a process id of their own, not
    the server backend's: then prepared statements and LISTEN do not survive between
    transactions (transaction pooling)."""
    return conn.get_server_pid() != await conn.fetchval("SELECT pg_backend_pid()")


async def connect_pg(settings: Settings, **pool_options: Any) -> asyncpg.Pool:
    """Create the asyncpg pool at boot, waiting a bounded time for the server. Behind
    a connection pooler (detected, or POSTGRES_POOLER=yes) statements are not cached."""
    check_certificate_files("POSTGRES_URL", settings.postgres_url)
    dsn, connect_options, dropped = pg_connect_options(settings.postgres_url)
    options: dict[str, Any] = dict(
        min_size=1, max_size=settings.pg_pool_max, command_timeout=20, max_inactive_connection_lifetime=300
    )
    options.update(pool_options)
    log = logging.getLogger("BOOT")
    if dropped:
        log.info("POSTGRES_URL: %s left out (libpq-only; asyncpg does not use them)", ", ".join(dropped))

    async def attempt() -> asyncpg.Pool:
        pooled = settings.postgres_pooler == "yes"
        if settings.postgres_pooler == "auto":
            conn = await asyncpg.connect(dsn, statement_cache_size=0, **connect_options)
            try:
                pooled = await behind_pooler(conn)
            finally:
                await conn.close()
        if pooled:
            log.info("PostgreSQL is behind a connection pooler: no prepared statements are cached")
            options["statement_cache_size"] = 0
            options.pop("server_settings", None)  # poolers refuse startup parameters they do not know
            options.setdefault("max_cached_statement_lifetime", 0)
        return await asyncpg.create_pool(dsn, **connect_options, **options)

    return await _wait_for(
        "PostgreSQL", settings.postgres_url, attempt, settings.boot_wait_s, "check POSTGRES_URL or run `make services`"
    )


async def wait_for_schema(pool: asyncpg.Pool, wait_s: float) -> None:
    """A process that reads the schema (the web process, `feed-v4 tickers`) started
    beside a daemon that is still migrating waits up to `wait_s` for it, then gives up."""
    deadline, told = time.monotonic() + wait_s, False
    with refused_at_boot("checking the schema"):
        while pending := await pending_migrations(pool):
            if time.monotonic() >= deadline:
                raise BootError(
                    f"the database lacks migrations {', '.join(pending[:3])}{' ...' if len(pending) > 3 else ''}: "
                    "start the daemon or run `feed-v4 migrate` (python feed_v4_main.py migrate)"
                )
            if not told:
                logging.getLogger("BOOT").info(
                    "waiting up to %.0f s for the schema: %d migrations not applied yet", wait_s, len(pending)
                )
                told = True
            await asyncio.sleep(1.0)
