"""ops/progress.py: the pure accounting (totals, done, rate, ETA) and its rendering
(log lines every few seconds and a summary, a tqdm bar on a terminal, PROGRESS)."""

from __future__ import annotations

import io
import logging

import pytest

from infra import ConfigError
from ops.progress import REPORT_MIN_MINUTES, Progress, ProgressReporter, format_seconds, progress_mode, resolve_mode


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_totals_done_rate_and_eta():
    clock = Clock()
    job = Progress(clock)
    job.expect("BTCUSDT", 3000)
    job.expect("ETHUSDT", 1000)
    assert (job.symbols_total, job.symbols_done, job.minutes_total, job.minutes_done) == (2, 0, 4000, 0)
    assert job.rate is None and job.eta_s is None
    clock.t += 2
    job.advance("ETHUSDT", 1000)
    assert (job.symbols_done, job.minutes_done, job.percent) == (1, 1000, 25.0)
    assert job.rate == 500.0 and job.eta_s == 6.0
    job.set_remaining("BTCUSDT", 1500)  # counted anew: the total follows
    assert job.minutes_total == 2500
    job.add_weight(10)
    clock.t += 3
    job.advance("BTCUSDT", 1500)
    assert (job.symbols_done, job.eta_s, job.elapsed_s) == (2, 0.0, 5.0)
    assert job.line() == "2/2 symbols done, 2,500/2,500 minutes (100%), REST weight 10, 500 min/s, ETA 0s"
    assert job.summary() == "2 symbols, 2,500 minutes, REST weight 10, 5.0s"


def test_the_rate_follows_the_recent_pace():
    clock = Clock()
    job = Progress(clock)
    job.expect("A", 100_000)
    for _ in range(60):  # fast for a minute
        clock.t += 1
        job.advance("A", 1000)
    for _ in range(40):  # then slow
        clock.t += 1
        job.advance("A", 10)
    assert job.rate is not None and job.rate < 20  # the last 30 s, not the average
    assert job.minutes_done == 60_400


def test_progress_mode_and_auto():
    assert progress_mode({}) == "auto" and progress_mode({"PROGRESS": " Bar "}) == "bar"
    with pytest.raises(ConfigError, match="PROGRESS='lots' is not one of auto, bar, log, off"):
        progress_mode({"PROGRESS": "lots"})

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert resolve_mode("auto", Tty()) == "bar" and resolve_mode("auto", io.StringIO()) == "log"
    assert resolve_mode("off", Tty()) == "off"
    assert [format_seconds(s) for s in (None, 5, 65, 7300)] == ["?", "5s", "1m05s", "2h01m"]


def _reporter(mode: str, clock: Clock, stream=None) -> tuple[ProgressReporter, list[str]]:
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logger = logging.getLogger(f"test_progress_{mode}_{id(lines)}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(Keep())
    total = iter(range(0, 10**9, 7))
    return ProgressReporter("job", logger, mode, stream or io.StringIO(), clock, weight=lambda: next(total)), lines


def test_log_lines_every_interval_and_one_summary():
    clock = Clock()
    reporter, lines = _reporter("log", clock)
    reporter.progress().expect("A", 6000)
    reporter.update()
    for _ in range(12):
        clock.t += 1
        reporter.progress().advance("A", 500)
        reporter.update()
    assert len(lines) == 3  # at the start, then every 5 s: not one per update
    assert lines[0].startswith("job: 0/1 symbols done, 0/6,000 minutes (0%), REST weight ")
    summary = reporter.finish()
    assert summary is not None and summary.startswith("job done: 1 symbols, 6,000 minutes, REST weight ")
    assert summary.endswith(", 12.0s") and lines[-1] == summary
    assert not reporter.active and reporter.finish() is None


def test_a_small_quick_job_stays_silent_and_off_is_off():
    clock = Clock()
    reporter, lines = _reporter("log", clock)
    reporter.progress().expect("A", REPORT_MIN_MINUTES - 1)
    reporter.update()
    reporter.progress().advance("A", REPORT_MIN_MINUTES - 1)
    reporter.update()
    reporter.finish()
    assert lines == []  # a live minute repaired: no line at all
    reporter, lines = _reporter("off", clock)
    reporter.progress().expect("A", 10_000)
    reporter.update()
    assert reporter.finish() is not None and lines == []


def test_bar_mode_draws_a_tqdm_bar_and_logs_the_summary():
    clock = Clock()
    stream = io.StringIO()
    reporter, lines = _reporter("bar", clock, stream)
    reporter.progress().expect("A", 3000)
    reporter.update()
    clock.t += 1
    reporter.progress().advance("A", 1500)
    reporter.update()
    reporter.finish()
    drawn = stream.getvalue()
    assert "job" in drawn and "1500/3000" in drawn and "0/1 symbols" in drawn
    assert len(lines) == 1 and lines[0].startswith("job done: 1 symbols, 1,500 minutes")
