"""`make demo` (scripts/demo.py): its pure helpers, and one real short run against the
test servers in a database of its own."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest
from servers import database_url, drop_database

PROJECT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("demo", PROJECT / "scripts" / "demo.py")
assert _spec is not None and _spec.loader is not None
demo = importlib.util.module_from_spec(_spec)
sys.modules["demo"] = demo  # dataclasses look their module up while the class is built
_spec.loader.exec_module(demo)

MINUTE = 60_000
T0 = 1_770_508_800_000  # 2026-02-08T00:00Z


# --------------------------------------------------------------------------- pure helpers


def test_demo_redis_db_is_never_the_live_one():
    assert demo.demo_redis_url("redis://127.0.0.1:6390/0") == "redis://127.0.0.1:6390/1"
    assert demo.demo_redis_url("redis://127.0.0.1:6390") == "redis://127.0.0.1:6390/1"
    assert demo.demo_redis_url("rediss://u:p@host:6380/1") == "rediss://u:p@host:6380/2"
    assert demo.redis_db_of(demo.demo_redis_url("unix:///tmp/r.sock?db=0")) == 1


def test_demo_database_on_the_same_server():
    live = "postgresql://postgres@127.0.0.1:5432/feed_v4?sslmode=disable"
    url = demo.with_database(live, "feed_v4_demo")
    assert url == "postgresql://postgres@127.0.0.1:5432/feed_v4_demo?sslmode=disable"
    assert demo.database_of(url) == "feed_v4_demo"


def test_exchange_urls_are_read_once_both_are_printed():
    head = "fake exchange: 7 symbols, speed 60x\nBINANCE_WS_URL=ws://127.0.0.1:1/market\n"
    assert demo.parse_exchange_urls(head) is None
    assert demo.parse_exchange_urls(head + "BINANCE_REST_URL=http://127.0.0.1:1\n") == {
        "BINANCE_WS_URL": "ws://127.0.0.1:1/market",
        "BINANCE_REST_URL": "http://127.0.0.1:1",
    }


def test_daemon_env_points_at_the_demo_only():
    base = {"PATH": "/bin", "REDIS_URL": "live", "DATABASE_URL": "live", "SYMBOLS": "BTCUSDT"}
    urls = {"BINANCE_WS_URL": "ws://x/market", "BINANCE_REST_URL": "http://x"}
    env = demo.daemon_env(base, "redis://r/1", "postgresql://p/d", urls, ["AUSDT", "BUSDT"])
    assert env["REDIS_URL"] == "redis://r/1" and env["POSTGRES_URL"] == "postgresql://p/d"
    assert "DATABASE_URL" not in env and env["PATH"] == "/bin"
    assert env["SYMBOLS"] == "AUSDT,BUSDT" and env["INITIAL_HISTORY_M1"] == "3000"
    assert env["BINANCE_REST_URL"] == "http://x"


def test_replay_resumes_after_the_stored_history_or_starts_over():
    end = T0 + 20 * 1440 * MINUTE
    assert demo.choose_start(T0, None, end) == (T0, False)
    assert demo.choose_start(T0, T0 - 5 * MINUTE, end) == (T0, False)
    assert demo.choose_start(T0, T0 + 49 * MINUTE, end) == (T0 + 50 * MINUTE, False)
    assert demo.choose_start(T0, end - MINUTE, end) == (T0, True)


def test_lag_and_minutes_behind():
    newest = T0  # closed at T0 + 1 min
    assert demo.lag_s(T0 + MINUTE + 5_000, newest) == 5
    assert demo.minutes_behind(T0 + MINUTE + 59_000, newest) == 0
    assert demo.minutes_behind(T0 + 3 * MINUTE + 1_000, newest) == 2
    assert demo.lag_s(None, newest) is None


def test_progress_line_is_plain_and_parseable():
    p = demo.Progress(elapsed_s=4, sim_ms=T0 + 90_000, m1=21013, m5=4200, m15=1400, indicator_values=8998)
    p.ready_stream, p.newest_m1_ms, p.open_gaps = 7, T0, 0
    p.last_error = "2026-02-08 00:00:01 | ERROR    | FEED | " + "x" * 500
    line = demo.format_progress(p)
    assert "\n" not in line and len(line) < 400
    assert "sim 2026-02-08 00:01:30" in line and "m1=21013 m5=4200 m15=1400" in line
    assert "values=8998 ready_stream=7" in line and "lag=30s behind=0" in line and "gaps=0" in line
    assert "last error: 2026-02-08 00:00:01 | ERROR" in line and line.endswith("...")
    assert "m1=- " in demo.format_progress(demo.Progress(elapsed_s=0))


def test_a_footprint_is_drawn_highest_price_first_with_its_poc():
    document = {
        "open_time": T0,
        "row_size": "1",
        "poc": "3425",
        "rows": [
            {"price": "3424", "bid_volume": "53.003", "ask_volume": "0", "bid_trades": 82, "ask_trades": 0},
            {"price": "3425", "bid_volume": "54.034", "ask_volume": "48.559", "bid_trades": 40, "ask_trades": 84},
        ],
    }
    title, high, low = demo.render_footprint("ETHUSDT", document, width=10).splitlines()
    assert title.startswith("footprint ETHUSDT m1 2026-02-08 00:00 (row 1;")
    assert high.split()[:4] == ["3425", "54.034", "x", "48.559"] and high.endswith("########## POC")
    assert low.split() == ["3424", "53.003", "x", "0", "#####"]


def test_log_tail_keeps_the_last_error_line(tmp_path: Path):
    log = tmp_path / "daemon.log"
    tail = demo.LogTail(log)
    assert tail.poll() is None
    ts = "2026-02-08 00:00:01"
    log.write_text(f"{ts} | INFO     | MAIN | booted\n{ts} | ERROR    | FEED | first\n{ts} | ERR")
    assert tail.poll() == f"{ts} | ERROR    | FEED | first"
    with open(log, "a") as handle:
        handle.write("OR    | FEED | second\nTraceback: | ERROR | not a log line\n")
    assert tail.poll() == f"{ts} | ERROR    | FEED | second"
    assert demo.is_error_line(f"{ts} | CRITICAL | MAIN | down")


# --------------------------------------------------------------------------- a real run


async def count_rows(url: str, table: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetchval(f"SELECT count(*) FROM {table}")
    finally:
        await conn.close()


@pytest.mark.timeout(120)
def test_demo_runs_the_daemon_and_stops_it_cleanly(redis_stack_server, pg_url: str, tmp_path: Path):
    database = f"feed_v4_demo_test_{os.getpid()}"
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "POSTGRES_URL", "DATABASE_URL")}
    env.update(REDIS_URL=redis_stack_server.url, POSTGRES_URL=pg_url, DEMO_DATABASE=database, DEMO_DIR=str(tmp_path))
    asyncio.run(drop_database(pg_url, database))
    try:
        run = subprocess.run(
            [sys.executable, str(PROJECT / "scripts" / "demo.py"), "--seconds", "45", "--web-port", "0"],
            cwd=PROJECT,
            env=env,
            capture_output=True,
            text=True,
            timeout=110,
        )
        report = f"exit {run.returncode}\n{run.stdout}\n{run.stderr}"
        assert run.returncode == 0, report
        progress = [line for line in run.stdout.splitlines() if line.startswith("[")]
        m1 = [int(m.group(1)) for line in progress if (m := re.search(r" m1=(\d+) ", line))]
        values = [int(m.group(1)) for line in progress if (m := re.search(r" values=(\d+) ", line))]
        assert m1 and max(m1) > 0, report
        assert values and max(values) > 0, report
        footprints = [int(m.group(1)) for line in progress if (m := re.search(r" footprints=(\d+)", line))]
        assert footprints and max(footprints) > 0, report
        assert re.search(r"^footprint \w+ m1 .*\n(  .*\n)*  .* POC$", run.stdout, re.MULTILINE), report
        assert "demo: daemon exited with code 0" in run.stdout, report
        assert f"/{database}" in run.stdout and "/1 " in run.stdout, report  # the demo servers, announced
        assert f"/{database}" in (tmp_path / "demo.env").read_text()
        assert (tmp_path / "daemon.log").stat().st_size > 0
        demo_url = database_url(pg_url, database)
        assert asyncio.run(count_rows(demo_url, "ohlcv4_m1")) >= max(m1)
    finally:
        asyncio.run(drop_database(pg_url, database))
