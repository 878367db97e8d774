"""One symbol's final M1 order flow, published in minute order as M1, M5 and M15 bars
(and the H1, H4 and D1 that TIMEFRAMES builds). Pure.

A minute is published only after every minute before it (as candles are): its CVD is
the sum of the deltas before it, so a minute refetched late holds back the ones after
it rather than leaving them with a wrong CVD. A minute that cannot be filled (older
than the exchange serves) is skipped: no row, the CVD carries on, and the M5/M15 bars
around it are not written (they would be wrong). An M5/M15 bar is the merge of its M1
bars, so it is written when its last minute is published; a chain that starts inside a
bucket (the first minute ever followed) skips that bucket.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from aggregation import SOURCE_TF
from candles import TF_MS, TIMEFRAMES, bucket_start
from orderflow.fold import BarFlow, merge, merge_into
from orderflow.output import CvdChain, FinalBar
from orderflow.profile import ImbalanceRules
from orderflow.rows import TF_ROW_MULTIPLE

M1_MS = 60_000
HIGHER = TIMEFRAMES[1:]  # the merged timeframes: M5, M15 and the higher ones built here
ORDERFLOW_TIMEFRAMES = ("m1", *HIGHER)


def _sources(tf: str) -> tuple[str, ...]:
    """The timeframes `tf` is built from, down to M1 (D1: H4, H1, M15, M1)."""
    chain = []
    while tf in SOURCE_TF:
        tf = SOURCE_TF[tf]
        chain.append(tf)
    return tuple(chain)


# What a forming bucket is resumed from after a restart, the coarsest that fits first
# (stored bars are whole): a forming D1 at 23:59 is 5 H4, 3 H1, 3 M15 and 14 M1 bars
# read back, not 1,439 M1.
PARTS_OF: dict[str, tuple[str, ...]] = {tf: _sources(tf) for tf in SOURCE_TF}


@dataclass
class Bucket:
    """The published minutes of a forming M5/M15 bar, merged as they come (so that the
    forming bar, refreshed every 250 ms, is one merge away); `merged` is the bucket's own,
    grown in place."""

    tf: str
    start: int
    minutes: int = 0
    whole: bool = True  # no minute of it unfillable
    merged: BarFlow | None = None

    def add(self, bar: BarFlow | None, part_tf: str = "m1") -> None:
        """A published minute (None: unfillable), or a stored whole bar of `part_tf`."""
        self.minutes += TF_MS[part_tf] // M1_MS
        if bar is None:
            self.whole = False
            return
        if self.merged is None:
            m1_row = bar.row_size // TF_ROW_MULTIPLE[part_tf]
            self.merged = merge(self.start, m1_row * TF_ROW_MULTIPLE[self.tf], [bar])
        else:
            merge_into(self.merged, bar)

    def complete(self) -> bool:
        return self.whole and self.minutes == TF_MS[self.tf] // M1_MS


@dataclass
class SymbolChain:
    symbol: str
    rules: ImbalanceRules = field(default_factory=ImbalanceRules)
    next_minute: int | None = None  # the first minute not published; None until one is offered
    waiting: dict[int, BarFlow | None] = field(default_factory=dict)  # None: unfillable
    higher: tuple[str, ...] = HIGHER
    cvd: dict[str, CvdChain] = field(default_factory=dict)
    buckets: dict[str, Bucket | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for tf in ("m1", *self.higher):
            self.cvd.setdefault(tf, CvdChain())
        for tf in self.higher:
            self.buckets.setdefault(tf, None)

    def start(self, minute: int) -> None:
        """The first minute of a chain with nothing published: the minutes after it wait
        for it (without a start, the chain starts at the first minute offered)."""
        if self.next_minute is None:
            self.next_minute = minute

    def resume(
        self,
        next_minute: int,
        cvd: dict[str, CvdChain],
        parts: dict[str, list[tuple[str, BarFlow]] | None],
        left_out: Mapping[str, list[tuple[int, list[tuple[str, BarFlow]]]]] | None = None,
    ) -> list[FinalBar]:
        """After a restart: the minute after the newest published, the series' CVD at
        their newest bars, and the stored bars the forming buckets are made of so far
        (`forming_parts`; None: that bucket is not whole and will not be written).
        Returns the bars of the buckets the previous run left out (`left_out_buckets`),
        chained before any minute after."""
        self.next_minute = next_minute
        self.cvd.update(cvd)
        out: list[FinalBar] = []
        for tf in self.higher:
            for start, bars in (left_out or {}).get(tf, ()):
                bucket = Bucket(tf, start)
                for part_tf, bar in bars:
                    bucket.add(bar, part_tf)
                if bucket.merged is not None:  # (whole: left_out_buckets gives no other)
                    out.append(FinalBar.of(self.symbol, tf, bucket.merged, self.cvd[tf], self.rules))
        for tf, bars in parts.items():
            bucket = self.buckets[tf] = Bucket(tf, bucket_start(next_minute, tf)) if bars is not None else None
            for part_tf, bar in bars or ():
                bucket.add(bar, part_tf)  # type: ignore[union-attr]
        return out

    def skip_to(self, minute: int) -> None:
        """Every minute before `minute` is unfillable (a long outage): none is written,
        the CVD carries on, and the buckets they touch are not written."""
        if self.next_minute is not None and self.next_minute < minute:
            self.next_minute = minute
            self.waiting = {m: b for m, b in self.waiting.items() if m >= minute}
            self.buckets = dict.fromkeys(self.higher)

    def offer(self, minute: int, bar: BarFlow | None) -> list[FinalBar]:
        """A final minute (None: unfillable); returns the bars now published."""
        if self.next_minute is None:
            self.next_minute = minute
        if minute < self.next_minute:
            return []  # published already (a repeat)
        self.waiting[minute] = bar
        out: list[FinalBar] = []
        while self.next_minute in self.waiting:
            minute = self.next_minute
            bar = self.waiting.pop(minute)
            if bar is not None:
                out.append(FinalBar.of(self.symbol, "m1", bar, self.cvd["m1"], self.rules))
            for tf in self.higher:
                merged = self._bucket(tf, minute, bar)
                if merged is not None:
                    out.append(FinalBar.of(self.symbol, tf, merged, self.cvd[tf], self.rules))
            self.next_minute = minute + M1_MS
        return out

    def _bucket(self, tf: str, minute: int, bar: BarFlow | None) -> BarFlow | None:
        start = bucket_start(minute, tf)
        if minute == start:
            self.buckets[tf] = Bucket(tf, start)
        bucket = self.buckets[tf]
        if bucket is None or bucket.start != start:
            return None  # the chain started inside this bucket
        bucket.add(bar)
        if minute != start + TF_MS[tf] - M1_MS:
            return None
        self.buckets[tf] = None
        return bucket.merged if bucket.complete() else None  # not written with a minute unfillable

    def forming(self, tf: str, minute_bar: BarFlow) -> BarFlow:
        """The forming M5/M15 bar: the published minutes of its bucket and the forming one."""
        start = bucket_start(minute_bar.open_time, tf)
        bucket = self.buckets[tf]
        bars = [minute_bar]
        if bucket is not None and bucket.start == start and bucket.merged is not None:
            bars.insert(0, bucket.merged)
        return merge(start, minute_bar.row_size * TF_ROW_MULTIPLE[tf], bars)


def forming_parts(
    tf: str, next_minute: int, stored: Mapping[tuple[str, int], BarFlow], start: int | None = None
) -> list[tuple[str, BarFlow]] | None:
    """The stored (tf, open time) bars a forming bucket of `tf` is made of before
    `next_minute`, the coarsest stored that fit first. None when one is missing: a minute of it
    was unfillable, or the chain began inside it; the bucket will not be written.
    `start`: the bucket's, when not the one `next_minute` is in."""
    time, parts = bucket_start(next_minute, tf) if start is None else start, []
    while time < next_minute:
        fits = [p for p in PARTS_OF[tf] if time % TF_MS[p] == 0 and time + TF_MS[p] <= next_minute]
        part_tf = next((p for p in fits if (p, time) in stored), None)  # (an M5 left out: its minutes)
        if part_tf is None:
            return None
        parts.append((part_tf, stored[(part_tf, time)]))
        time += TF_MS[part_tf]
    return parts


