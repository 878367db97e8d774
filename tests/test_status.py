"""`feed_v4_main.py status`: the report from real Redis and PostgreSQL, its health rules,
its rendering and the command's exit codes."""

from __future__ import annotations

import os
import time
from datetime import timedelta

import orjson
import pytest
from servers import drop_database, free_port, recreate_database, setting

import core_io
import infra
import status_report as sr
from indicators.groups import group_of
from infra import BootError, ConfigError, load_settings
from orderflow import store
from orderflow.fold import BarFlow
from orderflow.output import CvdChain, FinalBar
from orderflow.profile import ImbalanceRules
from tests.test_candles_pg import make_candle

# The exchange clock in the heartbeat: far from the local one, as under the fake exchange.
NOW = 1_740_830_490_000  # 2025-03-01 12:01:30 UTC
M1_LAST = NOW - 90_000  # 12:00 (closed at 12:01): lag 30 s
M5_LAST = NOW - 390_000  # 11:55 (closed at 12:00): lag 90 s
M15_LAST = NOW - 990_000  # 11:45 (closed at 12:00): lag 90 s
MINUTE = 60_000


def local_ms() -> int:
    return int(time.time() * 1000)


async def beat(redis, exchange_time: int | str = NOW, pid: int = 4242) -> None:
    now = local_ms()
    fields = {
        "host": "testhost",
        "pid": pid,
        "started_at": now - 3_600_000,
        "updated_at": now - 1000,
        "exchange_time": exchange_time,
        "workers": "FEED_INTAKE,INDICATORS,SIGNALS",
        "candles_stored": 120,
        "indicator_bars": 360,
        "symbols": "BTCUSDT,ETHUSDT",
        "member": "testhost:4242:abc123",
        "draining": 0,
        "cpu": "0.250",
        "loop_lag_ms": "3.5",
    }
    await infra.write_heartbeat(redis, infra.heartbeat_key("testhost", pid), fields, 30)


async def seed_tickers(pool, redis, m1_last: dict[str, int | None]) -> None:
    """Enable the tickers and store their newest M1 (and an M5/M15 each with an M1)."""
    await core_io.enable_symbols(pool, list(m1_last))
    candles = []
    for symbol, last in m1_last.items():
        if last is not None:
            candles += [
                make_candle(symbol, "m1", last),
                make_candle(symbol, "m5", M5_LAST),
                make_candle(symbol, "m15", M15_LAST),
            ]
    await core_io.upsert_candles(pool, candles)


# --------------------------------------------------------------------------- pure


def test_lag_is_time_since_the_bar_closed_never_negative():
    assert sr.lag_seconds(M1_LAST, "m1", NOW) == 30.0
    assert sr.lag_seconds(M5_LAST, "m5", NOW) == 90.0
    assert sr.lag_seconds(M15_LAST, "m15", NOW) == 90.0
    assert sr.lag_seconds(NOW - 30_000, "m1", NOW) == 0.0  # the forming minute
    assert sr.lag_seconds(NOW - 61_250, "m1", NOW) == 1.25
    assert sr.lag_seconds(None, "m1", NOW) is None


def test_now_is_the_newest_exchange_time_else_the_local_clock():
    daemons = [
        sr.parse_heartbeat("heartbeat:a:1", {"exchange_time": str(NOW - 5000)}, 10**13),
        sr.parse_heartbeat("heartbeat:b:2", {"exchange_time": str(NOW)}, 10**13),
        sr.parse_heartbeat("heartbeat:c:3", {"exchange_time": ""}, 10**13),
    ]
    assert sr.choose_now(daemons, 10**13) == (NOW, "exchange")
    assert sr.choose_now(daemons[2:], 10**13) == (10**13, "local")
    assert sr.choose_now([], 10**13) == (10**13, "local")
    assert daemons[2]["host"] == "c" and daemons[2]["pid"] is None and daemons[2]["workers"] == []


def test_a_live_feed_is_measured_on_the_local_clock_so_a_stalled_one_keeps_aging():
    local = NOW + 90_000  # exchange time a beat behind, or frozen by a stalled feed
    daemons = [sr.parse_heartbeat("heartbeat:a:1", {"exchange_time": str(NOW)}, local)]
    assert sr.choose_now(daemons, local) == (local, "local")
    far = NOW + sr.REPLAY_SKEW_MS + 1  # a replay months in the past
    assert sr.choose_now(daemons, far) == (NOW, "exchange")


