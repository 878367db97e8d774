"""The leases and the member list in Redis, and one process's round. The rules are
shards/leases.py's (`LeaseTable`), each a Lua script, so that it is atomic and runs on
Redis's clock; a round is one pipeline per call, not a round trip per symbol.

Takes and renewals go as one packed round split by node (candle_stores.execute_packed),
so that on a cluster each node's part can end with a WAIT for its replica; their scripts
go by hash (EVALSHA: 40 bytes a symbol, not the script's text, at every symbol every
second), sent again as EVAL where a node answers NOSCRIPT (a restart, a promoted
replica), which also caches it there. Releases and the heartbeat are rare: EVAL.

Keys (a symbol's two share its hash tag, so a script may touch both on Redis Cluster):
- `lease:{SYMBOL}`: `<token> <member>`, expiring (PX);
- `lease_token:{SYMBOL}`: the symbol's fencing token, never lowered, never expiring;
- `shard_members`: a sorted set of members, scored by when their heartbeat ends.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
import uuid
from collections.abc import Iterable

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError, ResponseError

from candle_stores import execute_packed
from shards.cluster import NotReplicated
from shards.leases import Holding, LeaseTimes, plan_round

MEMBERS_KEY = "shard_members"
REPLICA_WAIT_MS = 250  # how long a take or renewal waits for a replica's acknowledgement

_NOW_LUA = "local t = redis.call('TIME') local now = t[1] * 1000 + math.floor(t[2] / 1000) "
HEARTBEAT_LUA = (
    _NOW_LUA
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
return redis.call('ZRANGE', KEYS[1], 0, -1)
"""
)
# KEYS: lease, token. ARGV: member, ttl. The token, or false while another holds it.
TAKE_LUA = """
local held = redis.call('GET', KEYS[1])
if held then
  local token, member = string.match(held, '^(%d+) (.*)$')
  if member ~= ARGV[1] then return false end
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return tonumber(token)
end
local token = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], token .. ' ' .. ARGV[1], 'PX', ARGV[2])
return token
"""
# KEYS: lease. ARGV: '<token> <member>', ttl. 1 if extended.
RENEW_LUA = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""
RELEASE_LUA = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
return redis.call('DEL', KEYS[1])
"""


def script_sha(script: str) -> str:
    return hashlib.sha1(script.encode()).hexdigest()


TAKE_SHA, RENEW_SHA = script_sha(TAKE_LUA), script_sha(RENEW_LUA)


def lease_key(symbol: str) -> str:
    return f"lease:{{{symbol}}}"


def token_key(symbol: str) -> str:
    return f"lease_token:{{{symbol}}}"


def member_id() -> str:
    """`host:pid:random`: unique even when a container reuses a pid after a restart."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class LeaseStore:
    """`LeaseTable`'s operations on Redis, a batch of symbols per call."""

    def __init__(self, redis: Redis | RedisCluster, times: LeaseTimes) -> None:
        self.redis, self.times = redis, times

    async def heartbeat(self, member: str) -> list[str]:
        """This member's heartbeat renewed; the live members, sorted."""
        members = await self.redis.eval(HEARTBEAT_LUA, 1, MEMBERS_KEY, member, self.times.ttl_ms)
        return sorted(m.decode() if isinstance(m, bytes) else m for m in members)

    async def leave(self, member: str) -> None:
        await self.redis.zrem(MEMBERS_KEY, member)

    async def take(self, member: str, symbols: list[str]) -> dict[str, int]:
        """The symbols taken (or held already by this member), with their tokens; on a
        cluster only those a replica has too (see `_replicated`)."""
        calls = [[2, lease_key(s), token_key(s), member, self.times.ttl_ms] for s in symbols]
        answers = await self._replicated(TAKE_LUA, TAKE_SHA, calls)
        return {symbol: int(token) for symbol, token in zip(symbols, answers, strict=True) if token}

    async def renew(self, member: str, holdings: dict[str, int]) -> set[str]:
        """The holdings still this member's, extended (on a cluster: and replicated)."""
        symbols = list(holdings)
        calls = [[1, lease_key(s), f"{holdings[s]} {member}", self.times.ttl_ms] for s in symbols]
        answers = await self._replicated(RENEW_LUA, RENEW_SHA, calls)
        return {symbol for symbol, done in zip(symbols, answers, strict=True) if done}

    async def _replicated(self, script: str, sha: str, calls: list[list]) -> list:
        """One round; on a Redis Cluster each node's part counts only once a replica has
        acknowledged it (WAIT): a lease its master granted and lost in a failover would
        let a second process take the symbol from the promoted replica. What no replica
        acknowledged reads as not granted: this process does not write under it, and
        takes it again (same token) next round."""
        answers = await execute_packed(self.redis, [["EVALSHA", sha, *call] for call in calls], REPLICA_WAIT_MS)
        unknown = [i for i, answer in enumerate(answers) if _no_script(answer)]  # not run: safe to send again
        if unknown:
            again = await execute_packed(self.redis, [["EVAL", script, *calls[i]] for i in unknown], REPLICA_WAIT_MS)
            for i, answer in zip(unknown, again, strict=True):
                answers[i] = answer
        for answer in answers:
            if isinstance(answer, Exception) and not isinstance(answer, NotReplicated):
                raise answer
        return [None if isinstance(answer, NotReplicated) else answer for answer in answers]

    async def release(self, member: str, holdings: dict[str, int]) -> set[str]:
        return await self._each(RELEASE_LUA, member, holdings, [])

    async def holders(self, symbols: list[str]) -> dict[str, tuple[str, int]]:
        """Each held symbol's (member, token), for `status`."""
        async with self.redis.pipeline(transaction=False) as pipe:  # not MGET: the keys span slots
            for symbol in symbols:
                pipe.get(lease_key(symbol))
            values = await pipe.execute()
        out = {}
        for symbol, value in zip(symbols, values, strict=True):
            if value:
                token, member = (value.decode() if isinstance(value, bytes) else value).split(" ", 1)
                out[symbol] = (member, int(token))
        return out

    async def _each(self, script: str, member: str, holdings: dict[str, int], extra: list) -> set[str]:
        symbols = list(holdings)
        async with self.redis.pipeline(transaction=False) as pipe:
            for symbol in symbols:
                pipe.eval(script, 1, lease_key(symbol), f"{holdings[symbol]} {member}", *extra)
            answers = await pipe.execute()
        return {symbol for symbol, done in zip(symbols, answers, strict=True) if done}


