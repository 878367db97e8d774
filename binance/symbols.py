"""Which rows of `tickers` the feed can follow: symbol names and the exchange's listing.

Pure. A ticker is followed only when its name is valid and (once the listing is
known) the exchange lists it as TRADING; anything else would cost a gap row every
minute, REST weight and, for a bad name, the whole combined-stream connection.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from binance.protocol import valid_symbol
from orderflow.fold import to_units

TRADING = "TRADING"


@dataclass(frozen=True, slots=True)
class Listing:
    status: str  # TRADING, PENDING_TRADING, SETTLING, CLOSE, ...
    contract_type: str  # PERPETUAL, CURRENT_QUARTER, ...
    tick: int | None = None  # PRICE_FILTER's tickSize in units of 1e-8 (None: not given)


def tick_units(filters: Any) -> int | None:
    """The PRICE_FILTER's tickSize in units of 1e-8; None if absent or not a plain decimal."""
    for item in filters if isinstance(filters, list) else ():
        if isinstance(item, dict) and item.get("filterType") == "PRICE_FILTER":
            try:
                tick = to_units(str(item.get("tickSize")))
            except ValueError:
                return None
            return tick or None
    return None


def parse_listing(payload: Any) -> dict[str, Listing]:
    """`GET /fapi/v1/exchangeInfo` → symbol → listing; malformed entries are left out."""
    symbols = payload.get("symbols") if isinstance(payload, dict) else None
    if not isinstance(symbols, list):
        raise ValueError("exchangeInfo without a 'symbols' list")
    out: dict[str, Listing] = {}
    for item in symbols:
        if isinstance(item, dict) and isinstance(item.get("symbol"), str) and isinstance(item.get("status"), str):
            contract = item.get("contractType")
            contract = contract if isinstance(contract, str) else ""
            out[item["symbol"]] = Listing(item["status"], contract, tick_units(item.get("filters")))
    return out


_CCXT_STYLE = re.compile(r"^([A-Z0-9]+)/([A-Z0-9]+)(?::[A-Z0-9]+)?$")


def suggestion(symbol: str, known: Iterable[str]) -> str | None:
    """The listed name the user most likely meant: `btcusdt`, `BTC/USDT:USDT`, `BTCUSTD`."""
    known = list(known)
    candidates = [symbol.strip().upper()]
    if match := _CCXT_STYLE.match(candidates[0]):
        candidates.insert(0, match.group(1) + match.group(2))
    listed = set(known)
    for candidate in candidates:
        if candidate in listed and candidate != symbol:
            return candidate
    close = difflib.get_close_matches(candidates[-1], known, n=1, cutoff=0.8)
    return close[0] if close and close[0] != symbol else None


def ticker_problem(symbol: str, listing: Mapping[str, Listing] | None) -> str | None:
    """Why the feed cannot follow `symbol` (None: it can). Without a listing only the
    name is judged."""
    if not valid_symbol(symbol):
        hint = suggestion(symbol, listing or {}) if listing else None
        if hint is None and valid_symbol(symbol.strip().upper()):
            hint = symbol.strip().upper()
        return f"not a valid symbol name{f' (did you mean {hint}?)' if hint else ''}"
    if listing is None:
        return None
    listed = listing.get(symbol)
    if listed is None:
        hint = suggestion(symbol, listing)
        return f"not listed by the exchange{f' (did you mean {hint}?)' if hint else ''}"
    if listed.status != TRADING:
        return f"not trading on the exchange (status {listed.status})"
    return None


class TickerFilter:
    """The enabled tickers the feed follows, judged against the exchange's listing
    (fetched by the feed, refreshed every `refresh_s`, sooner for a ticker it does not
    know). Until a listing arrives, names alone are judged: a REST outage at boot
    never holds the feed up."""

    RETRY_S = 60.0  # a failed or too-recent fetch is not repeated sooner

    def __init__(self, refresh_s: float) -> None:
        self.refresh_s = refresh_s
        self.listing: dict[str, Listing] | None = None
        self.fetched_at = float("-inf")
        self.attempted_at = float("-inf")
        self.refused_symbols: set[str] = set()  # -1121 from REST since the last listing
        self.recorded: dict[str, str] = {}  # the problems last written to `tickers`

    def due(self, enabled: Iterable[str], now: float) -> bool:
        if now - self.attempted_at < self.RETRY_S:
            return False
        if self.listing is None or now - self.fetched_at >= self.refresh_s:
            return True
        return any(s not in self.listing for s in enabled if valid_symbol(s))

    def attempted(self, now: float) -> None:
        self.attempted_at = now

    def update(self, listing: dict[str, Listing], now: float) -> None:
        self.listing, self.fetched_at = listing, now
        self.refused_symbols.clear()

    def refused(self, symbol: str) -> None:
        self.refused_symbols.add(symbol)

    def split(self, enabled: Iterable[str]) -> tuple[set[str], dict[str, str]]:
        """(the tickers to follow, {ticker not followed: why})."""
        followed: set[str] = set()
        problems: dict[str, str] = {}
        for symbol in enabled:
            problem = ticker_problem(symbol, self.listing)
            if problem is None and symbol in self.refused_symbols:
                problem = "refused by the exchange's REST API (-1121 Invalid symbol)"
            if problem is None:
                followed.add(symbol)
            else:
                problems[symbol] = problem
        return followed, problems
