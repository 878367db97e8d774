"""Indicator worker: candle events in, indicator values out.

Reads `ohlcv_<tf>_ready` as consumer group `indicator_workers`. Each series (symbol,
timeframe) holds one kernel per configured instance, opened from stored history;
every new bar advances them in O(1). A batch of events costs one Redis round trip
(latest values into `indicator:<SYMBOL>:<tf>`, an `indicators_ready_stream` entry per
bar, the acks of earlier events whose values are written); PostgreSQL gets the values
right behind, in batches.

Correctness rests on four rules:
- a series is opened from PostgreSQL after noting each stream's last entry id, so
  events up to that id are already in the state and are skipped;
- an event older than the series' newest bar is a correction: the series is reopened
  and every value from that bar on is recomputed and rewritten;
- an event is acknowledged only once its values are in PostgreSQL; at start, every
  series is written again from the oldest bar among its unacknowledged events;
- after a crash, bars newer than the newest persisted value are recomputed at open,
  and so are those from the oldest stored bar without values.
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
from indicators import hashes, slow
from indicators.kernels import BarArrays, BarTuple, Kernel
from indicators.options import IndicatorOptions
from indicators.pending import PendingValues, matrices
from indicators.registry import IndicatorConfigError, Instance, parse_common
from indicators.series import (
    RECENT_BARS,
    InstanceFailure,
    Layout,
    Series,
    SlowInstance,
    bars_as_tuples,
    first_unseen,
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

log = logging.getLogger("INDICATORS")

MODULE = "INDICATORS"
TF_MINUTES = {tf: TF_MS[tf] // 60_000 for tf in TIMEFRAMES}
STREAM_TF = {stream: tf for tf, stream in core_io.CANDLE_STREAMS.items()}
PERSIST_QUIET_S = 0.1  # no candle event for this long: a good moment to write
PERSIST_MAX_WAIT_S = 2.0


# --------------------------------------------------------------------------- configuration


# --------------------------------------------------------------------------- the worker


class IndicatorWorker:
    metrics: Any = None  # metrics.definitions.DaemonMetrics when METRICS_PORT is set

    def __init__(
        self, settings: Settings, pool: asyncpg.Pool, redis: Redis, options: IndicatorOptions | None = None
    ) -> None:
        self.settings, self.pool, self.redis = settings, pool, redis
        self.options = options or IndicatorOptions()
        self.layouts: dict[str, Layout] = {tf: Layout([], []) for tf in TIMEFRAMES}
        self.config_key: Any = None
        self.config_errors: dict[int, str] = {}
        self.config_rows: dict[int, str] = {}  # instance id -> its row, as text
        self.errors_written: dict[int, str] | None = None  # what indicator_instances_v4.error holds
        self.broken: dict[int, tuple[str, str]] = {}  # instance id -> (its row, why it was disabled)
        self.series: dict[tuple[str, str], Series] = {}
        self.pending = PendingValues()
        self.persisted_event = asyncio.Event()
        self.slow_due: dict[tuple[str, str], tuple[int, int]] = {}  # series -> bars awaiting pandas-ta
        self.slow_wake = asyncio.Event()
        self.slow_errors = RateLimitedLog(MODULE, level="ERROR")
        self.slow_runner = slow.SlowRunner(self.options.slow_workers)
        self.retention_ms = settings.indicator_retention_days * DAY_MS
        self.newest_ms = 0  # newest bar seen, for the retention cut-off
        self.cache = hashes.IndicatorCache(redis)
        self.stats = {"bars": 0, "corrections": 0, "opened": 0, "persisted_rows": 0, "bad_events": 0}
        self.last_compute_s = 0.0
        self.ready = asyncio.Event()  # set once the series are open and events flow
        self.stopping = False
        # Whether this process leads the indicators now (set by the daemon from its
        # lease when several processes share the deployment; alone, it always does).
        self.may_compute: Callable[[], bool] = lambda: True
        self.redis_outage = Outage(MODULE, "Redis")
        self.pg_outage = Outage(MODULE, "PostgreSQL")
        self.persist_outage = Outage(MODULE, "PostgreSQL")
        self.last_batch_at = 0.0
        self._announce: list[tuple[str, str, int]] = []
        self._latest: dict[tuple[str, str], tuple[int, Sequence[str], list[float]]] = {}
        self._gone_names: dict[str, set[str]] = {}  # per timeframe: outputs of removed instances

    def workers(self) -> dict[str, Any]:
        return {
            "INDICATORS": self.run,
            "INDICATORS_PERSIST": self.run_persister,
            "INDICATORS_SLOW": self.run_slow,
            "INDICATORS_PRUNE": self.run_pruner,
        }

    # ----------------------------------------------------------------- configuration

    async def load_config(self) -> bool:
        """Re-read the instance tables; True when they changed (layouts rebuilt)."""
        rows = await core_io.fetch_indicator_config(self.pool)
        key = repr(rows)
        if key == self.config_key:
            return False
        incremental: dict[str, list[Instance]] = {tf: [] for tf in TIMEFRAMES}
        pandas_ta: dict[str, list[SlowInstance]] = {tf: [] for tf in TIMEFRAMES}
        errors: dict[int, str] = {}
        for instance_id, indicator, tf, raw in rows:
            row_key = repr((indicator, tf, raw))
            broken = self.broken.get(instance_id)
            if broken is not None and broken[0] == row_key:
                errors[instance_id] = broken[1]  # it failed as configured: not again until changed
                continue
            self.broken.pop(instance_id, None)
            try:
                if tf not in TIMEFRAMES:
                    raise IndicatorConfigError(f"timeframe {tf} is not built here: add it to TIMEFRAMES")
                instance = parse_common(instance_id, indicator, tf, TF_MINUTES[tf], raw)
                if instance is not None:
                    incremental[tf].append(instance)
                    continue
                kwargs, names = await self._describe_slow(indicator, raw)
                pandas_ta[tf].append(SlowInstance(instance_id, indicator, tf, kwargs, names))
            except IndicatorConfigError as exc:
                errors[instance_id] = str(exc)
                if self.config_errors.get(instance_id) != str(exc):
                    log_system_event(
                        "ERROR",
                        MODULE,
                        f"indicator instance {instance_id} ({indicator} {tf}) skipped: {exc}",
                        {"instance_id": instance_id, "indicator": indicator, "timeframe": tf, "params": raw},
                    )
        self.config_rows = {r[0]: repr((r[1], r[2], r[3])) for r in rows}
        if errors != self.errors_written:
            await core_io.set_instance_errors(self.pool, errors)
            self.errors_written = errors
        layouts = {tf: Layout(incremental[tf], pandas_ta[tf]) for tf in TIMEFRAMES}
        for tf, lay in layouts.items():  # outputs no longer configured leave the hashes as they are written
            before = {*self.layouts[tf].names, *(n for i in self.layouts[tf].slow for n in i.names)}
            now = {*lay.names, *(n for i in lay.slow for n in i.names)}
            self._gone_names[tf] = (self._gone_names.get(tf, set()) | before) - now
        self.layouts, self.config_key, self.config_errors = layouts, key, errors
        log.info(
            "indicator configuration: %s",
            ", ".join(
                f"{tf} {len(lay.instances)} incremental + {len(lay.slow)} pandas-ta" for tf, lay in layouts.items()
            ),
        )
        return True

    DESCRIBE_TIMEOUT_S = 60.0

    async def _describe_slow(self, indicator: str, raw: Mapping[str, str]) -> tuple[dict[str, Any], tuple[str, ...]]:
        """pandas-ta checks its own instance in the runner process; whatever goes wrong
        there (a crash of the process, a hang) is this instance's error, not the worker's."""
        try:
            return await asyncio.wait_for(self.slow_runner.call(slow.describe, indicator, raw), self.DESCRIBE_TIMEOUT_S)
        except IndicatorConfigError:
            raise
        except Exception as exc:
            raise IndicatorConfigError(f"pandas-ta could not check it: {type(exc).__name__}: {exc}") from None

    def _disable(self, failure: InstanceFailure) -> None:
        """An instance whose kernel raised: skipped until its configuration changes."""
        row_key = self.config_rows.get(failure.instance_id, "")
        self.broken[failure.instance_id] = (row_key, f"failed while computing: {failure}")
        log_system_event(
            "ERROR",
            MODULE,
            f"indicator instance {failure.instance_id} disabled: it failed while computing ({failure}); "
            "the other instances go on",
            {"instance_id": failure.instance_id},
        )
        self.config_key = None  # the next load_config rebuilds the layouts without it

    async def _isolating(self, action: Callable[[], Awaitable[Any]]) -> Any:
        """Run `action`; an instance that fails in it is disabled and the action re-run
        with the others."""
        while True:
            try:
                return await action()
            except InstanceFailure as failure:
                self._disable(failure)
                await self.load_config()

    # ----------------------------------------------------------------- opening series

    async def _watermarks(self) -> dict[str, tuple[int, int]]:
        pipe = self.redis.pipeline(transaction=False)
        for stream in core_io.CANDLE_STREAMS.values():
            pipe.xrevrange(stream, count=1)
        replies = await pipe.execute()
        return {
            tf: core_io.stream_id(reply[0][0]) if reply else (0, 0)
            for tf, reply in zip(core_io.CANDLE_STREAMS, replies)
        }

    async def open_series(
        self,
        keys: Sequence[tuple[str, str]],
        upto: Mapping[tuple[str, str], int] | None = None,
        write_from: Mapping[tuple[str, str], int] | None = None,
    ) -> None:
        """(Re)build series from stored bars.

        Without `upto` a series opens at its newest stored bar and writes the bars newer
        than its newest persisted value (only the newest bar, if it has none), and those
        from `write_from[key]` on if that bar has values: the boot and first-sight case. With `upto` it reopens
        at that bar (a correction or a configuration change) and writes the bars from
        `write_from[key]` on, if given.
        """
        fresh = upto is None
        marks = await self._watermarks() if fresh else {}
        newest_m1 = await core_io.newest_m1_time(self.pool) if fresh else None
        by_tf: dict[str, list[str]] = {}
        for symbol, tf in keys:
            by_tf.setdefault(tf, []).append(symbol)
        for tf, symbols in by_tf.items():
            layout = self.layouts[tf]
            tf_ms = TF_MS[tf]
            base = max(min(layout.history, self.options.history_max), self.options.slow_window if layout.slow else 0)
            if fresh:
                ids = [i.id for i in layout.instances]
                first, spans = await self._fresh_starts(tf, ids, symbols, write_from or {})
                requests = [(s, None, base + self._bars_since(first[s], newest_m1, tf_ms)) for s in symbols]
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
                requests = [(s, None, base + self._bars_since(first[s], newest_m1, tf_ms)) for s in moved]
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
            anchors = await self._anchors(tf, plans, counts)
            for index, (symbol, (bars, start)) in enumerate(plans.items()):
                if index % self.YIELD_EVERY_OPEN == self.YIELD_EVERY_OPEN - 1:
                    await asyncio.sleep(0)  # ~5 ms a series at boot: the feed runs in between
                old = self.series.get((symbol, tf))
                seen = marks[tf] if fresh else (old.seen if old else (0, 0))
                self._open_one((symbol, tf), bars, start, anchors, seen)
        self.stats["opened"] += len(keys)

    def _bars_since(self, first: int | None, newest: int | None, tf_ms: int) -> int:
        """Extra history so that the bars from `first` on are all loaded (within retention)."""
        if first is None or newest is None or newest < first:
            return 0
        return min((newest - first) // tf_ms + 1, self.retention_ms // tf_ms)

    async def _fresh_starts(
        self, tf: str, ids: list[int], symbols: list[str], write_from: Mapping[tuple[str, str], int]
    ) -> tuple[dict[str, int | None], dict[str, tuple[int, int]]]:
        """Per symbol, the first bar to write at boot (None: only the newest), and the
        span of its persisted values."""
        tf_ms = TF_MS[tf]
        persisted = await core_io.persisted_spans(self.pool, ids, symbols)
        first: dict[str, int | None] = {}
        spans: dict[str, tuple[int, int]] = {}
        for symbol in symbols:
            stored = [persisted[(i, symbol)] for i in ids if (i, symbol) in persisted]
            first[symbol] = min(last for _, last in stored) + tf_ms if stored else None
            if stored:
                spans[symbol] = (min(f for f, _ in stored), max(last for _, last in stored))
        # A bar stored after the values around it were computed (its backfill came in
        # while the previous run's values were on their way to PostgreSQL, and that run
        # died before folding it in) has no values: written again from it.
        for symbol, hole in (await core_io.first_value_holes(self.pool, tf, ids, spans)).items():
            first[symbol] = min(hole, first[symbol] or hole)
        # A bar whose event was never acknowledged, and which has values: they may be
        # those of the bar before it changed.
        for symbol, (_, newest_value) in spans.items():
            redo = write_from.get((symbol, tf))
            if redo is not None and redo <= newest_value:
                first[symbol] = min(redo, first[symbol] or redo)
        return first, spans

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
    ) -> None:
        symbol, tf = key
        layout = self.layouts[tf]
        kernels: list[Kernel] = []
        outputs: list[np.ndarray] = []
        for instance in layout.instances:
            try:
                kernel = instance.make_kernel()
                if instance.anchored:
                    outputs += kernel.fill(bars, anchors.get((instance.id, symbol)))  # type: ignore[call-arg]
                else:
                    outputs += kernel.fill(bars)
            except Exception as exc:
                raise InstanceFailure(instance.id, exc) from exc
            kernels.append(kernel)
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
                    self._queue_slow(key, rows[start][5], rows[-1][5])
        elif old is not None:
            series.last_time, series.recent = old.last_time, old.recent
        self.series[key] = series

    # ----------------------------------------------------------------- the hot path

    async def run(self) -> None:
        """While this process leads the indicators (`may_compute`: one process of a
        deployment, shards/ownership.py), it computes; otherwise it waits for the lead."""
        while not self.stopping:
            if self.may_compute():
                await self._run_leading()
            else:
                await asyncio.sleep(0.25)

    async def _run_leading(self) -> None:
        streams = list(core_io.CANDLE_STREAMS.values())
        await core_io.ensure_groups(self.redis, {s: (core_io.INDICATOR_GROUP,) for s in streams})
        # Entries another consumer (a process that led before, whatever its name) was
        # given and never acknowledged: this one's now, read through as its backlog.
        for stream in streams:
            await core_io.reclaim_stale(
                self.redis, stream, core_io.INDICATOR_GROUP, self.options.consumer, 0, count=1_000_000, page=1000
            )
        await self.load_config()
        symbols = await core_io.enabled_symbols(self.pool)
        keys = [(s, tf) for tf in TIMEFRAMES for s in symbols]
        started = time.monotonic()
        self.series.clear()
        unsettled = await self._unsettled_bars()
        if unsettled:
            log.info(
                "%d series have unacknowledged candle events, oldest bars: %s",
                len(unsettled),
                sorted(unsettled.items(), key=lambda item: item[1])[:5],
            )
        await self._isolating(lambda: self.open_series(keys, write_from=unsettled))
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
            if not self.may_compute():
                log_system_event("WARNING", MODULE, "another process leads the indicators now: computing stops here")
                return
            while self.pending.rows > self.options.persist_max_rows and not self.stopping:
                self.persisted_event.clear()
                await self.persisted_event.wait()
            try:
                if time.monotonic() >= next_reload:
                    if await self.load_config():
                        await self._isolating(self._reopen_all)
                    await self._forget_disabled_symbols()
                    next_reload = time.monotonic() + self.options.reload_s
                entries = await self._read(backlog or ">")
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
                self._disable(failure)
                await self.load_config()
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

    async def _unsettled_bars(self) -> dict[tuple[str, str], int]:
        """The oldest bar per series among the candle events not acknowledged at start:
        their values may be missing from PostgreSQL or computed from the bar before it
        changed (see indicators/acks.py)."""
        oldest: dict[tuple[str, str], int] = {}
        for tf, stream in core_io.CANDLE_STREAMS.items():
            entries = await core_io.unacknowledged(self.redis, stream, core_io.INDICATOR_GROUP, self.options.consumer)
            for fields in entries:
                with contextlib.suppress(KeyError, ValueError, TypeError):  # a bad one is logged when read
                    symbol, bar = parse_event(fields)
                    oldest[(symbol, tf)] = min(bar[5], oldest.get((symbol, tf), bar[5]))
        return oldest

    async def _forget_disabled_symbols(self) -> None:
        """Series of tickers no longer enabled are dropped (memory stays with the set)."""
        enabled = set(await core_io.enabled_symbols(self.pool))
        for key in [key for key in self.series if key[0] not in enabled]:
            del self.series[key]
            self.slow_due.pop(key, None)

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
            core_io.INDICATOR_GROUP,
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
        acks = [(stream, entry_id) for stream, entry_id, _ in entries]
        for stream, entry_id, fields in entries:
            tf = STREAM_TF.get(stream)
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
            if tf is None:
                continue
            by_series.setdefault((symbol, tf), []).append((core_io.stream_id(entry_id), bar))
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
            self._queue_slow((series.symbol, series.tf), bar[5], bar[5])

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
            gone = self._gone_names.get(tf, ())
            if self.layouts[tf].slow:
                scripted.append((symbol, tf, t, [*zip(names, shown), *((name, None) for name in gone)]))
            else:
                commands += hashes.latest_hash_commands(symbol, tf, t, names, shown, gone)
        commands += [self._announcement(symbol, tf, t) for symbol, tf, t in self._announce]
        self.pending.hold(acks)
        through, due = self.pending.due()
        commands += core_io.ack_commands(core_io.INDICATOR_GROUP, due)
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
            await core_io.execute_packed(self.redis, core_io.ack_commands(core_io.INDICATOR_GROUP, due))
            self.pending.forget(through)

    def _announcement(self, symbol: str, tf: str, t: int, **extra: str) -> list[Any]:
        fields = {"symbol": symbol, "tf": tf, "open_time": t, **extra}
        return core_io.xadd_command(core_io.INDICATORS_READY_STREAM, fields, self.settings.stream_maxlen)

    # ----------------------------------------------------------------- pandas-ta path

    SLOW_BARS_PER_ROUND = 256  # bars pandas-ta computes per round, all series together

    def _queue_slow(self, key: tuple[str, str], first: int, last: int) -> None:
        """Bars first..last of a series await their pandas-ta values. Kept as one range
        per series, so a long backfill costs constant memory; the bars are read from
        PostgreSQL when their turn comes."""
        old_first, old_last = self.slow_due.pop(key, (first, last))
        self.slow_due[key] = (min(first, old_first), max(last, old_last))
        self.slow_wake.set()

    def _take_slow(self) -> list[tuple[tuple[str, str], int, int]]:
        """Up to SLOW_BARS_PER_ROUND of the due bars, oldest series first; a series with
        more keeps the rest due, behind the others (round robin)."""
        picked: list[tuple[tuple[str, str], int, int]] = []
        budget = self.SLOW_BARS_PER_ROUND
        while self.slow_due and budget > 0:
            key = next(iter(self.slow_due))
            first, last = self.slow_due.pop(key)
            tf_ms = TF_MS[key[1]]
            if (last - first) // tf_ms + 1 > budget:
                cut = first + (budget - 1) * tf_ms
                self.slow_due[key] = (cut + tf_ms, last)
                last = cut
            picked.append((key, first, last))
            budget -= (last - first) // tf_ms + 1
        return picked

    async def run_slow(self) -> None:
        while True:
            await self.slow_wake.wait()
            self.slow_wake.clear()
            while self.slow_due:
                picked = self._take_slow()
                try:
                    await self._slow_round(picked)
                except PG_DOWN_ERRORS as exc:
                    for key, first, last in picked:
                        self._queue_slow(key, first, last)
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
