"""The hosted-server matrix: the whole daemon (`python feed_v4_main.py`, every worker)
against the servers hosted plans give users (tests/hosted.py), replaying real February
2026 candles from the fake exchange. Each setup either boots and runs (every candle
stored exactly as the archive has it, announced, indicator values equal to TA-Lib,
SIGTERM exits 0) or the process exits 2 with one line on stderr saying what to change,
quickly when waiting cannot help, and never with the password in it.

| setup | the daemon's URL | outcome |
|---|---|---|
| PgBouncer 1.18, transaction mode | `postgresql://...` (the pooler's port) | runs, pooler detected |
| Redis ACL user without @admin, @dangerous, TS.* | `redis://user:pw@...` | runs on the sorted-set store (`auto`) |
| TLS Redis, private CA | `rediss://...?ssl_ca_certs=<ca.pem>` | runs on TimeSeries |
| PostgreSQL accepting only TLS | `?sslmode=require`, Neon's `&channel_binding=require&connect_timeout=10` | runs |
| the same with the CA | `?sslmode=verify-full&sslrootcert=<ca.pem>` | boots |
| each one misconfigured, malformed URLs | | exit 2, one line |
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import asyncpg
import pytest
from daemon import DaemonProcess, run_main
from hosted import PgBouncer, RestrictedRedisServer, SslPostgresServer, TlsRedisServer
from redis.asyncio import Redis
from replay import (
    HISTORY_M1,
    M1,
    START,
    candle_mismatches,
    daemon_env,
    diagnose,
    pause_mid_minute,
    timeframes_in_use,
    unannounced,
    until,
)
from servers import PostgresServer, RedisServer, database_url, drop_database, free_port, recreate_database, setting

import core_io
from candles import BASE_TIMEFRAMES, TF_MS, ms_to_datetime
from connections import connect_pg
from fake_exchange import ArchiveSource, FakeExchange
from infra import load_settings, make_redis
from migrations import apply_migrations, discover
from signals_v4_main import RouterOptions, SignalRouter
from tests.indicator_reference import COMMON_CASES, configure, talib_mismatches

pytestmark = pytest.mark.timeout(120)

SYMBOLS = ["LINKUSDT", "NEARUSDT"]
# A few of each kind (moving averages, oscillators, bands, trend), checked against
# TA-Lib; the whole common set is the fault tests' business.
INDICATORS = [case for case in COMMON_CASES if case[0] in ("ema", "rsi", "macd", "bbands", "atr", "supertrend")]
SPEED = 600  # 10 simulated minutes a second
ARCHIVE_MINUTES = 360  # the replay never reaches the end of what the exchange has
RUN_S = 8.0  # live replay once the daemon has caught up: ~80 minutes, sixteen M5 buckets
BOOT_WAIT_S = "30"  # the default: a problem waiting cannot cure must not wait for it
AT_ONCE_S = 5.0  # a process start (~1 s) and one failed connection, not BOOT_WAIT_S
DB_NAME = f"feed_v4_hosted_{os.getpid()}"

ROUTER_LISTEN_PROBE_S = 15.0  # signals_v4_main.LISTEN_PING_S: the router's LISTEN connection is queried this often


def record(scenario: str, outcome: str) -> None:
    """The scenario's outcome, for `pytest -s` (the figures the README quotes)."""
    print(f"\n[hosted] {scenario}: {outcome}")


# --------------------------------------------------------------------------- servers


@pytest.fixture(scope="module")
def bouncer() -> Iterator[PgBouncer]:
    """PgBouncer in transaction mode in front of the test PostgreSQL, every database."""
    with PgBouncer(setting("POSTGRES_URL")) as server:
        yield server


@pytest.fixture
async def fresh_db() -> AsyncIterator[str]:
    """An empty database on the test PostgreSQL: its URL (direct)."""
    url = await recreate_database(setting("POSTGRES_URL"), DB_NAME)
    yield url
    await drop_database(setting("POSTGRES_URL"), DB_NAME)


