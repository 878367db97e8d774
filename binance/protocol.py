"""Binance USDⓈ-M market-data protocol: stream names, frame and REST-row parsing.

Pure functions, no I/O. Parsers tolerate unknown and missing optional fields (the
schema grew `i`/`P` in 2020 and `ap`/`st` in 2026) and raise FrameError with a
reason for anything that cannot become a candle or a price. They also refuse what
is well-formed but implausible (a negative volume, high below low, a time in
microseconds, a trade count no minute has), since whatever passes here is stored,
summed into M5/M15 and fed to the indicators.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any, Literal

import msgspec
import orjson

from candles import Candle

KLINE_SUFFIX = "@kline_1m"
MARK_PRICE_ALL_STREAM = "!markPrice@arr@1s"
REST_KLINES_MAX_LIMIT = 1500
M1_MS = 60_000

# Plausibility. USDⓈ-M futures opened in September 2019; times are milliseconds.
EARLIEST_MS = 1_567_296_000_000  # 2019-09-01
LATEST_MS = 4_102_444_800_000  # 2100-01-01: a time in microseconds is far beyond
MAX_EVENT_DELAY_MS = 86_400_000  # a kline event more than a day after its open time
MAX_TRADES_PER_MINUTE = 100_000_000  # x 15 still fits PostgreSQL's integer in an M15
MAX_DECIMAL = Decimal(10) ** 15
MAX_DECIMAL_CHARS = 40  # "83084.90000000" is 14; PostgreSQL's numeric has its own limits


class FrameError(ValueError):
    """A frame that cannot be used; the message is the reason logged."""


def valid_symbol(symbol: str) -> bool:
    """A name Binance could list: letters and digits (any script: symbols may be
    non-ASCII) and '_' (dated contracts, BTCUSDT_260327), upper case, at most 40
    characters. Anything else (a space, '#', '/', '@', lower case) would break or
    inject stream names."""
    return 0 < len(symbol) <= 40 and symbol[0] != "_" and symbol.replace("_", "").isalnum() and symbol == symbol.upper()


def kline_stream(symbol: str) -> str:
    return f"{symbol.lower()}{KLINE_SUFFIX}"


def symbol_of_kline_stream(stream: str) -> str | None:
    return stream[: -len(KLINE_SUFFIX)].upper() if stream.endswith(KLINE_SUFFIX) else None


def klines_weight(limit: int) -> int:
    """Request weight of GET /fapi/v1/klines by `limit` (BINANCE.md)."""
    if limit < 100:
        return 1
    if limit < 500:
        return 2
    if limit <= 1000:
        return 5
    return 10


class KlineUpdate(msgspec.Struct, gc=False):
    """A kline push; `closed` is `k.x`. `candle` holds the exchange's values for a close
    (and for a forming update only when asked: most pushes are those, and unused). A
    struct, not a dataclass: one is made per frame, in a third of the time."""

    event_time: int
    symbol: str
    open_time: int
    closed: bool
    candle: Candle | None
    first_trade_id: int = -1  # `f`, `L`: the minute's first and last trade ids (-1: no trade,
    last_trade_id: int = -1  # or not sent); read for a close only


@dataclass(slots=True)
class MarkPrices:
    event_time: int
    prices: dict[str, str]  # symbol -> mark price as the exchange's decimal text


@dataclass(slots=True)
class Reply:
    """The answer to one of our SUBSCRIBE / UNSUBSCRIBE / LIST_SUBSCRIPTIONS requests."""

    request_id: Any
    result: Any
    error: dict | None


FeedMessage = KlineUpdate | MarkPrices | Reply


def _decimal(value: Any, name: str) -> Decimal:
    """A non-negative decimal string of sane size (prices, quantities)."""
    if not isinstance(value, str) or len(value) > MAX_DECIMAL_CHARS:
        raise FrameError(f"field {name} is not a decimal string: {str(value)[:60]!r}")
    try:
        result = Decimal(value)
    except InvalidOperation:
        raise FrameError(f"field {name} is not a decimal: {value!r}") from None
    if not result.is_finite() or not 0 <= result < MAX_DECIMAL:
        raise FrameError(f"field {name} is out of range: {value!r}")
    return result


def check_time(value: Any, name: str) -> int:
    if type(value) is not int or not EARLIEST_MS <= value < LATEST_MS:
        raise FrameError(f"{name} {str(value)[:30]!r} is not a time in ms between 2019 and 2100")
    return value


def check_trades(value: Any) -> int:
    if type(value) is not int or not 0 <= value <= MAX_TRADES_PER_MINUTE:
        raise FrameError(f"kline trade count {str(value)[:30]!r} is out of range")
    return value


def check_candle(candle: Candle) -> Candle:
    """Prices positive and ordered (low <= open, close <= high), taker parts within the totals."""
    if candle.low <= 0:
        raise FrameError(f"kline low {candle.low} is not positive")
    if not candle.low <= min(candle.open, candle.close) <= max(candle.open, candle.close) <= candle.high:
        raise FrameError(f"kline prices out of order: o={candle.open} h={candle.high} l={candle.low} c={candle.close}")
    if candle.taker_buy_volume > candle.volume or candle.taker_buy_quote_volume > candle.quote_volume:
        raise FrameError("kline taker buy volume exceeds its volume")
    return candle


def parse_kline(data: dict, forming_candle: bool = False) -> KlineUpdate:
    k = data.get("k")
    if not isinstance(k, dict):
        raise FrameError("kline event without a 'k' object")
    try:
        symbol = k.get("s") or data["s"]
        open_time = k["t"]
        closed = k["x"]
        event_time = data.get("E", 0)
        interval = k.get("i", "1m")
    except KeyError as exc:
        raise FrameError(f"kline event without field {exc.args[0]!r}") from None
    if interval != "1m":
        raise FrameError(f"kline interval {interval!r} is not 1m")
    if not isinstance(symbol, str) or not valid_symbol(symbol):
        raise FrameError(f"kline symbol {str(symbol)[:50]!r} is not a symbol name")
    if type(open_time) is not int or open_time % M1_MS:
        raise FrameError(f"kline open time {str(open_time)[:30]!r} is not a whole minute in ms")
    check_time(open_time, "kline open time")
    if type(closed) is not bool:
        raise FrameError(f"kline 'x' is not a boolean: {closed!r}")
    if event_time != 0:
        check_time(event_time, "event time")
        if not open_time <= event_time <= open_time + MAX_EVENT_DELAY_MS:
            raise FrameError(f"event time {event_time} is implausible for a kline opening at {open_time}")
    if not closed and not forming_candle:
        return KlineUpdate(event_time, symbol, open_time, closed, None)
    texts = [k.get("o"), k.get("h"), k.get("l"), k.get("c"), k.get("v"), k.get("q", "0"), k.get("V", "0")]
    texts.append(k.get("Q", "0"))
    o, h, lo, c, v, q, bv, bq = _decimals(texts)
    candle = Candle(symbol, "m1", open_time, o, h, lo, c, v, q, check_trades(k.get("n", 0)), bv, bq)
    first, last = k.get("f", -1), k.get("L", -1)
    if type(first) is not int or type(last) is not int or not -1 <= first <= last or (first == -1) != (last == -1):
        raise FrameError(f"kline trade ids f={str(first)[:30]!r} L={str(last)[:30]!r} are implausible")
    return KlineUpdate(event_time, symbol, open_time, closed, check_candle(candle), first, last)


_KLINE_DECIMALS = ("o", "h", "l", "c", "v", "q", "V", "Q")


def _decimals(texts: list[Any]) -> list[Decimal]:
    """The eight decimals of a kline at once (the per-field checks of `_decimal`, ~4x
    faster: this runs for every close)."""
    try:
        if all(type(t) is str and len(t) <= MAX_DECIMAL_CHARS for t in texts):
            values = list(map(Decimal, texts))
            if min(values) >= 0 and max(values) < MAX_DECIMAL:  # NaN raises, infinity fails
                return values
    except InvalidOperation:
        pass
    return [_decimal(t, name) for t, name in zip(texts, _KLINE_DECIMALS)]  # raises with the field's reason


def _mark_price_item(item: Any) -> tuple[str, str, int]:
    if not isinstance(item, dict) or not isinstance(item.get("s"), str) or not isinstance(item.get("p"), str):
        raise FrameError("mark price update without 's' and 'p'")
    if _decimal(item["p"], "p") <= 0:
        raise FrameError(f"mark price {item['p']!r} is not positive")
    event_time = item.get("E", 0)
    if type(event_time) is not int:
        return item["s"], item["p"], 0
    return item["s"], item["p"], check_time(event_time, "event time") if event_time else 0


def parse_mark_prices(data: Any) -> MarkPrices:
    items = data if isinstance(data, list) else [data]
    prices: dict[str, str] = {}
    event_time = 0
    for item in items:
        symbol, price, item_time = _mark_price_item(item)
        prices[symbol] = price
        event_time = max(event_time, item_time)
    return MarkPrices(event_time, prices)


# Field types shared by the typed decoders of the trade and book streams (checked in C).
Id = Annotated[int, msgspec.Meta(ge=0)]
EventTime = Annotated[int, msgspec.Meta(ge=EARLIEST_MS, lt=LATEST_MS)]
DecimalText = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_DECIMAL_CHARS)]


class Envelope[Event](msgspec.Struct, gc=False):
    """A combined-stream frame: `{"stream": ..., "data": <event>}`."""

    stream: str
    data: Event


_OpenTime = Annotated[int, msgspec.Meta(ge=EARLIEST_MS, lt=LATEST_MS, multiple_of=M1_MS)]
_Trades = Annotated[int, msgspec.Meta(ge=0, le=MAX_TRADES_PER_MINUTE)]
_Text = Annotated[str, msgspec.Meta(max_length=MAX_DECIMAL_CHARS)]
_TradeId = Annotated[int, msgspec.Meta(ge=-1)]


class _KlineHead(msgspec.Struct, gc=False):
    t: _OpenTime
    x: bool
    s: str = ""
    i: Literal["1m"] = "1m"


class _KlineHeadEvent(msgspec.Struct, gc=False):
    e: Literal["kline"]
    k: _KlineHead
    E: int = 0
    s: str = ""


class _KlineHeadFrame(msgspec.Struct, gc=False):
    """What a forming kline needs: most pushes are those, and their prices go unused."""

    stream: str
    data: _KlineHeadEvent
    id: Any = msgspec.UNSET  # a reply's keys: such a frame takes the general parse


class _KlineValues(msgspec.Struct, gc=False):
    o: _Text
    h: _Text
    l: _Text  # noqa: E741 (Binance's name)
    c: _Text
    v: _Text
    n: _Trades = 0
    q: _Text = "0"
    V: _Text = "0"
    Q: _Text = "0"
    f: _TradeId = -1
    L: _TradeId = -1


class _KlineValuesEvent(msgspec.Struct, gc=False):
    k: _KlineValues


class _KlineValuesFrame(msgspec.Struct, gc=False):
    """A closing kline's values, read from the frame once its head passed."""

    data: _KlineValuesEvent


