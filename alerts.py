"""Optional Telegram alerts for ERROR/CRITICAL log records (SPEC sections 3 and 11).

A logging handler only enqueues (it never blocks or raises on the hot path); the `run`
worker deduplicates, rate-limits and POSTs to the Bot API. Telegram being away costs
a WARNING on the console and a count, never the daemon.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import socket
import time
from collections import deque
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, NamedTuple

import aiohttp

import infra

LOGGER_NAME = "ALERTS"  # its records never become alerts: a failing send must not recurse
MAX_TEXT = 4096  # Telegram's limit for one message
log = logging.getLogger(LOGGER_NAME)


class Alert(NamedTuple):
    level: str
    module: str
    message: str
    created: float  # wall-clock seconds, from the log record


def dedup_key(level: str, module: str, message: str) -> str:
    """Digits normalised, so 'storing 12 candles failed' and '... 13 ...' count as one alert."""
    return f"{level}|{module}|{re.sub(r'\d+', '#', message)}"


def format_window(seconds: float) -> str:
    return f"{seconds / 60:g} min" if seconds >= 60 else f"{seconds:g} s"


def format_alert(alert: Alert, host: str, repeated: int = 0, window_s: float = 0, notes: tuple[str, ...] = ()) -> str:
    """Plain text (no parse_mode, nothing to escape); the message body is cut to fit 4096 chars."""
    stamp = datetime.fromtimestamp(alert.created, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    head = f"{alert.level} | {alert.module}\n"
    tail = [f"(repeated {repeated} times in the last {format_window(window_s)})"] if repeated else []
    tail += [*notes, f"host {host} | {stamp}"]
    footer = "\n" + "\n".join(tail)
    room = MAX_TEXT - len(head) - len(footer)
    body = alert.message if len(alert.message) <= room else alert.message[: max(room - 1, 0)] + "…"
    return (head + body + footer)[:MAX_TEXT]


def mask_secret(text: str, secret: str) -> str:
    return text.replace(secret, "***") if secret else text


class TokenBucket:
    """`rate_per_min` sends per minute, bursts up to that many; the clock is injectable for tests."""

    def __init__(self, rate_per_min: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity = max(float(rate_per_min), 1.0)
        self.per_second = rate_per_min / 60.0
        self.clock = clock
        self.tokens = self.capacity
        self.stamp = clock()

    def take(self) -> bool:
        now = self.clock()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.per_second)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class _AlertHandler(logging.Handler):
    """Attach to the root logger; `emit` only appends to the owner's bounded queue."""

    def __init__(self, owner: TelegramAlerts) -> None:
        super().__init__(logging.ERROR)
        self.owner = owner

    def emit(self, record: logging.LogRecord) -> None:
        if record.name == LOGGER_NAME or record.name.startswith(LOGGER_NAME + "."):
            return
        try:
            message = record.getMessage()
            if record.exc_info and record.exc_info[1] is not None:
                message += f"\n{type(record.exc_info[1]).__name__}: {record.exc_info[1]}"
            self.owner.enqueue(Alert(record.levelname, record.name, message, record.created))
        except Exception:
            pass