@pytest.fixture
async def ssl_db(ssl_pg: SslPostgresServer) -> AsyncIterator[str]:
    """An empty database on the TLS-only server, migrated: its `sslmode=require` URL."""
    url = await recreate_database(ssl_pg.url, DB_NAME)
    async with asyncpg.create_pool(url, min_size=1, max_size=2) as pool:
        await apply_migrations(pool)
    yield url
    await drop_database(ssl_pg.url, DB_NAME)


# --------------------------------------------------------------------------- a daemon that runs


@dataclass
class Run:
    """A daemon's run: what the test sees of its servers and what it printed."""

    name: str
    pool: asyncpg.Pool  # the test's own connections to the daemon's data
    redis: Redis
    use_timeseries: bool
    output: str = ""
    stop_s: float = 0.0
    stored: int = 0
    checked_values: int = 0
    details: dict[str, object] = field(default_factory=dict)


async def stored_up_to(pool: asyncpg.Pool, redis: Redis, minute: int) -> bool:
    """Every symbol has `minute` stored, no gap open, its M1 indicators computed there."""
    newest = await core_io.last_m1_open_times(pool, SYMBOLS)
    if any(newest.get(s, 0) < minute for s in SYMBOLS):
        return False
    if await pool.fetchval("SELECT count(*) FROM missing_m1_log_v4 WHERE status = 'missing'"):
        return False
    for symbol in SYMBOLS:
        if int(await redis.hget(core_io.indicator_key(symbol, "m1"), "open_time") or 0) < minute:
            return False
    return True


SIGNAL = {"symbol": "LINKUSDT", "message": "hosted matrix", "bar_time": str(START), "sent_at": str(START + 1000)}


async def signal_logged(run: Run) -> bool:
    """The router logged the signal in PostgreSQL and acknowledged it in Redis."""
    status = await run.pool.fetchval("SELECT status FROM signals_v2_log WHERE message = $1", SIGNAL["message"])
    if status is None:
        return False
    assert status == "ignored", status
    pending = await run.redis.xpending(core_io.SIGNALS_STREAM, core_io.SIGNAL_GROUP)
    return pending["pending"] == 0


async def mismatches(run: Run, source: ArchiveSource, last_closed: int) -> tuple[int, int, list[tuple]]:
    """(candles expected, stored, every difference): candles against the archive, the
    Redis candle cache of the store in use against PostgreSQL, announcements, the gap
    log, the newest indicator hashes and every stored indicator value against TA-Lib."""
    expected, stored, wrong = await candle_mismatches(run.pool, run.redis, source, SYMBOLS, last_closed)
    # candle_mismatches reads the TimeSeries cache; the cache of the store in use is read here.
    wrong = [w for w in wrong if "Redis candle cache" not in str(w[-1])]
    store = core_io.make_candle_store(run.redis, run.use_timeseries, 250)
    first = START - (HISTORY_M1 + 30) * M1
    for symbol in SYMBOLS:
        for tf in await timeframes_in_use(run.pool):
            in_pg = await core_io.fetch_candles(run.pool, symbol, tf, first, last_closed + M1)
            in_pg = [c for c in in_pg if c.open_time + TF_MS[tf] <= last_closed + M1]
            cached = (await store.read_last_many([(symbol, tf)], 250))[(symbol, tf)]
            if not cached or cached != [c.to_bar() for c in in_pg[-250:]]:
                wrong.append((symbol, tf, "Redis candle cache differs from PostgreSQL"))
            value_at = int(await run.redis.hget(core_io.indicator_key(symbol, tf), "open_time") or 0)
            if tf in BASE_TIMEFRAMES and value_at != in_pg[-1].open_time:  # the default instances
                wrong.append((symbol, tf, "Redis indicators are not at the newest bar", value_at))
    wrong += await unannounced(run.pool, run.redis)
    gaps = await run.pool.fetch("SELECT symbol, open_time, status FROM missing_m1_log_v4 WHERE status <> 'backfilled'")
    wrong += [(r["symbol"], r["open_time"], f"gap left {r['status']}") for r in gaps]
    run.checked_values, indicator_wrong = await talib_mismatches(run.pool, SYMBOLS)
    return expected, stored, wrong + indicator_wrong


