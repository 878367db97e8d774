"""Binance's per-IP limits across every process of a deployment (BINANCE.md: connection
attempts are limited per IP, 300 per 5 minutes; REST weight per IP, 2,400 a minute).

A process alone keeps its own count (`AttemptLimiter` here, `rest.WeightLimiter`);
processes that share an IP also share a count in Redis (`SharedLimits`), so that adding
processes never adds up to a ban. Processes with the same `BINANCE_LIMIT_GROUP` share
(one IP, the default); give each IP its own group and each has the whole limit (split).
Each rule is one Lua script on Redis's clock, one round trip per connection attempt or
REST request: neither is per trade. Redis away: the local counts hold, logged once.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import deque

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from infra import RateLimitedLog

CONNECT_WINDOW_S = 300.0
CONNECT_LIMIT = 240  # of the documented 300 per 5 minutes: room for a restart's burst elsewhere

_NOW_LUA = "local t = redis.call('TIME') local now = t[1] * 1000 + math.floor(t[2] / 1000) "

# KEYS: the attempts (sorted set). ARGV: limit, window ms, a unique member.
# 0 when the attempt may go (it is counted), else the ms until one may.
CONNECT_LUA = (
    _NOW_LUA
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('ZADD', KEYS[1], now, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 0
end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return math.max(1, tonumber(oldest[2]) + tonumber(ARGV[2]) - now)
"""
)

# KEYS: the weight hash {minute, used, blocked_until}. ARGV: mode, amount, limit.
# mode 'take': counts `amount` if it fits this minute (0), else the ms to wait;
# 'seen': the exchange reported `amount` used this minute (catch up, never down);
# 'block': nobody sends for `amount` ms (a 429 or 418's Retry-After).
WEIGHT_LUA = (
    _NOW_LUA
    + """
local minute = math.floor(now / 60000)
local state = redis.call('HMGET', KEYS[1], 'minute', 'used', 'blocked_until')
local used = 0
if tonumber(state[1]) == minute then used = tonumber(state[2]) or 0 end
local blocked = tonumber(state[3]) or 0
local amount = tonumber(ARGV[2])
if ARGV[1] == 'block' then
  redis.call('HSET', KEYS[1], 'blocked_until', math.max(blocked, now + amount))
  redis.call('PEXPIRE', KEYS[1], math.max(120000, amount + 60000))
  return 0
end
if ARGV[1] == 'seen' then
  used = math.max(used, amount)
elseif blocked > now then
  return blocked - now
elseif used + amount > tonumber(ARGV[3]) then
  return (minute + 1) * 60000 - now
else
  used = used + amount
end
redis.call('HSET', KEYS[1], 'minute', minute, 'used', used)
if redis.call('PTTL', KEYS[1]) < 120000 then redis.call('PEXPIRE', KEYS[1], 120000) end
return 0
"""
)


class AttemptLimiter:
    """This process's connection attempts over a sliding window."""

    def __init__(self, limit: int = CONNECT_LIMIT, window_s: float = CONNECT_WINDOW_S) -> None:
        self.limit, self.window_s = limit, window_s
        self.times: deque[float] = deque()
        self.total = 0
        self.shared: SharedLimits | None = None
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        """Returns when a connection attempt may be made, counted as made."""
        async with self._lock:
            while True:
                now = time.monotonic()
                while self.times and now - self.times[0] >= self.window_s:
                    self.times.popleft()
                if len(self.times) >= self.limit:
                    await asyncio.sleep(self.times[0] + self.window_s - now)
                    continue
                wait_s = await self.shared.connect_wait_s() if self.shared else 0.0
                if wait_s > 0:
                    await asyncio.sleep(wait_s)
                    continue
                self.times.append(now)
                self.total += 1
                return


class SharedLimits:
    """The deployment's count of one IP's connection attempts and REST weight, in Redis."""

    def __init__(
        self,
        redis: Redis | RedisCluster,
        group: str,
        weight_limit: int,
        connect_limit: int = CONNECT_LIMIT,
        connect_window_s: float = CONNECT_WINDOW_S,
    ) -> None:
        self.redis = redis
        self.connects_key = f"binance_connects:{{{group}}}"  # one hash tag: one slot for both
        self.weight_key = f"binance_weight:{{{group}}}"
        self.weight_limit, self.connect_limit = weight_limit, connect_limit
        self.connect_window_ms = int(connect_window_s * 1000)
        self.errors = RateLimitedLog("LIMITS", interval_s=600)

    async def connect_wait_s(self) -> float:
        """0 when a connection attempt may go now (and it is counted), else how long to wait."""
        member = uuid.uuid4().hex
        return await self._run(CONNECT_LUA, self.connects_key, self.connect_limit, self.connect_window_ms, member)

    async def weight_wait_s(self, weight: int) -> float:
        return await self._run(WEIGHT_LUA, self.weight_key, "take", weight, self.weight_limit)

    async def seen(self, used: int) -> None:
        await self._run(WEIGHT_LUA, self.weight_key, "seen", used, self.weight_limit)

    async def block(self, seconds: float) -> None:
        await self._run(WEIGHT_LUA, self.weight_key, "block", int(seconds * 1000), self.weight_limit)

    async def _run(self, script: str, key: str, *args: object) -> float:
        try:
            wait_ms = await self.redis.eval(script, 1, key, *args)
        except (RedisError, OSError) as exc:
            self.errors.warn(
                "redis",
                f"the deployment's Binance limits are not readable in Redis ({exc!r}): this process "
                "keeps to its own count meanwhile",
            )
            return 0.0
        return int(wait_ms) / 1000