_KLINE_HEAD = msgspec.json.Decoder(_KlineHeadFrame)
_KLINE_VALUES = msgspec.json.Decoder(_KlineValuesFrame)


_STREAM_SYMBOL: dict[str, str | None] = {}  # kline stream name -> its valid symbol, or None


def _symbol_of_stream(stream: str) -> str | None:
    symbol = symbol_of_kline_stream(stream)
    symbol = symbol if symbol is not None and valid_symbol(symbol) else None
    if len(_STREAM_SYMBOL) < 100_000:  # a few hundred in practice; bounded whatever comes
        _STREAM_SYMBOL[stream] = symbol
    return symbol


def _kline_frame(raw: str | bytes, forming_candle: bool) -> KlineUpdate | None:
    """A combined-stream kline frame through typed decoders (msgspec, in C: the types,
    ranges, text lengths and the interval are checked while decoding, unknown fields
    are skipped). Nearly all frames are forming klines, so this is the feed's hot path:
    their head (times, symbol, `x`) is all that is decoded; a close's values are decoded
    from the frame a second time, into their own struct. It accepts only what
    `parse_general_frame` accepts, with the same result (the plausibility rules of
    `parse_kline` and `check_candle`, written out as one chain of comparisons); anything
    else returns None and takes the general parse, which accepts it or says why not."""
    try:
        frame = _KLINE_HEAD.decode(raw)
    except (msgspec.DecodeError, UnicodeError):
        return None
    data = frame.data
    k = data.k
    symbol, open_time, event_time = k.s or data.s, k.t, data.E
    stream = frame.stream
    stream_symbol = _STREAM_SYMBOL[stream] if stream in _STREAM_SYMBOL else _symbol_of_stream(stream)
    if stream_symbol != symbol or stream_symbol is None or frame.id is not msgspec.UNSET:
        return None
    if event_time and not (open_time <= event_time <= open_time + MAX_EVENT_DELAY_MS and event_time < LATEST_MS):
        return None
    if not k.x and not forming_candle:
        return KlineUpdate(event_time, symbol, open_time, False, None)
    try:
        values = _KLINE_VALUES.decode(raw).data.k
        o, h, lo, c, v, q, bv, bq = map(
            Decimal, (values.o, values.h, values.l, values.c, values.v, values.q, values.V, values.Q)
        )
        if not (
            0 < lo <= o <= h < MAX_DECIMAL
            and lo <= c <= h
            and 0 <= bv <= v < MAX_DECIMAL
            and 0 <= bq <= q < MAX_DECIMAL
            and values.f <= values.L
            and (values.f == -1) == (values.L == -1)
        ):
            return None
    except (msgspec.DecodeError, InvalidOperation):  # a value missing or too long; not a number, or a NaN
        return None
    candle = Candle(symbol, "m1", open_time, o, h, lo, c, v, q, values.n, bv, bq)
    return KlineUpdate(event_time, symbol, open_time, k.x, candle, values.f, values.L)