async def run_daemon(
    run: Run, redis_url: str, pg_url: str, env: dict[str, str] | None = None, seed: int = 7, run_s: float = RUN_S
) -> Run:
    """The daemon on these URLs replays the archive until it has caught up, `run_s`
    more, then stops mid-minute, settles and gets SIGTERM; everything is compared."""
    source = ArchiveSource(SYMBOLS, start_ms=START - (HISTORY_M1 + 30) * M1, end_ms=START + ARCHIVE_MINUTES * M1)
    exchange = FakeExchange(source, start_ms=START, speed=SPEED, seed=seed)
    await exchange.start()
    await configure(run.pool, INDICATORS)
    daemon = DaemonProcess({**daemon_env(exchange, redis_url, pg_url, SYMBOLS), **(env or {})})
    started = time.monotonic()
    try:
        daemon.start()

        async def caught_up() -> bool:
            assert daemon.alive(), daemon.output()[-4000:]
            target = (exchange.clock.now_ms() - 5_000) // M1 * M1 - M1
            return await stored_up_to(run.pool, run.redis, target)

        await until(caught_up, 60, f"{run.name}: the daemon to boot and catch up", interval=0.1)
        run.details["ready_s"] = round(time.monotonic() - started, 1)
        # A trading signal through the router (its phrase is unknown: logged 'ignored').
        await run.redis.xadd(core_io.SIGNALS_STREAM, SIGNAL)
        deadline = time.monotonic() + run_s
        while time.monotonic() < deadline:
            assert daemon.alive(), daemon.output()[-4000:]
            await asyncio.sleep(0.1)
        last_closed = await pause_mid_minute(exchange)
        try:
            await until(lambda: stored_up_to(run.pool, run.redis, last_closed), 60, f"{run.name}: the daemon to settle")
        except AssertionError:
            print(await diagnose(run.pool, daemon, last_closed))
            raise
        await until(lambda: signal_logged(run), 20, f"{run.name}: the router to log the signal")
        stopping = time.monotonic()
        code = await asyncio.to_thread(daemon.terminate)  # the exchange serves on this loop meanwhile
        run.stop_s = time.monotonic() - stopping
        run.output = daemon.output()
        assert code == 0, f"SIGTERM gave {code}:\n{run.output[-6000:]}"
        assert run.stop_s < 10, run.stop_s
        expected, run.stored, wrong = await mismatches(run, source, last_closed)
        assert not wrong, f"{len(wrong)} mismatches, e.g. {wrong[:10]}"
        assert run.stored == expected
    finally:
        daemon.cleanup()
        await exchange.stop()
    await assert_ran(run)
    record(
        run.name,
        f"runs: ready in {run.details['ready_s']} s, {run.stored} candles match the archive, "
        f"{run.checked_values} indicator values match TA-Lib, a signal routed (logged, acked), "
        f"SIGTERM exit 0 in {run.stop_s:.1f} s",
    )
    return run


async def assert_ran(run: Run) -> None:
    """What every run must show besides the exact data: live candles on every timeframe
    (M5 built from candles replayed after boot, not only the REST history), announced,
    indicator values in PostgreSQL, and no worker crash or error anywhere."""
    live = ms_to_datetime(START)
    for tf in ("m1", "m5"):
        count = await run.pool.fetchval(f"SELECT count(*) FROM {core_io.candle_table(tf)} WHERE open_time >= $1", live)
        assert count >= len(SYMBOLS) * (2 if tf == "m5" else 10), (tf, count)
        assert await run.redis.xlen(core_io.CANDLE_STREAMS[tf]) > 0
    assert await run.pool.fetchval("SELECT count(*) FROM indicator_values_v4 WHERE open_time >= $1", live) > 0
    assert await run.redis.xlen(core_io.INDICATORS_READY_STREAM) > 0
    errors = await run.pool.fetch(
        "SELECT level, module, message FROM system_log_v4 WHERE level IN ('ERROR', 'CRITICAL') ORDER BY id"
    )
    # A connection that sent libpq-only URL parameters (Neon's channel_binding) as settings.
    refused_settings = sorted(set(re.findall(r'unrecognized configuration parameter "\w+"', run.output)))
    assert not refused_settings, f"a PostgreSQL connection was made with the raw URL: {refused_settings}"
    assert not errors, [tuple(r) for r in errors]
    assert "Traceback" not in run.output, run.output[-6000:]
    assert "daemon stopped in" in run.output


