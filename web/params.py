"""The read API's query parameters and WebSocket channels, checked. Pure.

Every parameter a client sends is parsed here into a plain value or refused with a
`BadRequest` whose message says what was wrong and what is accepted; nothing a client
typed reaches SQL except as a bound parameter of a known type.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from candles import TIMEFRAMES

DEFAULT_LIMIT = 500
MAX_LIMIT = 5_000
MAX_FOOTPRINTS = 2_000
MAX_FEATURES = 5_000
MAX_TIME_MS = 32_503_680_000_000  # year 3000
SYMBOL_PATTERN = re.compile(r"[A-Z0-9]{2,30}")  # Binance's contract symbols are ASCII upper-case and digits
CHANNEL_KINDS_TF = ("candles", "indicators", "orderflow", "footprint")
CHANNEL_KINDS_SYMBOL = ("book", "features")


class BadRequest(ValueError):
    """A client's request cannot be answered as asked; the message says why (HTTP 400)."""


@dataclass(frozen=True)
class RangeQuery:
    """`symbol`, `tf`, at most `limit` rows with open time ≤ `end` (None: the newest)."""

    symbol: str
    tf: str
    limit: int
    end: int | None


def symbol_param(query: Mapping[str, str], known: Collection[str]) -> str:
    text = query.get("symbol")
    if not text:
        raise BadRequest("symbol is required (for example symbol=BTCUSDT)")
    symbol = text.strip().upper()
    if not SYMBOL_PATTERN.fullmatch(symbol):
        raise BadRequest(f"symbol {text[:40]!r} is not a Binance USDⓈ-M symbol (letters and digits, e.g. BTCUSDT)")
    if symbol not in known:
        raise BadRequest(f"symbol {symbol} is not an enabled ticker here (GET /api/v1/symbols lists them)")
    return symbol


def tf_param(query: Mapping[str, str], timeframes: Collection[str] = TIMEFRAMES) -> str:
    tf = (query.get("tf") or "m1").strip().lower()
    if tf not in timeframes:
        raise BadRequest(f"tf {tf[:20]!r} is not one of {', '.join(timeframes)}")
    return tf


def int_param(query: Mapping[str, str], name: str, default: int | None, low: int, high: int) -> int | None:
    text = query.get(name)
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        raise BadRequest(f"{name} must be a whole number, got {text[:40]!r}") from None
    if not low <= value <= high:
        raise BadRequest(f"{name} must be between {low} and {high}, got {value}")
    return value


def time_param(query: Mapping[str, str], name: str) -> int | None:
    """A time in ms since the epoch (what every answer gives)."""
    return int_param(query, name, None, 0, MAX_TIME_MS)


def range_query(
    query: Mapping[str, str], known: Collection[str], max_limit: int = MAX_LIMIT, with_tf: bool = True
) -> RangeQuery:
    unknown = set(query) - {"symbol", "limit", "end", *(("tf",) if with_tf else ())}
    if unknown:
        raise BadRequest(f"unknown parameter(s): {', '.join(sorted(unknown))[:200]}")
    return RangeQuery(
        symbol=symbol_param(query, known),
        tf=tf_param(query) if with_tf else "",
        limit=int_param(query, "limit", min(DEFAULT_LIMIT, max_limit), 1, max_limit) or DEFAULT_LIMIT,
        end=time_param(query, "end"),
    )


def channel_param(text: object, known: Collection[str], timeframes: Collection[str] = TIMEFRAMES) -> str:
    """`candles:BTCUSDT:m1` (kinds candles, indicators, orderflow, footprint) or
    `book:BTCUSDT` / `features:BTCUSDT`, normalised."""
    if not isinstance(text, str) or len(text) > 64:
        raise BadRequest("a channel is a string such as 'candles:BTCUSDT:m1' or 'book:BTCUSDT'")
    parts = text.split(":")
    kind = parts[0].lower()
    if kind in CHANNEL_KINDS_TF and len(parts) == 3:
        symbol = symbol_param({"symbol": parts[1]}, known)
        return f"{kind}:{symbol}:{tf_param({'tf': parts[2]}, timeframes)}"
    if kind in CHANNEL_KINDS_SYMBOL and len(parts) == 2:
        return f"{kind}:{symbol_param({'symbol': parts[1]}, known)}"
    raise BadRequest(
        f"channel {text!r}: use <kind>:<SYMBOL>:<tf> for {', '.join(CHANNEL_KINDS_TF)}, "
        f"or <kind>:<SYMBOL> for {', '.join(CHANNEL_KINDS_SYMBOL)}"
    )


def subscription_request(message: object, known: Collection[str], timeframes: Collection[str] = TIMEFRAMES):
    """A client's WebSocket message: ('subscribe' | 'unsubscribe', [channels])."""
    if not isinstance(message, dict) or len(message) != 1:
        raise BadRequest('send {"subscribe": [channels]} or {"unsubscribe": [channels]}')
    ((action, channels),) = message.items()
    if action not in ("subscribe", "unsubscribe") or not isinstance(channels, list):
        raise BadRequest('send {"subscribe": [channels]} or {"unsubscribe": [channels]}')
    return action, [channel_param(c, known, timeframes) for c in channels]
