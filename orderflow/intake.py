"""Order flow intake: the feed hands it aggTrades and closing klines; it folds them
(synchronously, in memory: nothing per trade touches a server), chains the final
minutes, and writes the bars (PostgreSQL first, then Redis) in batches.

Minutes that are not final on the exchange's check-sums (a gap in `a`, a mismatch with
the kline, the first minute after a (re)connect, the minutes a restart missed) are
refetched over REST `/fapi/v1/aggTrades` through the feed's weight limiter, checked
against the stored candle, and chained in their turn. Those beyond the 48 hours the
exchange serves are marked unfillable in `trade_gaps_v4`, logged once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice

import asyncpg
from redis.asyncio import Redis

import core_io
import infra
from binance.protocol import KlineUpdate
from binance.rest import RestClient, RestError
from candles import DAY_MS
from infra import PG_DOWN_ERRORS, REDIS_DOWN_ERRORS, Outage, RateLimitedLog, env_number, log_system_event
from orderflow import store
from orderflow.chain import (
    HIGHER,
    ORDERFLOW_TIMEFRAMES,
    PARTS_OF,
    SymbolChain,
    forming_parts,
    left_out_buckets,
    read_back_from,
)
from orderflow.fold import AggTrade, BarFlow, fold
from orderflow.output import CvdChain, FinalBar
from orderflow.profile import ImbalanceRules
from orderflow.render import FootprintRenderer
from orderflow.rows import RULE_HOURS, first_price_row
from orderflow.tape import KlineCheck, Outcome, Tape, verify
from storage.raw import AGG_TRADES, RawSettings, RawWriter
from storage.retention import drop_expired

MODULE = "ORDERFLOW"
M1_MS = 60_000
SERVED_MS = 48 * 3_600_000  # the exchange serves aggTrades of the last 48 hours
# Ticks between forming refreshes (M1: every tick, 250 ms): M5 every second, M15 every two,
# H1 and H4 every four, D1 every eight (their documents grow through the bucket; after a
# burst they are the refresh's main cost until the bucket ends).
FORMING_EVERY = {"m5": 4, "m15": 8, "h1": 16, "h4": 16, "d1": 32}


@dataclass(frozen=True)
class OrderFlowSettings:
    forming_interval_s: float = 0.25
    refetch_concurrency: int = 2
    refetch_retry_s: float = 5.0
    stale_minute_ms: int = 90_000  # an open minute no close came for, this long after its end
    retention_days: int = 30  # ORDERFLOW_RETENTION_DAYS; 0: kept forever
    raw: RawSettings = field(default_factory=RawSettings)  # RAW_TRADES: every aggTrade kept in agg_trades4 too

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> OrderFlowSettings:
        env = os.environ if env is None else env
        return cls(
            retention_days=env_number(env, "ORDERFLOW_RETENTION_DAYS", 30, int, 0, 36_500),
            raw=RawSettings.from_env(env),
        )


class OrderFlowIntake:
    def __init__(
        self,
        pool: asyncpg.Pool,
        redis: Redis,
        rest: RestClient,
        stream_maxlen: int,
        now_ms: Callable[[], int],
        tick_of: Callable[[str], int | None] = lambda symbol: None,
        settings: OrderFlowSettings | None = None,
        rules: ImbalanceRules | None = None,
    ) -> None:
        self.pool, self.redis, self.rest = pool, redis, rest
        self.stream_maxlen, self.now_ms, self.tick_of = stream_maxlen, now_ms, tick_of
        self.settings = settings or OrderFlowSettings()
        self.rules = rules or ImbalanceRules()
        self.tapes: dict[str, Tape] = {}
        self.trade_listener: Callable[[str, AggTrade], None] | None = None  # the book's one-second bars
        self.chains: dict[str, SymbolChain] = {}
        self.m1_rows: dict[tuple[str, int], int] = {}  # (symbol, day) -> M1 row
        self.fixed: dict[str, int] = {}
        # Final minutes as the frames made them: their bars (profiles, M5/M15 merges) are
        # made by the writer, off the frame handler that the candles share.
        self.finals: list[tuple[str, int, BarFlow]] = []
        self.to_write: list[FinalBar] = []
        self.to_publish: list[tuple[int, list]] = []  # written to PostgreSQL: (bar count, their Redis commands)
        self.refetch: set[tuple[str, int]] = set()  # (symbol, minute) wanted over REST
        self.refetch_logged: list[tuple[str, int, str]] = []
        self.mismatches: dict[tuple[str, int], int] = {}
        self.rows_decided: dict[tuple[str, int], tuple[int, str]] = {}  # to store: (symbol, day) -> (row, rule)
        self.refetch_wake = asyncio.Event()
        self.write_wake = asyncio.Event()
        self.publish_wake = asyncio.Event()
        self.changed: set[str] = set()  # symbols that traded since the last M1 forming refresh
        self.changed_higher: dict[str, set[str]] = {tf: set() for tf in HIGHER}  # ... since their last one
        self.stats = {"trades": 0, "final": 0, "refetched": 0, "unfillable": 0, "written": 0, "buckets_left_out": 0}
        self.pg_outage = Outage(MODULE, "PostgreSQL")
        self.redis_outage = Outage(MODULE, "Redis")
        self.errors = RateLimitedLog(MODULE)
        self.renderer = FootprintRenderer()
        self.raw = RawWriter(pool, AGG_TRADES, self.settings.raw) if self.settings.raw.trades else None

    # ----------------------------------------------------------------- frames (synchronous)

    def on_trade(self, symbol: str, trade: AggTrade) -> None:
        tape = self.tapes.get(symbol)
        if tape is None:
            return
        if self.trade_listener is not None:
            self.trade_listener(symbol, trade)
        if self.raw is not None:
            self.raw.add(raw_trade(symbol, trade))
        self.stats["trades"] += 1
        try:
            tape.add(trade)
            if tape.outcomes:
                self._take(symbol, tape)
        except Exception as exc:  # one symbol's trouble never stops the feed's frames
            self.errors.warn(type(exc).__name__, f"{symbol}: aggTrade {trade.agg_id} not folded: {exc!r}")
        self.changed.add(symbol)

    def on_close(self, update: KlineUpdate) -> None:
        tape = self.tapes.get(update.symbol)
        if tape is None or update.candle is None:
            return
        try:
            check = KlineCheck.of(update.candle, update.first_trade_id, update.last_trade_id)
            tape.close(check, update.event_time or self.now_ms())
            if tape.outcomes:
                self._take(update.symbol, tape)
        except Exception as exc:
            self.errors.warn(type(exc).__name__, f"{update.symbol}: close {update.open_time} not checked: {exc!r}")

    def resume(self, symbols: Iterable[str]) -> None:
        """A connection was (re)opened: a jump in `a` now is trades missed."""
        for symbol in symbols:
            tape = self.tapes.get(symbol)
            if tape is not None:
                tape.resume()

    def _take(self, symbol: str, tape: Tape) -> None:
        chain = self.chains[symbol]
        for outcome in tape.outcomes:
            if chain.next_minute is None and outcome.status != "final":
                continue  # a symbol new to order flow starts at its first whole minute: nothing to refetch
            if outcome.status == "final":
                self.stats["final"] += 1
                chain.start(outcome.open_time)
                self.finals.append((symbol, outcome.open_time, outcome.bar))  # chained by the writer
                self.write_wake.set()
            else:
                self._ask(symbol, outcome.open_time, outcome.reason)
        tape.outcomes.clear()

    def _ask_unseen(self, symbol: str, tape: Tape, stale: int) -> None:
        """Minutes the chain waits for that nothing would bring: no trade, close or refetch
        of theirs is known. A connection lost across whole minutes loses their trades and
        closes, and only the minute the id jump lands in is marked; a quiet minute has no
        id to jump at all. Without this the symbol's order flow stopped at the hole until
        a restart."""
        chain = self.chains.get(symbol)
        if chain is None or chain.next_minute is None:
            return
        known = [min(found) for found in (chain.waiting, tape.bars, tape.closes) if found]
        for minute in range(chain.next_minute, min([stale, *known]), M1_MS):
            self._ask(symbol, minute, "no trade or close came for it")

    def _publish(self, bars: Sequence[FinalBar]) -> None:
        if bars:
            self.to_write += bars
            self.write_wake.set()

    def _ask(self, symbol: str, minute: int, reason: str) -> None:
        if (symbol, minute) not in self.refetch:
            self.refetch.add((symbol, minute))
            self.refetch_logged.append((symbol, minute, reason))
            self.refetch_wake.set()
            self.write_wake.set()  # the writer logs it in trade_gaps_v4

    def row_size(self, symbol: str) -> Callable[[int, int | None], int]:
        def size(minute: int, price: int | None = None) -> int:
            fixed = self.fixed.get(symbol)
            if fixed is not None:
                return fixed
            day = minute - minute % DAY_MS
            found = self.m1_rows.get((symbol, day))
            if found is None:  # no day before to go by: the day's first price decides, stored
                found, rule = first_price_row(price, self.tick_of(symbol))
                self.m1_rows[(symbol, day)] = found
                self.rows_decided[(symbol, day)] = (found, rule)
                self.write_wake.set()
            return found

        return size

    # ----------------------------------------------------------------- following

    async def follow(self, symbols: Sequence[str]) -> None:
        """Prepare tapes and chains (row sizes, the stored state) before the streams are
        subscribed; the minutes between the stored bars and now are refetched."""
        new = [s for s in symbols if s not in self.tapes]
        if not new:
            return
        self.fixed.update(await store.fixed_rows(self.pool, new))
        now = self.now_ms() or await self._server_now()
        today = now - now % DAY_MS
        await self.plan_day(new, today)
        if now - today >= RULE_HOURS * 3_600_000:
            await self.plan_day(new, today + DAY_MS)
        newest = await store.newest_bars(self.pool, new, ORDERFLOW_TIMEFRAMES)
        # Per symbol with stored order flow: (the first bar read back, its newest minute).
        spans: dict[str, tuple[int, int]] = {}
        for symbol in new:
            last = stored_open_time(newest.get((symbol, "m1")))
            if last is not None:
                higher = {tf: t for tf in HIGHER if (t := stored_open_time(newest.get((symbol, tf)))) is not None}
                spans[symbol] = (read_back_from(last, higher), last)
        part_tfs = sorted({p for tf in HIGHER for p in PARTS_OF[tf]})
        stored_parts = await store.bars_between(self.pool, [(s, *span) for s, span in spans.items()], part_tfs)
        current = now - now % M1_MS
        for symbol in new:
            self.tapes[symbol] = Tape(self.row_size(symbol))
            chain = self.chains[symbol] = SymbolChain(symbol, self.rules)
            if symbol not in spans:
                continue
            since, last = spans[symbol]
            next_minute = last + M1_MS
            chains = {tf: CvdChain.after(newest.get((symbol, tf))) for tf in ORDERFLOW_TIMEFRAMES}
            stored = stored_parts.get(symbol, {})
            left_out = {
                tf: left_out_buckets(tf, next_minute, stored_open_time(newest.get((symbol, tf))), stored, since)
                for tf in HIGHER
            }
            forming = {tf: forming_parts(tf, next_minute, stored) for tf in HIGHER}
            written_now = chain.resume(next_minute, chains, forming, left_out)
            if written_now:  # buckets the previous owner left out: see left_out_buckets
                self.stats["buckets_left_out"] += len(written_now)
                self._publish(written_now)
            served_from = current - SERVED_MS + 5 * M1_MS
            served_from -= served_from % M1_MS
            if next_minute < served_from:  # beyond the exchange's 48 hours: one log line, no row per minute
                chain.skip_to(served_from)
                self.stats["unfillable"] += (served_from - next_minute) // M1_MS
                log_system_event(
                    "WARNING",
                    MODULE,
                    f"{symbol}: order flow from {next_minute} to {served_from - M1_MS} is unfillable (the daemon "
                    "was down longer than the 48 hours of trades the exchange serves; the archives have them)",
                )
                next_minute = served_from
            for minute in range(next_minute, current, M1_MS):
                self._ask(symbol, minute, "missed while the daemon was down")
        for symbol, minute in await store.open_gaps(self.pool, new):
            self._ask(symbol, minute, "a gap logged before the restart")

    async def _server_now(self) -> int:
        """Before the first frame: the exchange's clock (a replay's is not the local one).
        If REST does not answer (the candles must not wait on it; a process joining a
        busy deployment may find the shared REST weight spent): the exchange time the
        other processes' heartbeats carry; failing that, the local clock."""
        try:
            return await asyncio.wait_for(self.rest.server_time(), 10.0)
        except (RestError, OSError, TimeoutError) as exc:
            local_ms = int(time.time() * 1000)
            with contextlib.suppress(*REDIS_DOWN_ERRORS):
                beats = (await infra.read_heartbeats(self.redis)).values()
                known = infra.exchange_now_from_heartbeats(beats, local_ms)
                if known is not None:
                    self.errors.warn("clock", f"the exchange's time is unknown ({exc!r}): the heartbeats give it")
                    return known
            self.errors.warn("clock", f"the exchange's time is unknown ({exc!r}): the local clock plans the day")
            return local_ms

    def forget(self, symbols: Iterable[str]) -> None:
        symbols = set(symbols)
        for symbol in symbols:
            self.tapes.pop(symbol, None)
            self.chains.pop(symbol, None)
            self.fixed.pop(symbol, None)
        self.renderer.forget(symbols)
        self.refetch = {k for k in self.refetch if k[0] in self.tapes}

    async def plan_day(self, symbols: Sequence[str], day: int) -> None:
        """Decide (or read) the M1 rows of `day` from the first 23 hours of the day before."""
        for symbol, size in (await store.plan_day_rows(self.pool, day, symbols, self.tick_of)).items():
            self.m1_rows[(symbol, day)] = size

    # ----------------------------------------------------------------- workers

    WRITE_CHUNK = 100  # final minutes chained, and bars written, a statement

    async def run_writer(self) -> None:
        """Final bars to PostgreSQL (the record) in chunks, handed to the publisher once
        written. While a chunk's statement runs, its documents are made and the next
        chunk is chained: at 500 symbols closing together, the first are announced before
        the last are chained, and the server's time is mostly hidden."""
        while True:
            await self.write_wake.wait()
            self.write_wake.clear()
            while self.finals or self.to_write or self.refetch_logged or self.rows_decided:
                self._chain_finals(self.WRITE_CHUNK)
                try:
                    await self._store_decisions()
                    if self.to_write:
                        await self._write_chunk()
                    self.pg_outage.ok()
                except PG_DOWN_ERRORS as exc:
                    self.pg_outage.fail(exc, f"writing {len(self.to_write)} order-flow bars")
                    await asyncio.sleep(1.0)

    async def _store_decisions(self) -> None:
        """Row sizes (before the bars folded with them) and gaps being refetched."""
        if self.rows_decided:
            decided, self.rows_decided = self.rows_decided, {}
            try:
                await self._store_rows(decided)
            except BaseException:
                self.rows_decided = decided | self.rows_decided
                raise
        if self.refetch_logged:
            gaps, self.refetch_logged = self.refetch_logged, []
            try:
                await store.log_gaps(self.pool, gaps)
            except BaseException:
                self.refetch_logged = gaps + self.refetch_logged
                raise

    async def _write_chunk(self) -> None:
        """M1 bars first: those of a boundary are announced before its M5/M15 are written."""
        chunk = self.WRITE_CHUNK
        batch = list(islice((b for b in self.to_write if b.tf == "m1"), chunk)) or self.to_write[:chunk]
        written = asyncio.create_task(store.upsert_bars(self.pool, batch))
        await asyncio.sleep(0)  # the statement is on its way...
        commands = store.publish_commands(batch, self.stream_maxlen, self.renderer)  # ...while these are made
        self._chain_finals(chunk)  # ...and the next chunk is chained
        await written
        taken = {id(b) for b in batch}
        self.to_write = [b for b in self.to_write if id(b) not in taken]
        self.to_publish.append((len(batch), commands))
        self.publish_wake.set()

    async def run_publisher(self) -> None:
        """Written bars to Redis (hash, footprint, `orderflow_ready`), in the order written."""
        while True:
            await self.publish_wake.wait()
            self.publish_wake.clear()
            while self.to_publish:
                taken = len(self.to_publish)  # the writer may add more while these are sent
                try:
                    await core_io.execute_checked(self.redis, [c for _, b in self.to_publish[:taken] for c in b])
                    self.stats["written"] += sum(n for n, _ in self.to_publish[:taken])
                    del self.to_publish[:taken]
                    self.redis_outage.ok()
                except REDIS_DOWN_ERRORS as exc:
                    self.redis_outage.fail(exc, f"publishing {len(self.to_publish)} chunks of order-flow bars")
                    await asyncio.sleep(1.0)

    def _chain_finals(self, limit: int) -> None:
        finals, self.finals = self.finals[:limit], self.finals[limit:]
        for symbol, minute, bar in finals:
            chain = self.chains.get(symbol)
            if chain is None:
                continue  # no longer followed
            try:
                self._publish(chain.offer(minute, bar))
            except Exception as exc:  # one symbol's trouble never stops the others'
                self.errors.warn(type(exc).__name__, f"{symbol}: minute {minute} not chained: {exc!r}")

    async def _store_rows(self, decided: dict[tuple[str, int], tuple[int, str]]) -> None:
        by_day: dict[int, dict[str, tuple[int, str]]] = {}
        for (symbol, day), rule in decided.items():
            by_day.setdefault(day, {})[symbol] = rule
        for day, rules in by_day.items():
            stored = await store.decide_row_sizes(self.pool, day, rules)
            for symbol, size in stored.items():
                if size != rules[symbol][0]:  # another decision came first: it is the record
                    self.errors.warn("row", f"{symbol}: footprint row {rules[symbol][0]} was decided as {size}")

    async def run_ticker(self) -> None:
        """Event time passes: held trades become gaps, closes without their trades are
        refetched, open minutes no close came for are let go (and refetched once the
        candle pipeline has their kline); forming footprints are refreshed when changed."""
        next_day_planned = ticks = 0
        while True:
            await asyncio.sleep(self.settings.forming_interval_s)
            now = self.now_ms()
            if not now:
                continue
            stale = now - now % M1_MS - self.settings.stale_minute_ms
            for symbol, tape in list(self.tapes.items()):
                tape.tick(now)
                for minute in tape.drop_before(stale):
                    tape.outcomes.append(Outcome(minute, "refetch", None, "no close came for it"))
                if tape.outcomes:
                    self._take(symbol, tape)
                if not self.finals:  # else the writer is behind: a minute may be final, not chained yet
                    self._ask_unseen(symbol, tape, stale)
            ticks += 1
            if not self.writing:  # else this tick's refresh waits for the next one
                await self._forming(ticks)
            day = now - now % DAY_MS
            if now - day >= RULE_HOURS * 3_600_000 and next_day_planned != day + DAY_MS:
                try:
                    await self.plan_day(sorted(self.tapes), day + DAY_MS)
                    next_day_planned = day + DAY_MS
                except PG_DOWN_ERRORS as exc:
                    self.pg_outage.fail(exc, "deciding tomorrow's footprint rows")

    FORMING_SLICE = 20  # symbols whose forming documents are made between two yields to the loop

    @property
    def writing(self) -> bool:
        return bool(self.finals or self.to_write or self.to_publish)

    async def _forming(self, tick: int) -> None:
        """The forming footprints of the symbols that traded since their timeframe's last
        refresh. Made in slices with the loop let go between them; final bars come first:
        once the writer has some, the symbols not done wait for the next tick."""
        changed, self.changed = self.changed, set()
        due = [tf for tf in HIGHER if tick % FORMING_EVERY[tf] == 0]
        for tf in HIGHER:
            self.changed_higher[tf] |= changed
        symbols = list(changed.union(*(self.changed_higher[tf] for tf in due)))
        forming: dict[tuple[str, str], bytes] = {}
        document = self.renderer.document
        done = 0
        for done, symbol in enumerate(symbols):
            if done and done % self.FORMING_SLICE == 0:
                await asyncio.sleep(0)
                if self.writing:
                    break
            tape, chain = self.tapes.get(symbol), self.chains.get(symbol)
            if tape is None or chain is None or tape.newest_minute is None:
                continue
            bar = tape.bars.get(tape.newest_minute)
            if bar is None:
                continue
            if symbol in changed:
                forming[(symbol, "m1")] = document((symbol, "m1"), bar)
            for tf in due:
                if symbol in self.changed_higher[tf]:
                    forming[(symbol, tf)] = document((symbol, tf), chain.forming(tf, bar))
        else:
            done = len(symbols)
        left = set(symbols[done:])
        self.changed |= changed & left
        try:
            await store.set_forming(self.redis, forming)
            for tf in due:
                self.changed_higher[tf] &= left
        except REDIS_DOWN_ERRORS as exc:
            self.changed |= changed
            self.redis_outage.fail(exc, "refreshing forming footprints")

    async def run_refetcher(self) -> None:
        while True:
            await self.refetch_wake.wait()
            self.refetch_wake.clear()
            while self.refetch:
                spans = self._spans()
                results = await asyncio.gather(*(self._refetch_span(*span) for span in spans), return_exceptions=True)
                retry = False
                for (symbol, minutes), result in zip(spans, results):
                    if isinstance(result, BaseException):
                        if isinstance(result, PG_DOWN_ERRORS):
                            self.pg_outage.fail(result, "refetching order flow")
                        else:
                            self.errors.warn(type(result).__name__, f"refetching {symbol} {minutes[0]}: {result}")
                    retry |= result is not True
                if retry:
                    await asyncio.sleep(self.settings.refetch_retry_s)

    GAP_SWEEP_S = 30.0

    async def run_gap_sweep(self) -> None:
        """The open gaps of the symbols followed, read again every GAP_SWEEP_S and
        refetched (or, where the chain is past them, marked filled). Another process can
        log a gap of a symbol after this one has taken it over: the owner that lost it,
        or one killed with the row on its way. Read only at `follow`, such a row stayed
        open for good, its minute long since written here."""
        while True:
            await asyncio.sleep(self.GAP_SWEEP_S)
            try:
                gaps = await store.open_gaps(self.pool, sorted(self.chains))
            except PG_DOWN_ERRORS as exc:
                self.pg_outage.fail(exc, "reading the open trade gaps")
                continue
            unseen = {(symbol, minute) for symbol, minute in gaps if symbol in self.chains} - self.refetch
            if unseen:
                self.refetch |= unseen
                self.refetch_wake.set()

    SPAN_MS = 3_600_000  # one aggTrades request by time covers at most an hour

    def _spans(self) -> list[tuple[str, list[int]]]:
        """The oldest wanted minutes, as spans of up to an hour per symbol: one request
        by time fetches a quiet symbol's hour (20 weight), where a request per minute
        would cost 60 times that."""
        by_symbol: dict[str, list[int]] = {}
        for symbol, minute in sorted(self.refetch, key=lambda key: (key[1], key[0])):
            by_symbol.setdefault(symbol, []).append(minute)
        spans = [(s, [m for m in minutes if m < minutes[0] + self.SPAN_MS]) for s, minutes in by_symbol.items()]
        return sorted(spans, key=lambda span: span[1][0])[: self.settings.refetch_concurrency * 2]

    async def _refetch_span(self, symbol: str, minutes: list[int]) -> bool:
        """True when every minute is settled (final or unfillable); False to try again later."""
        chain = self.chains.get(symbol)
        if chain is None:
            for minute in minutes:
                self.refetch.discard((symbol, minute))
            return True
        now, wanted = self.now_ms(), []
        for minute in minutes:
            if chain.next_minute is not None and minute < chain.next_minute:
                await self._settled(symbol, [minute])  # published already (a gap logged before a restart)
            elif now and now - minute > SERVED_MS - 5 * M1_MS:
                await self._unfillable(symbol, minute, "older than the 48 hours the exchange serves")
            else:
                wanted.append(minute)
        if not wanted:
            return True
        candles = {
            c.open_time: c for c in await core_io.fetch_candles_at(self.pool, "m1", [(symbol, m) for m in wanted])
        }
        if not candles:
            return False  # the candle pipeline has not got these klines yet
        try:
            trades = await self.rest.agg_trades_between(symbol, wanted[0], wanted[-1] + M1_MS)
        except RestError as exc:
            if exc.code == -4166:
                for minute in wanted:
                    await self._unfillable(symbol, minute, str(exc))
                return True
            raise
        by_minute: dict[int, list[AggTrade]] = {}
        for trade in trades:
            if self.raw is not None:
                self.raw.add(raw_trade(symbol, trade))
            by_minute.setdefault(trade.time_ms - trade.time_ms % M1_MS, []).append(trade)
        settled, filled = True, []
        for minute in wanted:
            candle = candles.get(minute)
            if candle is None:
                settled = False
                continue
            check = KlineCheck.of(candle)
            found = by_minute.get(minute, [])
            bar = fold(minute, self.row_size(symbol)(minute, found[0].price if found else None), found)
            problem = verify(bar, check)
            if not problem:
                filled.append(minute)
                self.mismatches.pop((symbol, minute), None)
                self.stats["refetched"] += 1
                self._publish(chain.offer(minute, bar))
                continue
            tries = self.mismatches[(symbol, minute)] = self.mismatches.get((symbol, minute), 0) + 1
            if tries < self.MISMATCHES_MAX:
                self.errors.warn("mismatch", f"{symbol} {minute}: refetched trades disagree with the kline: {problem}")
                settled = False
            else:
                await self._unfillable(symbol, minute, f"the exchange's trades disagree with its kline: {problem}")
        await self._settled(symbol, filled)
        return settled

    async def _settled(self, symbol: str, minutes: list[int]) -> None:
        await store.resolve_gaps(self.pool, [(symbol, m) for m in minutes], "filled")
        for minute in minutes:
            self.refetch.discard((symbol, minute))

    MISMATCHES_MAX = 5

    async def _unfillable(self, symbol: str, minute: int, reason: str) -> bool:
        """Logged once: the minute is skipped by its chain (no row; CVD carries on)."""
        await store.resolve_gaps(self.pool, [(symbol, minute)], "unfillable", reason)
        log_system_event("WARNING", MODULE, f"{symbol} {minute}: order flow unfillable: {reason}")
        self.stats["unfillable"] += 1
        self.refetch.discard((symbol, minute))
        self.mismatches.pop((symbol, minute), None)
        chain = self.chains.get(symbol)
        if chain is not None:
            self._publish(chain.offer(minute, None))
        return True

    async def run_retention(self) -> None:
        """Whole pieces of orderflow4 past ORDERFLOW_RETENTION_DAYS (0: none) and of the raw
        trades past RAW_RETENTION_H are dropped, never rows, on the exchange's clock once it
        is known (a replay of older data keeps its days)."""
        kept = {"agg_trades4": self.settings.raw.retention_h * 3_600_000}
        if self.settings.retention_days:
            kept["orderflow4"] = self.settings.retention_days * DAY_MS
        while True:
            if self.now_ms():
                try:
                    dropped = []
                    for table, keep_ms in kept.items():
                        dropped += await drop_expired(self.pool, [table], keep_ms, self.now_ms())
                    if dropped:
                        log_system_event("INFO", MODULE, f"retention dropped {len(dropped)} pieces", {"names": dropped})
                except (OSError, asyncpg.PostgresError) as exc:
                    log_system_event("WARNING", MODULE, f"retention not run: {exc!r}")
            await asyncio.sleep(600 if self.now_ms() else 5)

    def workers(self) -> dict[str, Callable[[], object]]:
        return {
            "ORDERFLOW_RETENTION": self.run_retention,
            "ORDERFLOW_WRITE": self.run_writer,
            "ORDERFLOW_PUBLISH": self.run_publisher,
            "ORDERFLOW_TICK": self.run_ticker,
            "ORDERFLOW_REFETCH": self.run_refetcher,
            "ORDERFLOW_GAPS": self.run_gap_sweep,
        } | ({"ORDERFLOW_RAW": self.raw.run} if self.raw is not None else {})


def stored_open_time(record: asyncpg.Record | None) -> int | None:
    return None if record is None else core_io.datetime_to_ms(record["open_time"])


def raw_trade(symbol: str, trade: AggTrade) -> tuple:
    """A row of agg_trades4, in storage.raw.AGG_TRADES's column order."""
    return (
        symbol,
        trade.time_ms,
        trade.agg_id,
        trade.price,
        trade.qty,
        trade.first_trade_id,
        trade.last_trade_id,
        trade.buyer_maker,
    )
