"""The candle streams' consumer groups when several processes share a deployment.

Every process reads every candle event through a group of its own
(`indicator_workers:<member>`), computes the symbols it holds and acknowledges the
others' as it goes: a series' events reach one process, in stream order, with no
hand-over between processes and no added latency. A process running the indicators
without the feed computes every symbol, through the one group `indicator_workers`.

What a group holds unsettled (events given and not acknowledged, and those never read)
is what its process may not have written: the symbols' next owners write those series
again from the oldest such bar (`unsettled_elsewhere`). A process that stops computing
a symbol therefore leaves the symbol's events it reads from then on unacknowledged
(`Handover`), until a process that took the symbol's lease after it has opened the
series (`OPENED_KEY` holds the lease token each symbol was last opened under): an
event that changes a bar it had written values for (the older buckets of a history
whose newest ones came first) is written again by the next owner, not lost between
the two. A group whose process has been
gone for the grace period is destroyed by the process leading the indicators
(`abandoned_groups`): every gain would read its ever longer unread tail again.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import ResponseError

import core_io
from indicators.pending import PendingValues
from indicators.series import parse_event
from shards.ownership import INDICATORS_LEAD, Ownership

MEMBER_SEPARATOR = ":"
# Hash: symbol -> the lease token under which a process last opened its series.
OPENED_KEY = "indicator_opened"
GROUP_SWEEP_S = 30.0  # at most; a shorter grace period sweeps more often
SETTLED_GRACE_S = 10.0  # longer than any read blocks: a group read this recently is not gone


def group_of(member: str) -> str:
    return f"{core_io.INDICATOR_GROUP}{MEMBER_SEPARATOR}{member}"


def member_of(name: str) -> str | None:
    """The member a group belongs to; None for the shared `indicator_workers`."""
    prefix = core_io.INDICATOR_GROUP + MEMBER_SEPARATOR
    return name[len(prefix) :] if name.startswith(prefix) else None


def is_indicator_group(name: str) -> bool:
    return name == core_io.INDICATOR_GROUP or member_of(name) is not None


@dataclass(frozen=True)
class GroupState:
    name: str
    idle_ms: int | None  # since any of its consumers last tried to read; None: it has none


def abandoned_groups(
    groups: Sequence[GroupState],
    mine: str,
    live_members: Collection[str],
    now_s: float,
    first_seen_s: dict[str, float],
    grace_s: float,
) -> list[str]:
    """The indicator groups to destroy: not this process's, their member not live, and
    no consumer that has read within the grace period. A group with no consumer at all
    (its process died before its first read, or an earlier version's `restore` made it)
    goes once it has been seen so for the grace period; `first_seen_s` keeps since when
    (updated here)."""
    abandoned: list[str] = []
    candidates: set[str] = set()
    for group in groups:
        if group.name == mine or not is_indicator_group(group.name) or member_of(group.name) in live_members:
            continue
        if group.idle_ms is not None and group.idle_ms < grace_s * 1000:
            continue
        candidates.add(group.name)
        since = first_seen_s.setdefault(group.name, now_s)
        if group.idle_ms is not None or now_s - since >= grace_s:
            abandoned.append(group.name)
    for name in [n for n in first_seen_s if n not in candidates]:
        del first_seen_s[name]  # read again, or gone (destroyed here or elsewhere)
    return sorted(abandoned)


def oldest_bars(
    events: Iterable[tuple[str, Mapping[str, str]]], symbols: Collection[str] | None
) -> dict[tuple[str, str], int]:
    """The oldest bar per series among (timeframe, event fields), of `symbols` (None: all)."""
    oldest: dict[tuple[str, str], int] = {}
    for tf, fields in events:
        with contextlib.suppress(KeyError, ValueError, TypeError):  # a bad one is logged when read
            symbol, bar = parse_event(fields)
            if symbols is None or symbol in symbols:
                key = (symbol, tf)
                oldest[key] = min(bar[5], oldest.get(key, bar[5]))
    return oldest


@dataclass
class HeldEvents:
    token: int  # the lease token the symbol was computed under here
    since_s: float  # monotonic, when the first was held
    acks: dict[tuple[str, str], None]  # (stream, entry id), in reading order, without repeats
    oldest: dict[str, int]  # per timeframe, the oldest bar among them


class Handover:
    """The events of symbols this process computed and no longer does, held
    unacknowledged until another process opened them under a newer lease (pure)."""

    def __init__(self) -> None:
        self.tokens: dict[str, int] = {}  # symbols computed here: their lease token at opening
        self.held: dict[str, HeldEvents] = {}  # symbols no longer computed here

    def opened(self, symbol: str, token: int) -> list[tuple[str, str]]:
        """Its series opened here under `token`, written again from the oldest event held
        (`own_unsettled`): the held events are due."""
        self.tokens[symbol] = token
        held = self.held.pop(symbol, None)
        return list(held.acks) if held else []

    def stopped(self, symbol: str, now_s: float) -> None:
        token = self.tokens.pop(symbol, None)
        if token is not None and symbol not in self.held:
            self.held[symbol] = HeldEvents(token, now_s, {}, {})

    def hold(self, symbol: str, tf: str, bar_time: int, ack: tuple[str, str], now_s: float) -> bool:
        """An event of a symbol not computed here: True if it is to stay unacknowledged
        (the symbol was computed here, and no newer owner has opened it yet)."""
        held = self.held.get(symbol)
        if held is None:
            token = self.tokens.get(symbol)  # its lease ran out, not yet seen as lost
            if token is None:
                return False
            held = self.held[symbol] = HeldEvents(token, now_s, {}, {})
        held.acks[ack] = None
        held.oldest[tf] = min(bar_time, held.oldest.get(tf, bar_time))
        return True

    def own_unsettled(self, symbols: Collection[str]) -> dict[tuple[str, str], int]:
        """The oldest held bar per series of `symbols`."""
        return {(s, tf): t for s in symbols if s in self.held for tf, t in self.held[s].oldest.items()}

    def waiting(self) -> list[str]:
        """The symbols whose opening by a newer owner is awaited."""
        return sorted(self.held)

    def settle(
        self, published: Mapping[str, int | None], now_s: float, timeout_s: float
    ) -> tuple[list[tuple[str, str]], list[str]]:
        """(the acks now due, the symbols whose events were given up on): a symbol's held
        events are due once another process opened it under a newer lease token (it read
        them as unsettled, and computes what came after), or after `timeout_s` without
        that (its owner runs no indicators, or it is no longer traded)."""
        due: list[tuple[str, str]] = []
        expired: list[str] = []
        for symbol, held in list(self.held.items()):
            opened = published.get(symbol)
            if opened is None or opened <= held.token:
                if now_s - held.since_s <= timeout_s:
                    continue
                if held.acks:
                    expired.append(symbol)
            due += self.held.pop(symbol).acks
        return due, expired


# --------------------------------------------------------------------------- Redis


async def unsettled_elsewhere(
    redis: Redis, mine: str, symbols: Collection[str] | None, page: int = 10_000
) -> dict[tuple[str, str], int]:
    """Per series (of `symbols`), the oldest bar among the events every other indicator
    group holds unsettled: pending with one of its consumers, or not yet read. Read only:
    another process's entries stay as they are (XPENDING and XRANGE, no claim)."""
    events: list[tuple[str, Mapping[str, str]]] = []
    for tf, stream in core_io.CANDLE_STREAMS.items():
        for group in await core_io.stream_groups(redis, stream):
            name = group["name"]
            if name == mine or not is_indicator_group(name):
                continue
            after = "-"
            while True:  # its pending entries, a page of ids then their fields, a round trip each
                pending = await redis.xpending_range(stream, name, min=after, max="+", count=page)
                found = await core_io.entry_fields(redis, [(stream, entry["message_id"]) for entry in pending])
                events += [(tf, fields) for fields in found.values()]
                if len(pending) < page:
                    break
                after = f"({pending[-1]['message_id']}"
            never_read = await core_io.entries_after(redis, stream, group["last-delivered-id"], page)
            events += [(tf, fields) for _, fields in never_read]
    return oldest_bars(events, symbols)


async def unsettled_at_start(
    redis: Redis, group: str, consumer: str, elsewhere_of: Collection[str] | None
) -> dict[tuple[str, str], int]:
    """The oldest bar per series among the candle events this group has not acknowledged
    (claimed by `consumer`, which acknowledges them once written), and, for the symbols
    `elsewhere_of`, those other groups hold unsettled: their values may be missing from
    PostgreSQL or computed from the bar before it changed (indicators/pending.py holds acks until then)."""
    events: list[tuple[str, Mapping[str, str]]] = []
    for tf, stream in core_io.CANDLE_STREAMS.items():
        events += [(tf, fields) for fields in await core_io.unacknowledged(redis, stream, group, consumer)]
    oldest = oldest_bars(events, None)
    elsewhere = {} if elsewhere_of is None else await unsettled_elsewhere(redis, group, elsewhere_of)
    for key, bar in elsewhere.items():
        oldest[key] = min(bar, oldest.get(key, bar))
    return oldest


async def group_states(redis: Redis) -> tuple[list[GroupState], dict[str, list[str]]]:
    """The indicator groups of the candle streams, each with how recently any of its
    consumers tried to read (XINFO CONSUMERS' idle: a blocking read that found nothing
    counts), and the streams each is on."""
    newest: dict[str, int | None] = {}
    streams_of: dict[str, list[str]] = {}
    for stream in core_io.CANDLE_STREAMS.values():
        for name in [g["name"] for g in await core_io.stream_groups(redis, stream) if is_indicator_group(g["name"])]:
            with contextlib.suppress(ResponseError):  # destroyed meanwhile
                idle = [int(c["idle"]) for c in await redis.xinfo_consumers(stream, name)]
                seen = [i for i in (newest.get(name), min(idle, default=None)) if i is not None]
                newest[name] = min(seen, default=None)
                streams_of.setdefault(name, []).append(stream)
    return [GroupState(name, idle) for name, idle in newest.items()], streams_of


async def destroy(redis: Redis, streams_of: Mapping[str, list[str]], names: Iterable[str]) -> None:
    pipe = redis.pipeline(transaction=False)
    for name in names:
        for stream in streams_of.get(name, ()):
            pipe.xgroup_destroy(stream, name)
    await pipe.execute(raise_on_error=False)


# --------------------------------------------------------------------------- this process's share


class SymbolShare:
    """The indicator worker's view of this process's share of the deployment: which
    symbols it computes, through which group, the hand-over of those it stops computing,
    and the sweep of gone processes' groups."""

    SETTLE_EVERY_S = 1.0  # how often the openings of symbols handed over are looked up

    def __init__(self, ownership: Ownership) -> None:
        ownership.roles |= {INDICATORS_LEAD}  # taken with the symbols, by one process at a time
        self.ownership = ownership
        self.group = group_of(ownership.id)
        self.following: set[str] = set()  # held symbols whose series are open in the worker
        self.led = False  # whether it led at the last `changes`
        self.handover = Handover()
        self._next_settle_s = 0.0
        self._abandoned_since: dict[str, float] = {}

    def leads(self) -> bool:
        return self.ownership.may_write(INDICATORS_LEAD)

    def computes(self, symbol: str) -> bool:
        """Checked at each batch, so a lease that ran out stops the computing before
        another process starts; symbols no process follows go to the lead."""
        if symbol in self.ownership.candidates:
            return symbol in self.following and self.ownership.may_write(symbol)
        return self.leads()

    def holds_everything(self) -> bool:
        """The only member, following every symbol (the series open)."""
        ownership = self.ownership
        alone = ownership.member.members == [ownership.id]
        return alone and self.leads() and self.following >= ownership.candidates - ownership.roles

    def changes(self) -> tuple[set[str], set[str], bool]:
        """(symbols lost, symbols gained, whether the lead was lost) since the last call."""
        held = self.ownership.owned()
        led, self.led = self.led, self.leads()
        return self.following - held, held - self.following, led and not self.led

    def retaken(self) -> set[str]:
        """Symbols with events held here that it computes again under the same lease (it
        ran out for a moment, and was renewed): opened again like a symbol gained."""
        return {s for s in self.handover.held if s in self.following and self.computes(s)}

    async def hand_over(self, redis: Redis, pending: PendingValues, lost: set[str]) -> None:
        """Values of lost symbols not yet written are dropped, and the events they came
        from held for the next owner with those read from now on: written after it
        opened the series, they could undo what it wrote again (PostgreSQL does not
        check the lease)."""
        now = time.monotonic()
        for symbol in lost:
            self.handover.stopped(symbol, now)
        if not pending.drop(lost):
            return
        taken = set()
        for ack, fields in (await core_io.entry_fields(redis, pending.held_acks())).items():
            with contextlib.suppress(KeyError, ValueError, TypeError):
                symbol, bar = parse_event(fields)
                if symbol in lost and self.handover.hold(symbol, core_io.CANDLE_STREAM_TF[ack[0]], bar[5], ack, now):
                    taken.add(ack)
        pending.take_back(taken)

    async def opened(self, redis: Redis, symbols: Collection[str]) -> None:
        """These symbols' series are open here, written again from what others and this
        process held unsettled: the lease tokens they were opened under are published
        (processes that computed them before acknowledge their held events), and this
        process's own held events of them are acknowledged."""
        tokens = {s: t for s in symbols if (t := self.ownership.member.token(s)) is not None}
        acks = [ack for symbol, token in tokens.items() for ack in self.handover.opened(symbol, token)]
        commands = core_io.ack_commands(self.group, acks)
        if tokens:
            commands.append(["HSET", OPENED_KEY, *(x for item in tokens.items() for x in item)])
        if commands:
            await core_io.execute_checked(redis, commands)

    async def settle(self, redis: Redis, timeout_s: float) -> list[str]:
        """At most once a second, while symbols are handed over: acknowledge the events
        held of those a newer owner has opened; returns those given up on."""
        now = time.monotonic()
        waiting = self.handover.waiting()
        if not waiting or now < self._next_settle_s:
            return []
        self._next_settle_s = now + self.SETTLE_EVERY_S
        tokens = await redis.hmget(OPENED_KEY, waiting)
        published = {s: int(t) for s, t in zip(waiting, tokens, strict=True) if t is not None}
        due, expired = self.handover.settle(published, now, timeout_s)
        if due:
            await core_io.execute_packed(redis, core_io.ack_commands(self.group, due))
        return expired

    async def sweep(self, redis: Redis, grace_s: float, written: bool) -> list[str]:
        """While leading: the groups of processes gone for `grace_s`, destroyed. Alone,
        with every symbol's series open, every value `written` and nothing handed over,
        nothing a gone process's group holds is needed any more: no grace period."""
        if not self.leads():
            return []
        if written and self.holds_everything() and not self.handover.waiting():
            grace_s = min(SETTLED_GRACE_S, grace_s)
        states, streams_of = await group_states(redis)
        live = self.ownership.member.members
        gone = abandoned_groups(states, self.group, live, time.monotonic(), self._abandoned_since, grace_s)
        if gone:
            await destroy(redis, streams_of, gone)
        return gone
