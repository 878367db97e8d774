"""Binance REST: one client and one weight limiter for every caller of the process.

Every request goes through `WeightLimiter`, which keeps our weight within the
exchange's per-minute limit and honours `Retry-After` (429, and the 418 ban). Bodies
are read with a size cap: an endless or huge answer is an error, not memory.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson

from binance.protocol import klines_weight
from binance.streams import Backoff
from binance.trades import agg_trades_of
from infra import RateLimitedLog, log_system_event
from orderflow.fold import AggTrade

if TYPE_CHECKING:
    from binance.limits import SharedLimits

MAX_BODY_BYTES = 16 * 1024 * 1024  # exchangeInfo, the largest answer, is about 1 MB
RETRY_AFTER_MAX_S = 3600.0
INVALID_SYMBOL = -1121  # Binance error code: the symbol is not listed


class RestError(Exception):
    """A request that failed; `status` and `code` (Binance's error code) when known."""

    def __init__(self, message: str, status: int | None = None, code: int | None = None) -> None:
        super().__init__(message)
        self.status, self.code = status, code

    @property
    def permanent(self) -> bool:
        """A 4xx other than the rate limits: asking again gives the same answer."""
        return self.status is not None and 400 <= self.status < 500 and self.status not in (418, 429)


def retry_after_s(value: str | None, default: float = 60.0) -> float:
    """`Retry-After` in seconds, bounded; a malformed header means the default."""
    try:
        seconds = float(value) if value else default
    except ValueError:
        return default
    return min(max(seconds, 1.0), RETRY_AFTER_MAX_S) if seconds == seconds else default


def error_code(payload: Any) -> int | None:
    if isinstance(payload, dict) and type(payload.get("code")) is int:
        return payload["code"]
    return None


class WeightLimiter:
    """Keeps our request weight within the exchange's limit over a sliding window and
    honours Retry-After (429, and 418 bans)."""

    def __init__(self, limit: int, window_s: float) -> None:
        self.limit, self.window_s = limit, window_s
        self.total = 0  # weight spent since start (progress lines, the metrics endpoint)
        self.spent: deque[tuple[float, int]] = deque()
        self.blocked_until = 0.0
        self.shared: SharedLimits | None = None  # the deployment's count for this IP (binance/limits.py)
        self._lock = asyncio.Lock()
        self.waits = RateLimitedLog("REST")  # held back by the other processes: otherwise silent

    def _used(self, now: float) -> int:
        while self.spent and now - self.spent[0][0] >= self.window_s:
            self.spent.popleft()
        return sum(w for _, w in self.spent)

    async def acquire(self, weight: int) -> None:
        async with self._lock:
            while True:
                now = time.monotonic()
                if now < self.blocked_until:
                    await asyncio.sleep(self.blocked_until - now)
                    continue
                if self._used(now) + weight <= self.limit:
                    wait_s = await self.shared.weight_wait_s(weight) if self.shared else 0.0
                    if wait_s > 0:  # the other processes on this IP spent this minute's weight
                        self.waits.warn(
                            "shared",
                            f"the REST weight of this IP's minute is spent (the deployment's processes share "
                            f"{self.limit}): requests wait {wait_s:.1f}s; this process used {self._used(now)}",
                        )
                        await asyncio.sleep(wait_s)
                        continue
                    self.spent.append((now, weight))
                    self.total += weight
                    return
                await asyncio.sleep(max(0.005, self.spent[0][0] + self.window_s - now))

    async def block_for(self, seconds: float) -> None:
        """A 429 or 418: nobody on this IP sends until Retry-After has passed."""
        self.blocked_until = max(self.blocked_until, time.monotonic() + seconds)
        if self.shared:
            await self.shared.block(seconds)

    async def observe(self, used_header: str | None) -> None:
        """The exchange counts all our IP's requests; if it saw more than we did, catch up."""
        if used_header and used_header.isdigit() and len(used_header) < 10:
            gap = min(int(used_header), self.limit) - self._used(time.monotonic())
            if gap > 0:
                self.spent.append((time.monotonic(), gap))
                if self.shared:
                    await self.shared.seen(int(used_header))


async def read_capped(response: aiohttp.ClientResponse, cap: int = MAX_BODY_BYTES) -> bytes:
    if response.content_length is not None and response.content_length > cap:
        raise RestError(f"answer of {response.content_length} bytes is over the {cap}-byte cap", response.status)
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(65536):
        size += len(chunk)
        if size > cap:
            raise RestError(f"answer over the {cap}-byte cap", response.status)
        chunks.append(chunk)
    return b"".join(chunks)


class RestClient:
    def __init__(self, base_url: str, limiter: WeightLimiter, attempts: int = 6) -> None:
        self.base_url, self.limiter, self.attempts = base_url, limiter, attempts
        self._session: aiohttp.ClientSession | None = None
        self.requests = 0
        self.on_server_time: list[Any] = []  # callbacks given each /fapi/v1/time answer

    async def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15))
        return self._session

    async def close(self) -> None:
        if self._session:
            await self._session.close()

    async def get(self, path: str, params: dict[str, Any], weight: int) -> Any:
        backoff = Backoff(0.5, 10.0)
        last_error: Exception | None = None
        for _ in range(self.attempts):
            await self.limiter.acquire(weight)
            self.requests += 1
            try:
                session = await self.session()
                async with session.get(self.base_url + path, params=params) as response:
                    await self.limiter.observe(response.headers.get("X-MBX-USED-WEIGHT-1M"))
                    if response.status in (418, 429):
                        retry_after = retry_after_s(response.headers.get("Retry-After"))
                        await self.limiter.block_for(retry_after)
                        log_system_event(
                            "WARNING",
                            "REST",
                            f"HTTP {response.status} on {path}: waiting {retry_after:.0f}s",
                            {"retry_after_s": retry_after},
                        )
                        last_error = RestError(f"HTTP {response.status}", response.status)
                        continue
                    body = await read_capped(response)
                    if response.status >= 500:
                        raise RestError(f"HTTP {response.status}", response.status)
                    payload = orjson.loads(body)
                    if response.status >= 400:
                        raise RestError(
                            f"HTTP {response.status}: {str(payload)[:200]}", response.status, error_code(payload)
                        )
                    return payload
            except RestError as exc:
                if exc.permanent:
                    raise
                last_error = exc
            except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError) as exc:
                last_error = exc  # dropped connection, slow answer, truncated body
            await asyncio.sleep(backoff.next_delay())
        raise RestError(f"{path} failed {self.attempts} times: {last_error}")

    async def server_time(self) -> int:
        payload = await self.get("/fapi/v1/time", {}, 1)
        server_ms = payload.get("serverTime") if isinstance(payload, dict) else None
        if type(server_ms) is not int:
            raise RestError(f"/fapi/v1/time answered {str(payload)[:100]}")
        for callback in self.on_server_time:
            callback(server_ms)
        return server_ms

    async def klines(self, symbol: str, start_ms: int, end_ms: int, limit: int) -> list:
        params = {"symbol": symbol, "interval": "1m", "startTime": start_ms, "endTime": end_ms, "limit": limit}
        rows = await self.get("/fapi/v1/klines", params, klines_weight(limit))
        if not isinstance(rows, list):
            raise RestError(f"/fapi/v1/klines answered {str(rows)[:100]}")
        return rows

    AGG_TRADES_LIMIT, AGG_TRADES_WEIGHT = 1000, 20

    async def agg_trades_between(self, symbol: str, first_ms: int, end_ms: int) -> list[AggTrade]:
        """Every aggTrade with first_ms <= T < end_ms (at most an hour), oldest first: a page
        by time, then by id while pages come back full (a busy minute has thousands; a
        quiet hour fits in one page)."""
        last = end_ms - 1
        params: dict[str, Any] = {
            "symbol": symbol,
            "startTime": first_ms,
            "endTime": last,
            "limit": self.AGG_TRADES_LIMIT,
        }
        page = agg_trades_of(await self.get("/fapi/v1/aggTrades", params, self.AGG_TRADES_WEIGHT))
        trades = list(page)
        while len(page) == self.AGG_TRADES_LIMIT:
            params = {"symbol": symbol, "fromId": trades[-1].agg_id + 1, "limit": self.AGG_TRADES_LIMIT}
            page = agg_trades_of(await self.get("/fapi/v1/aggTrades", params, self.AGG_TRADES_WEIGHT))
            page = [t for t in page if t.time_ms <= last]  # a page past the span comes back short
            trades += page
        return trades

    async def exchange_info(self) -> Any:
        return await self.get("/fapi/v1/exchangeInfo", {}, 1)