# --------------------------------------------------------------------------- a daemon that refuses to boot


@dataclass
class Refusal:
    line: str
    seconds: float
    stderr: str


def refuses(env: dict[str, str], *args: str, secret: str | None = None, at_once: bool = True) -> Refusal:
    """`python feed_v4_main.py` exits 2 with exactly one `feed_v4:` line on stderr (the
    last); `at_once`: nothing else either (no waiting, no retry warnings) and quickly."""
    started = time.monotonic()
    done = run_main({"BOOT_WAIT_S": BOOT_WAIT_S, **env}, *args, timeout=90)
    seconds = time.monotonic() - started
    everything = done.stdout + done.stderr
    assert done.returncode == 2, f"exit {done.returncode}:\n{everything[-4000:]}"
    lines = done.stderr.strip().splitlines()
    ours = [line for line in lines if line.startswith("feed_v4:")]
    assert len(ours) == 1 and lines[-1] == ours[0], done.stderr
    assert "Traceback" not in everything, everything
    if at_once:
        assert lines == ours, done.stderr
        assert seconds < AT_ONCE_S, (seconds, done.stderr)
    if secret is not None:
        assert secret not in everything, everything
    return Refusal(ours[0], seconds, done.stderr)


def refused(scenario: str, refusal: Refusal) -> None:
    record(scenario, f"exit 2 after {refusal.seconds:.1f} s: {refusal.line}")


# --------------------------------------------------------------------------- 1. PgBouncer, transaction mode


def applied_by(stdout: str) -> list[str]:
    """The migrations a `migrate` applied (its line before the storage mode's)."""
    lines = stdout.strip().splitlines()
    assert len(lines) >= 2 and lines[-1].startswith("storage: "), stdout
    line = lines[-2]
    assert line.startswith("migrations applied: "), stdout
    names = line.removeprefix("migrations applied: ")
    return [] if names.startswith("none") else names.split(", ")


@pytest.mark.timeout(150)
async def test_pgbouncer_transaction_mode(bouncer: PgBouncer, fresh_db: str, redis: Redis, redis_url: str) -> None:
    via_pooler = bouncer.url_for(DB_NAME)
    # Two `migrate` at once through the pooler, on an empty database: each file applied once.
    env = {"POSTGRES_URL": via_pooler, "REDIS_URL": redis_url, "BOOT_WAIT_S": "10"}
    both = await asyncio.gather(*(asyncio.to_thread(run_main, env, "migrate") for _ in range(2)))
    for done in both:
        assert done.returncode == 0, done.stdout + done.stderr
        assert "behind a connection pooler" in done.stderr
    applied = applied_by(both[0].stdout) + applied_by(both[1].stdout)
    names = [m.name for m in discover()]
    assert sorted(applied) == sorted(names), [d.stdout for d in both]
    async with asyncpg.create_pool(fresh_db, min_size=1, max_size=4) as pool:
        rows = await pool.fetch("SELECT name FROM schema_migrations ORDER BY version")
        assert [r["name"] for r in rows] == names
        record(
            "PgBouncer: two `migrate` at once",
            f"exit 0 and 0, applied {len(applied_by(both[0].stdout))} + {len(applied_by(both[1].stdout))} "
            f"of {len(names)} migrations, each once",
        )
        # Longer than the router's LISTEN probe (a query every 15 s on its own connection).
        run = Run("PgBouncer (transaction mode)", pool, redis, True)
        await run_daemon(run, redis_url, via_pooler, run_s=ROUTER_LISTEN_PROBE_S + 3)
        assert "PostgreSQL is behind a connection pooler: no prepared statements are cached" in run.output
        statement_errors = await pool.fetchval(
            "SELECT count(*) FROM system_log_v4 WHERE message ILIKE '%prepared statement%' "
            "OR details::text ILIKE '%prepared statement%'"
        )
        assert statement_errors == 0
        assert 'prepared statement "' not in run.output and "__asyncpg_stmt_" not in run.output
        # The daemon's queries went through the pooler.
        assert f"{DB_NAME}" in bouncer.log_path.read_text()


