"""Pure builders for what the exchange sends: kline and mark price frames, REST rows, garbage.

Decimal strings are `str(Decimal)` of the source's values, so a close carries exactly the
archive row's text ("0.1040" stays "0.1040").
"""

from __future__ import annotations

import zlib
from dataclasses import replace
from decimal import ROUND_CEILING, ROUND_DOWN, ROUND_FLOOR, ROUND_HALF_EVEN, Decimal

import orjson

from candles import Candle

MINUTE_MS = 60_000
FUNDING_INTERVAL_MS = 8 * 3600 * 1000  # 00:00, 08:00, 16:00 UTC


def _step(value: Decimal) -> Decimal:
    """The smallest increment in `value`'s own decimals (Decimal("0.1040") -> 0.0001)."""
    return Decimal(1).scaleb(value.as_tuple().exponent)  # type: ignore[arg-type]


def _toward(start: Decimal, end: Decimal, fraction: Decimal, rounding: str) -> Decimal:
    return (start + (end - start) * fraction).quantize(_step(end), rounding=rounding)


def _scaled(value: Decimal, fraction: Decimal) -> Decimal:
    return (value * fraction).quantize(_step(value), rounding=ROUND_DOWN)


def partial_candle(final: Candle, fraction: float) -> Candle:
    """A plausible still-forming view of `final` after `fraction` of its minute.

    Keeps the final open; the close moves from open towards the final close; high/low grow
    towards the final extremes without passing them; counts and volumes grow in proportion
    to the trades so far. fraction >= 1 gives `final` itself.
    """
    if fraction >= 1 or final.trades == 0:
        return final
    trades = max(1, int(final.trades * fraction))
    share = Decimal(trades) / Decimal(final.trades)
    path = Decimal(round(max(fraction, 0.0), 4)).quantize(Decimal("0.0001"))
    o = final.open
    close = _toward(o, final.close, path, ROUND_HALF_EVEN)
    high = max(o, close, _toward(o, final.high, path, ROUND_FLOOR))
    low = min(o, close, _toward(o, final.low, path, ROUND_CEILING))
    return replace(
        final,
        close=close,
        high=high,
        low=low,
        volume=_scaled(final.volume, share),
        quote_volume=_scaled(final.quote_volume, share),
        trades=trades,
        taker_buy_volume=_scaled(final.taker_buy_volume, share),
        taker_buy_quote_volume=_scaled(final.taker_buy_quote_volume, share),
    )