def parse_frame(raw: str | bytes, forming_candle: bool = False) -> FeedMessage:
    """One WebSocket text frame (combined-stream wrapper or raw event) to a message."""
    if (update := _kline_frame(raw, forming_candle)) is not None:
        return update
    return parse_general_frame(raw, forming_candle)


def parse_general_frame(raw: str | bytes, forming_candle: bool = False) -> FeedMessage:
    """Any frame, by a generic JSON parse and the rules of `parse_kline`: the reference
    for the kline fast path, and the one place that says why a frame is refused."""
    try:
        message = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise FrameError(f"not JSON: {exc}") from None
    if not isinstance(message, dict):
        raise FrameError("frame is not a JSON object")
    if "id" in message and ("result" in message or "error" in message):
        return Reply(message["id"], message.get("result"), message.get("error"))
    data = message.get("data", message) if "stream" in message else message
    stream = message.get("stream")
    if stream is not None and not isinstance(stream, str):
        raise FrameError("stream name is not a string")
    if isinstance(data, list):
        return parse_mark_prices(data)
    if not isinstance(data, dict):
        raise FrameError("event is not a JSON object")
    event = data.get("e")
    if event == "kline":
        update = parse_kline(data, forming_candle)
        if stream is not None and symbol_of_kline_stream(stream) != update.symbol.upper():
            raise FrameError(f"kline for {update.symbol} on stream {stream!r}")
        return update
    if event == "markPriceUpdate":
        return parse_mark_prices(data)
    raise FrameError(f"unknown event {event!r} on stream {stream!r}")


