"""The daemon's boot: bad configuration ends it with one clear line and exit code 2."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import asyncpg
import redis
from daemon import MAIN, PROJECT, run_main
from servers import free_port


def assert_one_line_failure(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("feed_v4:")]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_unparseable_redis_url_stops_boot(pg_url):
    result = run_main({"REDIS_URL": "redis://host:port", "POSTGRES_URL": pg_url}, "migrate")
    assert_one_line_failure(result, "REDIS_URL is not a valid URL")


def test_wrong_postgres_port_stops_boot_after_a_bounded_wait(redis_stack_server):
    started = time.monotonic()
    result = run_main(
        {"REDIS_URL": redis_stack_server.url, "POSTGRES_URL": f"postgresql://postgres@127.0.0.1:{free_port()}/x"},
        "migrate",
    )
    assert_one_line_failure(result, "PostgreSQL at", "unreachable", "POSTGRES_URL")
    assert time.monotonic() - started < 30


def test_wrong_redis_port_stops_boot(pg_url):
    result = run_main({"REDIS_URL": f"redis://127.0.0.1:{free_port()}/0", "POSTGRES_URL": pg_url})
    assert_one_line_failure(result, "Redis at", "unreachable", "REDIS_URL")


def test_redis_without_timeseries_is_refused_when_the_fallback_is_off(plain_redis_server, pg_url):
    result = run_main({"REDIS_URL": plain_redis_server.url, "POSTGRES_URL": pg_url, "REDIS_CANDLE_STORE": "timeseries"})
    assert_one_line_failure(result, "no TimeSeries module", "REDIS_CANDLE_STORE")


def test_unknown_database_stops_boot(redis_stack_server, pg_url):
    result = run_main({"REDIS_URL": redis_stack_server.url, "POSTGRES_URL": pg_url.rsplit("/", 1)[0] + "/nope_db"})
    assert_one_line_failure(result, "does not exist", "nope_db", "create the database")


def test_migrate_command_applies_and_reports(pg_url):
    result = run_main({"REDIS_URL": "redis://127.0.0.1:1/0", "POSTGRES_URL": pg_url}, "migrate")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("migrations applied:")


def test_daemon_boots_on_plain_redis_and_stops_cleanly_on_sigterm(plain_redis_server, pg_url):
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "POSTGRES_URL")}
    env.update(
        {"REDIS_URL": plain_redis_server.url, "POSTGRES_URL": pg_url, "SYMBOLS": "BTCUSDT", "FEED_ENABLED": "false"}
    )
    process = subprocess.Popen([sys.executable, MAIN], env=env, cwd=PROJECT, stderr=subprocess.PIPE, text=True)
    output = []
    for line in process.stderr:
        output.append(line)
        if "router" in line and "started" in line:
            break
    # The signal router runs inside the daemon: an entry is logged and acknowledged.
    redis_cli = redis.Redis.from_url(plain_redis_server.url, decode_responses=True)
    redis_cli.xadd(
        "signals_stream",
        {"symbol": "BTCUSDT", "message": "no such phrase", "bar_time": "1770163200000", "sent_at": "1770163201000"},
    )
    deadline = time.monotonic() + 10
    while redis_cli.xpending("signals_stream", "signal_processor")["pending"] or not asyncio.run(_logged(pg_url)):
        assert time.monotonic() < deadline, "the router in the daemon did not log the signal"
        time.sleep(0.1)
    redis_cli.close()
    process.send_signal(signal.SIGTERM)
    _, rest = process.communicate(timeout=10)
    text = "".join(output) + rest
    assert process.returncode == 0, text
    assert "sorted-set store" in text
    assert "(candle store in use: zset;" in text  # the store chosen, not `auto`
    assert "storage: postgresql" in text  # and the storage mode, detected once
    assert "candle_store=auto" in text


async def _logged(pg_url: str) -> bool:
    conn = await asyncpg.connect(pg_url)
    try:
        return await conn.fetchval("SELECT count(*) FROM signals_v2_log WHERE status = 'ignored'") == 1
    finally:
        await conn.close()


def test_sigterm_while_boot_waits_for_a_server_exits_0_at_once(pg_url):
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "POSTGRES_URL")}
    env.update({"REDIS_URL": f"redis://127.0.0.1:{free_port()}/0", "POSTGRES_URL": pg_url, "BOOT_WAIT_S": "60"})
    process = subprocess.Popen([sys.executable, MAIN], env=env, cwd=PROJECT, stderr=subprocess.PIPE, text=True)
    output = []
    for line in process.stderr:  # boot is now retrying Redis, for up to a minute
        output.append(line)
        if "not reachable yet" in line:
            break
    signalled = time.monotonic()
    process.send_signal(signal.SIGTERM)
    _, rest = process.communicate(timeout=10)
    assert process.returncode == 0, "".join(output) + rest
    assert time.monotonic() - signalled < 3
    assert "stop requested during boot" in rest