def first_trade_id(symbol: str, open_time: int) -> int:
    """Made-up but monotonic trade ids: 100k id slots per minute, offset per symbol."""
    return (open_time // MINUTE_MS) * 100_000 + zlib.crc32(symbol.encode()) % 1000


def kline_event(candle: Candle, event_ms: int, closed: bool, ids: tuple[int, int] | None = None) -> bytes:
    """The raw `kline` event, exactly the real field order and types; `ids` the minute's
    first and last trade id (made up from the minute if not given).

    A minute without trades has n=0 and f=L=-1 (assumption: Binance's convention for
    "no trade id").
    """
    if ids is not None:
        first, last = ids
    elif candle.trades:
        first = first_trade_id(candle.symbol, candle.open_time)
        last = first + candle.trades - 1
    else:
        first = last = -1
    return orjson.dumps(
        {
            "e": "kline",
            "E": event_ms,
            "s": candle.symbol,
            "k": {
                "t": candle.open_time,
                "T": candle.open_time + MINUTE_MS - 1,
                "s": candle.symbol,
                "i": "1m",
                "f": first,
                "L": last,
                "o": str(candle.open),
                "c": str(candle.close),
                "h": str(candle.high),
                "l": str(candle.low),
                "v": str(candle.volume),
                "n": candle.trades,
                "x": closed,
                "q": str(candle.quote_volume),
                "V": str(candle.taker_buy_volume),
                "Q": str(candle.taker_buy_quote_volume),
                "B": "0",
            },
        }
    )


def agg_trade_event(symbol: str, row: dict, event_ms: int) -> bytes:
    """The raw `aggTrade` event of one made-up trade (a REST row), the real field order."""
    return orjson.dumps(
        {
            "e": "aggTrade",
            "E": event_ms,
            "s": symbol,
            "a": row["a"],
            "p": row["p"],
            "q": row["q"],
            "nq": row["q"],
            "f": row["f"],
            "l": row["l"],
            "T": row["T"],
            "m": row["m"],
        }
    )


def rest_row(candle: Candle, close_time: int | None = None) -> list[object]:
    """One `GET /fapi/v1/klines` row (12 elements)."""
    return [
        candle.open_time,
        str(candle.open),
        str(candle.high),
        str(candle.low),
        str(candle.close),
        str(candle.volume),
        close_time if close_time is not None else candle.open_time + MINUTE_MS - 1,
        str(candle.quote_volume),
        candle.trades,
        str(candle.taker_buy_volume),
        str(candle.taker_buy_quote_volume),
        "0",
    ]


def aggregate(candles: list[Candle]) -> Candle:
    """Candles of one bucket, oldest first -> one candle (for intervals above 1m)."""
    first, last = candles[0], candles[-1]
    return replace(
        first,
        close=last.close,
        high=max(c.high for c in candles),
        low=min(c.low for c in candles),
        volume=sum((c.volume for c in candles), Decimal(0)),
        quote_volume=sum((c.quote_volume for c in candles), Decimal(0)),
        trades=sum(c.trades for c in candles),
        taker_buy_volume=sum((c.taker_buy_volume for c in candles), Decimal(0)),
        taker_buy_quote_volume=sum((c.taker_buy_quote_volume for c in candles), Decimal(0)),
    )


def next_funding_ms(now_ms: int) -> int:
    return (now_ms // FUNDING_INTERVAL_MS + 1) * FUNDING_INTERVAL_MS


def mark_price_object(symbol: str, event_ms: int, current: Candle, noise: float) -> dict[str, object]:
    """A `markPriceUpdate` near the forming candle's close (floats: marks need no exactness).

    `noise` in [0, 1) spreads index and settle prices a little around the mark.
    """
    fraction = min(1.0, max(0.0, (event_ms - current.open_time) / MINUTE_MS))
    o, c = float(current.open), float(current.close)
    mark = o + (c - o) * fraction
    text = f"{mark:.8f}"
    return {
        "e": "markPriceUpdate",
        "E": event_ms,
        "s": symbol,
        "p": text,
        "ap": text,
        "P": f"{mark * (1 + (noise - 0.5) * 0.0004):.8f}",
        "i": f"{mark * (1 + (noise - 0.5) * 0.0006):.8f}",
        "r": "0.00010000",
        "T": next_funding_ms(event_ms),
        "st": 1,
    }


def combined_prefix(stream: str) -> bytes:
    """`{"stream":"<name>","data":` — the combined-stream wrapper around a raw payload."""
    return b'{"stream":' + orjson.dumps(stream) + b',"data":'


def reply(request_id: object, result: object) -> bytes:
    return orjson.dumps({"result": result, "id": request_id})


def error_reply(request_id: object, code: int, msg: str) -> bytes:
    return orjson.dumps({"error": {"code": code, "msg": msg}, "id": request_id})


GARBAGE_KINDS = ("invalid_json", "missing_k", "unknown_stream", "unknown_symbol", "wrong_types")


def garbage(kind: str, symbol: str, event_ms: int) -> tuple[bytes, str | None]:
    """(payload, stream name to wrap it in; None = send verbatim, even on combined connections)."""
    lower = symbol.lower()
    if kind == "invalid_json":
        return b'{"stream":"' + lower.encode() + b'@kline_1m","data":{"e":"kline","E":' + str(event_ms).encode(), None
    if kind == "missing_k":
        return orjson.dumps({"e": "kline", "E": event_ms, "s": symbol}), f"{lower}@kline_1m"
    if kind == "unknown_stream":
        return orjson.dumps({"e": "kline", "E": event_ms, "s": symbol}), f"{lower}@kline_7m"
    if kind == "unknown_symbol":
        bogus = foreign_kline("NOSUCHUSDT", event_ms)
        return bogus, "nosuchusdt@kline_1m"
    # wrong types: numbers as strings and strings as numbers
    payload = {
        "e": "kline",
        "E": str(event_ms),
        "s": symbol,
        "k": {"t": str(event_ms), "T": None, "s": symbol, "i": "1m", "o": 1.5, "c": [], "x": "true", "n": "12"},
    }
    return orjson.dumps(payload), f"{lower}@kline_1m"


UNKNOWN_KINDS = ("agg_trade", "book_ticker", "kline_5m", "unknown_stream", "unfollowed_symbol", "stray_reply")


def unknown_frame(kind: str, symbol: str, event_ms: int, other_symbol: str) -> tuple[bytes, str | None]:
    """A well-formed frame the client did not ask for: (payload, stream name to wrap it in;
    None = send verbatim). `other_symbol` is one the exchange does not list.

    agg_trade / book_ticker: other event types on their own streams; kline_5m: a closed
    5-minute kline (with values no minute has) on the `@kline_5m` stream; unknown_stream:
    a depth update wrapped in a stream nobody subscribed to; unfollowed_symbol: a closed
    kline for `other_symbol`; stray_reply: an answer to a request never made.
    """
    lower = symbol.lower()
    if kind == "agg_trade":
        trade = first_trade_id(symbol, event_ms - event_ms % MINUTE_MS)
        payload = {
            "e": "aggTrade",
            "E": event_ms,
            "s": symbol,
            "a": trade,
            "p": "1.0000",
            "q": "1.000",
            "f": trade,
            "l": trade,
            "T": event_ms,
            "m": True,
        }
        return orjson.dumps(payload), f"{lower}@aggTrade"
    if kind == "book_ticker":
        payload = {
            "e": "bookTicker",
            "u": event_ms,
            "s": symbol,
            "b": "1.0000",
            "B": "10",
            "a": "1.0001",
            "A": "10",
            "T": event_ms,
            "E": event_ms,
        }
        return orjson.dumps(payload), f"{lower}@bookTicker"
    if kind == "kline_5m":
        open_time = event_ms - event_ms % (5 * MINUTE_MS)
        frame = orjson.loads(foreign_kline(symbol, event_ms))
        frame["k"].update({"t": open_time, "T": open_time + 5 * MINUTE_MS - 1, "i": "5m"})
        return orjson.dumps(frame), f"{lower}@kline_5m"
    if kind == "unknown_stream":
        payload = {
            "e": "depthUpdate",
            "E": event_ms,
            "T": event_ms,
            "s": symbol,
            "U": event_ms,
            "u": event_ms + 1,
            "pu": event_ms - 1,
            "b": [["1.0000", "10"]],
            "a": [["1.0001", "10"]],
        }
        return orjson.dumps(payload), f"{lower}@depth5@100ms"
    if kind == "unfollowed_symbol":
        return foreign_kline(other_symbol, event_ms), f"{other_symbol.lower()}@kline_1m"
    if kind == "stray_reply":
        return reply(event_ms % 1_000_000 + 1_000_000, None), None
    raise ValueError(f"unknown kind {kind!r}")


def foreign_kline(symbol: str, event_ms: int) -> bytes:
    """A well-formed kline for a symbol the client never subscribed to."""
    open_time = event_ms - event_ms % MINUTE_MS
    one = Decimal("1.0000")
    candle = Candle(symbol, "m1", open_time, one, one, one, one, Decimal("1.000"), one, 1, Decimal(0), Decimal(0))
    return kline_event(candle, event_ms, closed=True)
