"""The fake exchange's data.binance.vision: daily kline and aggTrade archives made from
the data it replays, zipped, each with its `.CHECKSUM`.

Files of even days carry the header line recent archives have, odd days none (as older
ones). A day's file exists once the day has ended on the exchange's clock (the archives
appear the next day). It holds every minute of the source, also those its REST pretends
never existed (`Faults.missing_minutes`): the way an outage's minutes come back in the
archives. `Faults.archive_corrupt` names files served damaged (their checksum fails).
"""

from __future__ import annotations

import hashlib
import io
import re
import zipfile
from collections.abc import Callable, Iterable
from datetime import UTC, date, datetime

from candles import Candle

DAY_MS = 86_400_000
MINUTE_MS = 60_000
KLINE_HEADER = (
    "open_time,open,high,low,close,volume,close_time,quote_volume,count,taker_buy_volume,taker_buy_quote_volume,ignore"
)
AGG_TRADE_HEADER = "agg_trade_id,price,quantity,first_trade_id,last_trade_id,transact_time,is_buyer_maker"
PATH = re.compile(
    r"^data/futures/um/daily/(?P<kind>klines|aggTrades)/(?P<symbol>[A-Z0-9]+)(?:/1m)?/"
    r"(?P=symbol)-(?:1m|aggTrades)-(?P<day>\d{4}-\d{2}-\d{2})\.zip(?P<checksum>\.CHECKSUM)?$"
)


def kline_lines(candles: Iterable[Candle]) -> list[str]:
    return [
        f"{c.open_time},{c.open},{c.high},{c.low},{c.close},{c.volume},{c.open_time + MINUTE_MS - 1},"
        f"{c.quote_volume},{c.trades},{c.taker_buy_volume},{c.taker_buy_quote_volume},0"
        for c in candles
    ]


def agg_trade_lines(rows: Iterable[dict]) -> list[str]:
    return [f"{r['a']},{r['p']},{r['q']},{r['f']},{r['l']},{r['T']},{'true' if r['m'] else 'false'}" for r in rows]


def zipped(name: str, lines: list[str], header: str | None) -> bytes:
    text = io.StringIO()
    if header:
        text.write(header + "\n")
    text.writelines(line + "\n" for line in lines)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(name.removesuffix(".zip") + ".csv", text.getvalue())
    return out.getvalue()


def checksum_text(data: bytes, name: str) -> str:
    return f"{hashlib.sha256(data).hexdigest()}  {name}\n"


class ArchiveTree:
    """Answers a path under the archive's base: the bytes, or None (no such file)."""

    def __init__(
        self,
        symbols: Iterable[str],
        first_open_time: int,
        last_open_time: int,
        candle: Callable[[str, int], Candle | None],
        trades: Callable[[str, int], list[dict]],
        now_ms: Callable[[], int],
        corrupt: Callable[[], set[str]] = set,
    ) -> None:
        self.symbols = set(symbols)
        self.first, self.last = first_open_time, last_open_time
        self._candle, self._trades, self._now, self._corrupt = candle, trades, now_ms, corrupt
        self._cache: dict[tuple[str, str, date], bytes] = {}

    def file(self, path: str) -> bytes | None:
        match = PATH.match(path)
        if match is None or match["symbol"] not in self.symbols:
            return None
        kind, symbol = match["kind"], match["symbol"]
        try:
            day = date.fromisoformat(match["day"])
        except ValueError:
            return None
        start = int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp() * 1000)
        if start + DAY_MS > self._now() or start + DAY_MS <= self.first or start > self.last:
            return None  # not published yet, or nothing of the source in it
        name = path.rsplit("/", 1)[1].removesuffix(".CHECKSUM")
        data = self._zip(kind, symbol, day, start, name)
        if match["checksum"]:
            return checksum_text(data, name).encode()
        if name in self._corrupt():
            data = data[:-40] + bytes(b ^ 0xFF for b in data[-40:])
        return data

    def _zip(self, kind: str, symbol: str, day: date, start: int, name: str) -> bytes:
        key = (kind, symbol, day)
        data = self._cache.get(key)
        if data is None:
            minutes = range(start, start + DAY_MS, MINUTE_MS)
            if kind == "klines":
                lines = kline_lines(c for t in minutes if (c := self._candle(symbol, t)) is not None)
                header = KLINE_HEADER
            else:
                lines = agg_trade_lines(row for t in minutes for row in self._trades(symbol, t))
                header = AGG_TRADE_HEADER
            data = zipped(name, lines, header if day.day % 2 == 0 else None)
            if len(self._cache) > 64:
                self._cache.clear()
            self._cache[key] = data
        return data