def test_workers_are_summarised_by_prefix():
    names = ["FEED_INTAKE", "FEED_GAPS", "INDICATORS", "INDICATORS_PERSIST", "SIGNALS", "HEARTBEAT"]
    assert sr.workers_summary(names) == "FEED(2) INDICATORS(2) SIGNALS HEARTBEAT"
    assert sr.workers_summary([]) == "-"


def make_pg_state(symbol_lags_s: dict[str, float | None], **extra) -> sr.PgState:
    """PostgreSQL as if each symbol's newest M1 had this lag against NOW (None: no M1)."""
    rows = [
        sr.TickerRow(
            symbol,
            {
                "m1": None if lag is None else NOW - int(lag * 1000) - MINUTE,
                "m5": M5_LAST if lag is not None else None,
                "m15": M15_LAST if lag is not None else None,
            },
            0,
            None,
        )
        for symbol, lag in symbol_lags_s.items()
    ]
    state = dict(tickers=rows, gap_totals={}, oldest_gaps=[], recent_errors=[], level_counts={})
    state.update(extra)
    return sr.PgState(**state)


def pure_report(symbol_lags_s: dict[str, float | None], heartbeat: bool = True, **kwargs) -> dict:
    heartbeats = {"heartbeat:h:1": {"host": "h", "pid": "1", "exchange_time": str(NOW)}} if heartbeat else {}
    return sr.build_report(
        heartbeats=heartbeats,
        pg=kwargs.pop("pg", None) or make_pg_state(symbol_lags_s),
        streams=kwargs.pop("streams", {}),
        indicator_times={},
        local_now_ms=NOW + 10**10,
        **kwargs,
    )


def test_health_rules_at_their_limits():
    report = pure_report({"BTCUSDT": 180.0, "ETHUSDT": 5.0})
    assert report["now_ms"] == NOW and report["tickers"][0]["m1"]["lag_s"] == 180.0
    assert sr.unhealthy_reasons(report, max_lag_s=180, max_pending=10) == []
    reasons = sr.unhealthy_reasons(report, max_lag_s=179, max_pending=10)
    assert len(reasons) == 1 and "BTCUSDT" in reasons[0] and "ETHUSDT" not in reasons[0]

    report["streams"] = {"s": {"length": 9, "groups": {"g": {"pending": 10, "lag": 0, "consumers": 1}}}}
    assert sr.unhealthy_reasons(report, 180, max_pending=10) == []
    assert sr.unhealthy_reasons(report, 180, max_pending=9) == ["stream s group g: 10 pending (limit 9)"]

    report["errors"]["last_hour"]["CRITICAL"] = 2
    assert sr.unhealthy_reasons(report, 180, 10) == ["2 CRITICAL event(s) in system_log_v4 in the last hour"]
    report["errors"]["last_hour"]["CRITICAL"] = 0
    report["daemons"] = []
    assert sr.unhealthy_reasons(report, 180, 10)[0].startswith("no live heartbeat")


def test_many_stale_tickers_make_one_line_worst_first():
    report = pure_report({f"S{i:03d}USDT": 1000.0 + i for i in range(40)} | {"NONEUSDT": None})
    reasons = report["unhealthy"]
    assert reasons[0] == "1 enabled ticker(s) with no M1 candle stored: NONEUSDT"
    assert reasons[1].startswith("40 ticker(s) with M1 lag above 180 s: S039USDT 17m19s, S038USDT")
    assert reasons[1].endswith("(+30 more)")


def test_render_lists_every_ticker_worst_first_in_aligned_columns():
    lags = {f"T{i:03d}USDT": i / 4 for i in range(500)}  # all within 180 s
    text = sr.render_status(pure_report(lags), colour=False)
    lines = text.splitlines()
    rows = [line for line in lines if line.startswith("T") and "USDT" in line]
    assert [r.split()[0] for r in rows] == [f"T{i:03d}USDT" for i in range(499, -1, -1)]
    header = next(line for line in lines if line.startswith("SYMBOL"))
    gaps_at = header.index("GAPS")
    assert all(r[gaps_at - 2 : gaps_at] == "  " and r[gaps_at] == "0" for r in rows)  # one column, aligned
    assert "HEALTHY" in lines[0] and "UNHEALTHY" not in text and "\033" not in text

    coloured = sr.render_status(pure_report({"AUSDT": 999.0}), colour=True)
    assert "\033[31m" in coloured and "UNHEALTHY" in coloured
    assert "\033[32m" in sr.render_status(pure_report({"AUSDT": 1.0}), colour=True)


