"""alerts.py: Telegram alerts, delivered to a real local HTTP server standing in for the Bot API."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import suppress

import pytest
from servers import FakeTelegram

from alerts import MAX_TEXT, Alert, TelegramAlerts, TokenBucket, dedup_key, format_alert, retry_after
from infra import ConfigError, load_settings, log_system_event

TOKEN = "123456:SECRET-bot-token"
CHAT = "-100777"
SERVERS = {"REDIS_URL": "redis://127.0.0.1:6390/0", "POSTGRES_URL": "postgresql://postgres@127.0.0.1:5432/feed_v4"}


class Clock:
    """Drives the token bucket and the dedup window without sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def wait_until(condition: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


@pytest.fixture
async def telegram() -> AsyncIterator[FakeTelegram]:
    server = FakeTelegram()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def make_alerts(telegram: FakeTelegram, clock: Clock) -> AsyncIterator[Callable[..., TelegramAlerts]]:
    """Build from settings, attach the handler to the root logger, start the worker; undo it all after."""
    root, level = logging.getLogger(), logging.getLogger().level
    root.setLevel(logging.DEBUG)  # so that the handler's own level is what keeps INFO/WARNING out
    made: list[tuple[TelegramAlerts, asyncio.Task | None]] = []

    def make(env: dict[str, str] | None = None, run: bool = True) -> TelegramAlerts:
        settings = load_settings(
            {**SERVERS, "TELEGRAM_BOT_TOKEN": TOKEN, "TELEGRAM_CHAT_ID": CHAT, "TELEGRAM_API_URL": telegram.url}
        )
        alerts = TelegramAlerts.from_settings(settings, env or {}, clock=clock, backoff_s=0.05, max_attempts=3)
        assert alerts is not None
        root.addHandler(alerts.handler)
        made.append((alerts, asyncio.create_task(alerts.run()) if run else None))
        return alerts

    yield make
    for alerts, task in made:
        root.removeHandler(alerts.handler)
        if task is not None:
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task
        await alerts.close()
    root.setLevel(level)


# --------------------------------------------------------------------------- pure helpers


def test_dedup_key_ignores_digits_but_not_level_module_or_words():
    key = dedup_key("ERROR", "INTAKE", "storing 12 candles failed")
    assert key == dedup_key("ERROR", "INTAKE", "storing 13 candles failed")
    assert key != dedup_key("CRITICAL", "INTAKE", "storing 12 candles failed")
    assert key != dedup_key("ERROR", "AGGREGATOR", "storing 12 candles failed")
    assert key != dedup_key("ERROR", "INTAKE", "storing 12 trades failed")


def test_format_alert_keeps_header_and_footer_within_telegram_limit():
    alert = Alert("ERROR", "INTAKE", "x" * 10_000, 0.0)
    text = format_alert(alert, "box", repeated=7, window_s=600, notes=("3 more alerts suppressed by the rate limit",))
    assert len(text) == MAX_TEXT
    assert text.startswith("ERROR | INTAKE\nxxx")
    assert text.endswith(
        "…\n(repeated 7 times in the last 10 min)\n3 more alerts suppressed by the rate limit\n"
        "host box | 1970-01-01 00:00:00 UTC"
    )


def test_token_bucket_refills_at_the_configured_rate():
    clock = Clock()
    bucket = TokenBucket(5, clock)
    assert [bucket.take() for _ in range(6)] == [True] * 5 + [False]
    clock.now += 11.9
    assert not bucket.take()
    clock.now += 0.2  # 12 s per token at 5/min
    assert bucket.take() and not bucket.take()
    clock.now += 3600
    assert sum(bucket.take() for _ in range(10)) == 5  # burst capped at one minute's worth


def test_retry_after_prefers_the_body_then_the_header():
    assert retry_after('{"ok": false, "parameters": {"retry_after": 3}}', "9", 0.5) == 3.0
    assert retry_after("<html>busy</html>", "9", 0.5) == 9.0
    assert retry_after("{}", None, 0.5) == 0.5


def test_from_settings_needs_token_and_chat_id_and_checks_options():
    base = {**SERVERS, "TELEGRAM_BOT_TOKEN": TOKEN, "TELEGRAM_CHAT_ID": CHAT}
    assert TelegramAlerts.from_settings(load_settings(SERVERS), {}) is None
    assert TelegramAlerts.from_settings(load_settings({**base, "TELEGRAM_CHAT_ID": ""}), {}) is None
    assert TelegramAlerts.from_settings(load_settings({**base, "TELEGRAM_BOT_TOKEN": ""}), {}) is None
    alerts = TelegramAlerts.from_settings(load_settings(base), {})
    assert alerts is not None
    assert (alerts.bucket.capacity, alerts.dedup_s, alerts.queue_max) == (10, 600.0, 1000)
    assert alerts.url == f"https://api.telegram.org/bot{TOKEN}/sendMessage"
    for bad in ("fast", "0"):
        with pytest.raises(ConfigError, match="ALERT_RATE_PER_MIN"):
            TelegramAlerts.from_settings(load_settings(base), {"ALERT_RATE_PER_MIN": bad})
    with pytest.raises(ConfigError, match="ALERT_QUEUE_MAX"):
        TelegramAlerts.from_settings(load_settings(base), {"ALERT_QUEUE_MAX": "-1"})


# --------------------------------------------------------------------------- delivery


async def test_error_is_delivered_with_path_chat_id_and_text(make_alerts, telegram):
    make_alerts()
    log_system_event("ERROR", "INTAKE", "storing 12 candles failed: connection reset")
    await wait_until(lambda: len(telegram.requests) == 1)
    request = telegram.requests[0]
    assert request["path"] == f"/bot{TOKEN}/sendMessage"
    assert request["json"]["chat_id"] == CHAT
    assert request["json"]["disable_web_page_preview"] is True
    text = request["json"]["text"]
    assert text.startswith("ERROR | INTAKE\nstoring 12 candles failed: connection reset\n")
    assert f"host {socket.gethostname()} | " in text and text.endswith(" UTC")

    threading.Thread(target=lambda: logging.getLogger("MAIN").critical("disk full")).start()  # not the loop thread
    await wait_until(lambda: len(telegram.requests) == 2)
    assert telegram.texts[1].startswith("CRITICAL | MAIN\ndisk full\n")


async def test_info_warning_and_own_records_are_not_sent(make_alerts, telegram):
    alerts = make_alerts()
    log_system_event("INFO", "INTAKE", "connected")
    log_system_event("WARNING", "INTAKE", "slow consumer")
    logging.getLogger("ALERTS").error("sending failed")  # would recurse if it were sent
    log_system_event("ERROR", "INTAKE", "marker")
    await wait_until(lambda: len(telegram.requests) == 1)
    await asyncio.sleep(0.1)
    assert len(telegram.requests) == 1 and "\nmarker\n" in telegram.texts[0]
    assert alerts.stats == {"sent": 1, "deduplicated": 0, "suppressed": 0, "failed": 0, "dropped": 0}


async def test_rate_limit_sends_at_most_the_budget_and_reports_the_rest(make_alerts, telegram, clock):
    alerts = make_alerts({"ALERT_RATE_PER_MIN": "5"})
    log = logging.getLogger("INTAKE")
    for i in range(50):  # letters, not digits: these must be distinct alerts
        log.error("failure in %s", "abcdefghij"[i // 10] + "abcdefghij"[i % 10])
    await wait_until(lambda: alerts.stats["sent"] + alerts.stats["suppressed"] == 50)
    await asyncio.sleep(0.1)
    assert len(telegram.requests) == 5 and alerts.stats["suppressed"] == 45

    clock.now += 12  # one token at 5/min
    log.error("after the burst")
    await wait_until(lambda: len(telegram.requests) == 6)
    assert "\nafter the burst\n45 more alerts suppressed by the rate limit\n" in telegram.texts[5]

    clock.now += 12
    log.error("later still")
    await wait_until(lambda: len(telegram.requests) == 7)
    assert "suppressed" not in telegram.texts[6]  # reported once


async def test_identical_errors_are_sent_once_then_the_repeat_count(make_alerts, telegram, clock):
    alerts = make_alerts()
    for n in range(20):
        log_system_event("ERROR", "INTAKE", f"storing {n + 10} candles failed")
    await wait_until(lambda: alerts.stats["deduplicated"] == 19)
    await asyncio.sleep(0.1)
    assert telegram.texts == [telegram.texts[0]] and "storing 10 candles failed" in telegram.texts[0]

    clock.now += 601
    log_system_event("ERROR", "INTAKE", "storing 99 candles failed")
    await wait_until(lambda: len(telegram.requests) == 2)
    assert "storing 99 candles failed\n(repeated 19 times in the last 10 min)\n" in telegram.texts[1]
    log_system_event("ERROR", "INTAKE", "storing 7 candles failed")  # a new window has started
    await wait_until(lambda: alerts.stats["deduplicated"] == 20)
    assert len(telegram.requests) == 2


async def test_full_queue_counts_drops_without_blocking_and_reports_them(make_alerts, telegram):
    alerts = make_alerts({"ALERT_QUEUE_MAX": "3"}, run=False)
    for name in ("a", "b", "c", "d", "e"):
        logging.getLogger("INTAKE").error("queued %s", name)
    assert alerts.stats["dropped"] == 2 and len(alerts.queue) == 3
    task = asyncio.create_task(alerts.run())
    try:
        await wait_until(lambda: len(telegram.requests) == 3)
        assert "2 alerts dropped (alert queue full)" in telegram.texts[0]
        assert "dropped" not in telegram.texts[1]
    finally:
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task


# --------------------------------------------------------------------------- Telegram trouble


@pytest.mark.parametrize(
    ("body", "headers"),
    [
        ({"ok": False, "error_code": 429, "parameters": {"retry_after": 1}}, {}),
        ({"ok": False, "error_code": 429}, {"Retry-After": "1"}),
    ],
    ids=["body", "header"],
)
async def test_429_waits_retry_after_then_delivers(make_alerts, telegram, body, headers):
    alerts = make_alerts()
    telegram.script.append((429, body, headers))
    log_system_event("ERROR", "INTAKE", "throttled")
    await wait_until(lambda: alerts.stats["sent"] == 1, timeout=4)
    first, second = telegram.requests
    assert second["json"] == first["json"]
    assert second["at"] - first["at"] >= 0.95  # the test backoff is 0.05 s: only retry_after explains this


async def test_5xx_is_retried_with_a_warning_that_masks_the_token(make_alerts, telegram, caplog):
    alerts = make_alerts()
    telegram.script.extend([(500, {}, {}), (502, {}, {})])
    log_system_event("ERROR", "INTAKE", "flaky upstream")
    await wait_until(lambda: alerts.stats["sent"] == 1)
    assert len(telegram.requests) == 3
    warnings = [r.getMessage() for r in caplog.records if r.name == "ALERTS" and r.levelno == logging.WARNING]
    assert len(warnings) == 2 and all("HTTP 5" in w and "/bot***/sendMessage" in w for w in warnings)
    assert not any(TOKEN in r.getMessage() for r in caplog.records)


async def test_server_down_warns_drops_and_recovers(make_alerts, telegram, caplog):
    alerts = make_alerts(run=False)
    worker = asyncio.create_task(alerts.run())
    try:
        await telegram.stop()
        log_system_event("ERROR", "INTAKE", "while telegram is down")
        await wait_until(lambda: alerts.stats["failed"] == 1)
        warnings = [r.getMessage() for r in caplog.records if r.name == "ALERTS" and r.levelno == logging.WARNING]
        assert len(warnings) == 3 and "dropped after 3 attempts" in warnings[-1]
        assert not any(TOKEN in r.getMessage() for r in caplog.records)
        assert not worker.done()

        await telegram.start()  # same port
        log_system_event("ERROR", "INTAKE", "telegram is back")
        await wait_until(lambda: alerts.stats["sent"] == 1)
        assert len(telegram.requests) == 1 and "\ntelegram is back\n" in telegram.texts[0]
    finally:
        worker.cancel()
        with suppress(asyncio.CancelledError):
            await worker