# --------------------------------------------------------------------------- 2. Redis ACL user without admin/TS


async def acl_denials(admin: Redis) -> dict[str, int]:
    """Commands refused to the restricted user since the last ACL LOG RESET, with counts."""
    denied: dict[str, int] = {}
    for entry in await admin.acl_log():
        if entry.get("username") == RestrictedRedisServer.USER:
            name = str(entry.get("object"))
            denied[name] = denied.get(name, 0) + int(entry.get("count", 1))
    return denied


@pytest.mark.timeout(150)
async def test_restricted_redis_user_runs_on_the_sorted_set_store(
    restricted_redis: RestrictedRedisServer, pool: asyncpg.Pool, pg_url: str
) -> None:
    admin = make_redis(restricted_redis.admin_url)
    try:
        await admin.flushall()
        await admin.execute_command("ACL", "LOG", "RESET")
        run = await run_daemon(
            Run("Redis ACL user (no @admin, @dangerous, TS.*)", pool, admin, False),
            restricted_redis.url,
            pg_url,
            {"REDIS_CANDLE_STORE": "auto"},
        )
        assert "Redis without usable TimeSeries (the user may not run the TimeSeries commands" in run.output
        assert "candles go to the sorted-set store" in run.output
        assert not await admin.keys("ohlcv:*:m1:c")  # no TimeSeries key: the sorted sets hold the candles
        assert await admin.exists(core_io.candle_zset_key("LINKUSDT", "m1"))
        # `status` too, as the restricted user.
        status = run_main({"REDIS_URL": restricted_redis.url, "POSTGRES_URL": pg_url}, "status", "--json")
        assert status.returncode in (0, 1) and "Traceback" not in status.stderr, status.stderr
        assert '"tickers"' in status.stdout or "LINKUSDT" in status.stdout, status.stdout[-2000:]
        # What the ACL refused, daemon and status together: only the boot's TimeSeries probe.
        denied = await acl_denials(admin)
        assert set(denied) == {"ts.create"}, denied
        record("Redis ACL user: commands refused (ACL LOG)", f"{denied}")
    finally:
        await admin.aclose()


def test_restricted_redis_user_with_timeseries_required_exits_2(
    restricted_redis: RestrictedRedisServer, pg_url: str
) -> None:
    env = {"REDIS_URL": restricted_redis.url, "POSTGRES_URL": pg_url, "REDIS_CANDLE_STORE": "timeseries"}
    refusal = refuses(env, secret=restricted_redis.password)
    assert "TimeSeries" in refusal.line and "REDIS_CANDLE_STORE=auto" in refusal.line
    assert "no permissions to run the 'ts.create' command" in refusal.line
    refused("Redis ACL user, REDIS_CANDLE_STORE=timeseries", refusal)


def test_restricted_redis_user_with_a_wrong_password_exits_2_at_once(
    restricted_redis: RestrictedRedisServer, pg_url: str
) -> None:
    secret = "wrong-Pass-4471"
    env = {"REDIS_URL": restricted_redis.url.replace(restricted_redis.password, secret), "POSTGRES_URL": pg_url}
    refusal = refuses(env, secret=secret)
    assert "password was refused" in refusal.line and "REDIS_URL" in refusal.line
    refused("Redis ACL user, wrong password", refusal)


# --------------------------------------------------------------------------- 3. TLS Redis with a private CA