class TelegramAlerts:
    """Queue, dedup, rate limit and deliver alerts; `stats` counts what happened to each."""

    def __init__(
        self,
        token: str,
        chat_id: str,
        api_url: str = infra.Settings.telegram_api_url,
        *,
        rate_per_min: float = 10,
        dedup_s: float = 600.0,
        queue_max: int = 1000,
        clock: Callable[[], float] = time.monotonic,
        backoff_s: float = 1.0,
        max_attempts: int = 5,
        timeout_s: float = 10.0,
    ) -> None:
        self.token, self.chat_id = token, chat_id
        self.url = f"{api_url.rstrip('/')}/bot{token}/sendMessage"
        self.dedup_s, self.queue_max, self.clock = dedup_s, queue_max, clock
        self.backoff_s, self.max_attempts, self.timeout_s = backoff_s, max_attempts, timeout_s
        self.bucket = TokenBucket(rate_per_min, clock)
        self.host = socket.gethostname()
        self.handler = _AlertHandler(self)
        self.stats = {"sent": 0, "deduplicated": 0, "suppressed": 0, "failed": 0, "dropped": 0}
        self.queue: deque[Alert] = deque()
        self.sending = False
        self.seen: dict[str, tuple[float, int]] = {}  # dedup key -> (last sent, repeats since)
        self.unreported = {"suppressed": 0, "dropped": 0}  # told in the next message delivered
        self.session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None

    @classmethod
    def from_settings(
        cls, settings: infra.Settings, env: Mapping[str, str] = os.environ, **options: Any
    ) -> TelegramAlerts | None:
        """None when alerts are not configured; ConfigError names a bad ALERT_* value."""
        if not settings.telegram_bot_token or not settings.telegram_chat_id:
            return None
        return cls(
            settings.telegram_bot_token,
            settings.telegram_chat_id,
            settings.telegram_api_url,
            rate_per_min=infra.env_number(env, "ALERT_RATE_PER_MIN", 10, int, 1, 1000),
            dedup_s=infra.env_number(env, "ALERT_DEDUP_S", 600.0, float, 0.0, 86_400.0),
            queue_max=infra.env_number(env, "ALERT_QUEUE_MAX", 1000, int, 1, 1_000_000),
            **options,
        )

    def enqueue(self, alert: Alert) -> None:
        """Callable from any thread; never blocks: a full queue counts the alert as dropped."""
        if len(self.queue) >= self.queue_max:
            self.stats["dropped"] += 1
            self.unreported["dropped"] += 1
            return
        self.queue.append(alert)
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            try:
                loop.call_soon_threadsafe(wake.set)
            except RuntimeError:  # loop closed at shutdown
                pass

    def compose(self, alert: Alert) -> tuple[str, dict[str, int]] | None:
        """Dedup then rate limit; the text to send and the counts it reports, or None."""
        now, key = self.clock(), dedup_key(alert.level, alert.module, alert.message)
        last, repeats = self.seen.get(key, (None, 0))
        if last is not None and now - last < self.dedup_s:
            self.seen[key] = (last, repeats + 1)
            self.stats["deduplicated"] += 1
            return None
        if not self.bucket.take():
            self.stats["suppressed"] += 1
            self.unreported["suppressed"] += 1
            return None
        if len(self.seen) > 10_000:
            self.seen = {k: v for k, v in self.seen.items() if now - v[0] < self.dedup_s}
        self.seen[key] = (now, 0)
        told = dict(self.unreported)
        notes = [f"{told['suppressed']} more alerts suppressed by the rate limit"] if told["suppressed"] else []
        notes += [f"{told['dropped']} alerts dropped (alert queue full)"] if told["dropped"] else []
        return format_alert(alert, self.host, repeats, self.dedup_s, tuple(notes)), told

    async def run(self) -> None:
        """The sending worker; runs forever (under `run_safe_loop`)."""
        self._loop, self._wake = asyncio.get_running_loop(), asyncio.Event()
        if self.session is None or self.session.closed:
            self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s))
        while True:
            self._wake.clear()
            while self.queue:
                self.sending = True
                composed = self.compose(self.queue.popleft())
                if composed is not None and await self.deliver(composed[0]):
                    for what, count in composed[1].items():
                        self.unreported[what] -= count
            self.sending = False
            await self._wake.wait()

    async def drain(self) -> None:
        """At shutdown: let what is queued go out (the caller bounds the wait)."""
        while self.queue or self.sending:
            await asyncio.sleep(0.02)

    async def deliver(self, text: str) -> bool:
        """POST with bounded retries; 429 waits as Telegram asks. False once given up."""
        assert self.session is not None
        payload = {"chat_id": self.chat_id, "text": text, "disable_web_page_preview": True}
        for attempt in range(1, self.max_attempts + 1):
            delay = min(self.backoff_s * 2 ** (attempt - 1), 60.0)
            try:
                async with self.session.post(self.url, json=payload) as response:
                    if response.status == 200:
                        self.stats["sent"] += 1
                        return True
                    body = await response.text()
                    problem = f"HTTP {response.status}: {body[:200]}"
                    if response.status == 429:
                        delay = retry_after(body, response.headers.get("Retry-After"), delay)
                    elif response.status < 500:  # bad token or chat id: retrying cannot help
                        log.warning("Telegram refused an alert (%s); dropped", mask_secret(problem, self.token))
                        break
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                problem = f"{type(exc).__name__}: {exc}"
            if attempt < self.max_attempts:
                masked = mask_secret(problem, self.token)
                log.warning(
                    "cannot send a Telegram alert (%s); try %d/%d, next in %.1f s",
                    masked,
                    attempt,
                    self.max_attempts,
                    delay,
                )
                await asyncio.sleep(delay)
            else:
                log.warning("Telegram alert dropped after %d attempts (%s)", attempt, mask_secret(problem, self.token))
        self.stats["failed"] += 1
        return False

    async def close(self) -> None:
        """Close the HTTP session; detach `handler` from the root logger first."""
        if self.session is not None:
            await self.session.close()


def retry_after(body: str, header: str | None, default: float) -> float:
    """Seconds Telegram asks us to wait: `parameters.retry_after` in the body, else Retry-After."""
    try:
        return min(max(float(json.loads(body)["parameters"]["retry_after"]), 0.0), 300.0)
    except (ValueError, TypeError, KeyError):
        pass
    try:
        return min(max(float(header or ""), 0.0), 300.0)
    except ValueError:
        return default
