"""Redis Cluster under the daemon's own I/O: a client that survives a failover,
routing a round of commands to the nodes that own their keys, stream reads one stream
at a time, and the move of keys stored under the other names (shards/keys.py).

The daemon's bulk rounds (candle_stores.execute_packed) write pre-packed RESP straight
to a connection, for speed; redis-py's cluster client cannot route those. Here a round
is split by the node that owns each command's first key, each node's part goes on one
of that node's connections (all nodes at once), and the replies come back in the
round's order. Commands the cluster redirects (MOVED/ASK after a failover or a slot
move, TRYAGAIN, CLUSTERDOWN, READONLY from a demoted master) or that a dead node never
answered are sent again once the client has re-read the slot map: every command of a
round is idempotent (its caller's contract), so a second delivery is harmless.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MasterDownError,
    MovedError,
    ReadOnlyError,
    ResponseError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import (
    ConnectionError as RedisConnectionError,
)
from redis.exceptions import (
    TimeoutError as RedisTimeoutError,
)

from shards.keys import renamed_key

KEY_SCHEME_KEY = "feed_v4:key_scheme"  # "tagged" or "plain": the names the stored keys have

# A failover takes the cluster's node timeout plus an election (a few seconds here);
# a round keeps trying for about that long before its caller sees the failure.
REROUTE_DELAYS_S: tuple[float, ...] = (0.0, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0)
_REDIRECTED = (MovedError, AskError, TryAgainError, ClusterDownError, ReadOnlyError, MasterDownError)
_REDIRECT_PREFIXES = ("MOVED", "ASK", "TRYAGAIN", "CLUSTERDOWN", "READONLY", "MASTERDOWN")
_NODE_LOST = (RedisConnectionError, RedisTimeoutError, OSError)

AnyRedis = Redis | RedisCluster


class FeedRedisCluster(RedisCluster):
    """redis-py's cluster client (8.1) finds the keys of XREAD/XREADGROUP (and other
    commands with keys after a keyword) by asking a node, COMMAND GETKEYS, on every
    call: a round trip each, and always the node that was its default at start, so once
    that node dies every such command fails with "connection refused" for good. Stream
    reads are routed here by their STREAMS keys; for the others a dead node is replaced
    by a live master after the slot map is read again."""

    async def _determine_slot(self, command: str, *args: Any) -> int:
        name = command.upper()
        if name in ("XREAD", "XREADGROUP"):
            upper = [str(a).upper() for a in args]
            if "STREAMS" in upper:
                start = upper.index("STREAMS") + 1
                keys = args[start : start + (len(args) - start) // 2]
                slots = {self.keyslot(key) for key in keys}
                if len(slots) == 1:
                    return slots.pop()
        try:
            return await super()._determine_slot(command, *args)
        except _NODE_LOST:
            await self.nodes_manager.initialize()
            self.commands_parser.node = self.get_random_node()
            return await super()._determine_slot(command, *args)

    async def aclose(self) -> None:
        """redis-py's closes nothing while the client awaits its re-initialization (where
        a CLUSTERDOWN leaves it), though its nodes may hold connections again by then:
        closed here whatever the state, or each leaks a socket."""
        await super().aclose()
        await self.nodes_manager.aclose()
        await self.nodes_manager.aclose("startup_nodes")


# How a round goes over one connection source: (acquire, release, commands) -> replies.
Acquire = Callable[[], Awaitable[Any]]
Release = Callable[[Any], Awaitable[None]]
RoundOn = Callable[[Acquire, Release, Sequence[Any]], Awaitable[list[Any]]]


def command_key(command: Any) -> str:
    """The key a command is routed by: a packed command's own, else its first key."""
    key = getattr(command, "key", None)
    if key is not None:
        return key
    name = str(command[0]).upper()
    if name in ("EVAL", "EVALSHA", "FCALL"):
        return str(command[3])
    return str(command[1])