def test_duration_format():
    assert [sr.format_duration(s) for s in (None, 0, 59.9, 185, 7_500, 277_200)] == [
        "-",
        "0s",
        "59s",
        "3m05s",
        "2h05m",
        "3d05h",
    ]


# --------------------------------------------------------------------------- against the servers


async def test_healthy_system_lags_on_the_exchange_clock(pool, redis):
    await seed_tickers(pool, redis, {"BTCUSDT": M1_LAST, "ETHUSDT": M1_LAST - MINUTE})
    await core_io.enable_symbols(pool, ["XRPUSDT"])
    await pool.execute("UPDATE tickers SET status = 'disabled' WHERE symbol = 'XRPUSDT'")
    await redis.hset(core_io.indicator_key("BTCUSDT", "m1"), mapping={"open_time": M1_LAST - MINUTE, "EMA_9": "1.5"})
    await redis.hset(core_io.indicator_key("BTCUSDT", "m15"), mapping={"open_time": M15_LAST, "EMA_9": "1.5"})
    await beat(redis)

    report = await sr.collect_status(pool, redis)

    assert report["healthy"] is True and report["unhealthy"] == []
    assert (report["now_ms"], report["now_source"], report["now"]) == (NOW, "exchange", "2025-03-01T12:01:30.000Z")
    assert [t["symbol"] for t in report["tickers"]] == ["ETHUSDT", "BTCUSDT"]  # worst lag first, disabled absent
    eth, btc = report["tickers"]
    assert btc["m1"] == {"open_time_ms": M1_LAST, "open_time": "2025-03-01T12:00:00.000Z", "lag_s": 30.0}
    assert (btc["m5"]["lag_s"], btc["m15"]["lag_s"], eth["m1"]["lag_s"]) == (90.0, 90.0, 90.0)
    assert btc["indicators"]["m1"]["lag_s"] == 90.0 and btc["indicators"]["m15"]["lag_s"] == 90.0
    assert btc["indicators"]["m5"] is None and eth["indicators"] == {"m1": None, "m5": None, "m15": None}
    assert btc["open_gaps"] == 0 and btc["oldest_gap"] is None
    (daemon,) = report["daemons"]
    assert (daemon["host"], daemon["pid"], daemon["exchange_time_ms"]) == ("testhost", 4242, NOW)
    assert daemon["workers"] == ["FEED_INTAKE", "INDICATORS", "SIGNALS"]
    assert (daemon["candles_stored"], daemon["indicator_bars"]) == (120, 360)
    assert 0.5 <= daemon["age_s"] < 30 and 3595 < daemon["uptime_s"] < 3630
    # SPEC 17: every live process and the symbols it owns; its load, and its lag (the
    # worst M1 lag of its symbols: ETHUSDT's 90 s).
    assert report["processes"] == [
        {
            "id": "testhost:4242",
            "host": "testhost",
            "pid": 4242,
            "alive": True,
            "symbols": ["BTCUSDT", "ETHUSDT"],
            "member": "testhost:4242:abc123",
            "draining": False,
            "cpu": 0.25,
            "loop_lag_ms": 3.5,
            "m1_lag_s": 90.0,
        }
    ]
    text = sr.render_status(report, colour=False)
    assert "testhost:4242" in text and "25%" in text and "4 ms" in text and "1m30s" in text

    # A drain requested (`drain testhost:4242`): listed as draining before the process answers.
    await redis.hset(infra.heartbeat_key("testhost", 4242), infra.DRAIN_FIELD, "1")
    report = await sr.collect_status(pool, redis)
    assert report["processes"][0]["draining"] is True
    assert "testhost:4242 (draining)" in sr.render_status(report, colour=False)


