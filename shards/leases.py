"""Which daemon process owns which symbol, when several share the enabled tickers. Pure:
the Redis side (shards/coordinator.py, Lua) keeps exactly the rules of `LeaseTable`.

- **Members.** Each process announces itself with a heartbeat that expires after
  `member_ttl_ms`, counted on Redis's clock: a process that stops (killed, frozen, cut
  off) leaves the list by itself.
- **Assignment.** Each symbol belongs to the live member with the highest hash of
  (member, symbol): rendezvous hashing. Every process computes the same owner from the
  same list, with no talk between them, and a join or a death moves only the symbols
  that must move (about 1/N of them).
- **Leases.** A symbol is written only under its lease: a key taken only when free and
  expiring after `ttl_ms` unless renewed. Each taking raises the symbol's fencing token,
  which the writes carry, so that storage can refuse a writer older than the newest.
- **Stopping in time.** A holder treats its lease as valid only until `sent + ttl * (1 -
  MAX_DRIFT) - margin` on its own monotonic clock, `sent` being when it *sent* the
  request that took or renewed it. Redis counts the TTL from when it *received* that
  request, later; a clock running up to MAX_DRIFT slow still ends the holder's validity
  first. So a holder stops writing before another can take the symbol, whatever the
  machines' wall clocks say and however long a pause (GC, a frozen VM) lasted: its
  monotonic clock went on meanwhile. `margin` covers a write issued just before the end
  reaching its server.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field

MAX_DRIFT = 0.01  # a clock's rate may be off by 1% (NTP keeps real ones within 0.05%)


@dataclass(frozen=True)
class LeaseTimes:
    ttl_ms: int = 5_000  # a lease, and a member's heartbeat
    renew_every_ms: int = 1_000  # a process's round: heartbeat, renew, take, release
    margin_ms: int = 500  # a write issued just before the end reaches its server by then

    def valid_for(self) -> float:
        """How long after sending the request a holder may write (its own clock)."""
        return self.ttl_ms * (1 - MAX_DRIFT) - self.margin_ms

    def takeover_ms(self, latency_ms: int) -> int:
        """The longest a symbol goes unowned when its owner dies or freezes: its lease and
        heartbeat run out, then the next owner's round (on a clock up to MAX_DRIFT slow),
        a request's round trip, and a renewal that was in flight when it stopped."""
        round_ms = self.renew_every_ms / (1 - MAX_DRIFT)
        return int(self.ttl_ms + 2 * round_ms + 3 * latency_ms)


def weight(member: str, symbol: str) -> bytes:
    return hashlib.blake2b(f"{member}\x00{symbol}".encode(), digest_size=8).digest()


def owner_of(symbol: str, members: Iterable[str]) -> str | None:
    """The member a symbol belongs to (None when there is none)."""
    return max(members, key=lambda member: weight(member, symbol), default=None)


def assignment(symbols: Iterable[str], members: Iterable[str]) -> dict[str, str]:
    """Every symbol's owner among the members (none when there are no members)."""
    live = sorted(set(members))
    return {symbol: owner for symbol in symbols if (owner := owner_of(symbol, live)) is not None}


@dataclass
class Lease:
    """What Redis holds for a symbol: its holder and token until `expires_at` (Redis's clock)."""

    member: str
    token: int
    expires_at: float


@dataclass
class LeaseTable:
    """Redis's side of the leases and the member list, on Redis's clock (`now`). The Lua
    scripts of shards/coordinator.py do exactly this; a test runs both side by side."""

    leases: dict[str, Lease] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)  # never go down, not even when a lease ends
    members: dict[str, float] = field(default_factory=dict)  # member -> heartbeat expiry

    def heartbeat(self, now: float, member: str, ttl_ms: int) -> list[str]:
        """The member's heartbeat renewed; the live members, sorted."""
        self.members = {m: until for m, until in self.members.items() if until > now}
        self.members[member] = now + ttl_ms
        return sorted(self.members)

    def leave(self, member: str) -> None:
        self.members.pop(member, None)

    def take(self, now: float, symbol: str, member: str, ttl_ms: int) -> int | None:
        """The symbol's token for this member: a new one if it was free, the same one
        (extended) if this member holds it already (a take repeated after a pause); None
        while another holds it. Tokens change only with the holder, so a holder's writes
        in flight are never fenced off by its own repeated take."""
        held = self._live(now, symbol)
        if held is not None:
            if held.member != member:
                return None
            held.expires_at = now + ttl_ms
            return held.token
        token = self.tokens.get(symbol, 0) + 1
        self.tokens[symbol] = token
        self.leases[symbol] = Lease(member, token, now + ttl_ms)
        return token

    def renew(self, now: float, symbol: str, member: str, token: int, ttl_ms: int) -> bool:
        """Extended only while still this holding (same member and token, not expired)."""
        held = self._live(now, symbol)
        if held is None or (held.member, held.token) != (member, token):
            return False
        held.expires_at = now + ttl_ms
        return True

    def release(self, now: float, symbol: str, member: str, token: int) -> bool:
        held = self._live(now, symbol)
        if held is None or (held.member, held.token) != (member, token):
            return False
        del self.leases[symbol]
        return True

    def holder(self, now: float, symbol: str) -> Lease | None:
        return self._live(now, symbol)

    def _live(self, now: float, symbol: str) -> Lease | None:
        held = self.leases.get(symbol)
        if held is not None and held.expires_at <= now:
            del self.leases[symbol]
            return None
        return held


@dataclass
class Holding:
    """A lease as its holder knows it: may write until `valid_until` (its own monotonic clock)."""

    token: int
    valid_until: float

    def may_write(self, local_now: float) -> bool:
        return local_now < self.valid_until


@dataclass(frozen=True)
class Round:
    """What a process does for its symbols in one round, from the member list it just read."""

    take: list[str]  # its own by the assignment, not held: taken if free
    renew: list[str]  # held and still its own
    release: list[str]  # held, now another live member's: handed over at once


def plan_round(me: str, members: list[str], symbols: Iterable[str], held: Iterable[str]) -> Round:
    """A symbol is taken by its owner, renewed by its holder while it stays the owner, and
    released by a holder that is no longer its owner. One that is held but no longer
    enabled is released too."""
    owners = assignment(symbols, members)
    held_now = set(held)
    mine = {symbol for symbol, owner in owners.items() if owner == me}
    return Round(
        take=sorted(mine - held_now),
        renew=sorted(held_now & mine),
        release=sorted(held_now - mine),
    )
