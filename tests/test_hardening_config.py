"""Hardening of settings, logs and retention (issue 13): secrets never printed, hosted
URLs understood, logs bounded in memory and on disk. Each test failed before."""

from __future__ import annotations

import pytest

from binance.settings import FeedSettings
from connections import pg_connect_options
from infra import ConfigError, RateLimitedLog, SystemEventLog, load_settings, mask_url
from retention import RetentionOptions, prune_all

BASE = {"REDIS_URL": "redis://127.0.0.1:6379/0", "POSTGRES_URL": "postgresql://postgres@127.0.0.1:5432/x"}


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("redis://:s3cret@host:6379/0", "redis://:***@host:6379/0"),
        (
            "rediss://default:s3cret@host:6379/0?ssl_ca_certs=/ca.pem",
            "rediss://default:***@host:6379/0?ssl_ca_certs=/ca.pem",
        ),
        ("postgresql://app:p@ss@host/db", "postgresql://app:***@host/db"),  # an unencoded '@'
        ("postgresql://app:pa/ss@host/db", "postgresql://app:***@host/db"),  # an unencoded '/'
        ("redis://host:6379/0?password=s3cret&x=1", "redis://host:6379/0?password=***&x=1"),
        ("postgresql://u@h/db?sslpassword=s3cret", "postgresql://u@h/db?sslpassword=***"),
        ("redis://host:6379/0", "redis://host:6379/0"),
    ],
)
def test_secrets_are_masked_even_in_urls_that_do_not_parse(url, masked):
    assert mask_url(url) == masked


def test_the_order_flow_switch_takes_a_boolean_and_refuses_anything_else():
    settings = load_settings(BASE)
    assert FeedSettings.from_env(settings, {}).orderflow
    assert not FeedSettings.from_env(settings, {"ORDERFLOW": "off"}).orderflow
    assert not FeedSettings.from_env(settings, {"ORDERFLOW": "False"}).orderflow
    with pytest.raises(ConfigError, match="ORDERFLOW"):
        FeedSettings.from_env(settings, {"ORDERFLOW": "of"})  # misspelt: was read as on


@pytest.mark.parametrize(
    ("key", "url", "says"),
    [
        ("POSTGRES_URL", "postgresql://app:s3cret@@127.0.0.1:5432/db", "unencoded '@'"),
        ("POSTGRES_URL", "postgresql://app:s3c@ret@127.0.0.1:5432/db", "unencoded '@'"),
        ("POSTGRES_URL", "postgresql://app:s3/cret@127.0.0.1:5432/db", "percent-encoded"),
        ("REDIS_URL", "redis://:s3#cret@127.0.0.1:6379/0", "percent-encoded"),
        ("REDIS_URL", "redis://:s3cret@127.0.0.1:port/0", "percent-encoded"),
    ],
)
def test_a_malformed_url_is_refused_without_printing_its_password(key, url, says):
    with pytest.raises(ConfigError) as error:
        load_settings({**BASE, key: url})
    assert says in str(error.value)
    assert "s3" not in str(error.value) and "cret" not in str(error.value)


def test_telegram_over_plain_http_is_refused_except_on_this_machine():
    with pytest.raises(ConfigError, match="plain http"):
        load_settings({**BASE, "TELEGRAM_API_URL": "http://api.telegram.org"})
    assert load_settings({**BASE, "TELEGRAM_API_URL": "http://127.0.0.1:8081/"}).telegram_api_url.endswith(":8081")
    assert load_settings(BASE).telegram_api_url == "https://api.telegram.org"


def test_symbols_with_characters_binance_never_uses_are_refused():
    for bad in ("BTC#USDT", "BTC/USDT", "BTC@USDT", "BTC USDT"):
        with pytest.raises(ConfigError, match="invalid symbol"):
            load_settings({**BASE, "SYMBOLS": f"ETHUSDT,{bad}"})
    assert load_settings({**BASE, "SYMBOLS": "btcusdt, BTCUSDT_260327"}).symbols == ("BTCUSDT", "BTCUSDT_260327")


