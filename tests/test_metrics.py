"""The Prometheus endpoint (METRICS_PORT), the Grafana dashboard and the log settings
(LOG_LEVEL, LOG_FORMAT): pure checks, then the daemon scraped during a replay."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
import socket
import time
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import aiohttp
import orjson
import pytest
from daemon import DaemonProcess, run_main
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from replay import HISTORY_M1, M1, START, SYMBOLS, complete, daemon_env, pause_mid_minute, until, until_sim

import core_io
import infra
from feed_v4_main import DaemonOptions
from infra import BootError, ConfigError
from metrics.definitions import (
    PREFIX,
    TIMEFRAMES,
    DaemonMetrics,
    Snapshot,
    SnapshotCollector,
    StreamInfo,
    candle_lag,
    exported_names,
)
from metrics.exporter import bind_socket

PROJECT = Path(__file__).resolve().parents[1]
DASHBOARD = PROJECT / "metrics" / "grafana_dashboard.json"
METRIC_NAME = re.compile(r"\bfeed_v4_\w+")


def candle(symbol: str, open_time: int):
    return SimpleNamespace(symbol=symbol, open_time=open_time)


def samples(text: str) -> dict[str, dict[tuple, float]]:
    """name -> {sorted label pairs: value}, from the text exposition format."""
    out: dict[str, dict[tuple, float]] = defaultdict(dict)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name][tuple(sorted(sample.labels.items()))] = sample.value
    return out


def full_registry():
    """A registry as the endpoint builds it, with every scrape-time family populated."""
    metrics = DaemonMetrics()
    snap = Snapshot(
        exchange_time_ms=START,
        followed_symbols=2,
        lag_s={tf: 1.0 for tf in TIMEFRAMES},
        behind={tf: 0 for tf in TIMEFRAMES},
        gaps_open=0,
        reconnects={"market": 1},
        connections={"market": 1},
        streams={"ohlcv_m1_ready": StreamInfo(5, {"indicator_workers": (1, 0)})},
        worker_restarts={"FEED_INTAKE": 0},
        held={"system_log": 0},
        outages={("INTAKE", "Redis"): False},
        indicator_bars=1,
        indicator_values_persisted=1,
    )
    metrics.registry.register(SnapshotCollector(lambda: snap))
    return metrics


# --------------------------------------------------------------------------- pure


def test_hooks_count_and_time_each_bar_once():
    metrics = DaemonMetrics()
    end_m15 = START + 15 * M1  # the minute START+14 closes m1, m5 and m15 at once
    metrics.close_received("BTCUSDT", end_m15 - M1)
    metrics.close_received("BTCUSDT", end_m15 - M1)  # a duplicate close keeps the first arrival
    assert len(metrics.stored_arrivals) == 3 and len(metrics.ready_arrivals) == 3
    metrics.candles_published([("m1", [candle("BTCUSDT", end_m15 - M1)]), ("m15", [candle("BTCUSDT", START)])])
    metrics.candles_published([("m1", [candle("BTCUSDT", end_m15 - M1)])])  # re-announced: counted, not timed
    metrics.candles_published([("m5", [candle("ETHUSDT", START)])])  # from REST: no arrival
    metrics.indicators_ready([("BTCUSDT", "m1", end_m15 - M1), ("BTCUSDT", "m5", end_m15 - 5 * M1)])
    metrics.flush()  # at every scrape and every few seconds: off the boundary's path
    got = samples(generate_latest(metrics.registry).decode())
    assert got[PREFIX + "candles_stored_total"] == {(("tf", "m1"),): 2, (("tf", "m5"),): 1, (("tf", "m15"),): 1}
    stored = got[PREFIX + "close_to_stored_seconds_count"]
    assert stored == {(("tf", "m1"),): 1, (("tf", "m5"),): 0, (("tf", "m15"),): 1}
    ready = got[PREFIX + "close_to_indicators_ready_seconds_count"]
    assert ready == {(("tf", "m1"),): 1, (("tf", "m5"),): 1, (("tf", "m15"),): 0}
    assert metrics.newest_stored == {
        ("m1", "BTCUSDT"): end_m15,
        ("m15", "BTCUSDT"): end_m15,
        ("m5", "ETHUSDT"): 1_770_163_500_000,
    }
    assert set(metrics.stored_arrivals) == {("m5", "BTCUSDT", end_m15)}
    metrics.stored_arrivals[("m5", "BTCUSDT", end_m15)] = time.monotonic() - 1000
    metrics.prune(60)
    assert not metrics.stored_arrivals and len(metrics.ready_arrivals) == 1


def test_indicators_not_timed_when_they_run_elsewhere():
    metrics = DaemonMetrics(time_indicators=False)
    metrics.close_received("BTCUSDT", START)
    assert metrics.stored_arrivals and not metrics.ready_arrivals


def test_candle_lag_is_the_worst_followed_symbols():
    newest = {("m1", "A"): START, ("m1", "B"): START - 5 * M1, ("m1", "GONE"): 0, ("m5", "A"): START}
    lag, behind = candle_lag(newest, ["A", "B"], START + 30_000, grace_ms=10_000)
    assert lag == {"m1": 330.0, "m5": 30.0}  # B is 5.5 min late; m15 has nothing stored yet
    assert behind == {"m1": 1, "m5": 0}


def test_scrape_time_families_render_and_parse():
    got = samples(generate_latest(full_registry().registry).decode())
    assert got[PREFIX + "candle_lag_seconds"][(("tf", "m5"),)] == 1.0
    assert got[PREFIX + "stream_pending"][(("group", "indicator_workers"), ("stream", "ohlcv_m1_ready"))] == 1
    assert got[PREFIX + "ws_reconnects_total"] == {(("route", "market"),): 1}
    assert got[PREFIX + "worker_restarts_total"] == {(("worker", "FEED_INTAKE"),): 0}


def test_dashboard_is_valid_and_uses_only_exported_metrics():
    dashboard = json.loads(DASHBOARD.read_text())
    exported = exported_names(full_registry().registry)
    assert {v["name"] for v in dashboard["templating"]["list"]} >= {"datasource"}
    used: set[str] = set()
    titles = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        titles.append(panel["title"])
        assert panel["datasource"]["uid"] in ("${datasource}", "${DS_PROMETHEUS}"), panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            used |= set(METRIC_NAME.findall(target["expr"]))
    assert used and not used - exported, sorted(used - exported)
    assert len(set(titles)) == len(titles)
    # Every group the issue names has a panel.
    for name in [
        "candle_lag_seconds",
        "gaps_open",
        "ws_reconnects_total",
        "rest_weight_used",
        "stream_pending",
        "stream_lag",
        "close_to_stored_seconds_bucket",
        "close_to_indicators_ready_seconds_bucket",
        "worker_restarts_total",
        "held_items",
        "candles_stored_total",
    ]:
        assert PREFIX + name in used, name


def test_metrics_options_from_env():
    settings = infra.load_settings({"REDIS_URL": "redis://h:1/0", "POSTGRES_URL": "postgresql://u@h:2/db"})
    options = DaemonOptions.from_env(settings, {})
    assert (options.metrics_port, options.metrics_host) == (0, "0.0.0.0")
    options = DaemonOptions.from_env(settings, {"METRICS_PORT": "9108", "METRICS_HOST": "127.0.0.1"})
    assert (options.metrics_port, options.metrics_host) == (9108, "127.0.0.1")
    assert DaemonOptions.from_env(settings, {"METRICS_PORT": "off"}).metrics_port == 0
    for env, message in [
        ({"METRICS_PORT": "http"}, "METRICS_PORT='http' is not a int"),
        ({"METRICS_PORT": "70000"}, "METRICS_PORT='70000' is out of range: use a value from 1 to 65535"),
        ({"METRICS_HOST": "http://x"}, "METRICS_HOST='http://x' is not an address"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            DaemonOptions.from_env(settings, env)


def test_a_port_in_use_is_a_boot_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(BootError, match=f"METRICS_PORT={port}: cannot listen on 127.0.0.1:{port}"):
            bind_socket("127.0.0.1", port)


# --------------------------------------------------------------------------- logging


def log_lines(env: dict[str, str], debug: bool = False) -> list[str]:
    stream = io.StringIO()
    try:
        infra.setup_logging(debug, stream, env=env)
        log = logging.getLogger("AGGREGATOR")
        log.debug("debug line")
        log.info("aggregation done: %s", "BTCUSDT")
        log.warning("warning line")
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("it failed")
    finally:
        infra.setup_logging(False, env={})  # the suite's usual console logging
    return stream.getvalue().splitlines()


def test_json_log_lines_parse():
    lines = log_lines({"LOG_FORMAT": "json"})
    entries = [orjson.loads(line) for line in lines if line.startswith("{")]
    assert [e["message"] for e in entries] == ["aggregation done: BTCUSDT", "warning line", "it failed"]
    first = entries[0]
    assert set(first) == {"ts", "level", "logger", "message"}
    assert (first["level"], first["logger"]) == ("INFO", "AGGREGATOR")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["ts"])
    assert abs(time.time() - infra.datetime.fromisoformat(first["ts"]).timestamp()) < 60
    assert "ValueError: boom" in entries[2]["exception"] and entries[2]["level"] == "ERROR"
    assert len(lines) == len(entries)  # the traceback is inside the object, not on lines of its own


def test_log_level_is_honoured_and_wins_over_debug_mode():
    assert [line.split(" | ")[3] for line in log_lines({"LOG_LEVEL": "warning"}) if " | " in line] == [
        "warning line",
        "it failed",
    ]
    assert any("debug line" in line for line in log_lines({}, debug=True))  # DEBUG_MODE alone: DEBUG
    assert not any("debug line" in line for line in log_lines({"LOG_LEVEL": "INFO"}, debug=True))
    assert not any("debug line" in line for line in log_lines({}))


@pytest.mark.parametrize(
    "env, message",
    [({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL='LOUD': use one of DEBUG"), ({"LOG_FORMAT": "xml"}, "LOG_FORMAT='xml'")],
)
def test_bad_log_settings_are_refused(env, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        infra.setup_logging(False, io.StringIO(), env=env)


def test_bad_log_setting_stops_the_daemon_with_exit_2():
    done = run_main(
        {"REDIS_URL": "redis://127.0.0.1:1/0", "POSTGRES_URL": "postgresql://u@127.0.0.1:1/x", "LOG_FORMAT": "yaml"}
    )
    assert done.returncode == 2 and "LOG_FORMAT='yaml': use text or json" in done.stderr


# --------------------------------------------------------------------------- the daemon


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def scrape(port: int) -> dict[str, dict[tuple, float]]:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/metrics", timeout=aiohttp.ClientTimeout(total=5)) as reply:
            assert reply.status == 200
            assert reply.headers["Content-Type"].startswith("text/plain")
            return samples(await reply.text())


async def answers(port: int) -> bool:
    try:
        await scrape(port)
        return True
    except (aiohttp.ClientError, OSError):
        return False


def total(values: dict[tuple, float], **labels: str) -> float:
    wanted = set(labels.items())
    return sum(v for k, v in values.items() if wanted <= set(k))


async def stored_rows(pool) -> dict[str, int]:
    return {tf: await pool.fetchval(f"SELECT count(*) FROM ohlcv4_{tf}") for tf in TIMEFRAMES}


async def indicators_at(redis, symbols: list[str], last_closed: int) -> bool:
    """Every symbol's M1 indicators announced for `last_closed` (they trail the candles)."""
    for symbol in symbols:
        newest = await redis.hget(core_io.indicator_key(symbol, "m1"), "open_time")
        if newest is None or int(newest) < last_closed:
            return False
    return True