def redirected(reply: Any) -> bool:
    if isinstance(reply, _REDIRECTED):
        return True
    return isinstance(reply, ResponseError) and str(reply).startswith(_REDIRECT_PREFIXES)


class NotReplicated(ResponseError):
    """No replica acknowledged the write within the wait: a failover could lose it."""


async def execute_routed(
    cluster: RedisCluster, commands: Sequence[Any], round_on: RoundOn, replica_wait_ms: int | None = None
) -> list[Any]:
    """`commands` as one round per owning node, all nodes at once; replies in order.

    With `replica_wait_ms`, each node's part ends with `WAIT 1 <ms>` on the same
    connection, where the node has a replica: Redis replicates asynchronously, so a write
    its master acknowledged can vanish in a failover. The replies of a part no replica
    acknowledged in time come back as `NotReplicated`."""
    replies: list[Any] = [None] * len(commands)
    waiting = list(range(len(commands)))
    lost: BaseException | None = None
    await cluster.initialize()  # the slot map, once per client
    for delay in REROUTE_DELAYS_S:
        if delay:
            await asyncio.sleep(delay)
            try:
                await cluster.nodes_manager.initialize()
            except (*_NODE_LOST, ClusterDownError) as exc:  # no node answers yet: wait on
                lost = exc
                continue
        by_node: dict[str, tuple[ClusterNode, list[int]]] = {}
        try:
            for index in waiting:
                node = cluster.get_node_from_key(command_key(commands[index]))
                by_node.setdefault(node.name, (node, []))[1].append(index)
        except SlotNotCoveredError as exc:  # a slot whose master is gone and not yet replaced
            lost = exc
            continue
        results = await asyncio.gather(
            *(
                _node_round(cluster, node, [commands[i] for i in indexes], round_on, replica_wait_ms)
                for node, indexes in by_node.values()
            ),
            return_exceptions=True,
        )
        again: list[int] = []
        for (_, indexes), result in zip(by_node.values(), results):
            if isinstance(result, _NODE_LOST):
                lost = result
                again += indexes
                continue
            if isinstance(result, BaseException):
                raise result
            for index, reply in zip(indexes, result):
                replies[index] = reply
                if redirected(reply):
                    again.append(index)
        if not again:
            return replies
        waiting = sorted(again)
    if lost is not None and any(replies[i] is None for i in waiting):
        raise lost
    return replies  # what is still redirected after every try goes back as its error


StreamRead = Callable[[dict[str, str], int | None], Awaitable[list[Any] | None]]


async def read_streams_apart(read: StreamRead, starts: dict[str, str], block_ms: int | None) -> list[Any]:
    """XREAD/XREADGROUP on a cluster, where one read cannot name streams of different
    slots: each stream is read on its own, all at once and without blocking; when none
    has anything and the caller would block, only the first stream is waited on, then
    the others are read again. Callers list their finest stream first (the M1 candle
    stream: every close of any timeframe is also an M1 close), so a close wakes them
    as it would on a single Redis. `read(starts, block)` is the caller's one read."""
    replies = await asyncio.gather(*(read({stream: start}, None) for stream, start in starts.items()))
    found = [item for reply in replies for item in (reply or [])]
    if found or not block_ms or not starts:
        return found
    first = next(iter(starts))
    woke = list(await read({first: starts[first]}, block_ms) or [])
    if not woke:
        return []
    rest = await asyncio.gather(*(read({s: i}, None) for s, i in starts.items() if s != first))
    return woke + [item for reply in rest for item in (reply or [])]


REPLICAS_KNOWN_S = 10.0
_replicas_seen: dict[str, tuple[float, bool]] = {}  # node name -> (when asked, has a replica)


