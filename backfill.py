"""Gap repair over REST: minutes logged 'missing', and a new symbol's first history.

`Backfiller.run` is the feed's FEED_BACKFILL worker. Each round takes, for every
followed symbol, its oldest missing minutes (a bounded number per symbol, so one
symbol's backlog never starves the others), fetches them from GET /fapi/v1/klines
concurrently under the shared weight limiter, and stores what came in large batches.
A minute the exchange still lacks a minute after its close becomes 'unfillable'; a
symbol the exchange calls invalid (-1121) is reported to the feed, which stops
following it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING

import asyncpg

import core_io
from aggregation import affected_buckets
from binance.protocol import REST_KLINES_MAX_LIMIT, FrameError, closed_rest_klines
from binance.rest import INVALID_SYMBOL, RestClient, RestError
from candles import TF_MS, Candle
from infra import PG_DOWN_ERRORS, Outage, RateLimitedLog, log_system_event
from ops.progress import ProgressReporter, progress_mode

if TYPE_CHECKING:
    from feed_and_aggregate import CandleIntake

M1_MS = TF_MS["m1"]
Run = tuple[str, int, int]  # (symbol, first minute, last minute)
MISSING_PER_SYMBOL = 2 * REST_KLINES_MAX_LIMIT  # minutes of one symbol per round
# A repaired minute that closed this long before the exchange's now (or any minute of a
# first history) is announced with `history=1`: warm-up history and catch-up, which a
# consumer acting on fresh bars skips; a live minute repaired within it is not marked.
LIVE_REPAIR_MS = 2 * M1_MS
log = logging.getLogger("BACKFILL")


def _is_history(candle: Candle, logged: bool, server_now: int) -> bool:
    return not logged or candle.open_time + M1_MS + LIVE_REPAIR_MS <= server_now


def contiguous_ranges(minutes: Sequence[tuple[str, int]], max_len: int) -> list[Run]:
    """(symbol, first, last) runs of consecutive minutes, at most `max_len` long."""
    runs: list[Run] = []
    for symbol, t in sorted(minutes):
        if runs and runs[-1][0] == symbol and t == runs[-1][2] + M1_MS and (t - runs[-1][1]) // M1_MS < max_len:
            runs[-1] = (symbol, runs[-1][1], t)
        else:
            runs.append((symbol, t, t))
    return runs


class Backfiller:
    """Fetches minutes logged 'missing' (and first history, which is not a gap) over REST."""

    UNFILLABLE_AFTER_MS = 60_000  # a minute the exchange still lacks this long after its close
    STORE_BATCH = 20_000  # fetched candles stored together

    def __init__(
        self,
        pool: asyncpg.Pool,
        intake: CandleIntake,
        rest: RestClient,
        concurrency: int,
        followed: Callable[[], Collection[str]],
        on_invalid_symbol: Callable[[str], None] = lambda symbol: None,
    ) -> None:
        self.pool, self.intake, self.rest = pool, intake, rest
        self.followed, self.on_invalid_symbol = followed, on_invalid_symbol
        self.wake = asyncio.Event()
        self.history: deque[Run] = deque()
        self.history_outstanding: dict[str, int] = {}  # symbol -> first-history ranges not yet stored
        self.semaphore = asyncio.Semaphore(concurrency)
        self.fetched = 0
        self.last_stored_at = 0.0  # local clock: REST keeps the feed alive too (the watchdog)
        self.bad_rows = RateLimitedLog("BACKFILL")
        # First history, catch-up and gap repair as one job at a time: a bar on a
        # terminal, a log line every few seconds otherwise (PROGRESS).
        self.reporter = ProgressReporter(
            "REST history/catch-up", log, progress_mode(), weight=lambda: rest.limiter.total
        )

    def request_history(self, symbol: str, first: int, last: int) -> None:
        if symbol in self.history_outstanding:
            return
        for start in range(first, last + M1_MS, REST_KLINES_MAX_LIMIT * M1_MS):
            self.history.append((symbol, start, min(last, start + (REST_KLINES_MAX_LIMIT - 1) * M1_MS)))
            self.history_outstanding[symbol] = self.history_outstanding.get(symbol, 0) + 1
        self.reporter.progress().expect(symbol, (last - first) // M1_MS + 1)
        self.wake.set()

    def forget(self, symbol: str) -> None:
        """No longer followed: its pending first history is dropped."""
        self.history = deque(run for run in self.history if run[0] != symbol)
        self.history_outstanding.pop(symbol, None)
        if self.reporter.job is not None and symbol in self.reporter.job.remaining:
            self.reporter.job.set_remaining(symbol, 0)

    async def run(self) -> None:
        outage = Outage("BACKFILL", "PostgreSQL")
        while True:
            try:
                await asyncio.wait_for(self.wake.wait(), timeout=5.0)
            except TimeoutError:
                pass
            self.wake.clear()
            try:
                if await self.fill_once():
                    self.last_stored_at = time.monotonic()
                outage.ok()
            except PG_DOWN_ERRORS as exc:
                outage.fail(exc, "backfilling")
                await asyncio.sleep(1.0)

    async def fill_once(self) -> int:
        """Fetch the logged gaps of the followed symbols and the pending history ranges;
        the REST calls run concurrently and their candles are stored in large batches,
        not per request. A failure stops the round's other requests (none is left
        running unowned)."""
        followed = set(self.followed())
        missing = await core_io.fetch_missing_m1(self.pool, sorted(followed), MISSING_PER_SYMBOL)
        if not missing and not self.history:
            self.reporter.finish()  # the job (if any) is over: its summary line
            return 0
        await self._count_remaining(missing)
        server_now = await self.rest.server_time()
        jobs = [(r, True) for r in contiguous_ranges(missing, REST_KLINES_MAX_LIMIT)]
        while self.history:
            run = self.history.popleft()
            if run[0] in followed:
                jobs.append((run, False))
        tasks = {asyncio.create_task(self._fetch(run, logged, server_now)): (run, logged) for run, logged in jobs}
        ready: list[tuple[Run, bool, list[Candle]]] = []
        stored = 0
        try:
            for next_done in asyncio.as_completed(tasks):
                run, logged, result = await next_done
                jobs.remove((run, logged))
                if isinstance(result, Exception):
                    self._failed(run, logged, result)
                    continue
                ready.append((run, logged, result))
                self._fetched(run)
                if sum(len(candles) for _, _, candles in ready) >= self.STORE_BATCH:
                    batch, ready = ready, []
                    stored += await self._store(batch, server_now)
            batch, ready = ready, []
            return stored + await self._store(batch, server_now)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            # First history fetched but not stored, or not fetched: asked again next round.
            self.history.extend(run for run, logged, _ in ready if not logged)
            self.history.extend(run for run, logged in jobs if not logged)

    async def _count_remaining(self, missing: Sequence[tuple[str, int]]) -> None:
        """The job's minutes still to fetch per symbol: its open gap rows (counted in
        PostgreSQL only for a symbol with more than a round's worth) and its first
        history not fetched yet."""
        gaps: dict[str, int] = {}
        for symbol, _ in missing:
            gaps[symbol] = gaps.get(symbol, 0) + 1
        capped = [symbol for symbol, n in gaps.items() if n >= MISSING_PER_SYMBOL]
        if capped:
            rows = await self.pool.fetch(
                "SELECT symbol, count(*) AS n FROM missing_m1_log_v4 "
                "WHERE status = 'missing' AND symbol = ANY($1::text[]) GROUP BY symbol",
                capped,
            )
            gaps.update((r["symbol"], r["n"]) for r in rows)
        history: dict[str, int] = {}
        for symbol, first, last in self.history:
            history[symbol] = history.get(symbol, 0) + (last - first) // M1_MS + 1
        progress = self.reporter.progress()
        for symbol in gaps.keys() | history.keys():
            progress.set_remaining(symbol, gaps.get(symbol, 0) + history.get(symbol, 0))
        self.reporter.update()

    def _fetched(self, run: Run) -> None:
        symbol, first, last = run
        self.reporter.progress().advance(symbol, (last - first) // M1_MS + 1)
        self.reporter.update()

    def _failed(self, run: Run, logged: bool, error: Exception) -> None:
        symbol = run[0]
        if isinstance(error, RestError) and error.code == INVALID_SYMBOL:
            self.forget(symbol)
            self.on_invalid_symbol(symbol)
            return
        if not logged:
            self.history.append(run)  # first history is retried on the next round
        log_system_event(
            "ERROR",
            "BACKFILL",
            f"klines for {symbol} failed: {error}",
            {"symbol": symbol, "from": run[1], "to": run[2]},
        )

    async def _fetch(self, run: Run, logged: bool, server_now: int) -> tuple[Run, bool, list[Candle] | Exception]:
        symbol, first, last = run
        try:
            async with self.semaphore:
                limit = (last - first) // M1_MS + 1
                rows = await self.rest.klines(symbol, first, last + M1_MS - 1, limit)
            bad: list[str] = []
            candles = [c for c in closed_rest_klines(symbol, rows, server_now, bad) if first <= c.open_time <= last]
        except (RestError, FrameError, OSError, TimeoutError) as exc:
            return run, logged, exc
        if bad:
            self.bad_rows.warn(bad[0], f"skipped {len(bad)} unusable kline rows of {symbol}: {bad[0]}")
        return run, logged, candles

    async def _store(self, ready: list[tuple[Run, bool, list[Candle]]], server_now: int) -> int:
        """Store the fetched candles, then settle the gap log of each range."""
        candles = [c for _, _, batch in ready for c in batch]
        refused: list[Candle] = []
        history = {
            (c.symbol, c.open_time) for _, logged, batch in ready for c in batch if _is_history(c, logged, server_now)
        }
        try:  # one call, as the live closes wait for it: no store of theirs falls in between
            await self.intake.store_m1(candles, refused, history=history)
        except BaseException:
            self.history.extend(run for run, logged, _ in ready if not logged)  # fetched again next round
            raise
        self.fetched += len(candles)
        not_stored = {(c.symbol, c.open_time) for c in refused}
        lost: list[tuple[str, int]] = []
        for (symbol, first, last), logged, batch in ready:
            if not logged:
                left = self.history_outstanding.get(symbol, 1) - 1
                if left <= 0:
                    self.history_outstanding.pop(symbol, None)
                else:
                    self.history_outstanding[symbol] = left
                continue
            got = {c.open_time for c in batch if (symbol, c.open_time) not in not_stored}
            lost += [
                (symbol, t)
                for t in range(first, last + M1_MS, M1_MS)
                if t not in got and t + M1_MS + self.UNFILLABLE_AFTER_MS <= server_now
            ]
        if lost:
            await core_io.set_missing_status(self.pool, lost, "unfillable")
            log_system_event(
                "WARNING",
                "BACKFILL",
                f"{len(lost)} minutes the exchange does not have",
                {"first": list(lost[0]), "last": list(lost[-1])},
            )
            await self.intake.aggregate(affected_buckets(lost, self.intake.aggregated))
        return len(candles)
