"""One symbol's aggTrades, put in `a` order and folded into M1 bars, each bar declared
final (or to be refetched) on the exchange's own check-sums. Pure, on event time.

Why hand-written: the rules are Binance's. `a` is contiguous per symbol, so a jump is a
gap and a smaller id a duplicate; ids follow trade time, so once a trade of a later
minute is folded (or the trade carrying the closing kline's last trade id `L`), every
trade of the minute is in, and its volume, taker buy volume and trade count must equal
the kline's. A bar that misses any of that is refetched, never written as final.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from candles import Candle
from orderflow.fold import AggTrade, BarFlow, to_units

M1_MS = 60_000


@dataclass(frozen=True, slots=True)
class KlineCheck:
    """What the closing kline says of its minute's trades (units). The trade ids come
    with the WebSocket close only (REST klines have none)."""

    open_time: int
    volume: int
    taker_buy_volume: int
    trades: int
    first_trade_id: int | None = None
    last_trade_id: int | None = None

    @classmethod
    def of(cls, candle: Candle, first_trade_id: int = -1, last_trade_id: int = -1) -> KlineCheck:
        """From a candle (the exchange's decimals) and, for a WebSocket close, its `f`/`L`
        (-1: none)."""
        return cls(
            candle.open_time,
            to_units(str(candle.volume)),
            to_units(str(candle.taker_buy_volume)),
            candle.trades,
            first_trade_id if first_trade_id >= 0 else None,
            last_trade_id if last_trade_id >= 0 else None,
        )


@dataclass(frozen=True, slots=True)
class Outcome:
    open_time: int
    status: Literal["final", "refetch"]
    bar: BarFlow | None  # the final bar; None for a refetch
    reason: str = ""


def verify(bar: BarFlow, check: KlineCheck) -> str:
    """Why the bar is not its kline's minute, or '' when it is."""
    if check.trades == 0:
        return "" if bar.agg_trades == 0 else f"{bar.agg_trades} aggTrades in a minute the kline says had none"
    if check.first_trade_id is not None and bar.first_trade_id != check.first_trade_id:
        return f"first trade {bar.first_trade_id}, the kline's {check.first_trade_id}"
    if check.last_trade_id is not None and bar.last_trade_id != check.last_trade_id:
        return f"last trade {bar.last_trade_id}, the kline's {check.last_trade_id}"
    if (bar.volume, bar.buy, bar.trades) != (check.volume, check.taker_buy_volume, check.trades):
        return (
            f"volume {bar.volume}, taker buy {bar.buy}, {bar.trades} trades; the kline's "
            f"{check.volume}, {check.taker_buy_volume}, {check.trades} (units of 1e-8)"
        )
    return ""


@dataclass
class Tape:
    """Feed it trades (`add`), closing klines (`close`) and the passing event time
    (`tick`); take the finished minutes from `outcomes`."""

    row_size: Callable[[int, int | None], int]  # the M1 row of a minute (per UTC day), given its first price
    hold_max: int = 10_000  # trades held ahead of a missing id, past which the gap is declared
    gap_wait_ms: int = 2_000  # event time a missing id is waited for (a reordered trade)
    close_wait_ms: int = 10_000  # event time a closed kline waits for its trades
    next_id: int | None = None  # the `a` expected next; None until the first trade
    newest_minute: int | None = None  # of the newest trade folded
    last_trade_id: int | None = None  # `l` of the newest trade folded
    bars: dict[int, BarFlow] = field(default_factory=dict)  # open minutes
    broken: set[int] = field(default_factory=set)  # open minutes known to miss trades
    held: dict[int, AggTrade] = field(default_factory=dict)
    held_since: int | None = None  # event time of the first trade held
    closes: dict[int, tuple[KlineCheck, int]] = field(default_factory=dict)  # minute -> (check, seen at)
    outcomes: list[Outcome] = field(default_factory=list)
    duplicates: int = 0
    gaps: list[tuple[int, int]] = field(default_factory=list)  # (first, last) missing `a`
    resumed: bool = False

    def add(self, trade: AggTrade) -> None:
        expected = self.next_id
        if expected is not None and trade.agg_id != expected:
            if trade.agg_id < expected or trade.agg_id in self.held:
                self.duplicates += 1
                return
            if self.resumed:  # after a reconnect the jump is a gap for sure: no wait
                self.resumed = False
                self._skip_gap(trade)
            else:
                self.held[trade.agg_id] = trade
                if self.held_since is None:
                    self.held_since = trade.time_ms
                if len(self.held) > self.hold_max:
                    self._skip_gap()
                return
        self.resumed = False
        self._fold(trade)
        self._drain_held()

    def close(self, check: KlineCheck, now_ms: int) -> None:
        self.closes[check.open_time] = (check, now_ms)
        self._finalise_due()

    def tick(self, now_ms: int) -> None:
        if self.held_since is not None and now_ms - self.held_since > self.gap_wait_ms:
            self._skip_gap()
        for minute, (_, seen_at) in sorted(self.closes.items()):
            if now_ms - seen_at > self.close_wait_ms:
                del self.closes[minute]
                self._refetch(minute, f"its trades were not all in {self.close_wait_ms} ms after its close")

    def resume(self) -> None:
        """The connection was replaced: a jump in `a` now is trades missed, not reordered."""
        self.resumed = True

    # ----------------------------------------------------------------- inside

    def _fold(self, trade: AggTrade) -> None:
        minute = trade.time_ms - trade.time_ms % M1_MS
        bar = self.bars.get(minute)
        if bar is None:
            bar = self.bars[minute] = BarFlow(minute, self.row_size(minute, trade.price))
        bar.add(trade)
        self.next_id = trade.agg_id + 1
        self.last_trade_id = trade.last_trade_id
        if self.newest_minute is None or minute > self.newest_minute:
            self.newest_minute = minute
        if self.closes:
            self._finalise_due()

    def _drain_held(self) -> None:
        while self.held and self.next_id in self.held:
            self._fold(self.held.pop(self.next_id))  # type: ignore[arg-type]
        if not self.held:
            self.held_since = None

    def _skip_gap(self, first_after: AggTrade | None = None) -> None:
        """Declare the ids before the first held (or `first_after`) missing; every minute
        they could belong to is broken."""
        if first_after is not None:
            self.held[first_after.agg_id] = first_after
        resume_at = min(self.held)
        after = self.held[resume_at]
        self.gaps.append((self.next_id, resume_at - 1))  # type: ignore[arg-type]
        start = self.newest_minute if self.newest_minute is not None else after.time_ms - after.time_ms % M1_MS
        end = after.time_ms - after.time_ms % M1_MS
        self.broken.update(range(start, end + M1_MS, M1_MS))
        self.next_id = resume_at
        self.held_since = None
        self._drain_held()

    def _complete(self, check: KlineCheck) -> bool:
        """Every trade of the minute is folded: the one with the kline's last trade id,
        or one of a later minute."""
        if self.newest_minute is not None and self.newest_minute > check.open_time:
            return True
        return (
            check.last_trade_id is not None
            and self.last_trade_id is not None
            and self.last_trade_id >= check.last_trade_id
        ) or check.trades == 0

    def _finalise_due(self) -> None:
        for minute in sorted(self.closes):
            check, _ = self.closes[minute]
            if not self._complete(check):
                continue
            del self.closes[minute]
            bar = self.bars.pop(minute, None) or BarFlow(minute, self.row_size(minute, None))
            problem = "a gap in the aggTrade ids" if minute in self.broken else verify(bar, check)
            if problem:
                self._refetch(minute, problem)
            else:
                self.outcomes.append(Outcome(minute, "final", bar))

    def _refetch(self, minute: int, reason: str) -> None:
        self.bars.pop(minute, None)
        self.broken.discard(minute)
        self.outcomes.append(Outcome(minute, "refetch", None, reason))

    def drop_before(self, minute: int) -> list[int]:
        """Forget open minutes before `minute` (no close came for them: the candle
        pipeline backfills the kline, and the order flow refetches them); returns them."""
        stale = sorted(m for m in self.bars if m < minute)
        for m in stale:
            del self.bars[m]
            self.broken.discard(m)
        return stale
