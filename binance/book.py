"""Book streams on the `/public` route (`<symbol>@bookTicker`, diff depth
`<symbol>@depth@100ms`) and the REST depth snapshot: frames and answers to typed events.
Pure, no I/O.

Decoded by typed msgspec decoders (types and ranges checked in C: book streams are 10-100
times busier than trades); prices and quantities become exact integer units
(orderflow.fold). Anything else raises FrameError with the reason.
"""

from __future__ import annotations

from typing import NamedTuple

import msgspec

from binance.protocol import DecimalText, Envelope, EventTime, FrameError, Id, valid_symbol
from binance.trades import MAX_UNITS, UNITS_SEEN, units

BOOK_TICKER_SUFFIX = "@bookTicker"
DEPTH_SPEED = "100ms"

_Level = tuple[DecimalText, DecimalText]

Level = tuple[int, int]  # (price, quantity) in units; quantity 0 deletes the level


class BookTick(NamedTuple):
    """The best bid and ask (`<s>@bookTicker`), in units."""

    update_id: int  # `u`
    bid: int
    bid_qty: int
    ask: int
    ask_qty: int
    time_ms: int  # `T`: the transaction time
    event_ms: int  # `E`


class DepthDiff(NamedTuple):
    """One diff depth event: the levels changed between update ids `U` and `u`."""

    first_id: int  # `U`
    last_id: int  # `u`
    previous_id: int  # `pu`: the `u` of the event before it on this stream
    bids: list[Level]
    asks: list[Level]
    time_ms: int  # `T`
    event_ms: int  # `E`


class DepthSnapshot(NamedTuple):
    """`GET /fapi/v1/depth`: the book as of `last_update_id`."""

    last_update_id: int
    bids: list[Level]
    asks: list[Level]
    time_ms: int
    event_ms: int


class _BookTickerEvent(msgspec.Struct, gc=False):
    s: str
    u: Id
    b: DecimalText
    B: DecimalText
    a: DecimalText
    A: DecimalText
    T: EventTime
    E: EventTime
    e: str = "bookTicker"


class _DepthEvent(msgspec.Struct, gc=False):
    s: str
    U: Id
    u: Id
    pu: int  # -1 on a stream's first event after some resets
    b: list[_Level]
    a: list[_Level]
    T: EventTime
    E: EventTime
    e: str = "depthUpdate"


class _Snapshot(msgspec.Struct, gc=False):
    lastUpdateId: Id  # Binance's name
    bids: list[_Level]
    asks: list[_Level]
    T: EventTime
    E: EventTime


_TICKER_FRAME = msgspec.json.Decoder(Envelope[_BookTickerEvent])
_DEPTH_FRAME = msgspec.json.Decoder(Envelope[_DepthEvent])
_SNAPSHOT = msgspec.json.Decoder(_Snapshot)


def book_ticker_stream(symbol: str) -> str:
    return f"{symbol.lower()}{BOOK_TICKER_SUFFIX}"


def depth_stream(symbol: str, speed: str = DEPTH_SPEED) -> str:
    return f"{symbol.lower()}@depth@{speed}"


def _units(text: str, what: str) -> int:
    try:
        value = units(text)
    except ValueError as exc:
        raise FrameError(f"{what}: {exc}") from None
    if value >= MAX_UNITS:
        raise FrameError(f"{what}: implausible {text}")
    return value


def _levels(levels: list[tuple[str, str]], what: str) -> list[Level]:
    out = []
    for price, qty in levels:
        p = _units(price, what)
        if p == 0:
            raise FrameError(f"{what}: a level at price 0")
        out.append((p, _units(qty, what)))
    return out


_CHECKED_STREAMS: set[tuple[str, str, str]] = set()  # (symbol, stream, suffix) found good


def _check_stream(symbol: str, stream: str, expected_suffix: str) -> None:
    """The event's symbol names its stream. Remembered once good: every book frame asks
    (~20,000 a second for 200 book tickers), for a few hundred streams."""
    if (symbol, stream, expected_suffix) in _CHECKED_STREAMS:
        return
    if not valid_symbol(symbol) or not stream.startswith(symbol.lower() + "@") or not stream.endswith(expected_suffix):
        raise FrameError(f"{expected_suffix} of {symbol!r} on stream {stream!r}")
    if len(_CHECKED_STREAMS) < 10_000:
        _CHECKED_STREAMS.add((symbol, stream, expected_suffix))


def parse_book_ticker_frame(raw: str | bytes) -> tuple[str, BookTick]:
    try:
        frame = _TICKER_FRAME.decode(raw)
    except (msgspec.DecodeError, UnicodeError) as exc:
        raise FrameError(f"not a bookTicker frame: {exc}") from None
    e = frame.data
    if e.e != "bookTicker":
        raise FrameError(f"event {e.e!r} on a bookTicker stream")
    _check_stream(e.s, frame.stream, BOOK_TICKER_SUFFIX)
    # Four remembered texts, looked up directly: ~20,000 frames a second at 200 symbols.
    seen = UNITS_SEEN.get
    bid, bid_qty, ask, ask_qty = seen(e.b), seen(e.B), seen(e.a), seen(e.A)
    if bid is None or bid_qty is None or ask is None or ask_qty is None or max(bid, bid_qty, ask, ask_qty) >= MAX_UNITS:
        what = f"bookTicker {e.s} {e.u}"
        bid, bid_qty, ask, ask_qty = (_units(text, what) for text in (e.b, e.B, e.a, e.A))
    if not 0 < bid < ask:
        raise FrameError(f"bookTicker {e.s} {e.u}: bid {e.b} not below ask {e.a}")
    return e.s, BookTick(e.u, bid, bid_qty, ask, ask_qty, e.T, e.E)


def parse_depth_frame(raw: str | bytes) -> tuple[str, DepthDiff]:
    try:
        frame = _DEPTH_FRAME.decode(raw)
    except (msgspec.DecodeError, UnicodeError) as exc:
        raise FrameError(f"not a depth frame: {exc}") from None
    e = frame.data
    if e.e != "depthUpdate":
        raise FrameError(f"event {e.e!r} on a depth stream")
    _check_stream(e.s, frame.stream, "ms")
    if e.u < e.U:
        raise FrameError(f"depth {e.s}: last update id {e.u} before the first {e.U}")
    what = f"depth {e.s} {e.u}"
    return e.s, DepthDiff(e.U, e.u, e.pu, _levels(e.b, what), _levels(e.a, what), e.T, e.E)


def depth_snapshot_of(answer: bytes | str | dict) -> DepthSnapshot:
    """`GET /fapi/v1/depth`'s answer, as its body or already parsed as JSON."""
    try:
        s = _SNAPSHOT.decode(answer) if isinstance(answer, bytes | str) else msgspec.convert(answer, _Snapshot)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeError) as exc:
        raise FrameError(f"depth snapshot: {exc}") from None
    what = f"depth snapshot {s.lastUpdateId}"
    return DepthSnapshot(s.lastUpdateId, _levels(s.bids, what), _levels(s.asks, what), s.T, s.E)