def parse_rest_kline(symbol: str, row: Any) -> tuple[Candle, int]:
    """A GET /fapi/v1/klines row to (candle, close time ms)."""
    if not isinstance(row, list) or len(row) < 11:
        raise FrameError(f"kline row is not a 12-element array: {str(row)[:200]}")
    open_time, close_time = row[0], row[6]
    if type(open_time) is not int or open_time % M1_MS or close_time != open_time + M1_MS - 1:
        raise FrameError(f"kline row has bad times: {str(row)[:200]}")
    check_time(open_time, "kline open time")
    candle = Candle(
        symbol=symbol,
        tf="m1",
        open_time=open_time,
        open=_decimal(row[1], "open"),
        high=_decimal(row[2], "high"),
        low=_decimal(row[3], "low"),
        close=_decimal(row[4], "close"),
        volume=_decimal(row[5], "volume"),
        quote_volume=_decimal(row[7], "quote_volume"),
        trades=check_trades(row[8]),
        taker_buy_volume=_decimal(row[9], "taker_buy_volume"),
        taker_buy_quote_volume=_decimal(row[10], "taker_buy_quote_volume"),
    )
    return check_candle(candle), close_time


def closed_rest_klines(symbol: str, rows: list, server_now_ms: int, rejected: list[str] | None = None) -> list[Candle]:
    """Only the closed rows: the last one may still be forming (close time not past).

    A row that does not parse is left out (its minute stays missing, and becomes
    unfillable if the exchange never gives a usable one); its reason goes to `rejected`.
    """
    out = []
    for row in rows:
        try:
            candle, close_time = parse_rest_kline(symbol, row)
        except FrameError as exc:
            if rejected is None:
                raise
            rejected.append(str(exc))
            continue
        if close_time < server_now_ms:
            out.append(candle)
    return out


def request_message(method: str, params: list[str] | None, request_id: int) -> bytes:
    body: dict[str, Any] = {"method": method, "id": request_id}
    if params is not None:
        body["params"] = params
    return orjson.dumps(body)
