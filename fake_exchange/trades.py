"""Made-up aggTrades that reproduce a kline exactly: the first trade at the open, the last
at the close, the high and the low printed, the volume and the taker buy volume summed
to the unit, the trade count and the kline's first/last trade ids. Pure and
deterministic (the same candle and seed give the same trades, live or over REST).

Prices keep the kline's decimals (its tick) and quantities the volume's (its step);
each aggTrade carries at least one trade and one step of quantity, as real ones do.
"""

from __future__ import annotations

import bisect
import random
import zlib
from collections.abc import Callable, Sequence
from decimal import Decimal

from candles import Candle

from .frames import MINUTE_MS, first_trade_id

TRADES_PER_AGG = 3  # about how many exchange trades one aggTrade carries here


class Unreproducible(ValueError):
    """A kline no list of trades can produce (e.g. four prices from one trade)."""


def _decimals(values: Sequence[Decimal]) -> int:
    return max(max(0, -v.as_tuple().exponent) for v in values)  # type: ignore[operator]


def _text(units: int, decimals: int) -> str:
    whole, frac = divmod(units, 10**decimals)
    return f"{whole}.{frac:0{decimals}d}" if decimals else str(whole)


def _interior_prices(candle: Candle) -> int:
    """How many prices besides the open and the close must be printed (the high, the
    low, where neither the open nor the close is one)."""
    ends = {candle.open, candle.close}
    return len({candle.high, candle.low} - ends)


def agg_count(candle: Candle, per_agg: int = TRADES_PER_AGG) -> int:
    """How many aggTrades the minute gets: about one per `per_agg` trades, at least
    enough for its prices and its two sides, at most one per trade and per step."""
    n = candle.trades
    if n == 0 or candle.volume == 0:
        return 0
    if n == 1:
        return 1
    wanted = max(2 + _interior_prices(candle), -(-n // per_agg))
    steps = int(candle.volume.scaleb(_decimals([candle.volume, candle.taker_buy_volume])))
    return min(wanted, n, steps)


def _split(total: int, parts: int, rng: random.Random) -> list[int]:
    """`total` as `parts` positive integers."""
    if parts == 0:
        return []
    cuts = sorted(rng.sample(range(1, total), parts - 1))
    return [b - a for a, b in zip([0, *cuts], [*cuts, total])]


def synthesize(
    candle: Candle, first_agg_id: int, first_trade_id: int, seed: int = 0, per_agg: int = TRADES_PER_AGG
) -> list[dict]:
    """The minute's aggTrades as REST rows (`a`, `p`, `q`, `f`, `l`, `T`, `m`), oldest
    first; ids from `first_agg_id` and `first_trade_id` on."""
    k = agg_count(candle, per_agg)
    if k == 0:
        return []
    rng = random.Random(zlib.crc32(f"{candle.symbol} {candle.open_time} {seed}".encode()))
    pd = _decimals([candle.open, candle.high, candle.low, candle.close])
    qd = _decimals([candle.volume, candle.taker_buy_volume])
    o, h, lo, c = (int(x.scaleb(pd)) for x in (candle.open, candle.high, candle.low, candle.close))
    volume, bought = int(candle.volume.scaleb(qd)), int(candle.taker_buy_volume.scaleb(qd))
    interior = [p for p in dict.fromkeys((h, lo)) if p not in (o, c)]
    if (k == 1 and len({o, h, lo, c}) > 1) or (k > 1 and k < 2 + len(interior)):
        raise Unreproducible(f"{candle.symbol} {candle.open_time}: {candle.trades} trades for its prices")
    if k == 1:
        prices = [o]
    else:
        middle = [rng.randint(lo, h) for _ in range(k - 2)]
        for price, at in zip(interior, rng.sample(range(k - 2), len(interior))):
            middle[at] = price
        prices = [o, *middle, c]
    # Sides: as many buying aggTrades as the taker buy share suggests, each side at least
    # one step of quantity per aggTrade.
    if bought == 0:
        buys = 0
    elif bought == volume:
        buys = k
    else:
        buys = min(max(1, round(k * bought / volume)), k - 1, bought)
        buys = max(buys, k - (volume - bought))
        if not 0 < buys < k or buys > bought:
            raise Unreproducible(f"{candle.symbol} {candle.open_time}: both sides in {k} aggTrades")
    buying = set(rng.sample(range(k), buys))
    buy_quantities = iter(_split(bought, buys, rng))
    sell_quantities = iter(_split(volume - bought, k - buys, rng))
    trade_counts = _split(candle.trades, k, rng)
    out = []
    trade_id = first_trade_id
    for j in range(k):
        taker_bought = j in buying
        quantity = next(buy_quantities) if taker_bought else next(sell_quantities)
        count = trade_counts[j]
        out.append(
            {
                "a": first_agg_id + j,
                "p": _text(prices[j], pd),
                "q": _text(quantity, qd),
                "f": trade_id,
                "l": trade_id + count - 1,
                "T": candle.open_time + 1 + j * (MINUTE_MS - 2) // k,
                "m": not taker_bought,
            }
        )
        trade_id += count
    return out


class TradeBook:
    """Every symbol's made-up aggTrades, minute by minute, with ids contiguous across
    minutes (an agg id base per minute: the aggTrades of all the minutes before it)."""

    def __init__(
        self,
        candle: Callable[[str, int], Candle | None],
        first_open_time: int,
        seed: int = 0,
        per_agg: int = TRADES_PER_AGG,
    ) -> None:
        self._candle = candle
        self._first = first_open_time
        self._seed = seed
        self.per_agg = per_agg
        self._bases: dict[str, list[int]] = {}  # symbol -> agg id base of each minute from the first
        self._cache: dict[tuple[str, int], list[dict]] = {}

    def base(self, symbol: str, minute: int) -> int:
        """The agg id of the minute's first aggTrade (1 for the source's first minute)."""
        bases = self._bases.setdefault(symbol, [1])
        index = (minute - self._first) // MINUTE_MS
        while len(bases) <= index:
            t = self._first + (len(bases) - 1) * MINUTE_MS
            candle = self._candle(symbol, t)
            bases.append(bases[-1] + (agg_count(candle, self.per_agg) if candle is not None else 0))
        return bases[index]

    def minute(self, symbol: str, minute: int) -> list[dict]:
        """The minute's aggTrades as REST rows, oldest first (none before the source)."""
        if minute < self._first:
            return []
        key = (symbol, minute)
        rows = self._cache.get(key)
        if rows is None:
            candle = self._candle(symbol, minute)
            rows = (
                []
                if candle is None
                else synthesize(
                    candle, self.base(symbol, minute), first_trade_id(symbol, minute), self._seed, self.per_agg
                )
            )
            if len(self._cache) > 20_000:
                self._cache.clear()
            self._cache[key] = rows
        return rows

    def trade_ids(self, symbol: str, minute: int) -> tuple[int, int] | None:
        """The minute's first and last exchange trade id as its kline carries them (None:
        the kline makes them up the same way)."""
        return None

    def minute_of_id(self, symbol: str, agg_id: int, newest_minute: int) -> int | None:
        """The minute whose aggTrades hold `agg_id` (None: beyond `newest_minute`)."""
        if agg_id >= self.base(symbol, newest_minute + MINUTE_MS):
            return None
        bases = self._bases[symbol]
        index = max(0, bisect.bisect_right(bases, agg_id) - 1)
        return self._first + index * MINUTE_MS