def left_out_buckets(
    tf: str, next_minute: int, newest: int | None, stored: Mapping[tuple[str, int], BarFlow], since: int
) -> list[tuple[int, list[tuple[str, BarFlow]]]]:
    """(start, stored parts) of each whole `tf` bucket from `since` that ended by
    `next_minute` after the series' newest stored bar (`newest`, its open time). The
    writer sends a boundary's M1 bars before its buckets (orderflow/intake.py): a process
    that lost the symbol between the two leaves those buckets out, and the next owner's,
    chained from the bar before them, would miss their deltas in the CVD. A bucket that
    is not whole (an unfillable minute, a chain begun inside it) was never written."""
    tf_ms = TF_MS[tf]
    first = since if newest is None else max(since, newest + tf_ms)
    first = bucket_start(first + tf_ms - 1, tf)  # the first bucket that starts there or after
    found = []
    for start in range(first, bucket_start(next_minute, tf), tf_ms):
        parts = forming_parts(tf, start + tf_ms, stored, start)
        if parts is not None:
            found.append((start, parts))
    return found


# How far back a resumed chain looks for buckets left out: far more than the writer's
# M1 bars ever run ahead of their buckets, a bound on what a gain reads back.
LEFT_OUT_LOOKBACK_MS = 2 * 3_600_000


def read_back_from(last: int, newest: Mapping[str, int], higher: tuple[str, ...] = HIGHER) -> int:
    """Where the stored bars a chain resumed after minute `last` needs begin: the highest
    bucket `last` is in (forming, or ended with it), or the bucket after a timeframe's
    newest stored bar (`newest`: tf -> open time) if that is earlier. The writer sends
    the M1 bars waiting before any bucket (orderflow/intake.py), so under load a bucket
    can be left out with minutes of the next quarter hour written after it (a timeframe
    with no stored bar yet: any of its buckets)."""
    earliest = last - LEFT_OUT_LOOKBACK_MS
    after = [t + TF_MS[tf] if (t := newest.get(tf)) is not None else earliest for tf in higher]
    return min(bucket_start(last, higher[-1]), max(min(after), earliest))
