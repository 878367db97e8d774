"""The exchange's clock as the feed knows it: pure, no I/O.

Everything time-based in the feed (gaps, overdue closes, completeness) runs on the
exchange's event time, so one frame with a time far ahead (microseconds instead of
milliseconds, a corrupted field) would make every symbol look minutes or years
behind. The clock therefore only moves forward on event times within `tolerance_ms`
of what it already trusts; `/fapi/v1/time` is the authority that re-anchors it, in
either direction. Frames the clock cannot judge are held by the feed until it has
asked the exchange.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ExchangeClock:
    tolerance_ms: int = 3_600_000
    now_ms: int = 0  # the newest trusted exchange time
    synced: bool = False  # anchored by the exchange's /fapi/v1/time at least once

    def plausible(self, event_ms: int) -> bool:
        """May the feed act on an event stamped `event_ms`? (0: the frame has no time.)"""
        return event_ms == 0 or (self.synced and event_ms <= self.now_ms + self.tolerance_ms)

    def advance(self, event_ms: int) -> None:
        if event_ms > self.now_ms:
            self.now_ms = event_ms

    def sync(self, server_ms: int) -> None:
        """The exchange's own time. Event times trusted beyond it by more than the
        tolerance were wrong after all: the clock goes back to the exchange's."""
        if not self.synced or server_ms > self.now_ms or self.now_ms > server_ms + self.tolerance_ms:
            self.now_ms = server_ms
        self.synced = True
