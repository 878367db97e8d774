"""One task per exchange that walks the simulated clock and publishes what is due.

Everything the exchange pushes on its own (kline updates, closes, mark prices, aggTrades,
the books' bookTickers and diffs) is an event with a due sim time in a heap. The task pops
what is due, then sleeps (real time) until the next one — no polling, so speed 1 costs
nothing and speed 1200 is just shorter sleeps. A clock jump re-plans from the new instant;
speed changes and pauses only re-time the sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import orjson

from candles import Candle

from .book import BookConfig, MadeUpBooks, RecordedBooks, book_streams
from .clock import SimClock
from .faults import Faults, Stats
from .frames import (
    GARBAGE_KINDS,
    MINUTE_MS,
    UNKNOWN_KINDS,
    agg_trade_event,
    garbage,
    kline_event,
    mark_price_object,
    partial_candle,
    unknown_frame,
)
from .hub import StreamHub
from .sources import CandleSource
from .trades import TradeBook

log = logging.getLogger("fake_exchange")

ALL_MARKS_1S = "!markPrice@arr@1s"
ALL_MARKS_3S = "!markPrice@arr"
BATCH = 2000  # events handled before yielding to the senders


@dataclass
class PushConfig:
    close_delay_ms: tuple[int, int] = (200, 2000)
    updates_per_minute: int = 4
    mark_prices: bool = True
    mark_pushes_per_s: float = 4.0  # cap on mark ticks per real second at high speed
    mark_arr_chunk: int = 100  # objects per !markPrice@arr push (always >= 2 pushes)


def update_offsets(updates_per_minute: int) -> list[int]:
    """When (ms into the minute) the unclosed updates go out.

    The first one is 300 ms in, so the next minute of an active symbol usually starts
    before a quiet symbol's close (0.2-2 s after T) arrives, as on the real stream.
    """
    if updates_per_minute <= 0:
        return []
    if updates_per_minute == 1:
        return [30_000]
    gap = 57_000 // (updates_per_minute - 1)
    return [300 + k * gap for k in range(updates_per_minute)]


class Scheduler:
    def __init__(
        self,
        *,
        clock: SimClock,
        hub: StreamHub,
        source: CandleSource,
        candle: Callable[[str, int], Candle | None],
        faults: Callable[[], Faults],
        stats: Stats,
        config: PushConfig,
        seed: int,
        trades: TradeBook,
        books: MadeUpBooks | RecordedBooks | None = None,
    ) -> None:
        self.clock = clock
        self.hub = hub
        self.source = source
        self._candle = candle  # honours Faults.missing_minutes
        self._faults = faults
        self.stats = stats
        self.config = config
        self._delays = random.Random(seed)
        self._noise = random.Random(seed + 1)
        self._names = {
            s: (f"{s.lower()}@kline_1m", f"{s.lower()}@markPrice@1s", f"{s.lower()}@markPrice") for s in source.symbols
        }
        self._trade_streams = {s: f"{s.lower()}@aggTrade" for s in source.symbols}
        self.trades = trades
        self._reordered: dict[str, dict] = {}  # symbol -> an aggTrade held back until its next one
        self._offsets = update_offsets(config.updates_per_minute)
        listed = set(source.symbols)
        self._other_symbol = next(s for s in ("BTCUSDT", "ETHUSDT", "XRPUSDT", "ZZZUSDT") if s not in listed)
        self._heap: list[tuple[int, int, Callable[..., None], tuple[object, ...]]] = []
        self._seq = itertools.count()
        self._wake = asyncio.Event()
        self._replan = False
        self._last_mark3 = -1
        # A symbol's next minute never starts before its own close went out (or was faulted
        # away): first updates that come due earlier wait here and follow that close.
        self._closing: set[tuple[str, int]] = set()  # (symbol, minute) closes not yet handled
        self._deferred: dict[tuple[str, int], int] = {}  # (symbol, minute) -> update offset
        self._task: asyncio.Task[None] | None = None
        self.max_lag_s = 0.0  # worst real-time lateness of an event (benchmarks read it)
        self.books = books
        self._book_names = {s: book_streams(s) for s in source.symbols}
        clock.add_listener(self._on_clock_change)

    # --- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        self._replan = True
        self._task = asyncio.create_task(self._run(), name="fake-exchange-scheduler")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def _on_clock_change(self, jumped: bool) -> None:
        self._replan = self._replan or jumped
        self._wake.set()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        heap = self._heap
        while True:
            if self._replan:
                self._replan = False
                self._plan_from(self.clock.now_ms())
            now = self.clock.now_ms()
            handled = 0
            while heap and heap[0][0] <= now and handled < BATCH and not self._replan:
                due, _, handler, args = heapq.heappop(heap)
                handled += 1
                try:
                    handler(due, *args)
                except Exception:
                    log.exception("fake exchange event at %d failed", due)
            if handled:
                speed = self.clock.speed or 1.0
                self.max_lag_s = max(self.max_lag_s, (now - due) / 1000.0 / speed)
            if handled >= BATCH or self._replan:
                await asyncio.sleep(0)
                continue
            delay = self.clock.real_seconds_until(heap[0][0]) if heap else None
            self._wake.clear()
            timer = loop.call_later(delay, self._wake.set) if delay is not None else None
            await self._wake.wait()
            if timer is not None:
                timer.cancel()

    def _push(self, due: int, handler: Callable[..., None], *args: object) -> None:
        heapq.heappush(self._heap, (due, next(self._seq), handler, args))

    # --- planning ------------------------------------------------------------------------

    def _plan_from(self, now: int) -> None:
        """(Re)build the agenda at `now`: the current minute, the previous one's pending closes."""
        self._heap.clear()
        self._closing.clear()
        self._deferred.clear()
        minute = now - now % MINUTE_MS
        self._plan_minute(minute - MINUTE_MS, after=now)
        self._plan_minute(minute, after=now)
        self._push(minute + MINUTE_MS, self._on_minute, minute + MINUTE_MS)
        if self.config.mark_prices:
            self._push(now - now % 1000 + 1000, self._on_mark_tick)
        if isinstance(self.books, RecordedBooks):
            self.books.seek(now)
            self._push(now, self._on_replay_tick)
        elif self.books is not None:
            step = self.book_step_ms()
            self._push(now - now % step + step, self._on_book_tick)

    def _plan_minute(self, minute: int, after: int) -> None:
        if not self.source.first_open_time <= minute <= self.source.last_open_time:
            return
        for offset in self._offsets:
            if minute + offset > after:
                self._push(minute + offset, self._on_update, minute, offset)
        low, high = self.config.close_delay_ms
        close_time = minute + MINUTE_MS - 1
        for symbol in self.source.symbols:
            due = close_time + self._delays.randint(low, high)
            if due > after:
                self._push(due, self._on_close, symbol, minute, False)
                self._closing.add((symbol, minute))
        self._plan_trades(minute, after)

    def _on_minute(self, due: int, minute: int) -> None:
        self._plan_minute(minute, after=due - 1)
        self._push(minute + MINUTE_MS, self._on_minute, minute + MINUTE_MS)

    # --- klines ----------------------------------------------------------------------------

    def _on_update(self, due: int, minute: int, offset: int) -> None:
        """An unclosed update for every symbol someone listens to."""
        if self._faults().silent:
            return
        subs, closing = self.hub.subs, self._closing
        for symbol in self.source.symbols:
            if self._names[symbol][0] not in subs:
                continue
            if closing and (symbol, minute - MINUTE_MS) in closing:
                self._deferred[(symbol, minute)] = offset
                continue
            self._send_update(due, symbol, minute, offset)

    def _send_update(self, due: int, symbol: str, minute: int, offset: int) -> None:
        final = self._candle(symbol, minute)
        if final is not None:
            data = kline_event(partial_candle(final, offset / MINUTE_MS), due, False)
            self._publish_kline(self._names[symbol][0], symbol, data, due)

    def _on_close(self, due: int, symbol: str, minute: int, delayed: bool) -> None:
        if delayed:
            self._close(due, symbol, minute, True)
            return
        self._closing.discard((symbol, minute))
        try:
            self._close(due, symbol, minute, False)
        finally:
            offset = self._deferred.pop((symbol, minute + MINUTE_MS), None)
            if offset is not None and not self._faults().silent and self._names[symbol][0] in self.hub.subs:
                self._send_update(due, symbol, minute + MINUTE_MS, offset)

    def _close(self, due: int, symbol: str, minute: int, delayed: bool) -> None:
        faults = self._faults()
        stream = self._names[symbol][0]
        if faults.silent or stream not in self.hub.subs:
            return
        final = self._candle(symbol, minute)
        if final is None:
            return
        if not delayed:
            if faults.chance(faults.drop_missing_close):
                self.stats.closes_dropped += 1
                self.stats.dropped_closes.append((symbol, minute))
                return
            if faults.chance(faults.late_close):
                self.stats.closes_delayed += 1
                self._push(due + faults.late_close_delay_ms, self._on_close, symbol, minute, True)
                return
        data = kline_event(final, due, True, self.trades.trade_ids(symbol, minute))
        self._publish_kline(stream, symbol, data, due)
        self.stats.closes_sent[symbol] += 1
        self.stats.log_close(symbol, minute)
        if not delayed and faults.chance(faults.duplicate_close):
            self.hub.publish(stream, data)
            self.stats.closes_duplicated += 1
            self.stats.closes_sent[symbol] += 1

    def _publish_kline(self, stream: str, symbol: str, data: bytes, due: int) -> None:
        faults = self._faults()
        if faults.chance(faults.malformed_frame):
            payload, wrap_as = garbage(faults.rng.choice(GARBAGE_KINDS), symbol, due)
            self.hub.publish(stream, payload, wrap_as=wrap_as, verbatim=wrap_as is None)
            self.stats.malformed_sent += 1
        if faults.chance(faults.unknown_frame):
            kind = faults.rng.choice(UNKNOWN_KINDS)
            payload, wrap_as = unknown_frame(kind, symbol, due, self._other_symbol)
            self.hub.publish(stream, payload, wrap_as=wrap_as, verbatim=wrap_as is None)
            self.stats.unknown_sent += 1
            self.stats.unknown_kinds[kind] += 1
        self.hub.publish(stream, data)
        self.stats.kline_events += 1

    # --- aggTrades ----------------------------------------------------------------------------

    TRADE_PUSH_MS = 100  # Binance pushes a symbol's aggTrades every 100 ms

    def _plan_trades(self, minute: int, after: int) -> None:
        """Each subscribed symbol's trades of the minute go out in 100 ms slots after
        their time. Planned a minute at a time: a symbol subscribed mid-minute gets its
        trades from the next minute on (its first minute is partial anyway)."""
        for symbol in self.source.symbols:
            if self._trade_streams[symbol] not in self.hub.subs:
                continue
            slots: dict[int, list[dict]] = {}
            for row in self.trades.minute(symbol, minute):
                due = row["T"] - row["T"] % self.TRADE_PUSH_MS + self.TRADE_PUSH_MS
                if due > after:
                    slots.setdefault(due, []).append(row)
            for due, rows in slots.items():
                self._push(due, self._on_trades, symbol, rows)

    def _on_trades(self, due: int, symbol: str, rows: list[dict]) -> None:
        faults = self._faults()
        stream = self._trade_streams[symbol]
        if faults.silent or stream not in self.hub.subs:
            return
        for row in rows:
            if faults.chance(faults.drop_trade):
                self.stats.dropped_trades.append((symbol, row["a"]))
                continue
            if faults.chance(faults.late_trade):
                self.stats.trades_late += 1
                self._push(due + faults.late_trade_delay_ms, self._on_trades, symbol, [row])
                continue
            held = self._reordered.pop(symbol, None)
            if held is None and faults.chance(faults.reorder_trade):
                self._reordered[symbol] = row  # goes out right after the next one
                self.stats.trades_reordered += 1
                continue
            self._send_trade(stream, symbol, row, due)
            if held is not None:
                self._send_trade(stream, symbol, held, due)
            if faults.chance(faults.duplicate_trade):
                self._send_trade(stream, symbol, row, due)
                self.stats.trades_duplicated += 1

    def _send_trade(self, stream: str, symbol: str, row: dict, due: int) -> None:
        self.hub.publish(stream, agg_trade_event(symbol, row, due))
        self.stats.trades_sent += 1

    # --- mark prices -------------------------------------------------------------------------

    def _mark_step_ms(self) -> int:
        """1 sim second, stretched so a connection gets at most `mark_pushes_per_s` per real second."""
        return 1000 * max(1, math.ceil(self.clock.speed / self.config.mark_pushes_per_s))

    def _on_mark_tick(self, due: int) -> None:
        self._push(due - due % 1000 + self._mark_step_ms(), self._on_mark_tick)
        if self._faults().silent:
            return
        subs = self.hub.subs
        every3 = due // 3000 != self._last_mark3 // 3000
        if every3:
            self._last_mark3 = due
        arr1, arr3 = ALL_MARKS_1S in subs, every3 and ALL_MARKS_3S in subs
        minute = due - due % MINUTE_MS
        collected: list[dict[str, object]] = []
        for symbol in self.source.symbols:
            _, one_s, three_s = self._names[symbol]
            single1, single3 = one_s in subs, every3 and three_s in subs
            if not (single1 or single3 or arr1 or arr3):
                continue
            current = self.source.candle(symbol, minute) or self.source.candle(symbol, minute - MINUTE_MS)
            if current is None:
                continue
            obj = mark_price_object(symbol, due, current, self._noise.random())
            if single1 or single3:
                data = orjson.dumps(obj)
                if single1:
                    self.hub.publish(one_s, data)
                if single3:
                    self.hub.publish(three_s, data)
                self.stats.mark_events += 1
            if arr1 or arr3:
                collected.append(obj)
        if collected:
            self._publish_mark_arrays(collected, arr1, arr3)

    def _publish_mark_arrays(self, objects: list[dict[str, object]], arr1: bool, arr3: bool) -> None:
        """The all-market stream arrives split across several pushes (never all in one)."""
        size = max(1, min(self.config.mark_arr_chunk, math.ceil(len(objects) / 2)))
        for start in range(0, len(objects), size):
            data = orjson.dumps(objects[start : start + size])
            if arr1:
                self.hub.publish(ALL_MARKS_1S, data)
            if arr3:
                self.hub.publish(ALL_MARKS_3S, data)
            self.stats.mark_events += 1

    # --- order books (/public) ------------------------------------------------------------------

    def book_listened(self, symbol: str) -> bool:
        """Someone takes the symbol's bookTicker or depth (on /public)."""
        subs = self.hub.subs
        ticker, depth = self._book_names[symbol]
        return ticker in subs or depth in subs

    def book_step_ms(self) -> int:
        """100 ms of sim time, stretched so a symbol gets at most `max_pushes_per_s` diffs per
        real second (at speed 60 a diff sums 3 s of changes)."""
        config = self.books.config if self.books is not None else BookConfig()
        per_real_s = self.clock.speed * 1000 / config.depth_ms
        return config.depth_ms * max(1, math.ceil(per_real_s / config.max_pushes_per_s))

    def _on_book_tick(self, due: int) -> None:
        """Every listened symbol's made-up book moves one window: its bookTickers, then its diff."""
        books = self.books
        assert isinstance(books, MadeUpBooks)
        step_ms = self.book_step_ms()
        self._push(due - due % step_ms + step_ms, self._on_book_tick)
        faults = self._faults()
        intensity = max(faults.book_burst_factor, 0.0)
        subs = self.hub.subs
        for symbol in self.source.symbols:
            ticker_name, depth_name = self._book_names[symbol]
            want_ticker, want_depth = ticker_name in subs, depth_name in subs
            if not (want_ticker or want_depth):
                continue
            step = books.emit(symbol, due, step_ms, intensity)
            if step is None:
                continue
            if intensity > 1:
                self.stats.book_burst_steps += 1
            if faults.silent:
                continue  # the book moves on unseen: listeners find a broken chain afterwards
            book = books.books[symbol]
            if want_ticker:
                for tick in step.tickers:
                    self._send_book(ticker_name, symbol, False, book.ticker_event(tick))
            if want_depth:
                self._send_depth(depth_name, symbol, partial(book.depth_event, step))

    def _send_depth(self, stream: str, symbol: str, event: Callable[[], dict]) -> None:
        """One diff, through the faults: dropped (the next one's `pu` breaks the chain) or
        sent with a wrong `pu`. `event` builds it (nothing is built for a dropped one)."""
        faults = self._faults()
        if faults.chance(faults.book_drop_diff):
            self.stats.book_dropped_diffs += 1
            return
        data = event()
        if faults.chance(faults.book_broken_pu):
            data["pu"] -= 1
            self.stats.book_broken_pu += 1
        self._send_book(stream, symbol, True, data)

    def _send_book(self, stream: str, symbol: str, depth: bool, event: dict | None, raw: bytes | None = None) -> None:
        """Publish one book event (a dict, or `raw` bytes as recorded), count it, log it if asked."""
        self.hub.publish(stream, orjson.dumps(event) if raw is None else raw)
        if depth:
            self.stats.depth_sent += 1
        else:
            self.stats.book_tickers_sent += 1
        if self.books is not None and self.books.config.log_events:
            self.stats.book_sent[symbol].append(event if event is not None else orjson.loads(raw or b"null"))

    def _on_replay_tick(self, due: int) -> None:
        """The recordings' frames whose event time has come, for the symbols listened to."""
        books = self.books
        assert isinstance(books, RecordedBooks)
        step_ms = books.config.replay_ms * max(1, math.ceil(self.clock.speed))
        faults = self._faults()
        subs = self.hub.subs
        more = listened = False
        for symbol in books.symbols:
            ticker_name, depth_name = self._book_names[symbol]
            want_ticker, want_depth = ticker_name in subs, depth_name in subs
            listened = listened or want_ticker or want_depth
            recorded = books.get(symbol, due) if (want_ticker or want_depth) else books.loaded(symbol)
            if recorded is None:
                more = True
                continue
            frames = recorded.take(due)
            more = more or recorded.cursor < len(recorded.frames)
            if faults.silent:
                continue
            for frame in frames:
                if frame.kind == "bookTicker":
                    if want_ticker:
                        self._send_book(ticker_name, symbol, False, None, frame.data)
                elif want_depth:
                    self._send_recorded_depth(depth_name, symbol, frame.data)
        if more:  # nobody listening: a look every 100 ms is enough
            step_ms = step_ms if listened else max(step_ms, 100)
            self._push(due - due % step_ms + step_ms, self._on_replay_tick)

    def _send_recorded_depth(self, stream: str, symbol: str, data: bytes) -> None:
        faults = self._faults()
        if faults.book_drop_diff or faults.book_broken_pu:
            self._send_depth(stream, symbol, partial(orjson.loads, data))
        else:
            self._send_book(stream, symbol, True, None, data)
