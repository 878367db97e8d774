"""The Redis half of storing candles: what PostgreSQL has stored is held, in order, until
Redis has cached and announced it (`ohlcv_<tf>_ready`), published at once when Redis
takes it and by a worker of its own otherwise. Bounded: past `held_max` the oldest are
let go and re-read from PostgreSQL once Redis is back (announced late, at least once).
`CandleIntake` (feed_and_aggregate.py) is built on it.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from typing import Any

import asyncpg
from redis.asyncio import Redis

import core_io
from binance.streams import Backoff
from candles import Candle
from infra import PG_DOWN_ERRORS, REDIS_DOWN_ERRORS, Outage, log_system_event


def widen(ranges: dict[Any, tuple[int, int]], key: Any, first: int, last: int) -> None:
    """Grow the (first, last) open-time range kept for `key` to cover first..last:
    what a full buffer lets go is remembered in constant memory per series."""
    old_first, old_last = ranges.get(key, (first, last))
    ranges[key] = (min(first, old_first), max(last, old_last))


class CandlePublisher:
    """Candles stored in PostgreSQL, cached and announced in Redis in the order stored."""

    metrics: Any = None  # metrics.definitions.DaemonMetrics when METRICS_PORT is set

    def __init__(
        self,
        pool: asyncpg.Pool,
        redis: Redis,
        store: core_io.CandleStore,
        stream_maxlen: int,
        held_max: int = 50_000,
        background: bool = False,
    ) -> None:
        self.pool, self.redis, self.store, self.maxlen = pool, redis, store, stream_maxlen
        # Background: the Redis publishing (and the intake's gap-log settling) run on
        # their own workers (run_publisher, run_settler), so the next batch's PostgreSQL
        # write overlaps this batch's announcement and nothing after it waits on the gap log.
        self.background = background
        # Stored in PostgreSQL, not yet cached and announced in Redis: in order, bounded.
        # Past `held_max` the oldest are let go and re-announced from PostgreSQL later.
        self.held: deque[tuple[str, list[Candle]]] = deque()
        self.held_candles = 0
        self.held_max = held_max
        # What was let go, as (first, last) open time per (tf, symbol): re-read from
        # PostgreSQL and published once the held ones are out (ranges stay small in memory).
        self.let_go: dict[tuple[str, str], tuple[int, int]] = {}
        self.publish_lock = asyncio.Lock()
        self.publish_wake = asyncio.Event()
        self.redis_outage = Outage("INTAKE", "Redis")
        self.pg_outage = Outage("INTAKE", "PostgreSQL")

    INLINE_PUBLISH_S = 2.0  # longer, and the publisher worker takes over: PostgreSQL writes never wait on Redis

    async def _cache_and_announce(self, candles: Sequence[Candle], tf: str, history: bool = False) -> None:
        """Hold the candles for Redis and publish at once, unless Redis is away or busy:
        then `run_publisher` sends everything held, in order, when it can."""
        self._hold(tf, candles, history)
        if self.background or self.redis_outage.active or self.publish_lock.locked():
            self.publish_wake.set()
            return
        try:
            await asyncio.wait_for(self.publish_held(), self.INLINE_PUBLISH_S)
        except TimeoutError:
            self.publish_wake.set()  # slow, not necessarily away: the rest goes in the background
        except REDIS_DOWN_ERRORS as exc:
            self.redis_outage.fail(exc, "caching and announcing candles", {"held": self.held_candles})
            self.publish_wake.set()

    def _hold(self, tf: str, candles: Sequence[Candle], history: bool = False) -> None:
        self.held.append((tf, core_io.HistoryBatch(candles) if history else list(candles)))
        self.held_candles += len(candles)
        while self.held_candles > self.held_max and len(self.held) > 1:
            tf, dropped = self.held.popleft()
            self.held_candles -= len(dropped)
            if not self.let_go:
                log_system_event(
                    "WARNING",
                    "INTAKE",
                    f"more than {self.held_max} candles held for Redis: the oldest will be re-read "
                    "from PostgreSQL when Redis takes them",
                )
            for c in dropped:
                widen(self.let_go, (tf, c.symbol), c.open_time, c.open_time)

    async def publish_let_go(self) -> int:
        """Re-read what was let go from PostgreSQL and publish it (late, at least once)."""
        published = 0
        while self.let_go:
            (tf, symbol), (first, last) = self.let_go.popitem()
            try:
                candles = await core_io.fetch_candles(self.pool, symbol, tf, first, last + 1)
                for i in range(0, len(candles), 5000):
                    await self._publish([(tf, candles[i : i + 5000])])
            except BaseException:
                widen(self.let_go, (tf, symbol), first, last)
                raise
            published += len(candles)
        return published

    async def _publish(self, batches: Sequence[tuple[str, Sequence[Candle]]]) -> None:
        await core_io.publish_candles(self.store, self.redis, batches, self.maxlen)
        if self.metrics is not None:  # in PostgreSQL and Redis now: counted and timed
            self.metrics.candles_published(batches)

    PUBLISH_ROUND = 20_000  # candles cached and announced in one Redis round at most

    async def publish_held(self) -> int:
        """Cache and announce what is held, oldest first, as few rounds as it takes; a
        failure keeps the rest."""
        published = 0
        async with self.publish_lock:
            while self.held:
                count, size = 0, 0
                for _, candles in self.held:
                    if count and size + len(candles) > self.PUBLISH_ROUND:
                        break
                    count, size = count + 1, size + len(candles)
                batch = [self.held[i] for i in range(count)]
                await self._publish(batch)
                # While it was out, _hold may have let the oldest go (they are in let_go
                # too: announced again later); only what was published leaves the front.
                sent = {id(entry) for entry in batch}
                while self.held and id(self.held[0]) in sent:
                    self.held_candles -= len(self.held.popleft()[1])
                published += size
        return published

    async def run_publisher(self) -> None:
        """Sends what was held while Redis was away, then what was let go (from PostgreSQL)."""
        backoff = Backoff(0.2, 5.0)
        published = 0
        while True:
            await self.publish_wake.wait()
            self.publish_wake.clear()
            try:
                published += await self.publish_held()
                if self.let_go:
                    async with self.publish_lock:
                        published += await self.publish_let_go()
            except REDIS_DOWN_ERRORS as exc:
                self.redis_outage.fail(exc, "caching and announcing candles", {"held": self.held_candles})
                self.publish_wake.set()
                await asyncio.sleep(backoff.next_delay())
                continue
            except PG_DOWN_ERRORS as exc:
                self.pg_outage.fail(exc, "re-reading candles to announce")
                self.publish_wake.set()
                await asyncio.sleep(backoff.next_delay())
                continue
            backoff.reset()
            if not self.held and not self.let_go:
                self.redis_outage.ok({"published": published})
                published = 0
