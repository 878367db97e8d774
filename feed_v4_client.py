"""A small client of the feed_v4 read API for strategy code and notebooks: pandas
DataFrames indexed by UTC time, with no knowledge of Redis keys or tables.

    from feed_v4_client import FeedClient
    feed = FeedClient("http://127.0.0.1:8080", token="...")   # or FEED_V4_URL / FEED_V4_TOKEN
    df = feed.candles("BTCUSDT", "m5", limit=2000, indicators=True)

Prices and volumes arrive as exact decimal strings and become float64 columns here
(`exact=True` keeps them as `decimal.Decimal`). Missing values are NaN. Longer ranges
than the API's page (5,000 rows) are fetched page by page, oldest first. Standard
library HTTP only (plus pandas), so it runs wherever pandas does.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from decimal import Decimal
from typing import Any

import pandas as pd

PAGE = 5_000
FOOTPRINT_PAGE = 2_000
TEXT_COLUMNS = frozenset({"symbol", "status"})


class FeedApiError(RuntimeError):
    """The API refused a request; `status` is the HTTP status, the message its reason."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


class FeedClient:
    def __init__(self, url: str | None = None, token: str | None = None, timeout: float = 30.0) -> None:
        self.url = (url or os.environ.get("FEED_V4_URL") or "http://127.0.0.1:8080").rstrip("/")
        self.token = token if token is not None else os.environ.get("FEED_V4_TOKEN")
        self.timeout = timeout

    # ------------------------------------------------------------------ HTTP

    def get(self, path: str, **params: Any) -> Any:
        """The decoded JSON of `GET /api/v1/<path>`; FeedApiError on a refusal."""
        query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
        request = urllib.request.Request(f"{self.url}/api/v1/{path}" + (f"?{query}" if query else ""))
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            try:
                reason = json.loads(exc.read()).get("error", exc.reason)
            except ValueError:
                reason = exc.reason
            raise FeedApiError(exc.code, str(reason)) from None

    def _pages(self, path: str, limit: int, page: int, time_key: str = "open_time", **params: Any) -> list[dict]:
        """Up to `limit` rows ending at `end`, oldest first, in pages of at most `page`."""
        rows: list[dict] = []
        end = params.pop("end", None)
        while len(rows) < limit:
            chunk = self.get(path, limit=min(page, limit - len(rows)), end=end, **params)
            if not chunk:
                break
            rows[:0] = chunk
            end = chunk[0][time_key] - 1
            if len(chunk) < min(page, limit):
                break
        return rows

    # ------------------------------------------------------------------ reads

    def symbols(self) -> pd.DataFrame:
        rows = self.get("symbols")
        frame = pd.DataFrame(
            [
                {k: v for k, v in r.items() if k != "newest"} | {f"newest_{tf}": t for tf, t in r["newest"].items()}
                for r in rows
            ]
        )
        return frame.set_index("symbol") if not frame.empty else frame

    def candles(
        self, symbol: str, tf: str = "m1", limit: int = 500, end: int | None = None, *, indicators: bool = False,
        exact: bool = False,
    ) -> pd.DataFrame:  # fmt: skip
        """Candles (and, with `indicators=True`, every indicator output as a column)."""
        frame = _frame(self._pages("candles", limit, PAGE, symbol=symbol, tf=tf, end=end), "open_time", exact)
        if indicators and not frame.empty:
            values = self.indicators(symbol, tf, limit=limit, end=end)
            frame = frame.join(values, how="left")
        return frame

    def indicators(self, symbol: str, tf: str = "m1", limit: int = 500, end: int | None = None) -> pd.DataFrame:
        rows = self._pages("indicators", limit, PAGE, symbol=symbol, tf=tf, end=end)
        return _frame([{"open_time": r["open_time"], **r["values"]} for r in rows], "open_time", False)

    def orderflow(
        self, symbol: str, tf: str = "m1", limit: int = 500, end: int | None = None, exact: bool = False
    ) -> pd.DataFrame:
        return _frame(self._pages("orderflow", limit, PAGE, symbol=symbol, tf=tf, end=end), "open_time", exact)

    def features(self, symbol: str, limit: int = 500, end: int | None = None) -> pd.DataFrame:
        return _frame(self._pages("features", limit, PAGE, time_key="ts", symbol=symbol, end=end), "ts", False)

    def footprint(self, symbol: str, tf: str = "m1", open_time: int | None = None, exact: bool = False) -> pd.DataFrame:
        """One bar's rows (price = the row's low edge), with the document's POC, value
        area and finality in `.attrs`."""
        document = self.get("footprint", symbol=symbol, tf=tf, open_time=open_time)
        frame = _frame(document["rows"], None, exact)
        frame.attrs.update({k: v for k, v in document.items() if k != "rows"})
        return frame

    def book(self, symbol: str) -> dict[str, Any]:
        """The depth filter: `bids` and `asks` as DataFrames (price, qty; best first), and
        the document's `update_id` and `time`."""
        document = self.get("book", symbol=symbol)
        out: dict[str, Any] = {k: v for k, v in document.items() if k not in ("bids", "asks")}
        for side in ("bids", "asks"):
            out[side] = pd.DataFrame(
                [(float(p), float(q)) for p, q in document[side]], columns=["price", "qty"], dtype="float64"
            )
        return out


def _frame(rows: list[dict], time_key: str | None, exact: bool) -> pd.DataFrame:
    """Rows as a DataFrame: decimal strings as float64 (or Decimal), null as NaN, the time
    column as a UTC DatetimeIndex named `time_key`."""
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    for column in frame.columns:
        if column == time_key or column in TEXT_COLUMNS:
            continue
        series = frame[column]
        if series.map(lambda v: isinstance(v, str)).any():
            frame[column] = series.map(lambda v: None if v is None else Decimal(v)) if exact else pd.to_numeric(series)
        elif series.dtype == object:
            frame[column] = pd.to_numeric(series)
    if time_key is not None:
        frame[time_key] = pd.to_datetime(frame[time_key], unit="ms", utc=True)
        frame = frame.set_index(time_key)
    return frame