async def test_no_heartbeat_is_unhealthy_and_falls_back_to_the_local_clock(pool, redis):
    await seed_tickers(pool, redis, {"BTCUSDT": M1_LAST})
    report = await sr.collect_status(pool, redis, now_ms=NOW)
    (reason,) = report["unhealthy"]
    assert reason.startswith("no live heartbeat: no daemon is running (or none can reach Redis); data ends at ")
    assert report["healthy"] is False and report["daemons"] == [] and report["state"] == "stopped"

    # No daemon: lags are measured where the data ends, not against the wall clock
    # months later; the one reason says where the data ends and how long ago.
    local = M1_LAST + MINUTE + 298 * 86_400_000 + 3_600_000
    report = await sr.collect_status(pool, redis, local_now_ms=local)
    assert report["now_source"] == "data end" and report["now_ms"] == M1_LAST + MINUTE
    assert report["tickers"][0]["m1"]["lag_s"] == 0.0
    assert report["data_end"] == "2025-03-01T12:01:00.000Z" and report["data_end_age_s"] == 298 * 86_400 + 3600
    assert report["unhealthy"] == [
        "no live heartbeat: no daemon is running (or none can reach Redis); "
        "data ends at 2025-03-01 12:01 UTC (298 days ago)"
    ]
    text = sr.render_status(report, colour=False)
    assert text.startswith("feed_v4 status: STOPPED (no daemon running)\n") and "lag 298" not in text
    assert "data     ends 2025-03-01 12:01:00 UTC (298 days ago; lags below are measured there)" in text
    await beat(redis, exchange_time="")  # a daemon whose feed has seen nothing yet
    assert (await sr.collect_status(pool, redis))["now_source"] == "local"


async def test_stale_ticker_and_ticker_without_candles_are_named(pool, redis):
    await seed_tickers(pool, redis, {"BTCUSDT": M1_LAST, "ETHUSDT": M1_LAST - 10 * MINUTE, "SOLUSDT": None})
    await beat(redis)
    report = await sr.collect_status(pool, redis)
    assert [t["symbol"] for t in report["tickers"]] == ["SOLUSDT", "ETHUSDT", "BTCUSDT"]
    assert report["tickers"][0]["m1"] is None and report["tickers"][1]["m1"]["lag_s"] == 630.0
    assert report["unhealthy"] == [
        "1 enabled ticker(s) with no M1 candle stored: SOLUSDT",
        "1 ticker(s) with M1 lag above 180 s: ETHUSDT 10m30s",
    ]
    relaxed = await sr.collect_status(pool, redis, max_lag_s=630)
    assert relaxed["unhealthy"] == ["1 enabled ticker(s) with no M1 candle stored: SOLUSDT"]


async def test_gap_open_for_more_than_ten_minutes_is_unhealthy(pool, redis):
    await seed_tickers(pool, redis, {"BTCUSDT": M1_LAST, "ETHUSDT": M1_LAST})
    await core_io.enable_symbols(pool, ["OFFUSDT"])
    await pool.execute("UPDATE tickers SET status = 'disabled' WHERE symbol = 'OFFUSDT'")
    await beat(redis)
    recent = M1_LAST - 5 * MINUTE  # 11:55, 6.5 min before now: still being backfilled
    await core_io.log_missing_m1(pool, [("BTCUSDT", recent), ("OFFUSDT", M1_LAST - 600 * MINUTE)])
    report = await sr.collect_status(pool, redis)
    assert report["healthy"], report["unhealthy"]
    btc = next(t for t in report["tickers"] if t["symbol"] == "BTCUSDT")
    assert btc["open_gaps"] == 1 and btc["oldest_gap"]["open_time_ms"] == recent
    assert btc["oldest_gap"]["age_s"] == 390.0

    old = [("ETHUSDT", M1_LAST - 30 * MINUTE), ("ETHUSDT", M1_LAST - 29 * MINUTE), ("ETHUSDT", M1_LAST - 28 * MINUTE)]
    await core_io.log_missing_m1(pool, old)
    await core_io.set_missing_status(pool, [old[2]], "unfillable")
    report = await sr.collect_status(pool, redis)
    assert report["unhealthy"] == ["1 ticker(s) with a missing M1 open for more than 10 min: ETHUSDT since 11:30"]
    eth = next(t for t in report["tickers"] if t["symbol"] == "ETHUSDT")
    assert eth["open_gaps"] == 2 and eth["oldest_gap"]["open_time_ms"] == old[0][1]
    gaps = report["gaps"]
    assert (gaps["missing"], gaps["backfilled"], gaps["unfillable"]) == (3, 0, 1)  # disabled ticker not counted
    assert [(g["symbol"], g["open_time_ms"]) for g in gaps["oldest_missing"]] == [old[0], old[1], ("BTCUSDT", recent)]