@pytest.mark.timeout(150)
async def test_tls_redis_with_the_ca_runs(tls_redis: TlsRedisServer, pool: asyncpg.Pool, pg_url: str) -> None:
    assert tls_redis.url.startswith("rediss://") and "ssl_ca_certs=" in tls_redis.url
    view = make_redis(tls_redis.url)
    try:
        await view.flushall()
        run = await run_daemon(Run("TLS Redis, private CA (ssl_ca_certs=)", pool, view, True), tls_redis.url, pg_url)
        assert "sorted-set store" not in run.output
        assert await view.exists(core_io.candle_series_key("LINKUSDT", "m1", "c"))
    finally:
        await view.aclose()


def test_tls_redis_without_the_ca_exits_2_at_once(tls_redis: TlsRedisServer, pg_url: str) -> None:
    refusal = refuses({"REDIS_URL": tls_redis.url_without_ca, "POSTGRES_URL": pg_url})
    assert "certificate" in refusal.line and "ssl_ca_certs" in refusal.line
    refused("TLS Redis without ssl_ca_certs (BOOT_WAIT_S=30)", refusal)


def test_plain_redis_url_to_the_tls_port_exits_2(tls_redis: TlsRedisServer, pg_url: str) -> None:
    # The server resets the connection, as one that is restarting might: a TLS handshake
    # tells them apart, so this does not wait for BOOT_WAIT_S either.
    env = {"REDIS_URL": tls_redis.plain_url, "POSTGRES_URL": pg_url, "BOOT_WAIT_S": "3"}
    refusal = refuses(env)
    assert "rediss://" in refusal.line and "ssl_ca_certs" in refusal.line
    refused("redis:// to the TLS port (BOOT_WAIT_S=3)", refusal)


def test_rediss_url_to_a_plain_redis_exits_2_at_once(plain_redis_server: RedisServer, pg_url: str) -> None:
    url = plain_redis_server.url.replace("redis://", "rediss://")
    refusal = refuses({"REDIS_URL": url, "POSTGRES_URL": pg_url})
    assert "does not speak TLS" in refusal.line and "redis://" in refusal.line
    refused("rediss:// to a plain Redis (BOOT_WAIT_S=30)", refusal)


# --------------------------------------------------------------------------- 4. PostgreSQL requiring SSL

NEON_STYLE = "&channel_binding=require&connect_timeout=10"


@pytest.mark.timeout(150)
@pytest.mark.parametrize("style", ["sslmode=require", "Neon-style"])
async def test_ssl_postgres_runs(style: str, ssl_db: str, redis: Redis, redis_url: str) -> None:
    url = ssl_db + (NEON_STYLE if style == "Neon-style" else "")
    async with asyncpg.create_pool(ssl_db, min_size=1, max_size=4) as pool:
        assert await pool.fetchval("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()") is True
        run = await run_daemon(Run(f"PostgreSQL TLS only, {style} URL", pool, redis, True), redis_url, url)
        connections = await pool.fetchval(
            "SELECT count(*) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) "
            "WHERE a.datname = current_database() AND NOT s.ssl"
        )
        assert connections == 0
    if style == "Neon-style":
        assert "POSTGRES_URL: channel_binding left out (libpq-only" in run.output


@pytest.mark.timeout(60)
async def test_ssl_postgres_verify_full_with_the_ca_boots(ssl_pg: SslPostgresServer, ssl_db: str, redis_url: str):
    verify = database_url(ssl_pg.verify_url, DB_NAME)
    assert "sslmode=verify-full&sslrootcert=" in verify
    source = ArchiveSource(SYMBOLS, start_ms=START - (HISTORY_M1 + 30) * M1, end_ms=START + ARCHIVE_MINUTES * M1)
    async with FakeExchange(source, start_ms=START, speed=SPEED, seed=3) as exchange:
        daemon = DaemonProcess(daemon_env(exchange, redis_url, verify, SYMBOLS))
        try:
            daemon.start()
            await until(lambda: "daemon started" in daemon.output() or not daemon.alive(), 30, "the daemon to boot")
            assert daemon.alive(), daemon.output()[-4000:]
            async with asyncpg.create_pool(ssl_db, min_size=1, max_size=2) as pool:
                await until(lambda: pool.fetchval("SELECT count(*) > 0 FROM ohlcv4_m1"), 30, "candles")
            code = await asyncio.to_thread(daemon.terminate)
            assert code == 0, daemon.output()[-4000:]
        finally:
            daemon.cleanup()
    record("PostgreSQL TLS only, sslmode=verify-full&sslrootcert=<ca>", "boots, stores candles, SIGTERM exit 0")


