"""The book streams' I/O: `/public` connections, snapshots, the depth filter, and the
one-second bars and features out to Redis and PostgreSQL.

Frames are handled synchronously (book/symbol.py, pure) and touch no server: finished
seconds and changed books are queued, and workers write them in batches: Redis at once
(one pipeline), PostgreSQL once a second (one transaction), snapshots through the
process's one REST client and weight limiter, one in flight per symbol.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction
from typing import Any

import asyncpg
from redis.asyncio import Redis

import core_io
from binance.book import (
    BOOK_TICKER_SUFFIX,
    BookTick,
    depth_snapshot_of,
    depth_stream,
    parse_book_ticker_frame,
    parse_depth_frame,
)
from binance.book import book_ticker_stream as ticker_stream
from binance.limits import AttemptLimiter
from binance.protocol import FrameError
from binance.rest import RestClient
from binance.streams import Backoff, StreamPool, StreamSettings
from book import store as book_store
from book.features import range_bounds
from book.minutes import MinuteRollup
from book.seconds import SECOND_MS
from book.symbol import Kind, Second, SymbolSeconds
from infra import Outage, RateLimitedLog, env_number, log_system_event
from orderflow.fold import UNIT, AggTrade
from storage.layout import HOUR_MS, ONE_SECOND_TABLES
from storage.raw import BOOK_TICKERS, RawSettings, RawWriter
from storage.retention import drop_expired

MODULE = "BOOK"
SNAPSHOT_LIMIT = 1000
SNAPSHOT_WEIGHT = 20  # GET /fapi/v1/depth?limit=1000
FUTURE_TOLERANCE_MS = 3_600_000  # an event time this far past the local clock is refused
BOOK_SOURCES = ("BOOK_TICKERS", "BOOK_CONNECTIONS", "BOOK_SNAPSHOTS")  # stopped first at shutdown


@dataclass(frozen=True)
class BookSettings:
    """From the environment (documented in the README)."""

    range_pct: Decimal = Decimal("1")  # BOOK_RANGE_PCT: the depth filter's ± range around the mid
    publish_ms: int = 250  # BOOK_PUBLISH_MS: `book:<S>` at most this often, when changed
    book_grace_ms: int = 30  # BOOK_GRACE_MS: book streams' events still on their way
    trade_grace_ms: int = 150  # TRADE_SECOND_GRACE_MS: aggTrade is pushed every 100 ms
    retention_h: int = 48  # FEATURES_RETENTION_H
    vpin_buckets_per_day: int = 50  # VPIN_BUCKETS: bucket = the last day's volume / this
    vpin_window: int = 50  # VPIN_WINDOW: buckets VPIN is taken over
    volatility_window: int = 60  # VOLATILITY_WINDOW_S: one-second returns
    snapshot_concurrency: int = 2
    write_every_s: float = 1.0
    raw: RawSettings = field(default_factory=RawSettings)  # RAW_BOOK_TICKERS: every update in book_tickers4

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> BookSettings:
        env = os.environ if env is None else env
        return cls(
            range_pct=Decimal(str(env_number(env, "BOOK_RANGE_PCT", 1.0, float, 0.01, 50))),
            publish_ms=env_number(env, "BOOK_PUBLISH_MS", 250, int, 10, 60_000),
            book_grace_ms=env_number(env, "BOOK_GRACE_MS", 30, int, 0, 10_000),
            trade_grace_ms=env_number(env, "TRADE_SECOND_GRACE_MS", 150, int, 0, 10_000),
            retention_h=env_number(env, "FEATURES_RETENTION_H", 48, int, 1, 24 * 3650),
            vpin_buckets_per_day=env_number(env, "VPIN_BUCKETS", 50, int, 1, 100_000),
            vpin_window=env_number(env, "VPIN_WINDOW", 50, int, 1, 10_000),
            volatility_window=env_number(env, "VOLATILITY_WINDOW_S", 60, int, 2, 86_400),
            raw=RawSettings.from_env(env),
        )


def public_url(market_url: str, env: Mapping[str, str] | None = None) -> str:
    """BINANCE_PUBLIC_WS_URL, else the `/market` URL's sibling `/public` (BINANCE.md)."""
    env = os.environ if env is None else env
    if env.get("BINANCE_PUBLIC_WS_URL"):
        return env["BINANCE_PUBLIC_WS_URL"].rstrip("/")
    base = market_url.rstrip("/")
    return base[: -len("/market")] + "/public" if base.endswith("/market") else base