def test_libpq_only_url_parameters_are_translated_or_left_out():
    url = "postgresql://u:p@h.neon.tech/db?sslmode=require&channel_binding=require&connect_timeout=15&options=x"
    dsn, options, dropped = pg_connect_options(url)
    assert dsn == "postgresql://u:p@h.neon.tech/db?sslmode=require&options=x"
    assert options == {"timeout": 15.0} and dropped == ["channel_binding"]
    with pytest.raises(ConfigError, match="connect_timeout"):
        pg_connect_options("postgresql://h/db?connect_timeout=soon")


def test_a_rate_limited_log_tracks_a_bounded_number_of_reasons():
    limited = RateLimitedLog("TEST", max_reasons=50)
    for i in range(10_000):
        limited.warn(f"reason {i} for {chr(65 + i % 26)}", "message")
    assert len(limited.last) <= 50 and len(limited.suppressed) <= 50
    limited = RateLimitedLog("TEST")
    for i in range(1000):
        limited.warn(f"row {i} refused", "message")  # digits folded: one reason
    assert len(limited.last) == 1 and sum(limited.suppressed.values()) == 999


async def test_a_log_row_postgresql_would_refuse_never_blocks_the_log(pool):
    log = SystemEventLog(capacity=100)
    log.record("WARNING", "FEED", "a NUL \x00 in a frame", {"frame": "\u0000 and more"})
    log.record("WARNING", "FEED", "a lone surrogate \ud800 in a frame")
    log.record("ERROR", "FEED", "x" * 100_000, {"frame": "y" * 1_000_000})
    log.record("INFO", "FEED", "the row after")
    assert await log.flush(pool) == 4
    rows = await pool.fetch("SELECT level, module, message, details::text AS details FROM system_log_v4 ORDER BY id")
    messages = [r["message"] for r in rows]
    assert messages[0] == "a NUL \ufffd in a frame" and "\ufffd and more" in rows[0]["details"]
    assert "refused by PostgreSQL" in messages[1]
    assert len(messages[2]) == SystemEventLog.MAX_MESSAGE_CHARS and len(rows[2]["details"]) < 20_000
    assert messages[3] == "the row after"


async def test_the_logs_are_pruned_to_their_retention_in_batches(pool):
    await pool.execute(
        "INSERT INTO system_log_v4 (ts, level, module, message) SELECT now() - make_interval(days => d), 'INFO', "
        "'T', 'm' FROM generate_series(1, 60) AS d"
    )
    await pool.execute(
        "INSERT INTO signals_v2_log (id, uid, status, received_at) VALUES "
        "(1, 'old', 'new', now() - interval '100 days'), (2, 'recent', 'new', now() - interval '1 day')"
    )
    await pool.execute(
        "INSERT INTO signal_log_entries_v2 (log_id, strategy_id, status) "
        "VALUES (1, 1, 'delivered'), (2, 1, 'delivered')"
    )
    await pool.execute(
        "INSERT INTO missing_m1_log_v4 (symbol, open_time, detected_at, status) VALUES "
        "('A', '2026-01-01', now() - interval '100 days', 'backfilled'), "
        "('A', '2026-01-02', now() - interval '100 days', 'missing'), "
        "('A', '2026-01-03', now() - interval '1 day', 'unfillable')"
    )
    options = RetentionOptions({"system_log": 30, "signal_log": 90, "gap_log": 90}, batch=7)
    pruned = await prune_all(pool, options)
    assert pruned == {"system_log": 31, "signal_log": 1, "gap_log": 1}
    assert await pool.fetchval("SELECT count(*) FROM system_log_v4") == 29
    assert [r["uid"] for r in await pool.fetch("SELECT uid FROM signals_v2_log")] == ["recent"]
    assert await pool.fetchval("SELECT count(*) FROM signal_log_entries_v2") == 1  # its entries went with it
    left = await pool.fetch("SELECT status FROM missing_m1_log_v4 ORDER BY open_time")
    assert [r["status"] for r in left] == ["missing", "unfillable"]  # an open gap is never pruned
    assert await prune_all(pool, options) == {}