def test_ssl_postgres_with_sslmode_disable_exits_2_at_once(ssl_pg: SslPostgresServer, redis_url: str) -> None:
    refusal = refuses({"POSTGRES_URL": ssl_pg.plain_url, "REDIS_URL": redis_url})
    assert "sslmode=require" in refusal.line and "encrypted" in refusal.line
    refused("PostgreSQL TLS only, sslmode=disable", refusal)


def test_ssl_postgres_with_a_wrong_password_exits_2_at_once(ssl_pg: SslPostgresServer, redis_url: str) -> None:
    secret = "Wrong-Secret-8812"
    refusal = refuses({"POSTGRES_URL": ssl_pg.password_url(secret), "REDIS_URL": redis_url}, secret=secret)
    assert "password was refused" in refusal.line and "POSTGRES_URL" in refusal.line
    assert 'user "app"' in refusal.line
    refused("PostgreSQL, SCRAM user with a wrong password (BOOT_WAIT_S=30)", refusal)


def test_ssl_postgres_verify_full_without_the_ca_exits_2_at_once(ssl_pg: SslPostgresServer, redis_url: str) -> None:
    url = ssl_pg.url.replace("sslmode=require", "sslmode=verify-full")
    refusal = refuses({"POSTGRES_URL": url, "REDIS_URL": redis_url})
    assert "sslrootcert=" in refusal.line and "sslmode=require" in refusal.line
    refused("PostgreSQL TLS only, sslmode=verify-full without sslrootcert", refusal)


def test_ssl_postgres_user_without_create_exits_2_at_once(ssl_pg: SslPostgresServer, redis_url: str) -> None:
    """The SCRAM user logs in but may not create tables in `public` (PostgreSQL 15+)."""
    refusal = refuses({"POSTGRES_URL": ssl_pg.password_url(), "REDIS_URL": redis_url}, secret=ssl_pg.app_password)
    assert "needs to create tables" in refusal.line and "permission denied" in refusal.line
    refused("PostgreSQL, SCRAM user without CREATE on its database", refusal)


@pytest.mark.parametrize("key", ["POSTGRES_URL", "REDIS_URL"])
def test_a_certificate_file_that_is_not_there_exits_2_at_once(
    key: str, ssl_pg: SslPostgresServer, tls_redis: TlsRedisServer, tmp_path
) -> None:
    missing = tmp_path / "no-such-ca.pem"
    env = {"POSTGRES_URL": ssl_pg.verify_url, "REDIS_URL": tls_redis.url}
    if key == "POSTGRES_URL":
        env[key] = f"postgresql://postgres@127.0.0.1:{ssl_pg.port}/postgres?sslmode=verify-full&sslrootcert={missing}"
    else:
        env[key] = f"{tls_redis.url_without_ca}?ssl_ca_certs={missing}"
    refusal = refuses(env)
    param = "sslrootcert" if key == "POSTGRES_URL" else "ssl_ca_certs"
    assert f"{key} names {param}='{missing}', which does not exist" in refusal.line
    refused(f"{key} naming a CA file that does not exist", refusal)


def test_sslmode_require_against_a_plain_server_exits_2_at_once(plain_pg: PostgresServer, redis_url: str) -> None:
    refusal = refuses({"POSTGRES_URL": plain_pg.url + "?sslmode=require", "REDIS_URL": redis_url})
    assert "does not accept TLS" in refusal.line and "sslmode" in refusal.line
    refused("sslmode=require to a PostgreSQL without TLS", refusal)


# --------------------------------------------------------------------------- 5. malformed URLs

