"""`feed_v4_cli.py drain HOST:PID`: move a process's symbols to the other processes
before a deploy. The request is a field of the process's heartbeat (infra.DRAIN_FIELD),
which the process reads at its next beat: it leaves the members, the others' next lease
rounds take its symbols (shards/ownership.py `drain`), and it follows nothing until the
request is withdrawn (`--cancel`) or it stops. The command waits until every symbol
the process followed is followed by another process.

Refused where no other live process would take the symbols (unless --force).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Mapping

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

import infra
from infra import HEARTBEAT_PREFIX, Settings, open_redis


class DrainError(Exception):
    """The request cannot be made (no such process, nobody to take the symbols)."""


def parse_shares(beats: Mapping[str, Mapping[str, str]]) -> dict[str, tuple[set[str], bool]]:
    """Each live process's (followed symbols, draining or asked to), by `host:pid`."""
    out = {}
    for key, fields in beats.items():
        symbols = {s for s in (fields.get("symbols") or "").split(",") if s}
        draining = fields.get("draining") == "1" or bool(fields.get(infra.DRAIN_FIELD))
        out[key.removeprefix(HEARTBEAT_PREFIX)] = (symbols, draining)
    return out


def check_request(shares: Mapping[str, tuple[set[str], bool]], target: str, force: bool) -> None:
    if target not in shares:
        live = ", ".join(sorted(shares)) or "none"
        raise DrainError(f"no live daemon process {target!r} (live: {live}; `status` lists them)")
    others = [p for p, (_, draining) in shares.items() if p != target and not draining]
    if not others and not force:
        raise DrainError(
            f"no other live process would take the symbols of {target}: start another first, "
            "or drain anyway with --force (its symbols are then followed by nobody)"
        )


def handed_over(shares: Mapping[str, tuple[set[str], bool]], target: str, symbols: set[str]) -> tuple[bool, set[str]]:
    """Whether the drain is done: the target follows nothing and reports draining, and
    each symbol it had is followed by another process; the symbols still unfollowed."""
    mine, draining = shares.get(target, (set(), False))
    elsewhere = {s for p, (followed, _) in shares.items() if p != target for s in followed}
    waiting = symbols - elsewhere
    return draining and not mine and not waiting, waiting


async def drain(redis: Redis | RedisCluster, target: str, cancel: bool, force: bool, wait_s: float) -> int:
    key = f"{HEARTBEAT_PREFIX}{target}"
    shares = parse_shares(await infra.read_heartbeats(redis))
    if cancel:
        if target not in shares:
            raise DrainError(f"no live daemon process {target!r}")
        await redis.hdel(key, infra.DRAIN_FIELD)
        print(f"drain of {target} withdrawn: it takes a share again at its next beat")
        return 0
    check_request(shares, target, force)
    symbols = shares[target][0]
    await redis.hset(key, infra.DRAIN_FIELD, str(int(time.time() * 1000)))
    print(f"drain of {target} requested: {len(symbols)} symbols to hand over")
    deadline = time.monotonic() + wait_s
    while True:
        shares = parse_shares(await infra.read_heartbeats(redis))
        done, waiting = handed_over(shares, target, symbols)
        if done or (force and target in shares and shares[target][1] and not shares[target][0]):
            print(f"{target} drained: it follows nothing now and may be stopped")
            return 0
        if time.monotonic() >= deadline:
            print(f"{target} not drained after {wait_s:.0f} s; not yet taken: {', '.join(sorted(waiting)[:20])}")
            return 1
        await asyncio.sleep(0.5)


async def run_drain_command(settings: Settings, args: argparse.Namespace) -> int:
    redis = await open_redis(settings.redis_url)
    try:
        return await drain(redis, args.process, args.cancel, args.force, args.wait)
    except DrainError as exc:
        print(f"drain: {exc}")
        return 2
    finally:
        await redis.aclose()
