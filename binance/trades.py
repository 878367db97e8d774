"""`<symbol>@aggTrade` on the `/market` route: stream names, frames and REST rows to
`AggTrade`s. Pure, no I/O.

Frames are decoded by a typed msgspec decoder (types and ranges checked in C): at
20k aggTrades a second in a burst, per-frame Python would cost a core. Prices and
quantities become exact integer units (orderflow.fold); anything else raises
FrameError with the reason logged.
"""

from __future__ import annotations

import msgspec

from binance.protocol import DecimalText, Envelope, EventTime, FrameError, Id, valid_symbol
from orderflow.fold import UNIT, AggTrade, to_units

AGG_TRADE_SUFFIX = "@aggTrade"
MAX_UNITS = 10**15 * UNIT  # a price or quantity no contract has


class _AggTradeEvent(msgspec.Struct, gc=False):
    s: str
    a: Id
    p: DecimalText
    q: DecimalText
    f: Id
    l: Id  # noqa: E741 (Binance's name)
    T: EventTime
    m: bool
    e: str = "aggTrade"


class _AggTradeRow(msgspec.Struct, gc=False):
    a: Id
    p: DecimalText
    q: DecimalText
    f: Id
    l: Id  # noqa: E741
    T: EventTime
    m: bool


_FRAME = msgspec.json.Decoder(Envelope[_AggTradeEvent])
_ROWS = msgspec.json.Decoder(list[_AggTradeRow])


def agg_trade_stream(symbol: str) -> str:
    return f"{symbol.lower()}{AGG_TRADE_SUFFIX}"


# Prices and quantities repeat (a symbol prints near the same prices all minute, sizes
# cluster on round lots, a book's levels come back update after update): their units
# are looked up, not parsed again; bounded. Shared by the trade and book streams.
_UNITS: dict[str, int] = {}
UNITS_SEEN = _UNITS  # read directly where a frame's four quotes are looked up (book tickers)
_UNITS_KEPT = 100_000
# Symbols seen valid, with their aggTrade stream's name (bounded: a feed of made-up
# names must not grow it).
_STREAMS: dict[str, str] = {}
_STREAMS_KEPT = 10_000


def clear_caches() -> None:
    """For measurements: the next frames find nothing parsed before."""
    _UNITS.clear()
    _STREAMS.clear()


def units(text: str) -> int:
    """`to_units`, remembered (ValueError for a bad text, never remembered)."""
    units = _UNITS.get(text)
    if units is None:
        units = to_units(text)
        if len(_UNITS) >= _UNITS_KEPT:
            _UNITS.clear()
        _UNITS[text] = units
    return units


def _trade(event: _AggTradeEvent | _AggTradeRow) -> AggTrade:
    try:
        price, qty = units(event.p), units(event.q)
    except ValueError as exc:
        raise FrameError(str(exc)) from None
    if not (0 < price < MAX_UNITS and 0 <= qty < MAX_UNITS):
        raise FrameError(f"implausible aggTrade {event.a}: price {event.p}, quantity {event.q}")
    if event.l < event.f:
        raise FrameError(f"aggTrade {event.a}: last trade id {event.l} before the first {event.f}")
    return AggTrade(event.a, price, qty, event.f, event.l, event.T, event.m)


def parse_agg_trade_frame(raw: str | bytes) -> tuple[str, AggTrade]:
    """(symbol, trade) of a combined-stream aggTrade frame."""
    try:
        frame = _FRAME.decode(raw)
    except (msgspec.DecodeError, UnicodeError) as exc:
        raise FrameError(f"not an aggTrade frame: {exc}") from None
    event = frame.data
    stream = _STREAMS.get(event.s)
    if stream is None and valid_symbol(event.s):
        stream = agg_trade_stream(event.s)
        if len(_STREAMS) >= _STREAMS_KEPT:
            _STREAMS.clear()
        _STREAMS[event.s] = stream
    if event.e != "aggTrade" or stream is None or frame.stream != stream:
        raise FrameError(f"aggTrade of {event.s!r} on stream {frame.stream!r}")
    return event.s, _trade(event)


def agg_trades_of(answer: bytes | str | list) -> list[AggTrade]:
    """GET /fapi/v1/aggTrades' answer, as its body or already parsed as JSON (the REST
    client's), oldest first; a body cut short or a bad row raises FrameError."""
    try:
        rows = _ROWS.decode(answer) if isinstance(answer, bytes | str) else msgspec.convert(answer, list[_AggTradeRow])
    except (msgspec.DecodeError, UnicodeError) as exc:
        raise FrameError(f"aggTrades rows: {exc}") from None
    return [_trade(row) for row in rows]