def listening_ports(pid: int) -> set[int]:
    """TCP ports the process listens on: its socket inodes against /proc/net/tcp{,6}."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib_suppress():
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


class contextlib_suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return exc[0] is not None and issubclass(exc[0], OSError)


@pytest.mark.timeout(120)
async def test_scraped_during_a_replay_the_values_move_with_the_data(pool, redis, redis_url, pg_url):
    from fake_exchange import ArchiveSource, FakeExchange
    from tests.indicator_reference import COMMON_CASES, configure

    symbols = SYMBOLS[:3]
    source = ArchiveSource(symbols, start_ms=START - (HISTORY_M1 + 30) * M1, end_ms=START + 240 * M1)
    exchange = FakeExchange(source, start_ms=START, speed=300, seed=3)
    await exchange.start()
    await configure(pool, COMMON_CASES[:4])
    port = free_port()
    env = daemon_env(exchange, redis_url, pg_url, symbols) | {
        "METRICS_PORT": str(port),
        "METRICS_HOST": "127.0.0.1",
        "WS_SILENCE_S": "15",  # the exchange is paused between the scrapes' checks
        "LOG_FORMAT": "json",
    }
    daemon = DaemonProcess(env)
    try:
        daemon.start()
        await until(lambda: answers(port), 30, "the metrics endpoint")
        await until_sim(exchange, START + 20 * M1, daemon)
        scrapes, rows = [], []
        for stop_at in (START + 20 * M1, START + 60 * M1):
            await until_sim(exchange, stop_at, daemon)
            last_closed = await pause_mid_minute(exchange)
            await until(lambda t=last_closed: complete(pool, symbols, t, redis), 30, "the daemon to catch up")
            await until(lambda t=last_closed: indicators_at(redis, symbols, t), 30, "the indicators")
            await asyncio.sleep(0.5)
            rows.append(await stored_rows(pool))
            scrapes.append(await scrape(port))
            exchange.clock.resume()
        first, second = scrapes
        stored = PREFIX + "candles_stored_total"
        for tf in TIMEFRAMES:
            gained = rows[1][tf] - rows[0][tf]
            counted = total(second[stored], tf=tf) - total(first[stored], tf=tf)
            assert gained > 0 and abs(counted - gained) <= len(symbols), (tf, counted, gained)
            assert (tf,) in {tuple(v for _, v in k) for k in second[PREFIX + "candle_lag_seconds"]}, tf
            assert second[PREFIX + "candle_lag_seconds"][(("tf", tf),)] < 2 * 60 * 15, tf
        # Everything stored this run was counted (the database started empty), history included.
        assert abs(total(first[stored], tf="m1") - rows[0]["m1"]) <= len(symbols)
        for name in ("close_to_stored_seconds_count", "close_to_indicators_ready_seconds_count"):
            grew = total(second[PREFIX + name], tf="m1") - total(first[PREFIX + name], tf="m1")
            assert grew >= len(symbols) * 30, (name, grew)  # ~40 live closes per symbol between the scrapes
        p = second[PREFIX + "close_to_stored_seconds_bucket"]
        assert total(p, tf="m1", le="+Inf") == total(second[PREFIX + "close_to_stored_seconds_count"], tf="m1")
        pending, lag = second[PREFIX + "stream_pending"], second[PREFIX + "stream_lag"]
        assert (("group", "indicator_workers"), ("stream", "ohlcv_m1_ready")) in pending
        assert (("group", "signal_processor"), ("stream", "signals_stream")) in pending
        assert lag  # Redis 7+: entries not yet delivered, per group
        assert second[PREFIX + "rest_weight_total"][()] > 0  # the history came over REST
        assert (("route", "market"),) in second[PREFIX + "ws_reconnects_total"]
        assert second[PREFIX + "worker_restarts_total"] and not any(second[PREFIX + "worker_restarts_total"].values())
        assert second[PREFIX + "workers_running"][()] >= 15
        assert {k[0][1] for k in second[PREFIX + "held_items"]} >= {
            "closes_for_postgres",
            "candles_for_redis",
            "indicator_values_for_postgres",
            "system_log",
        }
        assert second[PREFIX + "gaps_open"][()] == 0
        assert second[PREFIX + "closes_received_total"][()] > first[PREFIX + "closes_received_total"][()]
        assert second[PREFIX + "exchange_time_seconds"][()] * 1000 >= START + 60 * M1 - M1
        assert second["process_resident_memory_bytes"][()] > 50e6
        # The dashboard asks only for what a live daemon exports.
        used = set(METRIC_NAME.findall(DASHBOARD.read_text()))
        assert not used - set(second), sorted(used - set(second))
        # JSON logs: one object per line, whatever the daemon wrote.
        lines = [line for line in daemon.output().splitlines() if line.strip()]
        assert lines and all(orjson.loads(line)["level"] for line in lines), lines[:3]
        assert daemon.terminate() == 0
        assert not await answers(port)  # the endpoint stops with the daemon
    finally:
        daemon.cleanup()
        await exchange.stop()


@pytest.mark.timeout(60)
async def test_without_metrics_port_nothing_listens(pool, redis_url, pg_url):
    env = {
        "REDIS_URL": redis_url,
        "POSTGRES_URL": pg_url,
        "FEED_ENABLED": "false",
        "INDICATORS_ENABLED": "false",
        "SIGNALS_ENABLED": "false",
        "METRICS_PORT": "",
        "HEARTBEAT_INTERVAL_S": "0.2",
    }
    daemon = DaemonProcess(env)
    redis = infra.make_redis(redis_url)
    try:
        daemon.start()
        await until(lambda: redis.keys("heartbeat:*"), 30, "the daemon to run")
        assert listening_ports(daemon.process.pid) == set()
        assert daemon.terminate() == 0
    finally:
        await redis.aclose()
        daemon.cleanup()


@pytest.mark.timeout(60)
async def test_a_metrics_port_in_use_stops_the_daemon_with_exit_2(pool, redis_url, pg_url):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = await asyncio.to_thread(
            run_main,
            {
                "REDIS_URL": redis_url,
                "POSTGRES_URL": pg_url,
                "FEED_ENABLED": "false",
                "INDICATORS_ENABLED": "false",
                "SIGNALS_ENABLED": "false",
                "METRICS_PORT": str(port),
                "METRICS_HOST": "127.0.0.1",
            },
        )
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"METRICS_PORT={port}: cannot listen on 127.0.0.1:{port}" in done.stderr
