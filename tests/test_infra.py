"""infra.py: settings, log format, supervision, the system log and Redis retries."""

from __future__ import annotations

import asyncio
import gc
import io
import logging
import weakref
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from tcp_proxy import TcpProxy

import infra
from infra import ConfigError, SystemEventLog, load_settings, run_safe_loop

GOOD = {"REDIS_URL": "redis://127.0.0.1:6390/0", "POSTGRES_URL": "postgresql://postgres@127.0.0.1:5432/feed_v4"}


def test_settings_defaults_follow_the_spec():
    settings = load_settings(GOOD)
    assert settings.redis_candles == 250
    assert settings.indicator_retention_days == 14
    assert settings.binance_ws_url == "wss://fstream.binance.com/market"
    assert settings.binance_rest_url == "https://fapi.binance.com"
    assert settings.debug_mode is False
    assert settings.candle_store == "auto"


def test_symbols_are_normalised_and_deduplicated():
    settings = load_settings({**GOOD, "SYMBOLS": " btcusdt,ETHUSDT,,btcUSDT "})
    assert settings.symbols == ("BTCUSDT", "ETHUSDT")


def test_database_url_is_accepted_as_postgres_url():
    env = {"REDIS_URL": GOOD["REDIS_URL"], "DATABASE_URL": "postgres://u:secret@db:5432/x"}
    settings = load_settings(env)
    assert settings.postgres_url == env["DATABASE_URL"]
    assert "secret" not in repr(settings) and "secret" not in settings.describe()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"REDIS_URL": "http://localhost:6379"}, "REDIS_URL must start with"),
        ({"REDIS_URL": "redis://localhost:notaport"}, "REDIS_URL is not a valid URL"),
        ({"POSTGRES_URL": "mysql://localhost/db"}, "POSTGRES_URL must start with"),
        ({"REDIS_CANDLES": "many"}, "REDIS_CANDLES='many' is not a int"),
        ({"REDIS_CANDLES": "0"}, "REDIS_CANDLES='0' is out of range"),
        ({"DEBUG_MODE": "perhaps"}, "DEBUG_MODE='perhaps' is not a boolean"),
        ({"REDIS_CANDLE_STORE": "memcached"}, "REDIS_CANDLE_STORE='memcached'"),
        ({"BINANCE_WS_URL": "https://fstream.binance.com"}, "BINANCE_WS_URL must start with ws:// or wss://"),
    ],
)
def test_bad_settings_name_the_key(env, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_settings({**GOOD, **env})


def test_console_log_line_has_the_spec_format():
    stream = io.StringIO()
    infra.setup_logging(debug=False, stream=stream)
    logging.getLogger("AGGREGATOR").info("aggregation done: %s / %s", "BTCUSDT", "M15")
    logging.getLogger("AGGREGATOR").debug("hidden without DEBUG_MODE")
    line = stream.getvalue().strip()
    date, level, module, message = line.split(" | ")
    assert len(date) == 19 and date[4] == "-" and date[13] == ":"
    assert level == "INFO    "
    assert (module, message) == ("AGGREGATOR", "aggregation done: BTCUSDT / M15")


def test_colours_by_level_on_a_terminal():
    formatter = infra.ConsoleFormatter(colour=True)
    record = logging.LogRecord("FEED", logging.CRITICAL, __file__, 1, "down", None, None)
    assert formatter.format(record).startswith("\033[97;41m")
    record = logging.LogRecord("FEED", logging.WARNING, __file__, 1, "slow", None, None)
    assert formatter.format(record).startswith("\033[33m")


async def test_run_safe_loop_restarts_with_growing_then_reset_backoff(monkeypatch):
    sleeps: list[float] = []
    real_sleep = asyncio.sleep

    async def fake_sleep(delay):
        sleeps.append(delay)
        await real_sleep(0)

    monkeypatch.setattr(infra.asyncio, "sleep", fake_sleep)
    monkeypatch.setattr(infra.random, "uniform", lambda a, b: 1.0)
    clock = {"t": 0.0}
    monkeypatch.setattr(asyncio.get_running_loop(), "time", lambda: clock["t"])
    runs = {"n": 0}

    async def worker():
        runs["n"] += 1
        if runs["n"] == 4:
            clock["t"] += 120  # a long healthy run before this crash
        if runs["n"] < 6:
            raise ValueError(f"boom {runs['n']}")

    await run_safe_loop(worker, "TEST", retry_delay=1.0, max_delay=3.0, healthy_after_s=60)
    assert runs["n"] == 6
    assert sleeps == [1.0, 2.0, 3.0, 1.0, 2.0]
    rows = [r for r in infra.system_event_log.pending if r[2] == "TEST"]
    assert len(rows) >= 5 and "boom 1" in rows[0][3]


async def test_system_log_survives_postgres_outage(pool, pg_url):
    """Events recorded while PostgreSQL is unreachable are all written once it is back."""
    parts = urlsplit(pg_url)
    proxy = await TcpProxy(parts.hostname, parts.port or 5432).start()
    proxied = urlunsplit(parts._replace(netloc=f"{parts.username}@127.0.0.1:{proxy.port}"))
    proxied_pool = await asyncpg.create_pool(proxied, min_size=1, max_size=2, timeout=2)
    events = SystemEventLog(capacity=1000, batch_size=50)
    flusher = asyncio.create_task(events.run_flusher(proxied_pool, interval_s=0.05))
    try:
        events.record("INFO", "TEST", "before outage")
        await _until(lambda: events.written == 1)
        proxy.set_mode("down")
        for i in range(300):
            events.record("ERROR", "TEST", f"during outage {i}", {"i": i})
        await asyncio.sleep(0.5)
        assert len(events.pending) == 300  # nothing written, nothing lost
        proxy.set_mode("pass")
        await _until(lambda: events.written == 301, timeout=15)
    finally:
        flusher.cancel()
        await proxied_pool.close()
        await proxy.close()
    rows = await pool.fetch("SELECT message, details FROM system_log_v4 WHERE module = 'TEST' ORDER BY id")
    assert [r["message"] for r in rows] == ["before outage"] + [f"during outage {i}" for i in range(300)]
    assert rows[-1]["details"] == '{"i": 299}'


async def test_system_log_buffer_is_bounded_and_reports_drops(pool):
    events = SystemEventLog(capacity=10, batch_size=100)
    for i in range(25):
        events.record("WARNING", "TEST", f"event {i}")
    assert len(events.pending) == 10 and events.dropped == 15
    await events.flush(pool)
    messages = [r["message"] for r in await pool.fetch("SELECT message FROM system_log_v4 ORDER BY id")]
    assert messages[0] == "15 system log events were dropped while PostgreSQL was unreachable"
    assert messages[1:] == [f"event {i}" for i in range(15, 25)]


def test_recording_never_raises():
    events = SystemEventLog(capacity=5)
    events.record("NOISE", "TEST", "odd level", {"obj": object()})
    assert events.pending[-1][1] == "INFO"


async def test_redis_client_survives_killed_connections(redis):
    await redis.set("k", "v")
    await redis.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "no")
    assert await redis.get("k") == "v"
    for _ in range(3):
        await redis.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "no")
        assert await redis.set("k2", "v2")