async def test_errors_newest_first_and_a_recent_critical_is_unhealthy(pool, redis):
    await seed_tickers(pool, redis, {"BTCUSDT": M1_LAST})
    await beat(redis)
    rows = [
        ("ERROR", "FEED", "two hours ago", timedelta(hours=2)),
        ("ERROR", "INDICATORS", "ten minutes ago", timedelta(minutes=10)),
        ("CRITICAL", "WATCHDOG", "yesterday", timedelta(hours=30)),
        ("WARNING", "FEED", "a warning", timedelta(minutes=5)),
        ("INFO", "MAIN", "started", timedelta(minutes=1)),
    ]
    for level, module, message, ago in rows:
        await pool.execute(
            "INSERT INTO system_log_v4 (ts, level, module, message) VALUES (now() - $4::interval, $1, $2, $3)",
            level,
            module,
            message,
            ago,
        )
    report = await sr.collect_status(pool, redis)
    assert report["healthy"], report["unhealthy"]
    assert [(e["level"], e["module"], e["message"]) for e in report["errors"]["recent"]] == [
        ("ERROR", "INDICATORS", "ten minutes ago"),
        ("ERROR", "FEED", "two hours ago"),
    ]
    assert report["errors"]["last_hour"] == {"WARNING": 1, "ERROR": 1, "CRITICAL": 0}

    await pool.execute("INSERT INTO system_log_v4 (level, module, message) VALUES ('CRITICAL', 'MAIN', 'boom')")
    report = await sr.collect_status(pool, redis)
    assert report["unhealthy"] == ["1 CRITICAL event(s) in system_log_v4 in the last hour"]
    assert report["errors"]["recent"][0]["message"] == "boom"
    assert report["errors"]["recent"][0]["ts"].endswith("Z")


async def test_stream_lengths_and_pending_counts(pool, redis):
    await seed_tickers(pool, redis, {"BTCUSDT": M1_LAST})
    await beat(redis)
    m1, signals = core_io.CANDLE_STREAMS["m1"], core_io.SIGNALS_STREAM
    live, gone = group_of("testhost:4242:abc123"), group_of("testhost:77:dead01")  # (beat() names the first)
    await core_io.ensure_groups(redis, {m1: (live, gone), signals: (core_io.SIGNAL_GROUP,)})
    events = [core_io.candle_event(make_candle("BTCUSDT", "m1", M1_LAST - i * MINUTE)) for i in range(5)]
    await core_io.publish(redis, m1, events, maxlen=1000)
    await core_io.read_group(redis, live, "w1", [m1], count=3, block_ms=None)
    await core_io.read_group(redis, gone, "w1", [m1], count=5, block_ms=None)  # and then it died
    await core_io.publish(redis, signals, [{"symbol": "BTCUSDT", "message": "buy"}] * 2, maxlen=1000)
    taken = await core_io.read_group(redis, core_io.SIGNAL_GROUP, "r1", [signals], count=10, block_ms=None)
    await core_io.ack(redis, core_io.SIGNAL_GROUP, [(s, i) for s, i, _ in taken[:1]])
    await core_io.read_group(redis, core_io.SIGNAL_GROUP, "r2", [signals], count=10, block_ms=None)

    report = await sr.collect_status(pool, redis)
    streams = report["streams"]
    assert list(streams) == [
        "ohlcv_m1_ready",
        "ohlcv_m5_ready",
        "ohlcv_m15_ready",
        "indicators_ready_stream",
        "signals_stream",
    ]
    assert streams[m1]["length"] == 5
    assert streams[m1]["groups"][live] | {"last_delivered_id": None} == {
        "pending": 3,
        "lag": 2,
        "consumers": 1,
        "last_delivered_id": None,
        "gone": False,
    }
    assert streams[m1]["groups"][gone]["pending"] == 5 and streams[m1]["groups"][gone]["gone"]
    assert streams[signals]["length"] == 2
    assert streams[signals]["groups"][core_io.SIGNAL_GROUP]["pending"] == 1
    assert streams[signals]["groups"][core_io.SIGNAL_GROUP]["consumers"] == 2
    assert streams["ohlcv_m5_ready"] == {"length": 0, "groups": {}}  # missing: empty, not an error
    assert report["healthy"], report["unhealthy"]

    behind = await sr.collect_status(pool, redis, max_pending=2)
    # A gone process's group is not a backlog anyone is behind on: its 5 are not a fault.
    assert behind["unhealthy"] == [f"stream ohlcv_m1_ready group {live}: 3 pending (limit 2)"]
    text = sr.render_status(report, colour=False)
    assert "ohlcv_m1_ready" in text and live in text and f"{gone} (gone)" in text

    await redis.set(core_io.INDICATORS_READY_STREAM, "not a stream")
    broken = await sr.collect_status(pool, redis)
    assert "WRONGTYPE" in broken["streams"][core_io.INDICATORS_READY_STREAM]["error"]
    assert broken["unhealthy"][0].startswith("stream indicators_ready_stream cannot be read")


