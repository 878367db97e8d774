"""Progress of long REST work (a first history download, a catch-up, a gap backfill).

`Progress` is the pure accounting: per symbol the minutes still to fetch and those
fetched, the REST weight spent, the rate and the ETA, on a clock it is given.
`ProgressReporter` shows it: a tqdm bar when stderr is a terminal, otherwise an INFO
line through the logger every few seconds, and one summary line at the end (symbols,
minutes, weight, seconds). `PROGRESS` chooses: `auto` (default: bar on a terminal, log
lines otherwise), `bar`, `log`, `off`. Short jobs (a live minute repaired) show nothing:
no line per minute or per request.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import IO, Any

from infra import ConfigError, format_duration

MODES = ("auto", "bar", "log", "off")
LOG_INTERVAL_S = 5.0
RATE_WINDOW_S = 30.0  # the rate (and so the ETA) is measured over the last this many seconds
REPORT_MIN_MINUTES = 60  # a job smaller than this (and over within LOG_INTERVAL_S) stays silent


def progress_mode(env: Mapping[str, str] | None = None) -> str:
    """PROGRESS from the environment, checked: auto (default), bar, log or off."""
    env = os.environ if env is None else env
    raw = env.get("PROGRESS", "").strip().lower() or "auto"
    if raw not in MODES:
        raise ConfigError(f"PROGRESS={env.get('PROGRESS')!r} is not one of {', '.join(MODES)}")
    return raw


def resolve_mode(mode: str, stream: IO[str] | None) -> str:
    """`auto` as `bar` when `stream` is a terminal, else `log`."""
    if mode != "auto":
        return mode
    isatty = getattr(stream, "isatty", None)
    try:
        return "bar" if isatty is not None and isatty() else "log"
    except ValueError:  # a closed stream
        return "log"


def format_seconds(seconds: float | None) -> str:
    """An ETA: `?` while unknown, else as `status` shows durations."""
    return "?" if seconds is None else format_duration(round(seconds))


class Progress:
    """The accounting of one job: pure (no I/O), on the clock it is given."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.started = clock()
        self.remaining: dict[str, int] = {}  # symbol -> minutes still to fetch (as last known)
        self.fetched: dict[str, int] = {}  # symbol -> minutes fetched in this job
        self.weight = 0  # REST weight spent in this job
        self.samples: deque[tuple[float, int]] = deque([(self.started, 0)])

    # ---- input

    def expect(self, symbol: str, minutes: int) -> None:
        """`minutes` more to fetch for `symbol`."""
        self.remaining[symbol] = self.remaining.get(symbol, 0) + max(0, minutes)
        self.fetched.setdefault(symbol, 0)

    def set_remaining(self, symbol: str, minutes: int) -> None:
        """What is left for `symbol`, as counted anew (e.g. the gap log's open rows)."""
        self.remaining[symbol] = max(0, minutes)
        self.fetched.setdefault(symbol, 0)

    def advance(self, symbol: str, minutes: int) -> None:
        """`minutes` of `symbol` fetched."""
        self.fetched[symbol] = self.fetched.get(symbol, 0) + minutes
        self.remaining[symbol] = max(0, self.remaining.get(symbol, 0) - minutes)
        now = self.clock()
        self.samples.append((now, self.minutes_done))
        while len(self.samples) > 2 and now - self.samples[1][0] >= RATE_WINDOW_S:
            self.samples.popleft()

    def add_weight(self, weight: int) -> None:
        self.weight += max(0, weight)

    # ---- figures

    @property
    def symbols_total(self) -> int:
        return len(self.fetched)

    @property
    def symbols_done(self) -> int:
        return sum(1 for symbol in self.fetched if self.remaining.get(symbol, 0) == 0)

    @property
    def minutes_done(self) -> int:
        return sum(self.fetched.values())

    @property
    def minutes_total(self) -> int:
        return self.minutes_done + sum(self.remaining.values())

    @property
    def elapsed_s(self) -> float:
        return max(0.0, self.clock() - self.started)

    @property
    def rate(self) -> float | None:
        """Minutes fetched per second over the last RATE_WINDOW_S; None before any."""
        (t0, done0), (t1, done1) = self.samples[0], self.samples[-1]
        if done1 <= done0 or t1 <= t0:
            return None
        return (done1 - done0) / (t1 - t0)

    @property
    def eta_s(self) -> float | None:
        left = self.minutes_total - self.minutes_done
        if left <= 0:
            return 0.0
        rate = self.rate
        return None if rate is None else left / rate

    @property
    def percent(self) -> float:
        total = self.minutes_total
        return 100.0 if total == 0 else 100.0 * self.minutes_done / total

    def line(self) -> str:
        rate = self.rate
        return (
            f"{self.symbols_done}/{self.symbols_total} symbols done, "
            f"{self.minutes_done:,}/{self.minutes_total:,} minutes ({self.percent:.0f}%), "
            f"REST weight {self.weight:,}, "
            f"{'-' if rate is None else f'{rate:,.0f}'} min/s, ETA {format_seconds(self.eta_s)}"
        )

    def summary(self) -> str:
        return (
            f"{self.symbols_total} symbols, {self.minutes_done:,} minutes, "
            f"REST weight {self.weight:,}, {self.elapsed_s:.1f}s"
        )


