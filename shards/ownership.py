"""This process's share of the symbols, for the feed: the candidates (every ticker the
feed could follow) go to a lease round (shards/coordinator.py) every second, and what
this process then holds is what it follows and writes. A process alone holds every
candidate after its first round at boot; with several, each holds the symbols the
rendezvous hash gives it, a dead one's pass to the others within the takeover time,
and a newcomer gets its share from the others' next rounds.

Thin asyncio shell: the rules are shards/leases.py's, their Redis side the coordinator's.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from infra import REDIS_RETRY_ERRORS, Outage
from shards.coordinator import LeaseStore, ShardMember
from shards.leases import LeaseTimes

# The role of computing every symbol's indicators: one process of a deployment at a time
# (the worker's in-memory series are per process; its consumer group is one).
INDICATORS_LEAD = "__indicators__"


class Ownership:
    """Which symbols this process may follow and write, kept by a round a second."""

    def __init__(self, redis: Redis | RedisCluster, times: LeaseTimes | None = None, member: str | None = None) -> None:
        self.times = times or LeaseTimes()
        self.member = ShardMember(LeaseStore(redis, self.times), member)
        self.candidates: frozenset[str] = frozenset()
        # Leases that are roles, not symbols (INDICATORS_LEAD), taken with the symbols.
        self.roles: frozenset[str] = frozenset()
        self.held: frozenset[str] = frozenset()  # symbols and roles, as of the last round
        self.on_change: list[Callable[[], None]] = []  # told when `held` changes
        # Told (with the seconds it was away) when a round succeeds after failed ones: a
        # failover may have lost the writes its master acknowledged last (Redis replicates
        # asynchronously).
        self.on_back: list[Callable[[float], None]] = []
        self.outage = Outage("SHARDS", "Redis")
        self._lock = asyncio.Lock()
        self._round_started: float | None = None  # monotonic, while a round waits on Redis
        self.draining = False  # a drain request (ops/drain.py): no rounds, nothing claimed

    @property
    def id(self) -> str:
        return self.member.member

    def may_write(self, symbol: str) -> bool:
        """Checked at each write: false from the moment the lease may have run out, unless
        Redis is away and this process was alone at its last round (`_alone_through`)."""
        return self.member.may_write(symbol) or (self._alone_through() and symbol in self.held)

    def owned(self) -> set[str]:
        """The symbols held (not the roles)."""
        return set(self._holding()) - self.roles

    def _holding(self) -> frozenset[str]:
        """The symbols and roles this process may write now."""
        now = frozenset(self.member.owned())
        return now | self.held if self._alone_through() else now

    def _alone_through(self) -> bool:
        """Redis is away (a round failed, or has waited longer than a round's interval
        for an answer: a black-holed server fails only at the socket timeout) and this
        process was the only member at its last round: no other process can take a
        symbol without Redis, so it keeps writing what it held (as a single daemon always
        has) rather than stop for the outage. A partition that leaves Redis to others
        only is the case this cannot tell apart."""
        waiting = self._round_started is not None and (
            time.monotonic() - self._round_started > self.times.renew_every_ms / 1000
        )
        return (self.outage.active or waiting) and self.member.members == [self.member.member]

    async def claim(self, candidates: Iterable[str]) -> set[str]:
        """The candidates changed: a round now rather than at the next second."""
        self.candidates = frozenset(candidates) | self.roles
        if self.draining:
            return set()
        await self._round()
        return self.owned() & self.candidates

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.times.renew_every_ms / 1000)
            await self._round()

    async def _round(self) -> None:
        async with self._lock:
            if self.draining:
                return
            self._round_started = time.monotonic()
            try:
                await self.member.round(self.candidates)
                if self.outage.since is not None:
                    for tell in self.on_back:
                        tell(time.monotonic() - self.outage.since)
                self.outage.ok()
            except REDIS_RETRY_ERRORS as exc:  # the leases run out by themselves meanwhile
                self.outage.fail(exc, "renewing this process's leases")
            finally:
                self._round_started = None
            held = self._holding()
            if held != self.held:
                self.held = held
                self._tell()

    def _tell(self) -> None:
        for tell in self.on_change:
            tell()

    async def leave(self) -> None:
        """Every symbol handed back at once (writing stopped first): at shutdown, once
        everything is written, and on a drain request."""
        async with self._lock:
            with contextlib.suppress(*REDIS_RETRY_ERRORS):
                await self.member.leave()
            self.held = frozenset()

    async def drain(self) -> None:
        """A drain request (before a deploy): this process leaves the members, so the
        others' next rounds (within a second) take every symbol and role it held, and
        claims nothing until `resume`; its feed unsubscribes meanwhile (`on_change`).
        Leases a failed release leaves behind run out within the takeover time."""
        self.draining = True
        await self.leave()
        self._tell()

    def resume(self) -> None:
        """The drain request withdrawn: the next round rejoins and takes a share again."""
        self.draining = False
        self._tell()
