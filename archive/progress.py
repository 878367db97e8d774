"""Progress of an import: files, rows, MB, MB/s and ETA. A tqdm bar on a terminal, else
an INFO line every LOG_INTERVAL_S (`PROGRESS` chooses, as for the REST history)."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import IO, Any

from ops.progress import LOG_INTERVAL_S, format_seconds, resolve_mode


class ImportProgress:
    def __init__(
        self,
        files_total: int,
        logger: logging.Logger,
        mode: str = "auto",
        stream: IO[str] | None = None,
        clock: Callable[[], float] = time.monotonic,
        interval_s: float = LOG_INTERVAL_S,
    ) -> None:
        self.files_total, self.logger, self.clock, self.interval_s = files_total, logger, clock, interval_s
        self.stream = sys.stderr if stream is None else stream
        self.mode = resolve_mode(mode, self.stream)
        self.started = self._last_line = clock()
        self.files = self.rows = self.size = 0
        self._bar: Any = None

    @property
    def elapsed_s(self) -> float:
        return self.clock() - self.started

    def eta_s(self) -> float | None:
        if not self.files or self.files >= self.files_total:
            return None if not self.files else 0.0
        return self.elapsed_s / self.files * (self.files_total - self.files)

    def line(self) -> str:
        elapsed = max(self.elapsed_s, 1e-9)
        return (
            f"{self.files}/{self.files_total} files, {self.rows:,} rows, {self.size / 1e6:.1f} MB "
            f"({self.size / 1e6 / elapsed:.1f} MB/s, {self.rows / elapsed:,.0f} rows/s), "
            f"ETA {format_seconds(self.eta_s())}"
        )

    def file_done(self, rows: int, size: int) -> None:
        self.files += 1
        self.rows += rows
        self.size += size
        if self.mode == "bar":
            if self._bar is None:
                from tqdm import tqdm

                self._bar = tqdm(total=self.files_total, desc="import", unit="file", file=self.stream, leave=True)
            self._bar.n = self.files
            self._bar.set_postfix_str(f"{self.rows:,} rows, {self.size / 1e6:.1f} MB", refresh=False)
            self._bar.refresh()
        elif self.mode == "log" and self.clock() - self._last_line >= self.interval_s:
            self._last_line = self.clock()
            self.logger.info("import: %s", self.line())

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