class ProgressReporter:
    """Shows a job's `Progress`: a tqdm bar (`bar`), an INFO line every LOG_INTERVAL_S
    (`log`), or nothing (`off`); a summary line at the end in `bar` and `log` modes. A
    job stays silent until it is worth showing: at least REPORT_MIN_MINUTES to fetch,
    or running for LOG_INTERVAL_S."""

    def __init__(
        self,
        label: str,
        logger: logging.Logger,
        mode: str = "auto",
        stream: IO[str] | None = None,
        clock: Callable[[], float] = time.monotonic,
        interval_s: float = LOG_INTERVAL_S,
        weight: Callable[[], int | None] | None = None,
    ) -> None:
        self.label, self.logger, self.clock, self.interval_s = label, logger, clock, interval_s
        self.stream = sys.stderr if stream is None else stream
        self.mode = resolve_mode(mode, self.stream)
        self.weight_source = weight
        self.job: Progress | None = None
        self._weight_at_start: int | None = None
        self._shown = False
        self._last_line = 0.0
        self._bar: Any = None

    # ---- the job

    def progress(self) -> Progress:
        """The current job, started on first use."""
        if self.job is None:
            self.job = Progress(self.clock)
            self._weight_at_start = self._weight_now()
            self._shown = False
            self._last_line = self.clock()
        return self.job

    @property
    def active(self) -> bool:
        return self.job is not None

    def _weight_now(self) -> int | None:
        if self.weight_source is None:
            return None
        try:
            return self.weight_source()
        except Exception:  # an observer never breaks the work
            return None

    def _sync_weight(self) -> None:
        """The limiter's count when it keeps one, else what the caller added."""
        now = self._weight_now()
        if self.job is not None and now is not None and self._weight_at_start is not None:
            self.job.weight = max(self.job.weight, now - self._weight_at_start)

    def _worth_showing(self, job: Progress) -> bool:
        return job.minutes_total >= REPORT_MIN_MINUTES or job.elapsed_s >= self.interval_s

    def update(self) -> None:
        """After the job changed: redraw the bar, or log a line if one is due."""
        job = self.job
        if job is None or self.mode == "off":
            return
        self._sync_weight()
        if not self._shown:
            if not self._worth_showing(job):
                return
            self._shown = True
            if self.mode == "bar":
                self._open_bar(job)
            else:
                self._log_line(job)
                return
        if self.mode == "bar":
            self._draw_bar(job)
        elif self.clock() - self._last_line >= self.interval_s:
            self._log_line(job)

    def finish(self) -> str | None:
        """The job is over: the summary line (returned, and logged when the job was
        worth showing); the next update starts a new job."""
        job = self.job
        if job is None:
            return None
        self._sync_weight()
        if self._bar is not None:
            self._draw_bar(job)
            self._bar.close()
            self._bar = None
        self.job = None
        text = f"{self.label} done: {job.summary()}"
        if self.mode != "off" and (self._shown or self._worth_showing(job)):
            self.logger.info(text)
        return text

    # ---- rendering

    def _log_line(self, job: Progress) -> None:
        self._last_line = self.clock()
        self.logger.info("%s: %s", self.label, job.line())

    def _open_bar(self, job: Progress) -> None:
        from tqdm import tqdm

        self._bar = tqdm(
            total=job.minutes_total, desc=self.label, unit="min", file=self.stream, dynamic_ncols=True, leave=True
        )
        self._draw_bar(job)

    def _draw_bar(self, job: Progress) -> None:
        bar = self._bar
        if bar is None:
            return
        bar.total = job.minutes_total
        bar.n = job.minutes_done
        bar.set_postfix_str(
            f"{job.symbols_done}/{job.symbols_total} symbols, weight {job.weight:,}, ETA {format_seconds(job.eta_s)}",
            refresh=False,
        )
        bar.refresh()
