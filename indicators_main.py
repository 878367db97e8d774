"""Indicator worker: candle events in, indicator values out.

Reads `ohlcv_<tf>_ready` through its process's consumer group and computes the symbols
its process holds (indicators/groups.py: with several processes each computes its own
share; alone, everything). Each series (symbol, timeframe) holds one kernel per
configured instance, opened from stored history; every new bar advances them in O(1).
A batch of events costs one Redis round trip (latest values into
`indicator:<SYMBOL>:<tf>`, an `indicators_ready_stream` entry per bar, the acks of
earlier events whose values are written); PostgreSQL gets the values right behind, in
batches.

Correctness rests on five rules:
- a series is opened from PostgreSQL after noting each stream's last entry id, so
  events up to that id are already in the state and are skipped;
- an event older than the series' newest bar is a correction: the series is reopened
  and every value from that bar on is recomputed and rewritten;
- an event is acknowledged only once its values are in PostgreSQL; at start (and when
  a symbol is gained from another process), every series is written again from the
  oldest bar among the events its group, or another's, holds unsettled;
- after a crash, bars newer than the newest persisted value are recomputed at open,
  and so are those from the oldest stored bar without values.
- a series whose values began recently is checked at open against the history stored
  now, and written again if they differ (history stored after them, never announced).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import asyncpg
import numpy as np
from redis.asyncio import Redis
from redis.exceptions import RedisError

import core_io
from candles import DAY_MS, TF_MS, TIMEFRAMES
from indicators import groups, hashes, slow
from indicators.config import InstanceConfig
from indicators.kernels import BarArrays, BarTuple, Kernel
from indicators.options import IndicatorOptions
from indicators.pending import PendingValues, matrices
from indicators.series import (
    RECENT_BARS,
    InstanceFailure,
    Layout,
    Series,
    agrees_with_history,
    bars_as_tuples,
    fill_kernel,
    first_unseen,
    first_values_in,
    parse_event,
)
from infra import (
    PG_DOWN_ERRORS,
    REDIS_DOWN_ERRORS,
    Outage,
    RateLimitedLog,
    Settings,
    log_system_event,
)
from shards.ownership import Ownership

log = logging.getLogger("INDICATORS")

MODULE = "INDICATORS"
PERSIST_QUIET_S = 0.1  # no candle event for this long: a good moment to write
PERSIST_MAX_WAIT_S = 2.0


def earliest(*times: int | None) -> int | None:
    return min((t for t in times if t is not None), default=None)


# --------------------------------------------------------------------------- the worker


class IndicatorWorker:
    metrics: Any = None  # metrics.definitions.DaemonMetrics when METRICS_PORT is set

    def __init__(
        self, settings: Settings, pool: asyncpg.Pool, redis: Redis, options: IndicatorOptions | None = None
    ) -> None:
        self.settings, self.pool, self.redis = settings, pool, redis
        self.options = options or IndicatorOptions()
        self.series: dict[tuple[str, str], Series] = {}
        self.pending = PendingValues()
        self.persisted_event = asyncio.Event()
        self.slow_due = slow.SlowDue()
        self.slow_errors = RateLimitedLog(MODULE, level="ERROR")
        self.slow_runner = slow.SlowRunner(self.options.slow_workers)
        self.config = InstanceConfig(pool, self.slow_runner)
        self.retention_ms = settings.indicator_retention_days * DAY_MS
        self.newest_ms = 0  # newest bar seen, for the retention cut-off
        self.cache = hashes.IndicatorCache(redis)
        self.stats = {
            "bars": 0,
            "corrections": 0,
            "opened": 0,
            "persisted_rows": 0,
            "bad_events": 0,
            "stale_rewritten": 0,
        }
        self.last_compute_s = 0.0
        self.ready = asyncio.Event()  # set once the series are open and events flow
        self.stopping = False
        # The daemon's share of the symbols (`share`): this process computes the series
        # of the symbols it holds, through a consumer group of its own.
        self.shared: groups.SymbolShare | None = None
        self.group = core_io.INDICATOR_GROUP
        self.redis_outage = Outage(MODULE, "Redis")
        self.pg_outage = Outage(MODULE, "PostgreSQL")
        self.persist_outage = Outage(MODULE, "PostgreSQL")
        self.last_batch_at = 0.0
        self._announce: list[tuple[str, str, int]] = []
        self._latest: dict[tuple[str, str], tuple[int, Sequence[str], list[float]]] = {}

    def workers(self) -> dict[str, Any]:
        workers = {
            "INDICATORS": self.run,
            "INDICATORS_PERSIST": self.run_persister,
            "INDICATORS_SLOW": self.run_slow,
            "INDICATORS_PRUNE": self.run_pruner,
        }
        if self.shared is not None:
            workers["INDICATORS_GROUPS"] = self.run_group_sweeper
        return workers

    # ----------------------------------------------------------------- sharing the symbols

    def share(self, ownership: Ownership) -> None:
        """Several processes may share the deployment: this one computes the symbols it
        holds (and, while it leads the indicators, those no process follows), reading
        through a group of its own (indicators/groups.py)."""
        self.shared = groups.SymbolShare(ownership)
        self.group = self.shared.group

    def owns(self, symbol: str) -> bool:
        return self.shared is None or self.shared.computes(symbol)

    async def _follow_shares(self) -> None:
        """Series of symbols this process no longer holds are dropped, with their values
        not yet written, and their events held for the next owner (`SymbolShare.hand_over`,
        indicators/groups.py); those of symbols it gained are opened, and written again
        from the oldest bar another group, or this one, holds unsettled (what the
        previous owner did not write)."""
        shared = self.shared
        if shared is None:
            return
        lost, gained, lead_lost = shared.changes()
        gained |= shared.retaken()
        if lost or lead_lost or gained:  # (a lead lost: the symbols no process follows are another's now)
            candidates = shared.ownership.candidates
            self._drop(lambda s: s in lost or s in gained or (lead_lost and s not in candidates))
        shared.following -= lost
        if lost:  # their values not yet written are the next owner's to write
            await shared.hand_over(self.redis, self.pending, lost)
        if not gained:
            for symbol in await shared.settle(self.redis, self.options.group_grace_s):
                log_system_event("WARNING", MODULE, f"no process opened {symbol} after this one: events acknowledged")
            return
        enabled = set(await core_io.enabled_symbols(self.pool))
        # The streams' ends before what others hold unsettled: an event after them is this
        # process's to compute, one before them is in PostgreSQL or held unsettled.
        marks = await core_io.candle_stream_ends(self.redis)
        unsettled = await groups.unsettled_elsewhere(self.redis, self.group, gained)
        for key, bar in shared.handover.own_unsettled(gained).items():
            unsettled[key] = min(bar, unsettled.get(key, bar))
        keys = [(s, tf) for tf in TIMEFRAMES for s in sorted(gained & enabled)]
        await self._isolating(lambda: self.open_series(keys, write_from=unsettled, marks=marks))
        shared.following |= gained
        await shared.opened(self.redis, gained)
        log.info("computing %d more symbols (%d now), %d fewer", len(gained), len(shared.following), len(lost))

    def _drop(self, gone: Callable[[str], bool]) -> None:
        for key in [key for key in self.series if gone(key[0])]:
            del self.series[key]
            self.slow_due.discard(key)

    async def run_group_sweeper(self) -> None:
        """The groups of processes gone for the grace period are destroyed (a stream
        keeps every entry a group has not read), by the process leading the indicators."""
        while self.shared is not None:
            await asyncio.sleep(min(groups.GROUP_SWEEP_S, self.options.group_grace_s / 2))
            written = not self.pending and not self.pending.held()
            try:
                gone = await self.shared.sweep(self.redis, self.options.group_grace_s, written)
                if gone:
                    log_system_event("INFO", MODULE, f"destroyed the consumer groups of gone processes: {gone}")
            except REDIS_DOWN_ERRORS as exc:
                self.redis_outage.fail(exc, "sweeping the consumer groups of gone processes")

    # ----------------------------------------------------------------- configuration

    @property
    def layouts(self) -> dict[str, Layout]:
        return self.config.layouts

    async def _isolating(self, action: Callable[[], Awaitable[Any]]) -> Any:
        """Run `action`; an instance that fails in it is disabled and the action re-run
        with the others."""
        while True:
            try:
                return await action()
            except InstanceFailure as failure:
                self.config.disable(failure)
                await self.config.load()

    # ----------------------------------------------------------------- opening series

    async def open_series(
        self,
        keys: Sequence[tuple[str, str]],
        upto: Mapping[tuple[str, str], int] | None = None,
        write_from: Mapping[tuple[str, str], int] | None = None,
        marks: Mapping[str, tuple[int, int]] | None = None,
    ) -> None:
        """(Re)build series from stored bars.

        Without `upto` a series opens at its newest stored bar and writes the bars newer
        than its newest persisted value (only the newest bar, if it has none), and those
        from `write_from[key]` on if that bar has values: the boot and first-sight case. With `upto` it reopens
        at that bar (a correction or a configuration change) and writes the bars from
        `write_from[key]` on, if given. `marks`: the streams' ends, read before `write_from`
        was (the events after them are the series' to step).
        """
        fresh = upto is None
        if marks is None:
            marks = await core_io.candle_stream_ends(self.redis) if fresh else {}
        newest_m1 = await core_io.newest_m1_time(self.pool) if fresh else None
        by_tf: dict[str, list[str]] = {}
        for symbol, tf in keys:
            by_tf.setdefault(tf, []).append(symbol)
        for tf, symbols in by_tf.items():
            layout = self.layouts[tf]
            tf_ms = TF_MS[tf]
            base = max(min(layout.history, self.options.history_max), self.options.slow_window if layout.slow else 0)
            verify: dict[str, int] = {}
            if fresh:
                ids = [i.id for i in layout.instances]
                first, spans, value_firsts = await self._fresh_starts(tf, ids, symbols, write_from or {})
                # Values that began within `base` bars of the newest are checked against
                # the history stored now (`_stale_starts`): loaded from `base` bars before.
                verify = {
                    s: span[0] for s, span in spans.items() if self._bars_since(span[0], newest_m1, tf_ms) <= base
                }
                requests = [
                    (s, None, base + self._bars_since(earliest(first[s], verify.get(s)), newest_m1, tf_ms))
                    for s in symbols
                ]
            else:
                first = {symbol: (write_from or {}).get((symbol, tf)) for symbol in symbols}
                requests = [
                    (s, upto[(s, tf)], base + self._bars_since(first[s], upto[(s, tf)], tf_ms)) for s in symbols
                ]
            counts = {r[0]: r[2] for r in requests}
            history = await core_io.fetch_history(self.pool, tf, requests)
            while fresh:
                # A bar stored between the look for holes and the fetch (a backfill landing
                # while the daemon boots) is in the history as if its values were written,
                # and its event would find it held: look again, and fetch again from it.
                late = await core_io.first_value_holes(self.pool, tf, ids, spans)
                moved = {s: hole for s, hole in late.items() if first[s] is None or hole < first[s]}
                if not moved:
                    break
                first.update(moved)
                requests = [
                    (s, None, base + self._bars_since(earliest(first[s], verify.get(s)), newest_m1, tf_ms))
                    for s in moved
                ]
                counts.update({r[0]: r[2] for r in requests})
                history.update(await core_io.fetch_history(self.pool, tf, requests))
            plans: dict[str, tuple[BarArrays, int | None]] = {}
            for symbol in symbols:
                columns = history.get(symbol)
                bars = BarArrays.from_columns(columns) if columns else BarArrays.from_rows([])
                start = first[symbol]
                if fresh and bars.size and start is None:
                    start = int(bars.open_time[-1])  # a series new to us: values from its newest bar on
                elif not fresh:
                    start = first_unseen(self.series.get((symbol, tf)), bars, start)
                plans[symbol] = (bars, start)
            # (A series written again from its first value on anyway needs no check.)
            verify = {s: t for s, t in verify.items() if plans[s][1] is None or plans[s][1] > t}
            filled: dict[tuple[str, int], tuple[Kernel, list[np.ndarray]]] = {}  # the check's, opened with
            if verify:
                firsts = {s: value_firsts[s] for s in verify}
                stale = await self._stale_starts(tf, plans, counts, firsts, verify, filled)
                for symbol, t in stale.items():
                    bars, start = plans[symbol]
                    plans[symbol] = (bars, t if start is None else min(start, t))
            anchors = await self._anchors(tf, plans, counts)
            for index, (symbol, (bars, start)) in enumerate(plans.items()):
                if index % self.YIELD_EVERY_OPEN == self.YIELD_EVERY_OPEN - 1:
                    await asyncio.sleep(0)  # ~5 ms a series at boot: the feed runs in between
                old = self.series.get((symbol, tf))
                seen = marks[tf] if fresh else (old.seen if old else (0, 0))
                self._open_one((symbol, tf), bars, start, anchors, seen, filled)
        self.stats["opened"] += len(keys)

    def _bars_since(self, first: int | None, newest: int | None, tf_ms: int) -> int:
        """Extra history so that the bars from `first` on are all loaded (within retention)."""
        if first is None or newest is None or newest < first:
            return 0
        return min((newest - first) // tf_ms + 1, self.retention_ms // tf_ms)

    async def _fresh_starts(
        self, tf: str, ids: list[int], symbols: list[str], write_from: Mapping[tuple[str, str], int]
    ) -> tuple[dict[str, int | None], dict[str, tuple[int, int]], dict[str, dict[int, int]]]:
        """Per symbol, the first bar to write at boot (None: only the newest), the span
        of its persisted values, and each instance's first persisted bar."""
        tf_ms = TF_MS[tf]
        persisted = await core_io.persisted_spans(self.pool, ids, symbols)
        first: dict[str, int | None] = {}
        spans: dict[str, tuple[int, int]] = {}
        value_firsts: dict[str, dict[int, int]] = {}
        for symbol in symbols:
            stored = [persisted[(i, symbol)] for i in ids if (i, symbol) in persisted]
            first[symbol] = min(last for _, last in stored) + tf_ms if stored else None
            if stored:
                spans[symbol] = (min(f for f, _ in stored), max(last for _, last in stored))
                value_firsts[symbol] = {i: persisted[(i, symbol)][0] for i in ids if (i, symbol) in persisted}
        # A bar stored after the values around it were computed (its backfill came in
        # while the previous run's values were on their way to PostgreSQL, and that run
        # died before folding it in) has no values: written again from it.
        for symbol, hole in (await core_io.first_value_holes(self.pool, tf, ids, spans)).items():
            first[symbol] = min(hole, first[symbol] or hole)
        # A bar whose event was never acknowledged: its values may be those of the bar
        # before it changed; or, shared with other processes, missing (its previous
        # owner dropped them: groups.py). (Alone, a series with no values opens at its
        # newest bar: a first boot does not compute the whole history.)
        for symbol in symbols:
            redo = write_from.get((symbol, tf))
            if redo is not None and (redo <= spans[symbol][1] if symbol in spans else self.shared is not None):
                first[symbol] = min(redo, first[symbol] or redo)
        return first, spans, value_firsts

    async def _stale_starts(
        self,
        tf: str,
        plans: Mapping[str, tuple[BarArrays, int | None]],
        counts: Mapping[str, int],
        firsts: Mapping[str, Mapping[int, int]],
        since: Mapping[str, int],
        filled: dict[tuple[str, int], tuple[Kernel, list[np.ndarray]]],
    ) -> dict[str, int]:
        """The series (-> `since[symbol]`, their first value) whose stored values, at each
        instance's first one, are not those the history stored now gives: computed before
        older bars were stored (the warm-up history came after the first live minutes),
        whose announcement never came (their process died between storing and announcing
        them, or a Redis failover lost the entries). Nothing else would fold them in: the
        series opens holding those bars. `counts`: the bars asked for (fewer came: the
        whole series). The kernels filled for it go to `filled`, for the opening to keep
        (all but running sums, whose opening may take an anchor)."""
        instances = self.layouts[tf].instances
        checked = {
            s: first_values_in(plans[s][0], instances, at, plans[s][0].size < counts[s]) for s, at in firsts.items()
        }
        keys = [(i.id, s, t, name) for s, firsts_of in checked.items() for i, t, _ in firsts_of for name in i.names]
        stored = await core_io.fetch_values_at(self.pool, keys)
        stale: dict[str, int] = {}
        for count, (symbol, firsts_of) in enumerate(checked.items()):
            if count % self.YIELD_EVERY_OPEN == self.YIELD_EVERY_OPEN - 1:
                await asyncio.sleep(0)
            outputs: dict[int, list[np.ndarray]] = {}
            for instance, _, _ in firsts_of:
                kernel, outputs[instance.id] = fill_kernel(instance, plans[symbol][0])
                if not instance.anchored:
                    filled[(symbol, instance.id)] = (kernel, outputs[instance.id])
            if not agrees_with_history(symbol, firsts_of, outputs, stored):
                stale[symbol] = since[symbol]
        if stale:
            self.stats["stale_rewritten"] += len(stale)
            log_system_event(
                "WARNING",
                MODULE,
                f"values of {len(stale)} {tf} series differ from the ones their stored history gives "
                f"(bars stored after the values were computed, never announced): written again from their first",
                {"tf": tf, "symbols": sorted(stale)[:20]},
            )
        return stale

    async def _anchors(
        self, tf: str, plans: Mapping[str, tuple[BarArrays, int | None]], counts: Mapping[str, int]
    ) -> dict[tuple[int, str], tuple[int, float]]:
        """Trusted values for running sums (OBV): the stored value at the bar before the
        first one written (at the newest bar when nothing is written), from memory or
        PostgreSQL; failing that, the sum over the whole stored series at the window's
        first bar. A window holding the whole series needs none."""
        anchored = [(i.id, i.names[0]) for i in self.layouts[tf].instances if i.anchored]
        if not anchored:
            return {}
        wanted: list[tuple[int, str, int, str]] = []
        for symbol, (bars, first) in plans.items():
            if bars.size:
                at = int(bars.open_time[-1]) if first is None else first - TF_MS[tf]
                wanted += [(iid, symbol, at, name) for iid, name in anchored]
        found: dict[tuple[int, str], tuple[int, float]] = {}
        missing = []
        for iid, symbol, at, name in wanted:
            value = self.pending.value(symbol, tf, at, iid, name)
            if value is None:
                missing.append((iid, symbol, at, name))
            else:
                found[(iid, symbol)] = (at, value)
        for (iid, symbol, at, _), value in (await core_io.fetch_values_at(self.pool, missing)).items():
            found[(iid, symbol)] = (at, value)
        partial = {
            symbol: int(bars.open_time[0])
            for symbol, (bars, _) in plans.items()
            if bars.size >= counts[symbol] and any((iid, symbol) not in found for iid, _ in anchored)
        }
        if partial:
            sums = await core_io.obv_over_history(self.pool, tf, list(partial.items()))
            for iid, _ in anchored:
                for symbol, value in sums.items():
                    found.setdefault((iid, symbol), (partial[symbol], value))
        return found

    def _open_one(
        self,
        key: tuple[str, str],
        bars: BarArrays,
        first: int | None,
        anchors: Mapping[tuple[int, str], tuple[int, float]],
        seen: tuple[int, int],
        filled: Mapping[tuple[str, int], tuple[Kernel, list[np.ndarray]]],
    ) -> None:
        symbol, tf = key
        layout = self.layouts[tf]
        kernels: list[Kernel] = []
        outputs: list[np.ndarray] = []
        for instance in layout.instances:
            done = filled.get((symbol, instance.id))
            kernel, out = done or fill_kernel(instance, bars, anchors.get((instance.id, symbol)))
            kernels.append(kernel)
            outputs += out
        old = self.series.get(key)
        series = Series(symbol, tf, kernels, seen, [i.id for i in layout.instances])
        if bars.size:
            rows = bars_as_tuples(bars)
            series.last_time = rows[-1][5]
            series.recent.extend(rows[-RECENT_BARS:])
            if first is not None:
                start = int(np.searchsorted(bars.open_time, first))
                matrix = np.vstack(outputs) if outputs else np.empty((0, bars.size))
                for index in range(start, bars.size):
                    self._emit(series, rows[index], matrix[:, index].tolist(), rewrite=True)
                if layout.slow and start < bars.size:
                    self.slow_due.add(key, rows[start][5], rows[-1][5])
        elif old is not None:
            series.last_time, series.recent = old.last_time, old.recent
        self.series[key] = series

    # ----------------------------------------------------------------- the hot path

    async def run(self) -> None:
        streams = list(core_io.CANDLE_STREAMS.values())
        # A process's own group starts at the streams' end: what came before is in
        # PostgreSQL, and what others' groups hold unsettled is written again at open.
        at = "0" if self.shared is None else "$"
        await core_io.ensure_groups(self.redis, {s: (self.group,) for s in streams}, at=at)
        # Entries another consumer (a process that ran before, whatever its name) was
        # given and never acknowledged: this one's now, read through as its backlog.
        for stream in streams:
            await core_io.reclaim_stale(
                self.redis, stream, self.group, self.options.consumer, 0, count=1_000_000, page=1000
            )
        await self.config.load()
        symbols = await core_io.enabled_symbols(self.pool)
        if self.shared is not None:
            self.shared.following = self.shared.ownership.owned()
            symbols = [s for s in symbols if s in self.shared.following]
        keys = [(s, tf) for tf in TIMEFRAMES for s in symbols]
        started = time.monotonic()
        self.series.clear()
        elsewhere = None if self.shared is None else set(symbols)
        marks = await core_io.candle_stream_ends(self.redis)  # before the unsettled events: see _follow_shares
        unsettled = await groups.unsettled_at_start(self.redis, self.group, self.options.consumer, elsewhere)
        if unsettled:
            log.info(
                "%d series have unacknowledged candle events, oldest bars: %s",
                len(unsettled),
                sorted(unsettled.items(), key=lambda item: item[1])[:5],
            )
        await self._isolating(lambda: self.open_series(keys, write_from=unsettled, marks=marks))
        if self.shared is not None:
            await self.shared.opened(self.redis, self.shared.following)
        await self._flush_redis([])
        log_system_event(
            "INFO",
            MODULE,
            f"opened {len(keys)} series in {time.monotonic() - started:.1f}s",
            {"series": len(keys), "pending_rows": self.pending.rows},
        )
        self.ready.set()
        # Entries this consumer was given and has not acknowledged (before a restart,
        # before a failed round), read through once by id; then new ones.
        backlog: dict[str, str] | None = self._backlog_start()
        next_reload = time.monotonic() + self.options.reload_s
        while True:
            while self.pending.rows > self.options.persist_max_rows and not self.stopping:
                self.persisted_event.clear()
                await self.persisted_event.wait()
            try:
                if time.monotonic() >= next_reload:
                    if await self.config.load():
                        await self._isolating(self._reopen_all)
                    await self._forget_disabled_symbols()
                    next_reload = time.monotonic() + self.options.reload_s
                entries = await self._read(backlog or ">")
                await self._follow_shares()  # a symbol gained before or meanwhile: opened past these
                if backlog is not None:
                    backlog.update((stream, entry_id) for stream, entry_id, _ in entries)
                if entries:
                    await self.handle(entries)
                elif self._latest or self._announce:
                    await self._flush_redis([])  # what a failed round left
                self.redis_outage.ok()
                self.pg_outage.ok()
            except InstanceFailure as failure:
                # Values queued before the failure stay queued; the batch is read again
                # from the backlog and computed without the failed instance.
                self.config.disable(failure)
                await self.config.load()
                await self._isolating(self._reopen_all)
                backlog = self._backlog_start()
                continue
            except (*REDIS_DOWN_ERRORS, *PG_DOWN_ERRORS) as exc:
                # What was computed stays queued; the unacknowledged entries come back
                # from the backlog and are skipped as already held.
                outage = self.redis_outage if isinstance(exc, RedisError) else self.pg_outage
                outage.fail(exc, "reading candles and writing values")
                backlog = self._backlog_start()
                if self.stopping:
                    return
                await asyncio.sleep(1.0)
                continue
            if backlog is not None and not entries:
                backlog = None
            elif not entries and self.stopping:
                return

    def stop(self) -> None:
        """Shutdown: handle what the streams hold (the feed has drained into them), then return."""
        self.stopping = True
        self.persisted_event.set()

    async def _forget_disabled_symbols(self) -> None:
        """Series of tickers no longer enabled are dropped (memory stays with the set)."""
        enabled = set(await core_io.enabled_symbols(self.pool))
        self._drop(lambda symbol: symbol not in enabled)

    async def _reopen_all(self) -> None:
        """After a configuration change: every series rebuilt where it stands; new
        instances are warmed from history and give their first value on the next bar."""
        opened = {k: s.last_time for k, s in self.series.items() if s.last_time is not None}
        empty = [k for k, s in self.series.items() if s.last_time is None]
        for key in empty:
            del self.series[key]
        if opened:
            await self.open_series(list(opened), upto=opened)

    @staticmethod
    def _backlog_start() -> dict[str, str]:
        return dict.fromkeys(core_io.CANDLE_STREAMS.values(), "0")

    async def _read(self, start: str | Mapping[str, str]) -> list[core_io.StreamEntry]:
        streams = list(core_io.CANDLE_STREAMS.values())
        return await core_io.read_group(
            self.redis,
            self.group,
            self.options.consumer,
            streams,
            self.options.read_count,
            None if self.stopping else self.options.block_ms,
            start,
        )

    YIELD_EVERY_SERIES = 100  # stepped between two turns of the event loop
    YIELD_EVERY_OPEN = 4  # opened (from up to 5,000 stored bars each) between two turns

    async def handle(self, entries: Sequence[core_io.StreamEntry]) -> None:
        """One batch: group by series, open what is new, step, write once, ack."""
        self.last_batch_at = time.monotonic()
        by_series: dict[tuple[str, str], list[tuple[tuple[int, int], BarTuple]]] = {}
        held: set[tuple[str, str]] = set()
        handover = self.shared.handover if self.shared else None
        now = time.monotonic()
        for stream, entry_id, fields in entries:
            tf = core_io.CANDLE_STREAM_TF.get(stream)
            if not fields:
                continue  # a pending entry trimmed from the stream: nothing left to do
            try:
                symbol, bar = parse_event(fields)
            except (KeyError, ValueError, TypeError) as exc:
                self.stats["bad_events"] += 1
                log_system_event(
                    "WARNING",
                    MODULE,
                    f"skipped a malformed candle event {stream} {entry_id}: {exc!r}",
                    {"stream": stream, "id": entry_id, "fields": dict(fields)},
                )
                continue
            if tf is None or not self.owns(symbol):
                # Another process's symbol, acknowledged with the others; unless this
                # process computed it until now: held for the next owner (groups.Handover).
                if tf is not None and handover and handover.hold(symbol, tf, bar[5], (stream, entry_id), now):
                    held.add((stream, entry_id))
                continue
            by_series.setdefault((symbol, tf), []).append((core_io.stream_id(entry_id), bar))
        acks = [(stream, entry_id) for stream, entry_id, _ in entries if (stream, entry_id) not in held]
        new = [key for key in by_series if key not in self.series]
        if new:
            await self.open_series(new)
        skipped = await self._skipped_bars(by_series)
        started = time.perf_counter()
        corrections: dict[tuple[str, str], list[int]] = {}  # key -> [first bar to redo, newest bar]
        for index, (key, events) in enumerate(by_series.items()):
            if index % self.YIELD_EVERY_SERIES == self.YIELD_EVERY_SERIES - 1:
                # The feed shares this event loop: its closes are stored and announced
                # between slices of a boundary's 1,500 series, not after all of them.
                await asyncio.sleep(0)
            series = self.series[key]
            tf_ms = TF_MS[key[1]]
            for seen, bar in events:
                if seen <= series.seen:
                    continue
                t = bar[5]
                last = series.last_time
                redo = corrections.get(key)
                if redo is not None:
                    redo[0], redo[1] = min(redo[0], t), max(redo[1], t)
                elif last is None or t == last + tf_ms:
                    self._advance(series, bar)
                elif t > last:
                    await self._catch_up(series, t, skipped.get(key))
                    self._advance(series, bar)
                elif series.holds(bar):
                    continue
                else:
                    corrections[key] = [t, last]
                    self.stats["corrections"] += 1
        self.last_compute_s = time.perf_counter() - started
        if corrections:
            await self.open_series(
                list(corrections),
                upto={k: newest for k, (_, newest) in corrections.items()},
                write_from={k: first for k, (first, _) in corrections.items()},
            )
        await self._flush_redis(acks)

    def _advance(self, series: Series, bar: BarTuple) -> None:
        values = series.step(bar)
        self.stats["bars"] += 1
        self._emit(series, bar, values)
        if self.layouts[series.tf].slow:
            self.slow_due.add((series.symbol, series.tf), bar[5], bar[5])

    async def _skipped_bars(
        self, by_series: Mapping[tuple[str, str], list[tuple[tuple[int, int], BarTuple]]]
    ) -> dict[tuple[str, str], list[BarTuple]]:
        """The stored bars between each series' newest and its first new event, when the
        events skip some (their announcements were lost, or came before a restart): one
        query per timeframe for all series, not one round trip each."""
        wanted: dict[str, list[tuple[str, int, int]]] = {}
        for (symbol, tf), events in by_series.items():
            series = self.series[(symbol, tf)]
            fresh = [bar[5] for seen, bar in events if seen > series.seen]
            if series.last_time is None or not fresh:
                continue
            first, tf_ms = min(fresh), TF_MS[tf]
            if first > series.last_time + tf_ms:
                wanted.setdefault(tf, []).append((symbol, first - tf_ms, (first - series.last_time) // tf_ms - 1))
        found: dict[tuple[str, str], list[BarTuple]] = {}
        for tf, requests in wanted.items():
            for symbol, columns in (await core_io.fetch_history(self.pool, tf, requests)).items():
                found[(symbol, tf)] = bars_as_tuples(BarArrays.from_columns(columns))
        return found

    async def _catch_up(self, series: Series, t: int, fetched: list[BarTuple] | None = None) -> None:
        """Bars stored between the series' newest and `t` whose events never came."""
        tf_ms = TF_MS[series.tf]
        missing = (t - (series.last_time or t)) // tf_ms - 1
        if missing <= 0:
            return
        bars = [bar for bar in fetched or () if bar[5] < t]
        if not bars or bars[0][5] > (series.last_time or 0) + tf_ms:  # not prefetched (a second skip)
            got = await core_io.fetch_history(self.pool, series.tf, [(series.symbol, t - tf_ms, missing)])
            columns = got.get(series.symbol)
            bars = bars_as_tuples(BarArrays.from_columns(columns)) if columns else []
        for bar in bars:
            if series.last_time is None or bar[5] > series.last_time:
                self._advance(series, bar)

    def _emit(self, series: Series, bar: BarTuple, values: list[float], rewrite: bool = False) -> None:
        """Queue one bar's values: the hash (newest bar only), the announcement, PostgreSQL.

        rewrite: the bar may have stored values already; an output that now has none
        (e.g. SUPERTl after the trend flipped) must lose its old row."""
        layout = self.layouts[series.tf]
        t = bar[5]
        key = (series.symbol, series.tf)
        latest = self._latest.get(key)
        if latest is None or latest[0] <= t:
            self._latest[key] = (t, layout.names, values)
        self._announce.append((series.symbol, series.tf, t))
        self.newest_ms = max(self.newest_ms, t)
        if t >= self.newest_ms - self.retention_ms:
            self.pending.add((series.symbol, series.tf, t, ""), layout.ids, layout.names, values, rewrite)

    async def _flush_redis(self, acks: Sequence[tuple[str, str]]) -> None:
        """Latest values, announcements and acks: one round trip.

        The hashes take plain commands (hashes.latest_hash_commands: HDEL of the outputs
        without a value on the bar, HSET of the others), not the guarded script restore
        uses: this worker only ever writes a series' newest bar (a correction rewrites up
        to the newest), and a plain command costs Redis and the parser a fraction of a
        script call. A timeframe with pandas-ta instances takes the script (their values
        come later, by the same script): it rebuilds the hash for a newer bar and merges
        into the same one, so no pandas-ta value of an older bar survives under the new
        open time, and none of the newest bar is deleted."""
        commands: list[list[Any]] = []
        scripted: list[hashes.LatestValues] = []
        latest = list(self._latest.items())
        texts = hashes.float_texts([v for _, (_, _, values) in latest for v in values])
        at = 0
        for (symbol, tf), (t, names, values) in latest:
            shown = texts[at : at + len(values)]
            at += len(values)
            gone = self.config.gone_names.get(tf, ())
            if self.layouts[tf].slow:
                scripted.append((symbol, tf, t, [*zip(names, shown), *((name, None) for name in gone)]))
            else:
                commands += hashes.latest_hash_commands(symbol, tf, t, names, shown, gone)
        commands += [self._announcement(symbol, tf, t) for symbol, tf, t in self._announce]
        self.pending.hold(acks)
        through, due = self.pending.due()
        commands += core_io.ack_commands(self.group, due)
        if scripted:
            await self.cache.write(scripted, commands)
        elif commands:
            await core_io.execute_checked(self.redis, commands)
        if self.metrics is not None:  # announced: close -> indicators ready
            self.metrics.indicators_ready(self._announce)
        self.pending.forget(through)
        self._latest.clear()
        self._announce.clear()

    async def release_acks(self) -> None:
        """Acknowledge the events whose values are all in PostgreSQL now."""
        through, due = self.pending.due()
        if due:
            # Replies not checked: a group gone with a Redis wipe has nothing left to acknowledge.
            await core_io.execute_packed(self.redis, core_io.ack_commands(self.group, due))
            self.pending.forget(through)

    def _announcement(self, symbol: str, tf: str, t: int, **extra: str) -> list[Any]:
        fields = {"symbol": symbol, "tf": tf, "open_time": t, **extra}
        return core_io.xadd_command(core_io.INDICATORS_READY_STREAM, fields, self.settings.stream_maxlen)

    # ----------------------------------------------------------------- pandas-ta path

    SLOW_BARS_PER_ROUND = 256  # bars pandas-ta computes per round, all series together

    async def run_slow(self) -> None:
        while True:
            await self.slow_due.wake.wait()
            self.slow_due.wake.clear()
            while self.slow_due:
                picked = self.slow_due.take(self.SLOW_BARS_PER_ROUND)
                try:
                    await self._slow_round(picked)
                except PG_DOWN_ERRORS as exc:
                    for key, first, last in picked:
                        self.slow_due.add(key, first, last)
                    self.pg_outage.fail(exc, "reading bars for pandas-ta")
                    await asyncio.sleep(1.0)

    async def _slow_round(self, picked: Sequence[tuple[tuple[str, str], int, int]]) -> None:
        window = self.options.slow_window
        calls, owners = [], []
        for tf in TIMEFRAMES:
            wanted = [(key[0], first, last) for key, first, last in picked if key[1] == tf]
            instances = self.layouts[tf].slow
            if not wanted or not instances:
                continue
            requests = [(s, last, (last - first) // TF_MS[tf] + window) for s, first, last in wanted]
            history = await core_io.fetch_history(self.pool, tf, requests)
            for symbol, first, _last in wanted:
                t, *ohlcv = history.get(symbol, ([],))
                for index in range(bisect.bisect_left(t, first), len(t)):
                    lo = max(0, index + 1 - window)
                    columns = tuple(column[lo : index + 1] for column in ohlcv)
                    for instance in instances:
                        calls.append((instance.indicator, instance.kwargs, t[lo : index + 1], columns))
                        owners.append((symbol, tf, t[index], instance))
        if not calls:
            return
        results = await self.slow_runner.call(slow.compute_many, calls)
        latest: dict[tuple[str, str, int], dict[str, float]] = {}
        for (symbol, tf, t, instance), result in zip(owners, results):
            if not self.owns(symbol):
                continue  # lost meanwhile: its next owner computes these (groups.py)
            if isinstance(result, str):
                self.slow_errors.warn(str(instance.id), f"instance {instance.id}: {result}", {"symbol": symbol})
                continue
            names = tuple(result)
            values = [result[n] for n in names]
            self.pending.add((symbol, tf, t, instance.id), (instance.id,) * len(names), names, values)
            latest.setdefault((symbol, tf, t), {}).update(result)
        while True:
            try:
                await self.cache.write(
                    ((symbol, tf, t, values.items()) for (symbol, tf, t), values in latest.items()),
                    [self._announcement(symbol, tf, t, set="pandas-ta") for symbol, tf, t in latest],
                )
                return
            except REDIS_DOWN_ERRORS as exc:
                self.redis_outage.fail(exc, "writing pandas-ta values")
                await asyncio.sleep(1.0)

    # ----------------------------------------------------------------- PostgreSQL

    async def run_persister(self) -> None:
        """Write-behind, out of the hot path's way: it writes in small statements, and
        while candle events are flowing it waits for a pause (at most PERSIST_MAX_WAIT_S,
        or until a backlog builds up), since encoding rows holds the event loop."""
        try:
            while True:
                await asyncio.sleep(self.options.persist_interval_s)
                waited = 0.0
                while (
                    time.monotonic() - self.last_batch_at < PERSIST_QUIET_S
                    and waited < PERSIST_MAX_WAIT_S
                    and self.pending.rows < self.options.persist_max_rows // 4
                ):
                    await asyncio.sleep(PERSIST_QUIET_S / 2)
                    waited += PERSIST_QUIET_S / 2
                while self.pending:
                    try:
                        await self.persist_once()
                        self.persist_outage.ok()
                    except PG_DOWN_ERRORS as exc:
                        self.persist_outage.fail(exc, f"writing {self.pending.rows} indicator values")
                        await asyncio.sleep(1.0)
                    await asyncio.sleep(0)
                try:
                    await self.release_acks()
                except REDIS_DOWN_ERRORS as exc:
                    self.redis_outage.fail(exc, "acknowledging candle events")
        finally:
            if self.pending or self.pending.held():
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(asyncio.shield(self.flush()), 5.0)

    async def flush(self) -> None:
        while self.pending:
            await self.persist_once()
        await self.release_acks()

    async def persist_once(self) -> int:
        """Write the oldest pending bars (up to the batch size); at least once."""
        taken = self.pending.take(self.options.persist_batch_rows)
        by_layout, gone = matrices(taken)
        if gone[0]:
            await core_io.delete_indicator_rows(self.pool, *gone)
        written = 0
        for (ids, names), matrix in by_layout.items():
            written += await core_io.upsert_indicator_matrix(self.pool, ids, names, *matrix)
        self.pending.done(taken)
        self.stats["persisted_rows"] += written
        self.persisted_event.set()
        return written

    async def run_pruner(self) -> None:
        while True:
            await asyncio.sleep(self.options.prune_interval_s)
            try:
                dropped = await core_io.prune_indicator_values(self.pool, self.retention_ms)
            except (OSError, asyncpg.PostgresError) as exc:
                log_system_event("WARNING", "INDICATORS", f"retention not run: {exc!r}")
                continue
            if dropped:
                log.info(
                    "indicator values older than %d days: %d pieces dropped (%s)",
                    self.settings.indicator_retention_days,
                    len(dropped),
                    ", ".join(dropped),
                )

    def close(self) -> None:
        self.slow_runner.close()
