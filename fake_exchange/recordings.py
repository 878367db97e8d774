"""The real 2024-07-19 recordings (`../shared/data/binance_um_streams_2024-07-19`) as an
exchange: Binance's own 1m klines for the candles, the recorded trades as aggTrades (a
run of consecutive MARKET trades with one time, price and side is one aggTrade: the
recording has raw trades, which do not name their taker order). BTCUSDT and ETHUSDT,
2024-07-18 23:57 to 2024-07-19 00:05; the first and last minutes are recorded in part.
The recorded bookTicker and depth frames (and the REST snapshot) are replayed by
book.RecordedBooks; the depth, recorded as `<s>@depth@0ms`, goes out as `<s>@depth@100ms`
unchanged."""

from __future__ import annotations

import csv
from decimal import Decimal
from pathlib import Path

from candles import Candle
from market_data import STREAMS_DIR, recorded_agg_trades, recorded_book_frames

from .book import RecordedBook, recorded_book
from .trades import TradeBook

MINUTE_MS = 60_000
RECORDED_SYMBOLS = ["BTCUSDT", "ETHUSDT"]


class RecordingSource:
    """Binance's klines of the recorded minutes (`klines_1m.csv`)."""

    def __init__(self, symbols: list[str] | None = None, streams_dir: Path = STREAMS_DIR) -> None:
        self.symbols = list(symbols or RECORDED_SYMBOLS)
        self._rows: dict[tuple[str, int], Candle] = {}
        with open(streams_dir / "klines_1m.csv", newline="") as f:
            for row in csv.DictReader(f):
                if row["symbol"] in self.symbols:
                    t = int(row["open_time"])
                    self._rows[(row["symbol"], t)] = Candle(
                        row["symbol"],
                        "m1",
                        t,
                        *(Decimal(row[k]) for k in ("open", "high", "low", "close", "volume", "quote_volume")),
                        int(row["count"]),
                        Decimal(row["taker_buy_volume"]),
                        Decimal(row["taker_buy_quote_volume"]),
                    )
        self.first_open_time = min(t for _, t in self._rows)
        self.last_open_time = max(t for _, t in self._rows)

    def candle(self, symbol: str, open_time_ms: int) -> Candle | None:
        return self._rows.get((symbol, open_time_ms))


class RecordedTrades(TradeBook):
    """The recorded trades as aggTrades, served minute by minute like the made-up ones."""

    def __init__(self, source: RecordingSource, streams_dir: Path = STREAMS_DIR) -> None:
        super().__init__(source.candle, source.first_open_time)
        self._minutes: dict[tuple[str, int], list[dict]] = {}
        for symbol in source.symbols:
            for event in recorded_agg_trades(symbol, streams_dir):
                row = {k: event[k] for k in ("a", "p", "q", "f", "l", "T", "m")}
                self._minutes.setdefault((symbol, row["T"] - row["T"] % MINUTE_MS), []).append(row)

    def minute(self, symbol: str, minute: int) -> list[dict]:
        return self._minutes.get((symbol, minute), [])

    def trade_ids(self, symbol: str, minute: int) -> tuple[int, int] | None:
        rows = self._minutes.get((symbol, minute))
        return (rows[0]["f"], rows[-1]["l"]) if rows else (-1, -1)

    def minute_of_id(self, symbol: str, agg_id: int, newest_minute: int) -> int | None:
        for (s, t), rows in sorted(self._minutes.items()):
            if s == symbol and t <= newest_minute and rows[0]["a"] <= agg_id <= rows[-1]["a"]:
                return t
        return None


def load_recorded_book(symbol: str, streams_dir: Path = STREAMS_DIR) -> RecordedBook:
    """A recorded symbol's bookTicker and depth frames and its REST snapshot, for replay."""
    return recorded_book(symbol, list(recorded_book_frames(symbol, streams_dir)))