async def test_json_and_text_output(pool, redis):
    await seed_tickers(pool, redis, {"BTCUSDT": M1_LAST, "ETHUSDT": M1_LAST})
    await beat(redis)
    report = await sr.collect_status(pool, redis)
    parsed = orjson.loads(sr.report_json(report))
    assert set(parsed) == {
        "now_ms",
        "now",
        "now_source",
        "state",
        "storage_mode",
        "storage",
        "data_end_ms",
        "data_end",
        "data_end_age_s",
        "local_now_ms",
        "local_now",
        "healthy",
        "unhealthy",
        "thresholds",
        "daemons",
        "processes",
        "tickers",
        "streams",
        "gaps",
        "errors",
        "orderflow",
        "not_followed",
        "skipped_instances",
        "warnings",
    }
    assert set(parsed["tickers"][0]) == {"symbol", "m1", "m5", "m15", "indicators", "open_gaps", "oldest_gap"}
    assert parsed["storage_mode"] == "postgresql" == parsed["storage"]["mode"]  # the test server: plain
    assert parsed == report
    text = sr.render_status(report, colour=False)
    assert "BTCUSDT" in text and "ETHUSDT" in text and "HEALTHY" in text and "UNHEALTHY" not in text
    assert "12:00" in text and "2025-03-01 12:01:30 UTC (exchange clock)" in text
    assert "storage  postgresql" in text


@pytest.fixture
def settings(redis_stack_server, pg_url):
    return load_settings({"REDIS_URL": redis_stack_server.url, "POSTGRES_URL": pg_url})


async def test_run_status_exit_codes_and_output(pool, redis, settings, capsys):
    await seed_tickers(pool, redis, {"BTCUSDT": M1_LAST})
    assert await sr.run_status(settings, [], env={}) == 1  # no daemon: unhealthy, said plainly
    out = capsys.readouterr().out
    assert "STOPPED (no daemon running)" in out and "data ends at 2025-03-01 12:01 UTC" in out

    await beat(redis)
    assert await sr.run_status(settings, [], env={}) == 0
    out = capsys.readouterr().out
    assert "HEALTHY" in out and "UNHEALTHY" not in out and "BTCUSDT" in out and "\033" not in out

    assert await sr.run_status(settings, ["--json"], env={}) == 0
    parsed = orjson.loads(capsys.readouterr().out)
    assert parsed["healthy"] is True and parsed["tickers"][0]["m1"]["lag_s"] == 30.0

    assert await sr.run_status(settings, ["status", "--json"], env={"STATUS_MAX_LAG_S": "10"}) == 1
    assert orjson.loads(capsys.readouterr().out)["unhealthy"][0].startswith("1 ticker(s) with M1 lag above 10 s")

    assert await sr.run_status(settings, ["--help"], env={}) == 0
    assert "--json" in capsys.readouterr().out
    assert await sr.run_status(settings, ["--bogus"], env={}) == 2
    capsys.readouterr()
    with pytest.raises(ConfigError, match="STATUS_MAX_PENDING"):
        await sr.run_status(settings, [], env={"STATUS_MAX_PENDING": "lots"})


