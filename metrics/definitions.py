"""The daemon's Prometheus metrics: their names, the hooks' sinks and pure helpers.

Two kinds of metric live here:

- real prometheus_client objects (`DaemonMetrics`) that the hot path feeds through a
  few cheap hooks: counters of stored candles, and the two latency histograms. A hook
  is a dictionary operation and a counter increment; nothing here touches a server.
- values read at scrape time from the workers' own state (`Snapshot`, built by
  `metrics.exporter.snapshot_of`), turned into metric families by `snapshot_families`.

No metric carries a symbol label: at 500 symbols a labelled histogram would be tens of
thousands of series. The per-timeframe lag is the worst followed symbol's, and
`feed_v4_symbols_behind` counts how many are late; `status` names them.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from candles import TF_MS, TIMEFRAMES

PREFIX = "feed_v4_"
M1_MS = TF_MS["m1"]

# Seconds, from a bar's closing frame to the moment it is in both PostgreSQL and Redis
# (or its indicators are announced): the minute-boundary budgets are 50 and 100 ms.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0)

# Arrivals not matched within this long (a close never stored or refused) are forgotten,
# so a bar held longer by an outage is not timed; the table is also capped.
ARRIVAL_MAX_AGE_S = 900.0
ARRIVALS_MAX = 200_000
WAITS_MAX = 100_000  # latencies noted between two flushes (more: the newest kept)


def bar_end(tf: str, open_time: int) -> int:
    return open_time + TF_MS[tf]


def _ending(end: int) -> tuple[str, ...]:
    """The timeframes built here whose bars end with the minute ending at `end`."""
    return tuple(tf for tf in TIMEFRAMES if end % TF_MS[tf] == 0)


class DaemonMetrics:
    """One daemon's registry and the sinks of its hooks.

    `close_received` notes when a closing kline arrived (local monotonic clock; the
    exchange's clock may run at another pace, e.g. a replay); `candles_published` and
    `indicators_ready` observe the time since then once the bar is in PostgreSQL and
    Redis, or its indicator values are announced. Only WebSocket closes are timed:
    minutes fetched over REST have no arrival to start from.
    """

    def __init__(self, registry: CollectorRegistry | None = None, time_indicators: bool = True) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.time_indicators = time_indicators
        self.candles_stored = Counter(
            PREFIX + "candles_stored",
            "Candles stored in PostgreSQL and cached and announced in Redis (new or changed), by timeframe",
            ["tf"],
            registry=self.registry,
        )
        self.close_to_stored = Histogram(
            PREFIX + "close_to_stored_seconds",
            "From a closing kline's arrival to its bar being in PostgreSQL and Redis (announced), by timeframe",
            ["tf"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.close_to_indicators = Histogram(
            PREFIX + "close_to_indicators_ready_seconds",
            "From a closing kline's arrival to its bar's indicators announced on indicators_ready_stream",
            ["tf"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._stored_count = {tf: self.candles_stored.labels(tf) for tf in TIMEFRAMES}
        self._stored_hist = {tf: self.close_to_stored.labels(tf) for tf in TIMEFRAMES}
        self._ready_hist = {tf: self.close_to_indicators.labels(tf) for tf in TIMEFRAMES}
        self._stored_waits: dict[str, list[float]] = {tf: [] for tf in TIMEFRAMES}
        self._ready_waits: dict[str, list[float]] = {tf: [] for tf in TIMEFRAMES}
        # (tf, symbol, bar end ms) -> arrival (monotonic s), one table per stage.
        self.stored_arrivals: dict[tuple[str, str, int], float] = {}
        self.ready_arrivals: dict[tuple[str, str, int], float] = {}
        # (tf, symbol) -> the newest bar end stored this run (seeded from PostgreSQL).
        self.newest_stored: dict[tuple[str, str], int] = {}

    # ---- hooks (synchronous, cheap: ~1 µs a bar; the histograms are fed by `flush`)

    def close_received(self, symbol: str, open_time: int) -> None:
        now = time.monotonic()
        end = open_time + M1_MS
        stored, ready = self.stored_arrivals, self.ready_arrivals if self.time_indicators else None
        for tf in _ending(end):
            key = (tf, symbol, end)
            if key not in stored:
                stored[key] = now
            if ready is not None and key not in ready:
                ready[key] = now

    def candles_published(self, batches: Iterable[tuple[str, Sequence[Any]]]) -> None:
        now = time.monotonic()
        arrivals, newest = self.stored_arrivals, self.newest_stored
        for tf, candles in batches:
            if tf not in self._stored_count or not candles:
                continue
            self._stored_count[tf].inc(len(candles))
            waits, span = self._stored_waits[tf], TF_MS[tf]
            for candle in candles:
                end = candle.open_time + span
                key = (tf, candle.symbol)
                if newest.get(key, 0) < end:
                    newest[key] = end
                if arrivals and (arrived := arrivals.pop((tf, candle.symbol, end), None)) is not None:
                    waits.append(now - arrived)

    def indicators_ready(self, announced: Iterable[tuple[str, str, int]]) -> None:
        arrivals = self.ready_arrivals
        if not arrivals:
            return
        now = time.monotonic()
        for symbol, tf, open_time in announced:
            span = TF_MS.get(tf)
            if span and (arrived := arrivals.pop((tf, symbol, open_time + span), None)) is not None:
                self._ready_waits[tf].append(now - arrived)

    def flush(self) -> None:
        """Move the latencies the hooks noted into the histograms (at every scrape and
        every few seconds: off the boundary's path, where observing costs ~2 µs each)."""
        for waits, hists in ((self._stored_waits, self._stored_hist), (self._ready_waits, self._ready_hist)):
            for tf, noted in waits.items():
                if noted:
                    taken, waits[tf] = noted, []
                    hist = hists[tf]
                    for seconds in taken[-WAITS_MAX:]:
                        hist.observe(seconds)

    def prune(self, max_age_s: float = ARRIVAL_MAX_AGE_S) -> None:
        """Forget arrivals never matched (called every few seconds by the poller)."""
        self.flush()
        horizon = time.monotonic() - max_age_s
        for table in (self.stored_arrivals, self.ready_arrivals):
            if len(table) > ARRIVALS_MAX:
                table.clear()
            else:
                for key in [k for k, t in table.items() if t < horizon]:
                    del table[key]


# --------------------------------------------------------------------------- scrape-time values


@dataclass
class StreamInfo:
    length: int | None = None
    groups: dict[str, tuple[int, int | None]] = field(default_factory=dict)  # group -> (pending, lag)


@dataclass
class Snapshot:
    """Everything read from the workers' state at scrape time (plain values)."""

    exchange_time_ms: int = 0  # the exchange's clock as the feed tracks it; 0: none yet
    followed_symbols: int = 0
    lag_s: dict[str, float] = field(default_factory=dict)  # tf -> worst followed symbol's lag
    behind: dict[str, int] = field(default_factory=dict)  # tf -> followed symbols more than a bar late
    gaps_open: int | None = None
    gaps_detected: int = 0
    frames: int = 0
    bad_frames: int = 0
    closes: int = 0
    reconnects: dict[str, int] = field(default_factory=dict)  # route -> count
    connections: dict[str, int] = field(default_factory=dict)  # route -> open now
    rest_weight_used: int = 0
    rest_weight_limit: int = 0
    rest_weight_total: int = 0
    rest_blocked_s: float = 0.0
    streams: dict[str, StreamInfo] = field(default_factory=dict)
    worker_restarts: dict[str, int] = field(default_factory=dict)
    workers_running: int = 0
    held: dict[str, int] = field(default_factory=dict)  # buffer -> items
    outages: dict[tuple[str, str], bool] = field(default_factory=dict)  # (module, server) -> active
    indicator_bars: int | None = None
    indicator_values_persisted: int | None = None
    poll_errors: int = 0


def candle_lag(
    newest: Mapping[tuple[str, str], int], symbols: Iterable[str], now_ms: int, grace_ms: int = 0
) -> tuple[dict[str, float], dict[str, int]]:
    """Per timeframe: seconds from the newest stored bar end of the worst followed symbol
    to `now_ms`, and how many followed symbols are more than one bar + `grace_ms` late.
    A symbol with nothing stored yet is left out (its catch-up is under way)."""
    lag: dict[str, float] = {}
    behind: dict[str, int] = {}
    symbols = list(symbols)
    for tf in TIMEFRAMES:
        ends = [end for s in symbols if (end := newest.get((tf, s))) is not None]
        if not ends:
            continue
        lag[tf] = max(0.0, (now_ms - min(ends)) / 1000)
        limit = now_ms - TF_MS[tf] - grace_ms
        behind[tf] = sum(end < limit for end in ends)
    return lag, behind


def snapshot_families(snap: Snapshot) -> list[Metric]:
    """The scrape-time metric families, from a snapshot (pure)."""
    out: list[Metric] = []

    def gauge(name: str, doc: str, value: float | None = None, labels: Sequence[str] = ()) -> GaugeMetricFamily:
        family = GaugeMetricFamily(PREFIX + name, doc, value=value, labels=labels or None)
        out.append(family)
        return family

    def counter(name: str, doc: str, value: float | None = None, labels: Sequence[str] = ()) -> CounterMetricFamily:
        family = CounterMetricFamily(PREFIX + name, doc, value=value, labels=labels or None)
        out.append(family)
        return family

    if snap.exchange_time_ms:
        gauge(
            "exchange_time_seconds",
            "The exchange's clock as the feed tracks it (newest event time)",
            snap.exchange_time_ms / 1000,
        )
    gauge("followed_symbols", "Symbols the feed follows", snap.followed_symbols)
    lag = gauge(
        "candle_lag_seconds",
        "Exchange time minus the newest stored bar end of the worst followed symbol, by timeframe "
        "(up to one bar plus the delivery delay is normal)",
        labels=["tf"],
    )
    behind = gauge("symbols_behind", "Followed symbols whose newest stored bar is over one bar late", labels=["tf"])
    for tf in TIMEFRAMES:
        if tf in snap.lag_s:
            lag.add_metric([tf], snap.lag_s[tf])
            behind.add_metric([tf], snap.behind.get(tf, 0))
    if snap.gaps_open is not None:
        gauge("gaps_open", "Rows of missing_m1_log_v4 still 'missing' (polled every 15 s)", snap.gaps_open)
    counter("gaps_detected", "Missing minutes the feed found (gap-log rows it opened)", snap.gaps_detected)
    counter("ws_frames", "WebSocket frames received on the market route", snap.frames)
    counter("ws_bad_frames", "WebSocket frames skipped as malformed or implausible", snap.bad_frames)
    counter("closes_received", "Closing klines received over the WebSocket", snap.closes)
    reconnects = counter("ws_reconnects", "WebSocket connections lost and reopened, by route", labels=["route"])
    connections = gauge("ws_connections", "WebSocket connections open now, by route", labels=["route"])
    for route in sorted(snap.reconnects):
        reconnects.add_metric([route], snap.reconnects[route])
        connections.add_metric([route], snap.connections.get(route, 0))
    gauge("rest_weight_used", "REST request weight spent in the limiter's sliding window", snap.rest_weight_used)
    gauge("rest_weight_limit", "REST request weight allowed per window (REST_WEIGHT_LIMIT)", snap.rest_weight_limit)
    counter("rest_weight", "REST request weight spent since start", snap.rest_weight_total)
    gauge("rest_blocked_seconds", "Seconds REST requests still wait on a 429/418 Retry-After", snap.rest_blocked_s)
    length = gauge("stream_length", "Entries in each Redis stream the daemon writes or reads", labels=["stream"])
    pending = gauge(
        "stream_pending", "Entries delivered to a consumer group and not acknowledged", labels=["stream", "group"]
    )
    lagging = gauge("stream_lag", "Entries not yet delivered to a consumer group", labels=["stream", "group"])
    for stream in sorted(snap.streams):
        info = snap.streams[stream]
        if info.length is not None:
            length.add_metric([stream], info.length)
        for group in sorted(info.groups):
            group_pending, group_lag = info.groups[group]
            pending.add_metric([stream, group], group_pending)
            if group_lag is not None:
                lagging.add_metric([stream, group], group_lag)
    restarts = counter("worker_restarts", "Crashes of a worker restarted by run_safe_loop", labels=["worker"])
    for worker in sorted(snap.worker_restarts):
        restarts.add_metric([worker], snap.worker_restarts[worker])
    gauge("workers_running", "Worker tasks of the daemon not finished", snap.workers_running)
    held = gauge("held_items", "Items held in memory waiting for a server or a worker, by buffer", labels=["buffer"])
    for buffer in sorted(snap.held):
        held.add_metric([buffer], snap.held[buffer])
    outage = gauge("outage", "1 while a worker holds its writes for a server that is away", labels=["module", "server"])
    for (module, server), active in sorted(snap.outages.items()):
        outage.add_metric([module, server], 1.0 if active else 0.0)
    if snap.indicator_bars is not None:
        counter("indicator_bars", "Bars the indicator worker computed", snap.indicator_bars)
    if snap.indicator_values_persisted is not None:
        counter("indicator_values_persisted", "Indicator values written to PostgreSQL", snap.indicator_values_persisted)
    counter(
        "metrics_poll_errors", "Failed polls of Redis streams or the gap log by the metrics poller", snap.poll_errors
    )
    return out


class SnapshotCollector(Collector):
    """Calls `take` at every scrape (in the event loop: the endpoint is served there)."""

    def __init__(self, take: Any) -> None:
        self.take = take

    def collect(self) -> Iterable[Metric]:
        return snapshot_families(self.take())


def exported_names(registry: CollectorRegistry) -> set[str]:
    """Every sample name the registry produces (histogram and counter suffixes included)."""
    return {sample.name for family in registry.collect() for sample in family.samples}
