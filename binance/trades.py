"""`<symbol>@aggTrade` on the `/market` route: stream names, frames and REST rows to
`AggTrade`s. Pure, no I/O.

Frames are decoded by a typed msgspec decoder (types and ranges checked in C): at
20k aggTrades a second in a burst, per-frame Python would cost a core. Prices and
quantities become exact integer units (orderflow.fold); anything else raises
FrameError with the reason logged.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from binance.protocol import EARLIEST_MS, LATEST_MS, MAX_DECIMAL_CHARS, FrameError, valid_symbol
from orderflow.fold import UNIT, AggTrade, to_units

AGG_TRADE_SUFFIX = "@aggTrade"
MAX_UNITS = 10**15 * UNIT  # a price or quantity no contract has

_Id = Annotated[int, msgspec.Meta(ge=0)]
_Time = Annotated[int, msgspec.Meta(ge=EARLIEST_MS, lt=LATEST_MS)]
_Text = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_DECIMAL_CHARS)]


class _AggTradeEvent(msgspec.Struct, gc=False):
    s: str
    a: _Id
    p: _Text
    q: _Text
    f: _Id
    l: _Id  # noqa: E741 (Binance's name)
    T: _Time
    m: bool
    e: str = "aggTrade"


class _AggTradeFrame(msgspec.Struct, gc=False):
    stream: str
    data: _AggTradeEvent


class _AggTradeRow(msgspec.Struct, gc=False):
    a: _Id
    p: _Text
    q: _Text
    f: _Id
    l: _Id  # noqa: E741
    T: _Time
    m: bool


_FRAME = msgspec.json.Decoder(_AggTradeFrame)
_ROWS = msgspec.json.Decoder(list[_AggTradeRow])


def agg_trade_stream(symbol: str) -> str:
    return f"{symbol.lower()}{AGG_TRADE_SUFFIX}"


# Prices and quantities repeat (a symbol prints near the same prices all minute, and
# sizes cluster on round lots): their units are looked up, not parsed again; bounded.
_UNITS: dict[str, int] = {}
_UNITS_KEPT = 100_000
# Symbols seen valid, with their aggTrade stream's name (bounded: a feed of made-up
# names must not grow it).
_STREAMS: dict[str, str] = {}
_STREAMS_KEPT = 10_000


def clear_caches() -> None:
    """For measurements: the next frames find nothing parsed before."""
    _UNITS.clear()
    _STREAMS.clear()


def _units(text: str) -> int:
    units = _UNITS.get(text)
    if units is None:
        units = to_units(text)
        if len(_UNITS) >= _UNITS_KEPT:
            _UNITS.clear()
        _UNITS[text] = units
    return units


def _trade(event: _AggTradeEvent | _AggTradeRow) -> AggTrade:
    try:
        price, qty = _units(event.p), _units(event.q)
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