ENCODE = "percent-encoded"
MALFORMED = {
    # what: (which URL, the URL with {ssl}/{redis}/{restricted}/{nowhere} ports, the secret, the line also says)
    "POSTGRES_URL with an unencoded '@' in the password": (
        "POSTGRES_URL",
        "postgresql://app:p@ss@127.0.0.1:{ssl}/postgres",
        "p@ss",
        ENCODE,
    ),
    "POSTGRES_URL with an unencoded '/' in the password": (
        "POSTGRES_URL",
        "postgresql://app:pa/ss@host/db",
        "pa/ss",
        ENCODE,
    ),
    "REDIS_URL with an unencoded '#' in the password": (
        "REDIS_URL",
        "redis://:se#cret@host:6379/0",
        "cret",
        ENCODE,
    ),
    "REDIS_URL with ?password=, a wrong one": (
        "REDIS_URL",
        "redis://hosted_app@127.0.0.1:{restricted}/0?password=hunter2",
        "hunter2",
        "password=***",
    ),
    "REDIS_URL with ?password=, nothing listening (BOOT_WAIT_S=1)": (
        "REDIS_URL",
        "redis://127.0.0.1:{nowhere}/0?password=hunter2",
        "hunter2",
        "password=***",
    ),
}


@pytest.mark.parametrize("what", list(MALFORMED))
def test_bad_urls_exit_2_without_the_password(
    what: str, ssl_pg: SslPostgresServer, redis_stack_server: RedisServer, restricted_redis: RestrictedRedisServer
) -> None:
    key, template, secret, says = MALFORMED[what]
    ports = {"ssl": ssl_pg.port, "redis": redis_stack_server.port, "restricted": restricted_redis.port}
    env = {"POSTGRES_URL": ssl_pg.url, "REDIS_URL": redis_stack_server.url}
    env[key] = template.format(**ports, nowhere=free_port())
    unreachable = "nowhere" in template
    if unreachable:
        env["BOOT_WAIT_S"] = "1"
    refusal = refuses(env, secret=secret, at_once=not unreachable)
    assert says in refusal.line, refusal.line
    assert not re.search(r"p@ss|pa/ss|se#|hunter2", refusal.stderr)
    refused(what, refusal)


async def test_the_router_behind_pgbouncer_sees_routing_changes_without_listen(
    bouncer: PgBouncer, fresh_db: str, redis: Redis, redis_url: str
) -> None:
    """LISTEN never delivers through a pooler in transaction mode: the router polls the
    change counter instead, so a strategy added while it runs gets the next signal."""
    settings = load_settings({"REDIS_URL": redis_url, "POSTGRES_URL": bouncer.url_for(DB_NAME)})
    pool = await connect_pg(settings)
    await apply_migrations(pool)
    router = SignalRouter(settings, pool, RouterOptions(reload_s=3600, block_ms=100))
    task = asyncio.create_task(router.run())
    try:
        await until(lambda: router.running, 10, "the router")
        await until(lambda: router.snapshot_version >= 2, 10, "the first poll's reload")
        async with asyncpg.create_pool(fresh_db, min_size=1, max_size=2) as direct:
            await direct.execute("INSERT INTO tickers (symbol, status) VALUES ('NEARUSDT', 'enabled')")
            await direct.execute("INSERT INTO strategies (id, name) VALUES (7, 'pooled')")
            await direct.execute("INSERT INTO signal_phrases (id, phrase, action) VALUES (3, 'go long', 'open_long')")
            await direct.execute("INSERT INTO strategy_signals VALUES (7, 3)")
        await until(lambda: router.snapshot.counts()["mappings"] == 1, 10, "the change to reach the router")
        await redis.xadd(
            core_io.SIGNALS_STREAM,
            {"symbol": "NEARUSDT", "message": "go long", "bar_time": "1770163200000", "sent_at": "1770163201000"},
        )
        await until(lambda: redis.xlen("strategy_signals:7"), 10, "the routed signal")
    finally:
        router.stop()
        await asyncio.wait_for(task, 10)
        await pool.close()
