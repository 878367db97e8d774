"""Binance feed: WebSocket intake, gap repair over REST, M5/M15 aggregation, mark prices.

The pieces, each a worker run under `run_safe_loop` by the daemon:
    Feed.streams      the WebSocket connections (binance/streams.py)
    Feed.intake       closed klines → PostgreSQL, Redis, `ohlcv_m1_ready`, aggregation
    Backfiller        'missing' minutes and first history from GET /fapi/v1/klines
    Feed.watch_gaps   minutes whose close is overdue on event time
    Feed.follower     subscribe / unsubscribe as rows of `tickers` change (ticker_following.py)
Pure logic lives in binance/protocol.py and aggregation.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import deque
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from redis.asyncio import Redis

import core_io
from aggregation import AGGREGATED_TFS, GapTracker, RecentCandles, affected_buckets
from aggregation_io import build_buckets, missing_buckets
from backfill import Backfiller
from binance.clock import ExchangeClock
from binance.limits import AttemptLimiter, SharedLimits
from binance.protocol import (
    MARK_PRICE_ALL_STREAM,
    FrameError,
    KlineUpdate,
    MarkPrices,
    Reply,
    kline_stream,
    parse_frame,
)
from binance.rest import RestClient, RestError, WeightLimiter
from binance.settings import FeedSettings
from binance.streams import Backoff, StreamPool
from binance.trades import agg_trade_stream, parse_agg_trade_frame
from candle_publisher import CandlePublisher, widen
from candles import TF_MS, Candle, bucket_start, datetime_to_ms, ms_to_datetime
from infra import (
    PG_DOWN_ERRORS,
    PG_REJECTED_ERRORS,
    REDIS_DOWN_ERRORS,
    Outage,
    RateLimitedLog,
    Settings,
    log_system_event,
)
from orderflow import store as orderflow_store
from orderflow.intake import OrderFlowIntake, OrderFlowSettings
from shards.ownership import Ownership
from ticker_following import TickerFollower

M1_MS = TF_MS["m1"]
log = logging.getLogger("FEED")


# --------------------------------------------------------------------------- storing candles


class CandleIntake(CandlePublisher):
    """Stores M1 candles (PostgreSQL first, then Redis, then the announcement) and
    builds the M5/M15 buckets they complete."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        redis: Redis,
        store: core_io.CandleStore,
        stream_maxlen: int,
        defer_aggregation: bool = False,
        held_max: int = 50_000,
        background: bool = False,
        aggregated: Sequence[str] = AGGREGATED_TFS,
    ) -> None:
        super().__init__(pool, redis, store, stream_maxlen, held_max, background)
        self.stored_m1 = 0
        self.aggregated = tuple(aggregated)  # the timeframes built from M1, lower first
        # Deferred: buckets are built by `run_aggregator`, so building 500 M15 buckets at a
        # quarter hour never delays the next M1 closes (a crash loses nothing: the boot
        # reconciliation rebuilds recent buckets).
        self.defer_aggregation = defer_aggregation
        self.to_settle: list[tuple[str, int]] = []
        self.settle_wake = asyncio.Event()
        self.buckets_due: set[tuple[str, str, int]] = set()
        self.recent = RecentCandles(self.aggregated)  # what buckets are built from in memory
        self.buckets_wake = asyncio.Event()
        self.aggregating = False
        # Candles of a write that failed: PostgreSQL may still have committed it (a reply
        # lost, a black-holed connection delivering late), so the retry cannot rely on
        # "changed" to decide what to announce. They are announced anyway (at least once).
        self.unsure: set[tuple[str, str, int]] = set()
        self.rejections = RateLimitedLog("INTAKE", level="ERROR")
        self.last_stored_at = time.monotonic()  # local clock: the watchdog's measure of a live feed
        # Bucket writes, from store_m1 and from aggregate, one at a time from reading the
        # minutes to queueing the announcement: a build from minutes read just before a
        # newer one was stored never overwrites the newer bucket, and the last
        # announcement of a bucket is what PostgreSQL holds.
        self.bucket_lock = asyncio.Lock()
        # Buckets due from history minutes (REST warm-up and catch-up): announced as
        # history too when the aggregator builds them (core_io.HISTORY_FIELD).
        self.history_buckets: set[tuple[str, str, int]] = set()
        # Whether this process may write a symbol now (its lease, shards/ownership.py):
        # what it may not is dropped here, for the symbol's owner to store.
        self.may_write: Callable[[str], bool] = lambda symbol: True

    async def store_m1(
        self,
        candles: Sequence[Candle],
        rejected: list[Candle] | None = None,
        history: bool | Collection[tuple[str, int]] = False,
        fenced: list[Candle] | None = None,
    ) -> list[Candle]:
        """Returns the candles that were new or changed (announced); those PostgreSQL
        refused go to `rejected`, those of symbols this process may not write now to
        `fenced`.

        An M5/M15 bucket this batch completes (its last minute is here and every other
        one was stored through this intake) is built at once and stored in the same
        statement: at a quarter hour the M15s are announced with the M1s, not a
        PostgreSQL round trip later. The other buckets a new minute touches are built
        by `aggregate` (from PostgreSQL when memory does not hold them). `history`: REST
        warm-up history or catch-up (True: all of them, or the (symbol, open time) of
        those that are), announced with `history=1`, and so are the buckets built from it."""
        writable: list[Candle] = []
        for candle in candles:
            if self.may_write(candle.symbol):
                writable.append(candle)
            elif fenced is not None:
                fenced.append(candle)
        if not writable:
            return []
        async with self.bucket_lock:
            return await self._store_m1(writable, rejected, history)

    async def _store_m1(
        self, candles: Sequence[Candle], rejected: list[Candle] | None, history: bool | Collection[tuple[str, int]]
    ) -> list[Candle]:
        unique = {(c.symbol, c.open_time): c for c in candles}
        marked = set(unique) if history is True else set(history or ())  # the history minutes
        self.recent.remember(list(unique.values()))
        completed = self.recent.completed_buckets(unique.values())
        refused: list[Candle] = []
        changed = await self._upsert([*unique.values(), *completed], refused)
        self.last_stored_at = time.monotonic()
        self.recent.remember_parts(completed, refused)
        refused_m1 = [c for c in refused if c.tf == "m1"]
        if refused_m1:  # not stored: never in a bucket, nor settled; their buckets are rebuilt from PostgreSQL
            for candle in refused_m1:
                unique.pop((candle.symbol, candle.open_time), None)
                self.recent.forget_m1(candle)
            self._due(affected_buckets(((c.symbol, c.open_time) for c in refused_m1), self.aggregated))
            if rejected is not None:
                rejected += refused_m1
        fresh = [c for c in unique.values() if (c.symbol, "m1", c.open_time) in changed]
        fresh.sort(key=lambda c: c.open_time)
        if fresh:
            await self._announce_marked(fresh, "m1", [(c.symbol, c.open_time) in marked for c in fresh])
            self.stored_m1 += len(fresh)
        # A bucket can change with none of its minutes: a repeated close completes in
        # memory a bucket whose other minutes came since (its build still queued). A
        # bucket is history when the minute that completed it is.
        for tf in self.aggregated:
            built = [b for b in completed if b.tf == tf and (b.symbol, tf, b.open_time) in changed]
            if built:
                last = TF_MS[tf] - M1_MS
                await self._announce_marked(built, tf, [(b.symbol, b.open_time + last) in marked for b in built])
        if fresh:
            done = {(b.symbol, b.tf, b.open_time) for b in completed}
            touched = affected_buckets(((c.symbol, c.open_time) for c in fresh), self.aggregated)
            buckets = {b for b in touched - done if self.recent.may_end(b)}
            live = affected_buckets(
                ((c.symbol, c.open_time) for c in fresh if (c.symbol, c.open_time) not in marked), self.aggregated
            )
            # A live minute's bucket is live, whatever it held before.
            self.history_buckets = (self.history_buckets | (buckets - live)) - live
            if self.defer_aggregation:
                self._due(buckets)
            elif buckets:
                await self._aggregate(buckets)  # under the bucket lock already
        # A late close or a refetch settles its gap-log row (off the latency path).
        if self.background:
            self.to_settle += unique
            self.settle_wake.set()
        else:
            await core_io.set_missing_status(self.pool, list(unique), "backfilled")
        return fresh

    def _due(self, buckets: set[tuple[str, str, int]]) -> None:
        if buckets:
            self.buckets_due |= buckets
            self.buckets_wake.set()

    async def run_settler(self) -> None:
        """Gap-log rows of minutes now stored become 'backfilled', in batches."""
        backoff = Backoff(0.2, 5.0)
        while True:
            await self.settle_wake.wait()
            self.settle_wake.clear()
            keys, self.to_settle = self.to_settle, []
            try:
                for i in range(0, len(keys), 20_000):
                    await core_io.set_missing_status(self.pool, keys[i : i + 20_000], "backfilled")
                backoff.reset()
            except PG_DOWN_ERRORS as exc:
                self.to_settle = keys + self.to_settle
                self.settle_wake.set()
                self.pg_outage.fail(exc, "settling the gap log")
                await asyncio.sleep(backoff.next_delay())

    async def reconcile(self, window_ms: int, symbols: Collection[str]) -> None:
        """Close the crash windows of a previous run, or of the process that held
        `symbols` before this one (a kill between the PostgreSQL commit and Redis):
        rebuild the buckets of their recent minutes and announce every recent candle the
        streams lack. Announcements are at least once; consumers are idempotent."""
        newest = await core_io.newest_m1_time(self.pool)
        if newest is None:
            return
        cutoff = newest - window_ms
        cutoff -= cutoff % TF_MS["m15"]
        mine = [s for s in symbols if self.may_write(s)]
        recent = await self.pool.fetch(
            "SELECT symbol, open_time FROM ohlcv4_m1 WHERE open_time >= $1 AND symbol = ANY($2)",
            ms_to_datetime(cutoff),
            mine,
        )
        await self.aggregate(
            affected_buckets(((r["symbol"], datetime_to_ms(r["open_time"])) for r in recent), self.aggregated)
        )
        repaired = 0
        for tf, stream in core_io.CANDLE_STREAMS.items():
            announced = await core_io.announced_candles(self.redis, stream)
            stored = await self.pool.fetch(
                f"SELECT symbol, open_time FROM {core_io.candle_table(tf)} WHERE open_time >= $1 AND symbol = ANY($2)",
                ms_to_datetime(cutoff),
                mine,
            )
            unannounced = {(r["symbol"], datetime_to_ms(r["open_time"])) for r in stored} - announced
            candles = await core_io.fetch_candles_at(self.pool, tf, sorted(unannounced))
            if candles:
                await self._cache_and_announce(candles, tf)
                repaired += len(candles)
        if repaired:
            log_system_event(
                "WARNING",
                "INTAKE",
                f"announced {repaired} candles a previous run stored but did not announce",
                {"window_ms": window_ms},
            )

    async def _upsert(
        self, candles: Sequence[Candle], rejected: list[Candle] | None = None
    ) -> set[tuple[str, str, int]]:
        """The (symbol, tf, open_time) of the candles that are new or changed, or unsure.

        Rows PostgreSQL refuses (a value it cannot store) are isolated by halving the
        batch, logged and added to `rejected`; the rest is stored: one bad candle never
        holds up the others, and retrying it would only fail again."""
        try:
            changed = set(await core_io.upsert_candles(self.pool, candles))
        except PG_REJECTED_ERRORS as exc:
            if len(candles) == 1:
                self._reject(candles[0], exc, rejected)
                return set()
            half = len(candles) // 2
            return await self._upsert(candles[:half], rejected) | await self._upsert(candles[half:], rejected)
        except BaseException:
            if len(self.unsure) < 1_000_000:
                self.unsure.update((c.symbol, c.tf, c.open_time) for c in candles)
            raise
        if self.unsure:  # only after a failure: the usual batch builds no key set
            keys = {(c.symbol, c.tf, c.open_time) for c in candles}
            changed |= keys & self.unsure
            self.unsure -= keys
        return changed

    def _reject(self, candle: Candle, exc: BaseException, rejected: list[Candle] | None) -> None:
        if rejected is not None:
            rejected.append(candle)
        self.rejections.warn(
            f"{type(exc).__name__}",
            f"PostgreSQL refused the {candle.tf} candle {candle.symbol} {candle.open_time}: {exc}",
            {"candle": [str(v) for v in dataclasses.astuple(candle)]},
        )

    async def run_aggregator(self) -> None:
        """Builds the buckets `store_m1` left due, all that piled up in one go."""
        backoff = Backoff(0.2, 5.0)
        while True:
            await self.buckets_wake.wait()
            self.buckets_wake.clear()
            due, self.buckets_due = self.buckets_due, set()
            self.aggregating = True
            try:
                await self.aggregate(due)
                backoff.reset()
            except PG_DOWN_ERRORS as exc:
                self.buckets_due |= due
                self.buckets_wake.set()
                self.pg_outage.fail(exc, "building M5/M15 buckets")
                await asyncio.sleep(backoff.next_delay())
            except BaseException:
                self.buckets_due |= due
                raise
            finally:
                self.aggregating = False

    async def build_missing(self, history_ms: int, symbols: Collection[str]) -> None:
        """Build the buckets missing within `history_ms` whose minutes are stored: a
        history's older buckets are left to the aggregator, and a process that died, or
        lost the symbol, before that ran never builds them (its fence drops them)."""
        newest = await core_io.newest_m1_time(self.pool)
        mine = [s for s in symbols if self.may_write(s)]
        if newest is not None and mine:
            await self.aggregate(await missing_buckets(self.pool, self.aggregated, mine, newest - history_ms))

    async def _announce_marked(self, candles: Sequence[Candle], tf: str, marks: Sequence[bool]) -> None:
        """Cache and announce in order, runs of history (`history=1`) and live candles apart."""
        start = 0
        for end in range(1, len(candles) + 1):
            if end == len(candles) or marks[end] != marks[start]:
                await self._cache_and_announce(candles[start:end], tf, marks[start])
                start = end

    async def aggregate(self, buckets: set[tuple[str, str, int]]) -> list[Candle]:
        """Build every bucket whose minutes are all stored or unfillable; announce changes."""
        buckets = {bucket for bucket in buckets if self.may_write(bucket[0])}
        if not buckets:
            return []
        async with self.bucket_lock:
            return await self._aggregate(buckets)

    async def _aggregate(self, buckets: set[tuple[str, str, int]]) -> list[Candle]:
        # A bucket whose minutes all passed through this intake is built from memory;
        # the others from what PostgreSQL holds (after a restart, a backfill, a gap).
        built = await build_buckets(self.pool, buckets, self.recent.parts_in_memory)
        if not built:
            return []
        refused: list[Candle] = []
        changed = await self._upsert(built, refused)
        self.recent.remember_parts(built, refused)
        fresh = [c for c in built if (c.symbol, c.tf, c.open_time) in changed]
        for tf in self.aggregated:
            of_tf = sorted((c for c in fresh if c.tf == tf), key=lambda c: c.open_time)
            await self._announce_marked(of_tf, tf, [(c.symbol, tf, c.open_time) in self.history_buckets for c in of_tf])
        if self.history_buckets:
            self.history_buckets -= {(c.symbol, c.tf, c.open_time) for c in built}
        return fresh