async def _until(predicate, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


def _rss_mb() -> float:
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) / 1024


def test_freed_heap_goes_back_to_the_os():
    """glibc keeps freed heap: RSS stays at its peak until it is trimmed."""
    blobs = [bytes(1000) + bytes([i % 256]) for i in range(150_000)]  # ~150 MB of malloc'd objects
    peak = _rss_mb()
    kept = blobs[::1000]  # what a long-lived process keeps: the free pages lie between them
    del blobs
    held = _rss_mb()
    infra.release_free_memory()
    assert held > peak - 50  # freed, but still held by the process
    assert _rss_mb() < held - 100
    assert len(kept) == 150


class _Cyclic:
    def __init__(self) -> None:
        self.me = self


def test_tidying_the_heap_collects_and_freezes_and_hourly_thaws():
    """Garbage cycles go; the survivors are frozen (a full collection no longer rescans
    them); the hourly full tidy collects cycles that died while frozen."""
    try:
        dead = _Cyclic()
        dead_ref = weakref.ref(dead)
        kept = _Cyclic()
        kept_ref = weakref.ref(kept)
        del dead
        infra.tidy_heap()
        assert dead_ref() is None
        assert gc.get_freeze_count() > 0
        del kept  # a cycle that dies while frozen
        gc.collect()
        assert kept_ref() is not None
        infra.tidy_heap(full=True)
        assert kept_ref() is None
    finally:
        gc.unfreeze()
