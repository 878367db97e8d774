"""M1 → M5/M15 (→ H1 → H4 → D1) aggregation and M1 gap detection: pure, no I/O.

Everything runs on the exchange's event time, so a replay at any speed behaves like
a live day.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field

from candles import TF_MS, TIMEFRAMES, Candle, bucket_start

M1_MS = TF_MS["m1"]
AGGREGATED_TFS = TIMEFRAMES[1:]  # built by this deployment: M5, M15 and the higher ones asked for
# What each timeframe is built from. Exact either way (sums of exact decimals, the first
# open, the last close); a higher bucket from its few parts keeps the intake's memory
# small (a D1 from minutes would hold 1,440 candles per symbol).
SOURCE_TF: dict[str, str] = {"m5": "m1", "m15": "m1", "h1": "m15", "h4": "h1", "d1": "h4"}
LEVEL: dict[str, int] = {"m1": 0, "m5": 1, "m15": 1, "h1": 2, "h4": 3, "d1": 4}  # a source's level is lower


def aggregate(tf: str, bucket_open: int, parts: Sequence[Candle]) -> Candle:
    """Exact aggregate of one bucket's parts (M1 candles, or the buckets of its source
    timeframe; given oldest first). One pass over the parts (a quarter hour builds 1,000
    buckets on the way to their announcement: a pass per field took four times as long)."""
    if not parts:
        raise ValueError("a bucket needs at least one candle")
    first = parts[0]
    high, low, volume, quote_volume = first.high, first.low, first.volume, first.quote_volume
    trades, taker_buy_volume, taker_buy_quote_volume = (
        first.trades,
        first.taker_buy_volume,
        first.taker_buy_quote_volume,
    )
    minutes = first.m1_count or 1
    for candle in parts[1:]:
        if candle.high > high:
            high = candle.high
        if candle.low < low:
            low = candle.low
        volume += candle.volume
        quote_volume += candle.quote_volume
        trades += candle.trades
        taker_buy_volume += candle.taker_buy_volume
        taker_buy_quote_volume += candle.taker_buy_quote_volume
        minutes += candle.m1_count or 1
    return Candle(
        first.symbol,
        tf,
        bucket_open,
        first.open,
        high,
        low,
        parts[-1].close,
        volume,
        quote_volume,
        trades,
        taker_buy_volume,
        taker_buy_quote_volume,
        minutes,
    )


def bucket_minutes(tf: str, bucket_open: int) -> range:
    return range(bucket_open, bucket_open + TF_MS[tf], M1_MS)


def bucket_parts(tf: str, bucket_open: int) -> range:
    """Open times of the source candles a bucket is built from."""
    return range(bucket_open, bucket_open + TF_MS[tf], TF_MS[SOURCE_TF[tf]])


def affected_buckets(
    m1_keys: Iterable[tuple[str, int]], tfs: Sequence[str] = AGGREGATED_TFS
) -> set[tuple[str, str, int]]:
    """(symbol, tf, bucket open) of every bucket of `tfs` that holds one of these minutes."""
    return {(symbol, tf, bucket_start(open_time, tf)) for symbol, open_time in m1_keys for tf in tfs}


def buildable(tf: str, bucket_open: int, present: set[int], unfillable: set[int]) -> bool:
    """A bucket is built once each of its parts is stored, or is made only of minutes
    known unfillable (`present`: open times of parts; `unfillable`: of minutes).

    A bucket with a merely missing minute waits for the backfill (its part is not built
    yet either); one made only of unfillable minutes has nothing to build from.
    """
    source = SOURCE_TF[tf]
    return bool(present) and all(
        part in present or all(m in unfillable for m in bucket_minutes(source, part))
        for part in bucket_parts(tf, bucket_open)
    )


@dataclass
class GapTracker:
    """Per symbol, the newest minute accounted for (closed, or reported missing).

    `on_close` reports the minutes skipped before a close; `overdue` reports minutes
    whose close has not come within `grace_ms` of event time, judged by the newest
    event time seen on any stream (never by the local clock).
    """

    grace_ms: int = 10_000
    newest: dict[str, int] = field(default_factory=dict)

    def seed(self, symbol: str, last_open_time: int) -> None:
        self.newest[symbol] = max(self.newest.get(symbol, last_open_time), last_open_time)

    def forget(self, symbol: str) -> None:
        self.newest.pop(symbol, None)

    def on_close(self, symbol: str, open_time: int) -> list[int]:
        newest = self.newest.get(symbol)
        if newest is None or open_time <= newest:
            if newest is None:
                self.newest[symbol] = open_time
            return []
        self.newest[symbol] = open_time
        return list(range(newest + M1_MS, open_time, M1_MS))

    def overdue(self, event_now_ms: int, max_minutes: int = 1440) -> dict[str, list[int]]:
        """Minutes m with m + 1 min + grace < now whose close never came."""
        last_due = (event_now_ms - M1_MS - self.grace_ms - 1) // M1_MS * M1_MS
        found: dict[str, list[int]] = {}
        for symbol, newest in self.newest.items():
            if last_due > newest:
                start = max(newest + M1_MS, last_due - (max_minutes - 1) * M1_MS)
                found[symbol] = list(range(start, last_due + M1_MS, M1_MS))
                self.newest[symbol] = last_due
        return found


PARENT_TF = {source: tf for tf, source in SOURCE_TF.items() if source != "m1"}


class RecentCandles:
    """The candles stored lately, from which the buckets they complete are built in
    memory (no read of PostgreSQL on the way to the announcement): each symbol's M1 of
    this and the previous M15 bucket, and the stored buckets higher ones are built from
    (M15 for H1, H1 for H4, H4 for D1) of this and the previous higher bucket."""

    RECENT_M1_KEPT = 45  # per symbol, past which the minutes before the previous M15 bucket go

    def __init__(self, aggregated: Sequence[str]) -> None:
        self.aggregated = tuple(aggregated)  # lower timeframes first
        self.m1: dict[str, dict[int, Candle]] = {}
        self.newest: dict[str, int] = {}  # the newest minute remembered, per symbol
        self.parts: dict[tuple[str, str], dict[int, Candle]] = {}
        self.part_tfs = {SOURCE_TF[tf] for tf in self.aggregated} - {"m1"}

    def remember(self, candles: Sequence[Candle]) -> None:
        """Each symbol's minutes are pruned as it grows, not all symbols' at the quarter
        hour (where they all grew at once, on the way to the announcements)."""
        for c in candles:
            minutes = self.m1.get(c.symbol)
            if minutes is None:
                minutes = self.m1[c.symbol] = {}
            minutes[c.open_time] = c
            if c.open_time > self.newest.get(c.symbol, -1):
                self.newest[c.symbol] = c.open_time
            if len(minutes) > self.RECENT_M1_KEPT:
                horizon = bucket_start(max(minutes), "m15") - TF_MS["m15"]
                for t in [t for t in minutes if t < horizon]:
                    del minutes[t]

    def forget_m1(self, candle: Candle) -> None:
        """A minute PostgreSQL refused: never part of a bucket built from memory."""
        self.m1.get(candle.symbol, {}).pop(candle.open_time, None)

    def completed_buckets(self, m1: Iterable[Candle]) -> list[Candle]:
        """The buckets these minutes end, when memory holds all their parts (a higher
        bucket's last part is built here too, lower timeframes first)."""
        built: dict[tuple[str, str, int], Candle] = {}
        for candle in m1:
            end = candle.open_time + M1_MS
            for tf in self.aggregated:
                if end % TF_MS[tf]:
                    continue
                key = (candle.symbol, tf, end - TF_MS[tf])
                if key not in built and (members := self.parts_in_memory(key, built)) is not None:
                    built[key] = aggregate(tf, key[2], members)
        return list(built.values())

    def parts_in_memory(
        self, bucket: tuple[str, str, int], built: dict[tuple[str, str, int], Candle]
    ) -> list[Candle] | None:
        """A bucket's parts if memory (or this batch's `built`) holds them all."""
        symbol, tf, start = bucket
        source = SOURCE_TF[tf]
        if source == "m1":
            minutes = self.m1.get(symbol, {})
            parts = [minutes.get(t) for t in bucket_minutes(tf, start)]
        else:
            stored = self.parts.get((symbol, source), {})
            parts = [built.get((symbol, source, t)) or stored.get(t) for t in bucket_parts(tf, start)]
        return parts if all(parts) else None  # type: ignore[return-value]

    def may_end(self, bucket: tuple[str, str, int]) -> bool:
        """False for a higher bucket (H1 and up) still forming: the symbol's newest stored
        minute is before its last, so building it would only find parts missing. M5/M15
        are always tried (a bucket whose last minute is unfillable ends without one)."""
        symbol, tf, start = bucket
        newest = self.newest.get(symbol)
        return LEVEL[tf] < 2 or newest is None or start + TF_MS[tf] <= newest + M1_MS

    def remember_parts(self, built: Iterable[Candle], refused: Collection[Candle] = ()) -> None:
        """Keep the stored buckets higher ones are built from, pruned as each series grows."""
        if not self.part_tfs:
            return
        rejected = {(c.symbol, c.tf, c.open_time) for c in refused}
        for c in built:
            if c.tf in self.part_tfs and (c.symbol, c.tf, c.open_time) not in rejected:
                parts = self.parts.setdefault((c.symbol, c.tf), {})
                parts[c.open_time] = c
                parent = PARENT_TF[c.tf]
                if len(parts) > 2 * TF_MS[parent] // TF_MS[c.tf]:
                    horizon = bucket_start(max(parts), parent) - TF_MS[parent]
                    for t in [t for t in parts if t < horizon]:
                        del parts[t]
