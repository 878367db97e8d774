"""Simulated exchange time, so a day of market can be replayed in minutes."""

from __future__ import annotations

import time
from collections.abc import Callable


class SimClock:
    """now_ms() = start_ms + (monotonic() - t0) * speed, with pause, jump and speed changes.

    The real-time base is `time.monotonic()` (the clock asyncio's default loop uses), so the
    clock works before a loop exists. Listeners are told about every change (argument:
    True for a jump, False for a speed change / pause / resume) so the scheduler can wake up
    and re-plan instead of sleeping towards an instant that moved.
    """

    def __init__(self, start_ms: int, speed: float = 1.0) -> None:
        if speed < 0:
            raise ValueError("speed must be >= 0")
        self._anchor_sim = float(start_ms)
        self._anchor_real = time.monotonic()
        self._speed = float(speed)
        self._paused = False
        self._listeners: list[Callable[[bool], None]] = []

    def now_ms(self) -> int:
        if self._paused:
            return int(self._anchor_sim)
        return int(self._anchor_sim + (time.monotonic() - self._anchor_real) * 1000.0 * self._speed)

    @property
    def speed(self) -> float:
        return self._speed

    @property
    def paused(self) -> bool:
        return self._paused

    def add_listener(self, callback: Callable[[bool], None]) -> None:
        self._listeners.append(callback)

    def _reanchor(self, sim_ms: float) -> None:
        self._anchor_sim = sim_ms
        self._anchor_real = time.monotonic()

    def _notify(self, jumped: bool) -> None:
        for callback in list(self._listeners):
            callback(jumped)

    def set_speed(self, speed: float) -> None:
        if speed < 0:
            raise ValueError("speed must be >= 0")
        self._reanchor(self._exact_now())
        self._speed = float(speed)
        self._notify(False)

    def pause(self) -> None:
        if not self._paused:
            self._reanchor(self._exact_now())
            self._paused = True
            self._notify(False)

    def resume(self) -> None:
        if self._paused:
            self._reanchor(self._anchor_sim)
            self._paused = False
            self._notify(False)

    def jump_to(self, sim_ms: int) -> None:
        """Move to `sim_ms` at once. Events in between are not replayed (like a gap in the tape)."""
        self._reanchor(float(sim_ms))
        self._notify(True)

    def advance(self, delta_ms: int) -> None:
        self.jump_to(self.now_ms() + delta_ms)

    def restart(self, sim_ms: int) -> None:
        """Re-anchor at `sim_ms` without telling listeners (used when the exchange starts)."""
        self._reanchor(float(sim_ms))

    def real_seconds_until(self, sim_ms: int) -> float | None:
        """Real seconds until the clock reaches `sim_ms`; None while it stands still."""
        if self._paused or self._speed == 0:
            return None
        return max(0.0, (sim_ms - self._exact_now()) / (1000.0 * self._speed))

    def _exact_now(self) -> float:
        if self._paused:
            return self._anchor_sim
        return self._anchor_sim + (time.monotonic() - self._anchor_real) * 1000.0 * self._speed