# --------------------------------------------------------------------------- the feed


@dataclass
class FeedStats:
    frames: int = 0
    bad_frames: int = 0
    closes: int = 0
    gaps_detected: int = 0
    mark_prices: int = 0
    event_time: int = 0


@dataclass
class Feed:
    """The feed's shared state and its workers."""

    settings: Settings
    feed_settings: FeedSettings
    pool: asyncpg.Pool
    redis: Redis
    store: core_io.CandleStore
    symbols: set[str] = field(default_factory=set)
    stats: FeedStats = field(default_factory=FeedStats)

    def __post_init__(self) -> None:
        self.intake = CandleIntake(
            self.pool,
            self.redis,
            self.store,
            self.settings.stream_maxlen,
            defer_aggregation=True,
            held_max=self.feed_settings.buffer_max_candles,
            background=True,
        )
        limiter = WeightLimiter(self.feed_settings.rest_weight_limit, self.feed_settings.rest_weight_window_s)
        # One IP's limits, counted for every process of the deployment (binance/limits.py).
        tuning = self.feed_settings
        limiter.shared = SharedLimits(self.redis, tuning.limit_group, tuning.rest_weight_limit, tuning.connect_limit)
        self.attempts = AttemptLimiter(self.feed_settings.connect_limit)  # every route's connections
        self.attempts.shared = limiter.shared
        self.rest = RestClient(self.settings.binance_rest_url, limiter)
        self.clock = ExchangeClock(int(self.feed_settings.frame_time_tolerance_s * 1000))
        self.rest.on_server_time.append(self._synced)
        self.ahead: deque[str | bytes] = deque()  # frames the clock could not judge yet
        self.clock_wake = asyncio.Event()
        self.backfiller = Backfiller(
            self.pool,
            self.intake,
            self.rest,
            self.feed_settings.rest_concurrency,
            followed=lambda: self.symbols,
            on_invalid_symbol=self.refused_by_rest,
        )
        self.follower = TickerFollower(self.pool, self.rest, self.feed_settings, self._follow)
        self.ownership = Ownership(self.redis)  # which symbols are this process's to write
        self.ownership.on_change.append(self.follower.wake.set)
        self.ownership.on_back.append(self._after_redis_outage)
        self.intake.may_write = self.ownership.may_write
        self.tracker = GapTracker(grace_ms=self.feed_settings.gap_grace_ms)
        self.closed: asyncio.Queue[Candle] = asyncio.Queue()
        self.new_gaps: list[tuple[str, int]] = []
        self.prices: dict[str, str] = {}
        self.streams = StreamPool(
            self.settings.binance_ws_url, self.feed_settings, self.handle_frame, self.handle_connected, self.attempts
        )
        self.catch_up_pending: set[str] = set()
        self.needs_history: set[str] = set()  # added symbols that had no candles at all
        # Added symbols with candles: is their first history whole? Known at their catch-up.
        self.history_unsure: set[str] = set()
        self.catch_up_wake = asyncio.Event()
        self.bad_frames = RateLimitedLog("FEED")
        self.store_errors = RateLimitedLog("INTAKE", level="ERROR")
        self.to_reconcile: set[str] = set()  # symbols taken on whose last run's crash window is to close
        self.reannounce_ms = 0  # Redis came back: the window whose announcements a failover may have lost
        self.batch: list[Candle] = []  # taken from `closed`, not stored yet
        self.last_ws_data_at = time.monotonic()  # local clock: a route that delivers nothing
        # Closes let go while PostgreSQL was away and the buffer full: (first, last) per
        # symbol, logged as gaps (and fetched over REST) once it is back.
        self.dropped: dict[str, tuple[int, int]] = {}
        self.rest_fallback = False
        self.fallback_fetched_at = 0.0
        self.orderflow = OrderFlowIntake(
            self.pool,
            self.redis,
            self.rest,
            self.settings.stream_maxlen,
            lambda: self.clock.now_ms,
            self._tick_of,
            OrderFlowSettings.from_env(),
        )

    # ---- frames (synchronous: called for every frame, must stay cheap)

    def handle_frame(self, raw: str | bytes, held: bool = False) -> None:
        if not held:
            self.stats.frames += 1
        if ('@aggTrade"' in raw[:64]) if isinstance(raw, str) else (b'@aggTrade"' in raw[:64]):
            try:
                self.orderflow.on_trade(*parse_agg_trade_frame(raw))
            except FrameError as exc:
                self._bad_frame(str(exc), raw)
            return
        try:
            message = parse_frame(raw)
        except FrameError as exc:
            self._bad_frame(str(exc), raw)
            return
        if isinstance(message, KlineUpdate | MarkPrices):
            if not self.clock.plausible(message.event_time):
                if held:  # the exchange's own time says it is too far ahead
                    ahead = f"event time {message.event_time} is ahead of the exchange's {self.clock.now_ms}"
                    self._bad_frame(ahead, raw)
                else:
                    self._hold(raw)
                return
            self.clock.advance(message.event_time)
            self.stats.event_time = self.clock.now_ms
            self.last_ws_data_at = time.monotonic()
        if isinstance(message, KlineUpdate):
            symbol = message.symbol
            if symbol not in self.symbols:
                self.bad_frames.warn("unfollowed", f"skipped a kline for unfollowed symbol {symbol[:40]!r}")
                return
            if message.closed:
                self.stats.closes += 1
                if self.intake.metrics is not None:
                    self.intake.metrics.close_received(symbol, message.open_time)
                self.new_gaps += [(symbol, t) for t in self.tracker.on_close(symbol, message.open_time)]
                if self.closed.qsize() < self.feed_settings.buffer_max_candles:
                    self.closed.put_nowait(message.candle)
                else:
                    self._drop(symbol, message.open_time)
                self.orderflow.on_close(message)
        elif isinstance(message, MarkPrices):
            for symbol, price in message.prices.items():
                if symbol in self.symbols:
                    self.prices[symbol] = price
        elif isinstance(message, Reply) and message.error:
            log_system_event("ERROR", "FEED", f"request {message.request_id} refused: {str(message.error)[:300]}")

    def _bad_frame(self, reason: str, raw: str | bytes) -> None:
        self.stats.bad_frames += 1
        self.bad_frames.warn(reason, f"skipped a bad frame: {reason}", {"frame": str(raw[:300])})

    HELD_FRAMES_MAX = 20_000

    def _hold(self, raw: str | bytes) -> None:
        """A frame stamped later than the clock trusts: kept (bounded) until the
        exchange's /fapi/v1/time says whether the clock or the frame is wrong. A close
        let go here becomes an overdue minute, fetched over REST."""
        if len(self.ahead) < self.HELD_FRAMES_MAX:
            self.ahead.append(raw)
        else:
            self._bad_frame("too many frames ahead of the exchange's clock", raw)
        self.clock_wake.set()

    def _synced(self, server_ms: int) -> None:
        self.clock.sync(server_ms)
        self.stats.event_time = self.clock.now_ms

    def _tick_of(self, symbol: str) -> int | None:
        listing = self.follower.tickers.listing
        found = listing.get(symbol) if listing is not None else None
        return found.tick if found is not None else None

    def refused_by_rest(self, symbol: str) -> None:
        """GET /fapi/v1/klines answered -1121 (invalid symbol): stop following it."""
        self.follower.refused(symbol)

    def _drop(self, symbol: str, open_time: int) -> None:
        if not self.dropped:
            log_system_event(
                "WARNING",
                "INTAKE",
                f"{self.feed_settings.buffer_max_candles} closes wait for PostgreSQL: newer ones are "
                "let go and fetched over REST once it is back",
            )
        widen(self.dropped, symbol, open_time, open_time)

    def handle_connected(self, streams: set[str]) -> None:
        """After every (re)connect: catch up what the disconnection may have missed."""
        self.catch_up_pending |= {s for s in self.symbols if kline_stream(s) in streams}
        self.catch_up_wake.set()
        self.orderflow.resume(s for s in self.orderflow.tapes if agg_trade_stream(s) in streams)

    # ---- workers

    async def intake_loop(self) -> None:
        """Drain closed klines in batches; a failed batch is retried, never dropped (it
        is kept on the feed, so even a crash of this worker keeps it)."""
        backoff = Backoff(0.2, 5.0)
        outage = self.intake.pg_outage
        while True:
            if not self.batch:
                self.batch.append(await self.closed.get())
            while not self.closed.empty() and len(self.batch) < 5000:
                self.batch.append(self.closed.get_nowait())
            try:
                await self._flush_gaps()
                refused: list[Candle] = []
                fenced: list[Candle] = []
                await self.intake.store_m1(self.batch, refused, fenced=fenced)
                self.new_gaps += [(c.symbol, c.open_time) for c in refused]  # the exchange's REST may do better
                # A close of a symbol still followed whose lease lapsed (Redis away) or just
                # passed on: a gap for whoever holds it to fetch. Dropped unlogged, a lease
                # that lapsed and came back between two of the follower's looks lost the minute.
                self.new_gaps += [(c.symbol, c.open_time) for c in fenced if c.symbol in self.symbols]
                if self.dropped:
                    await self._log_dropped()
                self.batch = []
                backoff.reset()
                outage.ok({"waiting": self.closed.qsize()})
            except PG_DOWN_ERRORS as exc:
                outage.fail(exc, f"storing {len(self.batch)} candles", {"waiting": self.closed.qsize()})
                await asyncio.sleep(backoff.next_delay())
            except asyncpg.PostgresError as exc:  # up but unusable (permissions, read-only, disk full)
                self.store_errors.warn(
                    type(exc).__name__, f"PostgreSQL refused to store {len(self.batch)} candles: {exc}; retrying"
                )
                await asyncio.sleep(backoff.next_delay())

    async def _log_dropped(self) -> None:
        dropped, self.dropped = self.dropped, {}
        try:
            await self._log_gaps([(s, t) for s, (a, b) in dropped.items() for t in range(a, b + 1, M1_MS)])
        except BaseException:
            for symbol, (first, last) in dropped.items():
                widen(self.dropped, symbol, first, last)
            raise

    async def _flush_gaps(self) -> None:
        """Log the gaps found so far; on failure they stay queued, in order."""
        if not self.new_gaps:
            return
        gaps, self.new_gaps = self.new_gaps, []
        try:
            await self._log_gaps(gaps)
        except BaseException:
            self.new_gaps = gaps + self.new_gaps
            raise

    async def _log_gaps(self, gaps: list[tuple[str, int]]) -> None:
        added = await core_io.log_missing_m1(self.pool, gaps)
        if added:
            self.stats.gaps_detected += added
            log_system_event(
                "WARNING", "GAPS", f"{added} missing minutes detected", {"first": list(gaps[0]), "last": list(gaps[-1])}
            )
            self.backfiller.wake.set()

    async def watch_gaps(self) -> None:
        """Minutes whose close is overdue on event time become gaps."""
        while True:
            await asyncio.sleep(0.5)
            if self.clock.now_ms:
                for symbol, minutes in self.tracker.overdue(self.clock.now_ms).items():
                    self.new_gaps += [(symbol, t) for t in minutes]
            if self.closed.empty():  # else the intake logs them before its next batch
                await self._flush_gaps()

    async def keep_clock(self) -> None:
        """Frames stamped ahead of the clock wait here for the exchange's /fapi/v1/time,
        then are judged again: a real jump (a long reconnect, a fast replay) is taken,
        a frame still ahead of the exchange's own time is refused."""
        backoff = Backoff(0.5, 10.0)
        outage = Outage("FEED", "REST /fapi/v1/time")
        while True:
            await self.clock_wake.wait()
            try:
                await self.rest.server_time()  # syncs the clock (RestClient.on_server_time)
            except (RestError, OSError, TimeoutError) as exc:
                outage.fail(exc, f"checking the clock for {len(self.ahead)} frames")
                await asyncio.sleep(backoff.next_delay())
                continue
            outage.ok()
            backoff.reset()
            self.clock_wake.clear()
            held, self.ahead = self.ahead, deque()
            for raw in held:
                self.handle_frame(raw, held=True)

    async def flush_prices(self) -> None:
        """Latest mark prices; while Redis is away only the newest per symbol is kept."""
        while True:
            await asyncio.sleep(0.5)
            if self.prices:
                prices, self.prices = self.prices, {}
                try:
                    await core_io.set_mark_prices(self.redis, prices)
                except REDIS_DOWN_ERRORS:
                    self.prices = prices | self.prices
                    await asyncio.sleep(2.0)
                    continue
                self.stats.mark_prices += len(prices)

    async def watch_rest_fallback(self) -> None:
        """No data at all over the WebSocket for REST_FALLBACK_S while symbols are
        followed (a dead or silent route, e.g. a legacy URL): closed minutes are fetched
        over REST every REST_FALLBACK_S until the WebSocket delivers again.

        Judged on any data (mark prices come every second), not on closes: those come
        once a minute, and a close that is late while data flows is the gap watcher's
        to find, on the exchange's clock."""
        limit = self.feed_settings.rest_fallback_s
        followed_since = time.monotonic()
        while True:
            await asyncio.sleep(min(limit, 1.0))
            if not self.symbols:
                followed_since = time.monotonic()
                continue
            silent_for = time.monotonic() - max(self.last_ws_data_at, followed_since)
            if silent_for < limit:
                if self.rest_fallback:
                    self.rest_fallback = False
                    log_system_event("INFO", "FEED", "the WebSocket delivers data again: REST fallback off")
                continue
            if not self.rest_fallback:
                self.rest_fallback = True
                log_system_event(
                    "ERROR",
                    "FEED",
                    f"no data over the WebSocket for {silent_for:.0f}s: closed minutes are fetched "
                    f"over REST every {limit:g}s until it is back (check BINANCE_WS_URL: the /market route)",
                    {"url": self.settings.binance_ws_url},
                )
            elif time.monotonic() - self.fallback_fetched_at < limit:
                continue
            self.fallback_fetched_at = time.monotonic()
            self.catch_up_pending |= self.symbols
            self.catch_up_wake.set()

    def _after_redis_outage(self, down_s: float) -> None:
        """Redis back: what a failover lost of the last announcements its master took is
        announced again, as after a crash: the reconciliation of every symbol held, over
        the outage and RECONCILE_WINDOW_M1 before it (a history or a backfill announced
        at that moment has older bars than the minute)."""
        window_ms = int(down_s * 1000) + self.feed_settings.reconcile_window_m1 * M1_MS
        self.reannounce_ms = max(self.reannounce_ms, window_ms)
        self.catch_up_wake.set()

    async def catch_up(self) -> None:
        """From the last stored M1 to the exchange's now: gaps are logged and backfilled;
        a symbol with no candles gets its first history (not logged as gaps)."""
        while True:
            await self.catch_up_wake.wait()
            self.catch_up_wake.clear()
            taken, self.to_reconcile = self.to_reconcile, set()  # symbols just taken on (at boot: all it holds)
            symbols, self.catch_up_pending = self.catch_up_pending, set()
            reannounce, self.reannounce_ms = self.reannounce_ms, 0
            try:
                if reannounce:
                    await self.intake.reconcile(reannounce, self.symbols)
                if taken:
                    await self.intake.reconcile(self.feed_settings.reconcile_window_m1 * M1_MS, taken)
                if symbols:
                    await self._catch_up(sorted(symbols))
                if taken:  # once their catch-up is asked for: ~2 s for 300 symbols' 3,750 minutes
                    await self.intake.build_missing(self.feed_settings.initial_history_m1 * M1_MS, taken)
            except BaseException:
                # Kept for the worker's restart (a Redis failover, PostgreSQL away): a catch-up
                # lost with it left the minutes missed before a take-over unstored for good, and
                # the order flow of those symbols waiting on their klines. Each step is idempotent.
                self.to_reconcile |= taken & self.symbols
                self.catch_up_pending |= symbols & self.symbols
                self.reannounce_ms = max(self.reannounce_ms, reannounce)
                self.catch_up_wake.set()
                raise

    async def _catch_up(self, symbols: list[str]) -> None:
        server_now = await self.rest.server_time()
        last_closed = (server_now - M1_MS) // M1_MS * M1_MS  # newest minute with close time < now
        stored = await core_io.last_m1_open_times(self.pool, symbols)
        history_from = bucket_start(last_closed - (self.feed_settings.initial_history_m1 - 1) * M1_MS, "m15")
        await self._check_history(symbols, history_from)
        gaps: list[tuple[str, int]] = []
        for symbol in symbols:
            last = stored.get(symbol)
            if symbol in self.backfiller.history_outstanding:
                continue  # its first history is still being fetched
            if last is None or symbol in self.needs_history:
                self.needs_history.discard(symbol)
                self.backfiller.request_history(symbol, history_from, last_closed)
            else:
                gaps += [(symbol, t) for t in range(last + M1_MS, last_closed + M1_MS, M1_MS)]
            self.tracker.seed(symbol, last_closed)
        await self._log_gaps(gaps)

    async def _check_history(self, symbols: list[str], history_from: int) -> None:
        """Symbols just taken on whose stored M1 starts after the history window get their
        history: a first history queued behind the live closes already stored was dropped
        with the symbol when its process lost it or died, and "has candles" hid that for
        good. A symbol listed inside the window costs one request per take-over."""
        unsure = [s for s in symbols if s in self.history_unsure]
        if unsure:
            firsts = await core_io.first_m1_open_times(self.pool, unsure)
            self.needs_history |= {s for s in unsure if firsts.get(s, history_from) > history_from}
            self.history_unsure -= set(unsure)

    async def _follow(self, wanted: set[str]) -> None:
        """Follow what the exchange lists of `tickers` and this process holds the lease
        of (shards/ownership.py): all of it when it runs alone."""
        wanted = await self.ownership.claim(wanted)
        added, removed = wanted - self.symbols, self.symbols - wanted
        if added or removed:
            previous, self.symbols = self.symbols, wanted
            try:
                await self._apply(added, removed)
            except BaseException:
                # Tried again whole by the follower's restart (each step is idempotent): kept
                # as applied, the symbols taken on were never subscribed or caught up.
                self.symbols = previous
                raise
            log_system_event(
                "INFO",
                "FEED",
                f"following {len(wanted)} symbols",
                {"added": sorted(added)[:100], "removed": sorted(removed)[:100]},
            )

    async def _apply(self, added: set[str], removed: set[str]) -> None:
        for symbol in removed:
            self.tracker.forget(symbol)
            self.backfiller.forget(symbol)
        self.orderflow.forget(removed)
        traded = sorted(added & await orderflow_store.trade_symbols(self.pool)) if self.feed_settings.orderflow else []
        await self.orderflow.follow(traded)  # before its streams: the row sizes and the stored state
        # Seed gap detection before the first frame: after a restart the first live close
        # must reveal the minutes missed while the process was down.
        stored = await core_io.last_m1_open_times(self.pool, sorted(added))
        for symbol, last in stored.items():
            self.tracker.seed(symbol, last)
        # The minutes of each symbol's current M15 bucket, so the first boundary after a
        # (re)start builds its M5/M15 from memory, in the same statement as the M1s.
        recent = [(s, bucket_start(t, "m15"), t + M1_MS) for s, t in stored.items()]
        for candles in (await core_io.fetch_candle_ranges(self.pool, "m1", recent)).values():
            self.intake.recent.remember(candles)
        # Decided now, before the first live close can be stored and hide the empty history.
        self.needs_history |= added - set(stored)
        self.history_unsure |= added & set(stored)
        first = [] if self.streams.connections else [MARK_PRICE_ALL_STREAM]  # on the first connection
        await self.streams.update(
            first + [kline_stream(s) for s in added] + [agg_trade_stream(s) for s in traded],
            {kline_stream(s) for s in removed} | {agg_trade_stream(s) for s in removed},
        )
        # Already-connected connections do not reconnect: catch the new symbols up now.
        self.to_reconcile |= added
        self.catch_up_pending |= added
        self.catch_up_wake.set()

    async def run_connections(self) -> None:
        """Owns the connections (and the REST client); cancelling it closes them."""
        try:
            await self.streams.run()
        finally:
            await self.rest.close()

    async def drain(self) -> None:
        """At shutdown, once the sources are stopped: store every close received, log
        the gaps found, build the buckets due and write the last mark prices."""
        while not self.closed.empty() or self.batch:
            await asyncio.sleep(0.01)
        await self._flush_gaps()
        while self.intake.buckets_due or self.intake.aggregating:
            await asyncio.sleep(0.01)
        while self.intake.held and not self.intake.redis_outage.active:
            await asyncio.sleep(0.01)  # (what Redis does not take now, the next boot re-announces)
        while self.intake.to_settle and not self.intake.pg_outage.active:
            await asyncio.sleep(0.01)
        flow = self.orderflow
        while ((flow.finals or flow.to_write) and not flow.pg_outage.active) or (
            flow.to_publish and not flow.redis_outage.active
        ):
            await asyncio.sleep(0.01)
        if flow.raw is not None:
            await flow.raw.drain()
        if self.prices:
            prices, self.prices = self.prices, {}
            await core_io.set_mark_prices(self.redis, prices)

    def workers(self) -> dict[str, Callable[[], Any]]:
        """By name; those in SOURCES take data in and are stopped first at shutdown."""
        return {
            "FEED_CONNECTIONS": self.run_connections,
            "FEED_TICKERS": self.follower.run,
            "FEED_SHARDS": self.ownership.run,
            "FEED_INTAKE": self.intake_loop,
            "FEED_AGGREGATE": self.intake.run_aggregator,
            "FEED_CATCH_UP": self.catch_up,
            "FEED_GAPS": self.watch_gaps,
            "FEED_BACKFILL": self.backfiller.run,
            "FEED_PRICES": self.flush_prices,
            "FEED_PUBLISH": self.intake.run_publisher,
            "FEED_SETTLE": self.intake.run_settler,
            "FEED_REST_FALLBACK": self.watch_rest_fallback,
            "FEED_CLOCK": self.keep_clock,
            **(self.orderflow.workers() if self.feed_settings.orderflow else {}),
        }

    SOURCES = (
        "FEED_CONNECTIONS",
        "FEED_TICKERS",
        "FEED_SHARDS",
        "FEED_CATCH_UP",
        "FEED_BACKFILL",
        "FEED_REST_FALLBACK",
        "FEED_CLOCK",
    )