class BookIntake:
    def __init__(
        self,
        pool: asyncpg.Pool,
        redis: Redis,
        rest: RestClient,
        settings: BookSettings,
        ws_url: str,
        stream_settings: StreamSettings,
        stream_maxlen: int,
        ticker_refresh_s: float = 5.0,
        attempts: AttemptLimiter | None = None,
    ) -> None:
        self.pool, self.redis, self.rest, self.settings = pool, redis, rest, settings
        self.stream_maxlen, self.ticker_refresh_s = stream_maxlen, ticker_refresh_s
        self.range_pct = Fraction(settings.range_pct)
        self.streams = StreamPool(ws_url, stream_settings, self.on_frame, self.on_connected, attempts)
        self.symbols: dict[str, SymbolSeconds] = {}
        # Whether this process may write a symbol (its lease, shards/ownership.py):
        # only those are followed, and nothing of the others is published or stored.
        self.owns: Callable[[str], bool] = lambda symbol: True
        self.rollups: dict[str, MinuteRollup] = {}
        self.clock_ms = 0  # the newest event time seen on the book streams
        self.next_pass_ms = 0
        self.graces = sorted({settings.book_grace_ms, settings.trade_grace_ms})
        self.finished: list[Second] = []  # for Redis
        self.to_write: list[Second] = []  # for PostgreSQL
        self.minutes_to_write: list[Any] = []
        self.writing = False  # a flush is on its way to PostgreSQL
        self.publish_wake = asyncio.Event()
        self.snapshots_due: asyncio.Queue[str] = asyncio.Queue()
        self.snapshot_pending: set[str] = set()
        self.last_written: dict[str, int] = {}  # symbol -> newest second stored (at boot: from PostgreSQL)
        self.first_seen: set[str] = set()
        self.bad_frames = RateLimitedLog(MODULE)
        self.holes = RateLimitedLog(MODULE, interval_s=10.0)
        self.errors = RateLimitedLog(MODULE, level="ERROR")
        self.pg_outage = Outage(MODULE, "PostgreSQL")
        self.redis_outage = Outage(MODULE, "Redis")
        self.stats = {"frames": 0, "ticks": 0, "diffs": 0, "trades": 0, "seconds": 0, "snapshots": 0, "bad": 0}
        self.raw = RawWriter(pool, BOOK_TICKERS, settings.raw) if settings.raw.book_tickers else None
        # Benches: (symbol, second, time.time() when the frame that finished it came, when it was in Redis).
        self.published: list[tuple[str, int, float, float]] | None = None
        self.finished_at: dict[tuple[str, int], float] = {}

    # ------------------------------------------------------------ frames (synchronous, cheap)

    def on_frame(self, raw: str | bytes) -> None:
        self.stats["frames"] += 1
        head = raw[:64]
        try:
            if (BOOK_TICKER_SUFFIX + '"' in head) if isinstance(head, str) else (b'@bookTicker"' in head):
                symbol, event = parse_book_ticker_frame(raw)
            elif ("@depth" in head) if isinstance(head, str) else (b"@depth" in head):
                symbol, event = parse_depth_frame(raw)
            else:
                return  # a reply to SUBSCRIBE, or a stream this route does not serve us
            event_ms = event.event_ms
            if event_ms > self.clock_ms + SECOND_MS and event_ms > time.time() * 1000 + FUTURE_TOLERANCE_MS:
                raise FrameError(f"{symbol}: event time {event_ms} is in the future")  # it would end every second
        except FrameError as exc:
            self.stats["bad"] += 1
            self.bad_frames.warn(str(exc), f"skipped a bad book frame: {exc}", {"frame": str(raw[:300])})
            return
        state = self.symbols.get(symbol)
        if state is not None:
            try:
                if isinstance(event, BookTick):
                    self.stats["ticks"] += 1
                    if self.raw is not None:
                        self.raw.add((symbol, event.event_ms, *event[:5]))  # storage.raw.BOOK_TICKERS's order
                    state.on_tick(event)
                else:
                    self.stats["diffs"] += 1
                    state.on_diff(event)
                    if state.sync.wants_snapshot:
                        self._want_snapshot(state)
            except Exception as exc:  # one symbol's trouble never stops the others' frames
                self.errors.warn(type(exc).__name__, f"{symbol}: book event not applied: {exc!r}")
                state.reconnected(frozenset({"ticker" if isinstance(event, BookTick) else "depth"}))
        if event_ms > self.clock_ms:
            self.clock_ms = event_ms
            if event_ms >= self.next_pass_ms:
                self._close_pass()

    def on_trade(self, symbol: str, trade: AggTrade) -> None:
        """Every aggTrade of a followed symbol (teed from the order-flow intake)."""
        state = self.symbols.get(symbol)
        if state is not None:
            self.stats["trades"] += 1
            state.on_trade(trade)

    def on_connected(self, streams: set[str]) -> None:
        """A (re)connect: what the old connection had on its way is lost."""
        for symbol, state in self.symbols.items():
            kinds: set[Kind] = set()
            if ticker_stream(symbol) in streams:
                kinds.add("ticker")
            if depth_stream(symbol) in streams:
                kinds.add("depth")
            if kinds:
                state.reconnected(frozenset(kinds))

    def _want_snapshot(self, state: SymbolSeconds) -> None:
        state.sync.wants_snapshot = False
        if state.symbol not in self.snapshot_pending:
            self.snapshot_pending.add(state.symbol)
            self.snapshots_due.put_nowait(state.symbol)
        if state.sync.reason:
            self.holes.warn(
                f"resync {state.symbol}",
                f"{state.symbol}: book resynchronised ({state.sync.reason})",
                {"resyncs": state.sync.resyncs, "stale_snapshots": state.sync.stale_snapshots},
            )
            state.sync.reason = ""

    def _close_pass(self) -> None:
        clock = self.clock_ms
        for state in self.symbols.values():
            seconds = state.close_through(clock)
            if seconds:
                self.finished += seconds
                if self.published is not None:
                    now = time.time()
                    self.finished_at.update(((s.symbol, s.ts), now) for s in seconds)
        if self.finished:
            self.publish_wake.set()
        base = clock - clock % SECOND_MS
        self.next_pass_ms = next((base + g for g in self.graces if base + g > clock), base + SECOND_MS + self.graces[0])

    # ------------------------------------------------------------ following

    async def follow(self, wanted: Mapping[str, frozenset[Kind]]) -> None:
        """The symbols and kinds to follow now (from `tickers`)."""
        gone = [s for s in self.symbols if s not in wanted or wanted[s] != self.symbols[s].kinds]
        added = [s for s, kinds in wanted.items() if s not in self.symbols or s in gone]
        removed_streams = set()
        for symbol in gone:
            old = self.symbols.pop(symbol)
            self.rollups.pop(symbol, None)
            removed_streams |= self._streams_of(symbol, old.kinds)
        buckets = await self._vpin_buckets(added)
        if added:
            self.last_written.update(await book_store.newest_seconds(self.pool, added))
        added_streams = set()
        for symbol in added:
            kinds = wanted[symbol]
            self.symbols[symbol] = SymbolSeconds(
                symbol,
                kinds,
                self.range_pct,
                buckets.get(symbol),
                trade_grace_ms=self.settings.trade_grace_ms,
                book_grace_ms=self.settings.book_grace_ms,
                vpin_window=self.settings.vpin_window,
                volatility_window=self.settings.volatility_window,
            )
            self.rollups[symbol] = MinuteRollup(symbol)
            added_streams |= self._streams_of(symbol, kinds)
        if added_streams or removed_streams:
            await self.streams.update(added_streams - removed_streams, removed_streams - added_streams)
            log_system_event(
                "INFO",
                MODULE,
                f"book streams for {len(self.symbols)} symbols",
                {"added": added[:100], "gone": gone[:100]},
            )

    @staticmethod
    def _streams_of(symbol: str, kinds: Iterable[Kind]) -> set[str]:
        names = {"ticker": ticker_stream, "depth": depth_stream}
        return {names[k](symbol) for k in kinds if k in names}

    async def _vpin_buckets(self, symbols: list[str]) -> dict[str, int]:
        """A VPIN bucket per symbol: a day's volume / VPIN_BUCKETS (the paper's 50 a day),
        the day's volume from the stored M1s of the last day (scaled up to a day when
        fewer are stored)."""
        if not symbols:
            return {}
        rows = await self.pool.fetch(
            "SELECT symbol, sum(volume) AS volume, count(*) AS minutes FROM ohlcv4_m1 WHERE symbol = ANY($1::text[])"
            " AND open_time > (SELECT max(open_time) FROM ohlcv4_m1) - interval '1 day' GROUP BY symbol",
            symbols,
        )
        buckets = {}
        for row in rows:
            day_volume = row["volume"] * 1440 / row["minutes"] if row["minutes"] else 0
            bucket = int(day_volume * UNIT) // self.settings.vpin_buckets_per_day
            if bucket > 0:
                buckets[row["symbol"]] = bucket
        return buckets

    async def _fill_vpin_buckets(self) -> None:
        """Symbols followed before their history was stored (a first boot) get a bucket
        once it is."""
        missing = [s for s, state in self.symbols.items() if not state.vpin_bucket and "trades" in state.kinds]
        for symbol, bucket in (await self._vpin_buckets(missing)).items():
            if (state := self.symbols.get(symbol)) is not None:
                state.start_vpin(bucket)

    async def read_tickers(self) -> dict[str, frozenset[Kind]]:
        rows = await self.pool.fetch(
            "SELECT symbol, trades, book_ticker, depth FROM tickers WHERE status = 'enabled' AND (book_ticker OR depth)"
        )
        wanted: dict[str, frozenset[Kind]] = {}
        for row in rows:
            if not self.owns(row["symbol"]):
                continue
            kinds: set[Kind] = set()
            if row["book_ticker"]:
                kinds.add("ticker")
            if row["depth"]:
                kinds.add("depth")
            if row["trades"]:
                kinds.add("trades")
            wanted[row["symbol"]] = frozenset(kinds)
        return wanted

    # ------------------------------------------------------------ workers

    async def run_tickers(self) -> None:
        buckets_filled_at = time.monotonic()
        while True:
            try:
                await self.follow(await self.read_tickers())
                if time.monotonic() - buckets_filled_at > 60:
                    buckets_filled_at = time.monotonic()
                    await self._fill_vpin_buckets()
            except (OSError, asyncpg.PostgresError) as exc:
                log_system_event("WARNING", MODULE, f"tickers not read: {exc!r}")
            await asyncio.sleep(self.ticker_refresh_s)

    async def run_connections(self) -> None:
        await self.streams.run()

    async def run_snapshots(self) -> None:
        """Snapshots as the books ask for them, a few at a time through the weight limiter."""
        running: set[asyncio.Task] = set()
        while True:
            symbol = await self.snapshots_due.get()
            while len(running) >= self.settings.snapshot_concurrency:
                _, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            task = asyncio.create_task(self._snapshot(symbol))
            running.add(task)

    async def _snapshot(self, symbol: str) -> None:
        backoff = Backoff(0.5, 30.0)
        try:
            while symbol in self.symbols:
                try:
                    answer = await self.rest.get(
                        "/fapi/v1/depth", {"symbol": symbol, "limit": SNAPSHOT_LIMIT}, SNAPSHOT_WEIGHT
                    )
                    snapshot = depth_snapshot_of(answer)
                except Exception as exc:  # one symbol's trouble never stops the others
                    self.holes.warn(f"snapshot {symbol}", f"{symbol}: depth snapshot failed: {exc!r}")
                    await asyncio.sleep(backoff.next_delay())
                    continue
                state = self.symbols.get(symbol)
                if state is not None:
                    self.stats["snapshots"] += 1
                    state.on_snapshot(snapshot)
                    if state.sync.wants_snapshot:  # stale: another one
                        state.sync.wants_snapshot = False
                        await asyncio.sleep(backoff.next_delay())
                        continue
                return
        finally:
            self.snapshot_pending.discard(symbol)

    async def run_publisher(self) -> None:
        """Finished seconds to Redis as they come (features hash, stream), then queued
        for PostgreSQL."""
        while True:
            await self.publish_wake.wait()
            self.publish_wake.clear()
            seconds, self.finished = [s for s in self.finished if self.owns(s.symbol)], []
            await self._publish(seconds, [])
            self.to_write += seconds

    async def run_depth_filter(self) -> None:
        """Every BOOK_PUBLISH_MS, the books that changed, within ±BOOK_RANGE_PCT of the mid,
        to `book:<SYMBOL>`. One book at a time between turns of the event loop (~1 ms for
        a busy book's 2,000 levels), in its own round to Redis: a finished second is never
        held behind them."""
        every_s = self.settings.publish_ms / 1000
        while True:
            started = time.monotonic()
            books = []
            for symbol in [s for s in self.symbols if self.owns(s)]:
                document = self._filtered_book(symbol)
                if document is not None:
                    books.append((symbol, document))
                    await asyncio.sleep(0)
            if books:
                await self._publish([], books)
            await asyncio.sleep(max(0.0, every_s - (time.monotonic() - started)))

    def _filtered_book(self, symbol: str) -> dict | None:
        state = self.symbols.get(symbol)
        if state is None or not state.book_changed:
            return None
        book = state.sync.book
        if book is None or state.sync.state != "synced":
            return None
        state.book_changed = False
        best_bid, best_ask = book.best_bid(), book.best_ask()
        if best_bid is None or best_ask is None:
            return None
        columns = book.within(*range_bounds(best_bid[0], best_ask[0], self.range_pct))
        return book_store.book_document(*columns, book.update_id, self.clock_ms)

    async def _publish(self, seconds: list[Second], books: list[tuple[str, dict]]) -> None:
        features = [(s.symbol, s.features) for s in seconds if s.features is not None]
        if not features and not books:
            return
        commands = book_store.redis_commands(features, books, self.stream_maxlen)
        backoff = Backoff(0.2, 5.0)
        while True:
            try:
                await core_io.execute_checked(self.redis, commands)
                self.redis_outage.ok()
                break
            except Exception as exc:  # Redis away: retried; the seconds still go to PostgreSQL
                self.redis_outage.fail(exc, f"publishing {len(seconds)} seconds")
                if self.redis_outage.active and len(commands) > 50_000:
                    return
                await asyncio.sleep(backoff.next_delay())
        if self.published is not None:
            now = time.time()
            finished_at = self.finished_at
            self.published += [(s.symbol, s.ts, finished_at.pop((s.symbol, s.ts), now), now) for s in seconds]

    async def run_writer(self) -> None:
        """The finished seconds (and their minutes' rollups) to PostgreSQL once a second."""
        backoff = Backoff(0.5, 10.0)
        while True:
            await asyncio.sleep(self.settings.write_every_s)
            if not self.to_write and not self.minutes_to_write:
                continue
            await self._write_due(backoff)

    async def _write_due(self, backoff: Backoff) -> None:
        seconds, self.to_write = self.to_write, []
        self._roll(seconds)
        minutes, self.minutes_to_write = self.minutes_to_write, []
        self.writing = True
        try:
            while True:
                try:
                    await self._write(seconds, minutes)
                    self.pg_outage.ok()
                    return
                except asyncpg.DataError as exc:  # a value PostgreSQL refuses: resending cannot help
                    log_system_event(
                        "ERROR", MODULE, f"{len(seconds)} seconds, {len(minutes)} minutes not stored: {exc!r}"
                    )
                    return
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                    self.pg_outage.fail(exc, f"writing {len(seconds)} seconds")
                    await asyncio.sleep(backoff.next_delay())
        finally:
            self.writing = False

    def _roll(self, seconds: list[Second]) -> None:
        for second in seconds:
            rollup = self.rollups.get(second.symbol)
            if rollup is not None:
                row = rollup.add(second.trades, second.ticker, second.depth, second.features)
                if row is not None:
                    self.minutes_to_write.append(row)

    async def _write(self, seconds: list[Second], minutes: list[Any]) -> None:
        await book_store.write_seconds(
            self.pool,
            [(s.symbol, s.trades) for s in seconds if s.trades is not None],
            [(s.symbol, s.ticker) for s in seconds if s.ticker is not None],
            [(s.symbol, s.depth) for s in seconds if s.depth is not None],
            [(s.symbol, s.features) for s in seconds if s.features is not None],
            minutes,
        )
        self.stats["seconds"] += len(seconds)
        self._log_restart_holes(seconds)

    def _log_restart_holes(self, seconds: list[Second]) -> None:
        """The first second stored after a start: the hole since the last one stored."""
        for second in seconds:
            if second.symbol in self.first_seen:
                continue
            self.first_seen.add(second.symbol)
            last = self.last_written.get(second.symbol)
            if last is not None and second.ts - last > SECOND_MS:
                log_system_event(
                    "WARNING",
                    MODULE,
                    f"{second.symbol}: no one-second bars from {core_io.ms_to_datetime(last + SECOND_MS)} "
                    f"to {core_io.ms_to_datetime(second.ts - SECOND_MS)}: the process was not running",
                    {"symbol": second.symbol, "from_ms": last + SECOND_MS, "to_ms": second.ts - SECOND_MS},
                )

    async def run_retention(self) -> None:
        """Whole partitions past FEATURES_RETENTION_H are dropped, never rows."""
        while True:
            # On the exchange's clock, once it is known: a replay of older data keeps its hours.
            if self.clock_ms:
                try:
                    dropped = await drop_expired(
                        self.pool, ONE_SECOND_TABLES, self.settings.retention_h * HOUR_MS, self.clock_ms
                    )
                    dropped += await drop_expired(
                        self.pool, ["book_tickers4"], self.settings.raw.retention_h * HOUR_MS, self.clock_ms
                    )
                    if dropped:
                        log_system_event(
                            "INFO", MODULE, f"retention dropped {len(dropped)} partitions", {"names": dropped}
                        )
                except (OSError, asyncpg.PostgresError) as exc:
                    log_system_event("WARNING", MODULE, f"retention not run: {exc!r}")
            await asyncio.sleep(600 if self.clock_ms else 5)

    async def drain(self) -> None:
        """At shutdown: the seconds finished so far reach Redis and PostgreSQL, with the
        minutes they began (a restart's rollup of the same minute keeps the fuller one)."""
        while (self.finished or self.to_write or self.writing) and not self.pg_outage.active:
            self.publish_wake.set()
            await asyncio.sleep(0.05)
        self.minutes_to_write += [row for rollup in self.rollups.values() if (row := rollup.flush()) is not None]
        if self.minutes_to_write and not self.pg_outage.active:
            await self._write_due(Backoff(0.2, 1.0))
        if self.raw is not None:
            await self.raw.drain()

    def workers(self) -> dict[str, Callable[[], Any]]:
        return {
            "BOOK_TICKERS": self.run_tickers,
            "BOOK_CONNECTIONS": self.run_connections,
            "BOOK_SNAPSHOTS": self.run_snapshots,
            "BOOK_PUBLISH": self.run_publisher,
            "BOOK_FILTER": self.run_depth_filter,
            "BOOK_WRITE": self.run_writer,
            "BOOK_RETENTION": self.run_retention,
        } | ({"BOOK_RAW": self.raw.run} if self.raw is not None else {})