def _no_script(answer: object) -> bool:
    """NOSCRIPT, however the reply parser classed it (redis-py strips the code)."""
    return isinstance(answer, NoScriptError) or (isinstance(answer, ResponseError) and "NOSCRIPT" in str(answer))


class ShardMember:
    """One process's share: its round (heartbeat, release, renew, take) and whether it may
    write a symbol now. Validity runs on this process's monotonic clock from the moment
    each request was sent (shards/leases.py says why)."""

    def __init__(self, store: LeaseStore, member: str | None = None) -> None:
        self.store = store
        self.member = member or member_id()
        self.holdings: dict[str, Holding] = {}
        self.members: list[str] = []

    def may_write(self, symbol: str) -> bool:
        holding = self.holdings.get(symbol)
        return holding is not None and holding.may_write(time.monotonic() * 1000)

    def token(self, symbol: str) -> int | None:
        holding = self.holdings.get(symbol)
        return holding.token if holding is not None else None

    def owned(self) -> list[str]:
        now = time.monotonic() * 1000
        return sorted(s for s, h in self.holdings.items() if h.may_write(now))

    async def round(self, symbols: Iterable[str]) -> None:
        self.members = await self.store.heartbeat(self.member)
        plan = plan_round(self.member, self.members, symbols, self.holdings)
        handed = {symbol: self.holdings.pop(symbol).token for symbol in plan.release}  # stop first
        if handed:
            await self.store.release(self.member, handed)
        take = list(plan.take)
        if plan.renew:
            valid_until = self._valid_from_now()
            kept = await self.store.renew(self.member, {s: self.holdings[s].token for s in plan.renew})
            for symbol in plan.renew:
                if symbol in kept:
                    self.holdings[symbol].valid_until = max(self.holdings[symbol].valid_until, valid_until)
                else:  # gone from Redis (a wipe, a lost failover write): taken again now if free
                    del self.holdings[symbol]
                    take.append(symbol)
        if take:
            valid_until = self._valid_from_now()
            for symbol, token in (await self.store.take(self.member, take)).items():
                self.holdings[symbol] = Holding(token, valid_until)

    def _valid_from_now(self) -> float:
        """How long a lease requested now may be written under: from the sending."""
        return time.monotonic() * 1000 + self.store.times.valid_for()

    async def leave(self) -> None:
        """A drain: every symbol released (writing stopped first) and the member gone."""
        handed = {symbol: holding.token for symbol, holding in self.holdings.items()}
        self.holdings.clear()
        if handed:
            await self.store.release(self.member, handed)
        await self.store.leave(self.member)
