"""A final bar as readers get it: the PostgreSQL record, the Redis hash, the footprint
document, and the running CVD. Pure."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from candles import DAY_MS, datetime_to_ms, ms_to_datetime
from orderflow.fold import BarFlow, units_text
from orderflow.profile import ImbalanceRules, Profile, profile


@dataclass
class CvdChain:
    """One series' cumulative delta (units): `cvd` runs from the series' first bar on,
    `cvd_day` restarts at 00:00 UTC. Bars are chained in order (a bar waits for the ones
    before it, as candles do), so the same trades always give the same values."""

    cvd: int = 0
    cvd_day: int = 0
    day: int | None = None

    @classmethod
    def after(cls, record: Any) -> CvdChain:
        """Going on from a stored bar (a row of orderflow4; None: from nothing)."""
        if record is None:
            return cls()
        open_time = datetime_to_ms(record["open_time"])
        return cls(int(record["cvd"]), int(record["cvd_day"]), open_time - open_time % DAY_MS)

    def chain(self, open_time: int, delta: int) -> tuple[int, int]:
        day = open_time - open_time % DAY_MS
        if day != self.day:
            self.day, self.cvd_day = day, 0
        self.cvd += delta
        self.cvd_day += delta
        return self.cvd, self.cvd_day


@dataclass(frozen=True)
class FinalBar:
    symbol: str
    tf: str
    bar: BarFlow
    cvd: int
    cvd_day: int
    profile: Profile | None

    @classmethod
    def of(
        cls, symbol: str, tf: str, bar: BarFlow, chain: CvdChain, rules: ImbalanceRules, percent: int = 70
    ) -> FinalBar:
        cvd, cvd_day = chain.chain(bar.open_time, bar.delta)
        return cls(symbol, tf, bar, cvd, cvd_day, profile(bar.footprint(), rules, percent))

    def record(self) -> tuple[Any, ...]:
        """Columns of `orderflow4`, in the order of `ORDERFLOW_COLUMNS`."""
        bar, p = self.bar, self.profile
        indices = sorted(bar.rows)
        cells = [bar.rows[i] for i in indices]
        bids, asks, bid_trades, ask_trades = (list(column) for column in zip(*cells)) if cells else ([], [], [], [])
        return (
            self.symbol,
            self.tf,
            ms_to_datetime(bar.open_time),
            bar.buy,
            bar.sell,
            bar.delta_min or 0,
            bar.delta_max or 0,
            self.cvd,
            self.cvd_day,
            bar.agg_trades,
            bar.trades,
            bar.buy_trades,
            bar.sell_trades,
            bar.vwap(),
            bar.max_qty,
            bar.row_size,
            p.poc if p else None,
            p.vah if p else None,
            p.val if p else None,
            bar.first_agg_id,
            bar.last_agg_id,
            indices,
            bids,
            asks,
            bid_trades,
            ask_trades,
            bar.notional,
            bar.high,
            bar.low,
            bar.first_trade_id,
            bar.last_trade_id,
        )

    def fields(self) -> dict[str, str]:
        """The Redis hash `orderflow:<SYMBOL>:<tf>`: decimal text, names as in `orderflow_v4`."""
        bar, p = self.bar, self.profile
        out = {
            "open_time": str(bar.open_time),
            "buy_volume": units_text(bar.buy),
            "sell_volume": units_text(bar.sell),
            "delta": units_text(bar.delta),
            "delta_min": units_text(bar.delta_min or 0),
            "delta_max": units_text(bar.delta_max or 0),
            "cvd": units_text(self.cvd),
            "cvd_day": units_text(self.cvd_day),
            "agg_trades": str(bar.agg_trades),
            "trades": str(bar.trades),
            "buy_trades": str(bar.buy_trades),
            "sell_trades": str(bar.sell_trades),
            "vwap": str(bar.vwap() or ""),
            "max_trade_qty": units_text(bar.max_qty),
            "row_size": units_text(bar.row_size),
            "first_agg_id": "" if bar.first_agg_id is None else str(bar.first_agg_id),
            "last_agg_id": "" if bar.last_agg_id is None else str(bar.last_agg_id),
        }
        for name in ("poc", "vah", "val"):
            out[name] = units_text(getattr(p, name) * bar.row_size) if p else ""
        return out


def footprint_document(bar: BarFlow, p: Profile | None, text: Callable[[int], str] = units_text) -> dict[str, Any]:
    """`text` writes a value in units as decimal text (the read API passes a memoised
    `units_text`: prices and sizes repeat from bar to bar)."""
    size = bar.row_size
    document: dict[str, Any] = {
        "open_time": bar.open_time,
        "row_size": text(size),
        "rows": [
            {
                "price": text(index * size),
                "bid_volume": text(bid),
                "ask_volume": text(ask),
                "bid_trades": bid_trades,
                "ask_trades": ask_trades,
            }
            for index, bid, ask, bid_trades, ask_trades in bar.footprint()
        ],
    }
    return document if p is None else document | profile_fields(size, p, text)


def profile_fields(size: int, p: Profile, text: Callable[[int], str] = units_text) -> dict[str, Any]:
    """The footprint document's profile part (rows given by their low price)."""

    def price(index: int) -> str:
        return text(index * size)

    return {
        "poc": price(p.poc),
        "vah": price(p.vah),
        "val": price(p.val),
        "imbalances": {"buy": [price(i) for i in p.buy_imbalances], "sell": [price(i) for i in p.sell_imbalances]},
        "stacked": {
            "buy": [[price(a), price(b)] for a, b in p.stacked_buy],
            "sell": [[price(a), price(b)] for a, b in p.stacked_sell],
        },
        "unfinished": {"high": p.unfinished_high, "low": p.unfinished_low},
    }
