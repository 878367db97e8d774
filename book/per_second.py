"""A symbol's features for each second (`features_1s_v4`), from that second's bars. Pure.

- `microprice`: the weighted mid of the second's last best quote (the book ticker's; the
  depth book's when the symbol takes depth only);
- `i1`, `i10`: depth imbalance over the best 1 and 10 levels (the depth bar's; `i1`
  from the book ticker's sizes without depth, `i10` then None);
- `ofi`: level-1 OFI over the second (the book ticker's, else the depth bar's), in
  quantity;
- `volume_imbalance`: (V^buy − V^sell)/(V^buy + V^sell) of the second's trades;
- `vpin`, `vpin_bulk`: VPIN after the second's trades, exact and bulk (book/vpin.py);
- `log_return`: ln(microprice / the previous second's microprice) (None for the first);
- `volatility`: the sample standard deviation of the last `window` one-second log
  returns (seconds without a quote have no return and are skipped), not annualised;
  None until two returns.

A second with no bar of any kind has no features row.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from book.features import depth_imbalance, weighted_mid
from book.seconds import DepthSecond, TickerSecond, TradeSecond
from book.vpin import Vpin
from orderflow.fold import UNIT


@dataclass(frozen=True, slots=True)
class Features:
    ts: int
    microprice: float | None
    i1: float | None
    i10: float | None
    ofi: float | None
    volume_imbalance: float | None
    vpin: float | None
    vpin_bulk: float | None
    volatility: float | None
    log_return: float | None


@dataclass
class FeatureState:
    """What carries from one second to the next: the last microprice, the returns'
    window, VPIN's buckets (fed the trades as they come, `vpin.add`)."""

    vpin: Vpin
    window: int = 60
    last_microprice: float | None = None
    returns: deque[float] = field(default_factory=deque)

    def __post_init__(self) -> None:
        self.returns = deque(self.returns, maxlen=self.window)

    def second(
        self,
        ts: int,
        trades: TradeSecond | None,
        ticker: TickerSecond | None,
        depth: DepthSecond | None,
        depth_quote: tuple[int, int, int, int] | None = None,
    ) -> Features | None:
        """`depth_quote`: the depth book's best (bid, qty, ask, qty) at the second's end,
        for a symbol without book ticker."""
        if trades is None and ticker is None and depth is None:
            return None
        if ticker is not None:
            microprice: float | None = ticker.microprice_close()
            ofi: float | None = ticker.ofi / UNIT
            i1 = depth_imbalance(
                [(ticker.bid_close, ticker.bid_qty_close)], [(ticker.ask_close, ticker.ask_qty_close)], 1
            )
        else:
            microprice = weighted_mid(depth_quote) if depth_quote is not None else None
            ofi = depth.ofi_l1 / UNIT if depth is not None else None
            i1 = None
        if depth is not None:
            i1 = depth.imbalance_1
        log_return = None
        if microprice is not None:
            if self.last_microprice is not None:
                log_return = math.log(microprice / self.last_microprice)
                self.returns.append(log_return)
            self.last_microprice = microprice
        volume_imbalance = None
        if trades is not None and trades.volume:
            volume_imbalance = (trades.buy_volume - trades.sell_volume) / trades.volume
        return Features(
            ts,
            microprice,
            i1,
            depth.imbalance_10 if depth is not None else None,
            ofi,
            volume_imbalance,
            self.vpin.exact(),
            self.vpin.bulk(),
            _sample_std(self.returns),
            log_return,
        )


def _sample_std(values: deque[float]) -> float | None:
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