async def test_run_status_unreachable_redis_raises_boot_error(pg_url):
    settings = load_settings({"REDIS_URL": f"redis://127.0.0.1:{free_port()}/0", "POSTGRES_URL": pg_url})
    started = time.monotonic()
    with pytest.raises(BootError, match=r"Redis at redis://127\.0\.0\.1:\d+/0 unreachable"):
        await sr.run_status(settings, [], env={})
    assert time.monotonic() - started < 8


async def test_run_status_on_a_database_without_the_schema_raises_boot_error(redis_stack_server):
    name = f"feed_v4_status_empty_{os.getpid()}"
    empty_url = await recreate_database(setting("POSTGRES_URL"), name)
    try:
        settings = load_settings({"REDIS_URL": redis_stack_server.url, "POSTGRES_URL": empty_url})
        with pytest.raises(BootError, match=r"no feed_v4 schema.*migrate"):
            await sr.run_status(settings, [], env={})
    finally:
        await drop_database(setting("POSTGRES_URL"), name)


def test_a_group_given_the_newest_entry_has_no_lag_whatever_redis_counts():
    # Redis's lag counter goes wrong after trimming (seen: 40032 with nothing unread).
    groups = [{"name": "g", "pending": 0, "lag": 40032, "consumers": 1, "last-delivered-id": "1700-5"}]
    assert sr.stream_info(10, groups, [("1700-5", {})])["groups"]["g"]["lag"] == 0
    assert sr.stream_info(10, groups, [("1700-6", {})])["groups"]["g"]["lag"] == 40032
    assert sr.stream_info(10, groups)["groups"]["g"]["lag"] == 40032


async def test_order_flow_lag_and_trade_gaps_are_shown(pool, redis):
    await seed_tickers(pool, redis, {"BTCUSDT": M1_LAST, "ETHUSDT": M1_LAST})
    await pool.execute("UPDATE tickers SET trades = false WHERE symbol = 'ETHUSDT'")
    bars = [
        FinalBar.of(symbol, "m1", BarFlow(t, 1_000_000), CvdChain(), ImbalanceRules())
        for symbol, t in (("BTCUSDT", M1_LAST - 3 * MINUTE), ("ETHUSDT", M1_LAST))
    ]
    await store.upsert_bars(pool, bars)
    await store.log_gaps(pool, [("BTCUSDT", M1_LAST - 2 * MINUTE, "a gap in the aggTrade ids")])
    await store.resolve_gaps(pool, [("BTCUSDT", M1_LAST - 9 * MINUTE)], "unfillable", "older than 48 h")
    await beat(redis)
    report = await sr.collect_status(pool, redis)
    flow = report["orderflow"]
    assert flow["tickers"] == 1  # ETHUSDT's trades are not followed
    assert flow["worst"]["m1"] == {
        "symbol": "BTCUSDT",
        "open_time_ms": M1_LAST - 3 * MINUTE,
        "open_time": "2025-03-01T11:57:00.000Z",
        "lag_s": 210.0,
    }
    assert flow["worst"]["m5"] is None
    assert flow["gaps"] == {
        "open": 1,
        "filled": 0,
        "unfillable": 1,
        "oldest_open": {
            "symbol": "BTCUSDT",
            "open_time_ms": M1_LAST - 2 * MINUTE,
            "open_time": "2025-03-01T11:58:00.000Z",
        },
    }
    text = sr.render_status(report, colour=False)
    assert "ORDER FLOW (1 tickers" in text and "m1 BTCUSDT" in text and "open 1  filled 0  unfillable 1" in text


def test_no_daemon_and_no_data_says_so():
    report = pure_report({"BTCUSDT": None}, heartbeat=False)
    assert report["state"] == "stopped" and report["now_source"] == "local" and report["data_end"] is None
    assert report["unhealthy"][0] == (
        "no live heartbeat: no daemon is running (or none can reach Redis); no M1 candle stored"
    )
    assert "data     none stored" in sr.render_status(report, colour=False)


def test_a_running_daemon_is_measured_as_before():
    report = pure_report({"BTCUSDT": 30.0})
    assert (report["state"], report["now_source"], report["healthy"]) == ("running", "exchange", True)
    assert sr.render_status(report, colour=False).startswith("feed_v4 status: HEALTHY\n")