async def _wait_for(cluster: RedisCluster, node: ClusterNode, replica_wait_ms: int | None) -> list[Any] | None:
    """The WAIT to end `node`'s part with, when asked for and the node has a replica (a
    cluster of masters only has no failover to lose a write to). Asked of the node
    itself (the slot map leaves out replicas that have not synced yet), every 10 s."""
    if replica_wait_ms is None:
        return None
    now = time.monotonic()
    asked, has_replica = _replicas_seen.get(node.name, (-REPLICAS_KNOWN_S, False))
    if now - asked >= REPLICAS_KNOWN_S:
        info = await cluster.execute_command("INFO", "replication", target_nodes=node)
        has_replica = int(info.get("connected_slaves", 0) or 0) > 0
        _replicas_seen[node.name] = (now, has_replica)
    return ["WAIT", 1, replica_wait_ms] if has_replica else None


async def _node_round(
    cluster: RedisCluster, node: ClusterNode, commands: list[Any], round_on: RoundOn, replica_wait_ms: int | None
) -> list[Any]:
    wait = await _wait_for(cluster, node, replica_wait_ms)

    async def acquire() -> Any:
        return node.acquire_connection()

    async def release(conn: Any) -> None:
        node.release(conn)

    if wait is None:
        return await round_on(acquire, release, commands)
    *replies, acknowledged = await round_on(acquire, release, [*commands, wait])
    if isinstance(acknowledged, int) and acknowledged >= 1:
        return replies
    failed = NotReplicated(f"no replica of {node.name} acknowledged within {wait[2]} ms")
    return [reply if redirected(reply) else failed for reply in replies]


# --------------------------------------------------------------------------- key names


async def migrate_key_names(redis: AnyRedis, make_raw: Callable[[], AnyRedis], tagged: bool, batch: int = 500) -> int:
    """Once per change of scheme: every per-symbol key stored under the other scheme's
    name is moved to this one's (a key already under the new name wins: it is newer).
    `make_raw` makes a client of the same server without reply decoding (DUMP is binary).
    Returns how many keys moved."""
    scheme = "tagged" if tagged else "plain"
    if await redis.get(KEY_SCHEME_KEY) == scheme:
        return 0
    moved = 0
    pending: list[tuple[str, str]] = []
    raw = make_raw()
    try:
        async for key in redis.scan_iter(count=1000):
            target = renamed_key(key, tagged)
            if target is not None:
                pending.append((key, target))
            if len(pending) >= batch:
                moved += await _move(redis, raw, pending)
                pending = []
        if pending:
            moved += await _move(redis, raw, pending)
    finally:
        await raw.aclose()
    await redis.set(KEY_SCHEME_KEY, scheme)
    return moved


async def _move(redis: AnyRedis, raw: AnyRedis, pairs: list[tuple[str, str]]) -> int:
    if not isinstance(redis, RedisCluster):
        async with redis.pipeline(transaction=False) as pipe:
            for key, target in pairs:
                pipe.renamenx(key, target)
            renamed = await pipe.execute(raise_on_error=False)
        stale = [key for (key, _), done in zip(pairs, renamed) if done is False or done == 0]
        if stale:
            await redis.delete(*stale)
        return sum(1 for done in renamed if done is True or done == 1)
    # On a cluster the two names hash to different slots: copy, then drop the old.
    async with raw.pipeline(transaction=False) as pipe:
        for key, _ in pairs:
            pipe.dump(key)
            pipe.pttl(key)
        dumped = await pipe.execute(raise_on_error=False)
    moved = 0
    async with raw.pipeline(transaction=False) as pipe:
        for (_, target), data, ttl in zip(pairs, dumped[0::2], dumped[1::2]):
            if isinstance(data, bytes):
                pipe.restore(target, max(int(ttl), 0) if isinstance(ttl, int) else 0, data)
                moved += 1
        restored = await pipe.execute(raise_on_error=False)
    moved -= sum(1 for reply in restored if isinstance(reply, Exception))  # BUSYKEY: the newer one stays
    async with raw.pipeline(transaction=False) as pipe:
        for key, _ in pairs:
            pipe.delete(key)
        await pipe.execute(raise_on_error=False)
    return moved
