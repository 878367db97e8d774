"""The REST side: klines (with weights, 429 and 418), aggTrades, the depth snapshot, time,
ping, exchangeInfo; and the fake's own log of when each close frame left it."""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import orjson
from aiohttp import web

from candles import Candle

from .book import DEPTH_DEFAULT_LIMIT, MadeUpBooks, RecordedBooks, depth_weight
from .clock import SimClock
from .faults import Faults, Stats
from .frames import MINUTE_MS, aggregate, partial_candle, rest_row
from .sources import CandleSource
from .trades import TradeBook

INTERVALS_MS = {
    "1m": 60_000,
    "3m": 180_000,
    "5m": 300_000,
    "15m": 900_000,
    "30m": 1_800_000,
    "1h": 3_600_000,
    "2h": 7_200_000,
    "4h": 14_400_000,
    "6h": 21_600_000,
    "8h": 28_800_000,
    "12h": 43_200_000,
    "1d": 86_400_000,
}
DEFAULT_LIMIT, MAX_LIMIT = 500, 1500
AGG_TRADES_DEFAULT_LIMIT, AGG_TRADES_MAX_LIMIT, AGG_TRADES_WEIGHT = 500, 1000, 20
AGG_TRADES_WINDOW_MS = 48 * 3_600_000  # served since late 2026; older: -4166
WEIGHT_HEADER = "X-MBX-USED-WEIGHT-1M"


def klines_weight(limit: int) -> int:
    if limit < 100:
        return 1
    if limit < 500:
        return 2
    if limit <= 1000:
        return 5
    return 10


class WeightLimiter:
    """Binance's per-IP request weight, counted in fixed windows of REAL time.

    Real time, not sim time: the limit is about how fast the client really calls. Over the
    limit -> 429 with Retry-After (seconds to the window's end); calling again before that
    -> 418 (a ban of two windows, growing while the client keeps calling).
    """

    def __init__(self, limit: int, window_s: float) -> None:
        self.limit = limit
        self.window_s = window_s
        self._window = -1
        self.used = 0
        self._retry_until = 0.0
        self._banned_until = 0.0

    def charge(self, weight: int) -> tuple[int, int]:
        """Adds `weight`; returns (HTTP status 200/429/418, Retry-After seconds)."""
        now = time.monotonic()
        window = math.floor(now / self.window_s)
        if window != self._window:
            self._window, self.used = window, 0
        if now < self._banned_until or now < self._retry_until:
            self._banned_until = max(self._banned_until, now + 2 * self.window_s)
            return 418, max(1, math.ceil(self._banned_until - now))
        self.used += weight
        if self.used > self.limit:
            self._retry_until = (window + 1) * self.window_s
            return 429, max(1, math.ceil(self._retry_until - now))
        return 200, 0


@dataclass
class KlinesQuery:
    symbol: str
    interval_ms: int
    start: int | None
    end: int | None
    limit: int


class BinanceError(Exception):
    def __init__(self, status: int, code: int, msg: str, retry_after: int | None = None) -> None:
        super().__init__(msg)
        self.status, self.code, self.msg, self.retry_after = status, code, msg, retry_after


class RestApi:
    def __init__(
        self,
        *,
        clock: SimClock,
        source: CandleSource,
        candle: Callable[[str, int], Candle | None],
        faults: Callable[[], Faults],
        stats: Stats,
        limiter: WeightLimiter,
        trades: TradeBook,
        books: MadeUpBooks | RecordedBooks | None = None,
        book_listened: Callable[[str], bool] = lambda symbol: False,
        book_step_ms: Callable[[], int] = lambda: 100,
        listings: Iterable[dict] = (),
    ) -> None:
        self.clock = clock
        self.source = source
        self._candle = candle
        self._faults = faults
        self.stats = stats
        self.limiter = limiter
        self._forced_418 = False
        self._symbols = set(source.symbols)
        self.trades = trades
        self.books = books
        self._book_listened = book_listened
        self._book_step_ms = book_step_ms
        # exchangeInfo entries beside the replayed symbols (a replayed symbol keeps its own):
        # listed only, no klines, trades or book (their REST answers -1121 like an unknown one)
        self.listings = [dict(item) for item in listings if item.get("symbol") not in self._symbols]

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/fapi/v1/klines", self._klines)
        app.router.add_get("/fapi/v1/aggTrades", self._agg_trades)
        app.router.add_get("/fapi/v1/depth", self._depth)
        app.router.add_get("/fapi/v1/time", self._simple(lambda: {"serverTime": self.clock.now_ms()}))
        app.router.add_get("/fapi/v1/ping", self._simple(lambda: {}))
        app.router.add_get("/fapi/v1/exchangeInfo", self._simple(self._exchange_info))
        app.router.add_get("/fake/closes", self._close_log)

    # --- plumbing -------------------------------------------------------------------------

    async def _close_log(self, request: web.Request) -> web.StreamResponse:
        """Not Binance's: when each close frame left this exchange, from entry `from` on (the
        `next` of the previous answer; entries past the log's size are gone). Free of weight."""
        try:
            start = int(request.query.get("from", "0"))
        except ValueError:
            return web.json_response({"error": "'from' is not an integer"}, status=400)
        log, total = self.stats.close_log, self.stats.closes_logged
        skip = max(start - (total - len(log)), 0)
        return web.json_response({"next": total, "closes": list(itertools.islice(log, skip, None))})

    def _simple(self, body: Callable[[], object]):
        async def handle(request: web.Request) -> web.StreamResponse:
            self.stats.rest_requests += 1
            status, retry_after = self.limiter.charge(1)
            if status != 200:
                return await self._fail(request, self._limit_error(status, retry_after))
            return await self._respond(request, 200, body())

        return handle

    async def _respond(
        self, request: web.Request, status: int, payload: object, extra: dict[str, str] | None = None
    ) -> web.StreamResponse:
        faults = self._faults()
        if faults.rest_delay_s > 0:
            await asyncio.sleep(faults.rest_delay_s)
        body = orjson.dumps(payload)
        headers = {WEIGHT_HEADER: str(self.limiter.used), **(extra or {})}
        if faults.rest_truncate_count > 0:
            faults.rest_truncate_count -= 1
            self.stats.rest_truncated += 1
            return await self._truncated(request, status, body, headers)
        return web.Response(status=status, body=body, headers=headers, content_type="application/json")

    @staticmethod
    async def _truncated(request: web.Request, status: int, body: bytes, headers: dict[str, str]) -> web.StreamResponse:
        """Promise the whole body (Content-Length), deliver half, then close the socket."""
        response = web.StreamResponse(status=status, headers=headers)
        response.content_type = "application/json"
        response.content_length = len(body)
        await response.prepare(request)
        await response.write(body[: len(body) // 2])
        if request.transport is not None:
            request.transport.close()
        return response

    async def _fail(self, request: web.Request, error: BinanceError) -> web.StreamResponse:
        if error.status == 429:
            self.stats.rest_429 += 1
        elif error.status == 418:
            self.stats.rest_418 += 1
        else:
            self.stats.rest_400 += 1
        extra = {"Retry-After": str(error.retry_after)} if error.retry_after is not None else None
        return await self._respond(request, error.status, {"code": error.code, "msg": error.msg}, extra)

    @staticmethod
    def _limit_error(status: int, retry_after: int) -> BinanceError:
        if status == 429:
            msg = "Too many requests; current limit of IP(127.0.0.1) is 2400 requests per minute."
            return BinanceError(429, -1003, msg, retry_after)
        msg = "Way too many requests; IP(127.0.0.1) banned. Please use the websocket for live updates to avoid bans."
        return BinanceError(418, -1003, msg, retry_after)

    # --- klines -------------------------------------------------------------------------------

    async def _klines(self, request: web.Request) -> web.StreamResponse:
        self.stats.rest_requests += 1
        self.stats.rest_klines += 1
        try:
            self._forced_limit_fault()
            query = self._parse(request.query)
            status, retry_after = self.limiter.charge(klines_weight(query.limit))
            if status != 200:
                raise self._limit_error(status, retry_after)
        except BinanceError as error:
            return await self._fail(request, error)
        return await self._respond(request, 200, self._rows(query))

    def _forced_limit_fault(self) -> None:
        faults = self._faults()
        if faults.rest_429_count > 0:
            faults.rest_429_count -= 1
            self._forced_418 = faults.rest_429_count == 0 and faults.rest_418_after_429
            raise self._limit_error(429, faults.retry_after_s)
        if self._forced_418:
            self._forced_418 = False
            raise self._limit_error(418, faults.ban_retry_after_s)

    def _parse(self, params) -> KlinesQuery:
        symbol = params.get("symbol")
        if not symbol:
            raise BinanceError(400, -1102, "Mandatory parameter 'symbol' was not sent, was empty/null, or malformed.")
        interval = params.get("interval")
        if not interval:
            raise BinanceError(400, -1102, "Mandatory parameter 'interval' was not sent, was empty/null, or malformed.")
        if interval not in INTERVALS_MS:
            raise BinanceError(400, -1120, "Invalid interval.")
        limit = self._int_param(params, "limit")
        limit = DEFAULT_LIMIT if limit is None else limit
        if not 1 <= limit <= MAX_LIMIT:
            raise BinanceError(400, -1130, "Data sent for parameter 'limit' is not valid.")
        start, end = self._int_param(params, "startTime"), self._int_param(params, "endTime")
        if start is not None and end is not None and start > end:
            raise BinanceError(400, -1023, "Start time is greater than end time.")
        if symbol not in self._symbols:
            raise BinanceError(400, -1121, "Invalid symbol.")
        return KlinesQuery(symbol, INTERVALS_MS[interval], start, end, limit)

    @staticmethod
    def _int_param(params, name: str) -> int | None:
        raw = params.get(name)
        if raw is None or raw == "":
            return None
        if not raw.isdigit() or len(raw) > 20:
            raise BinanceError(
                400, -1100, f"Illegal characters found in parameter '{name}'; legal range is '^[0-9]{{1,20}}$'."
            )
        return int(raw)

    def _rows(self, q: KlinesQuery) -> list[list[object]]:
        """Rows with open time in [startTime, endTime] and <= now; the last may be still forming."""
        size, now = q.interval_ms, self.clock.now_ms()
        lowest = self.source.first_open_time - self.source.first_open_time % size
        highest = min(now, self.source.last_open_time)
        highest -= highest % size
        if q.end is not None:
            highest = min(highest, q.end - q.end % size)
        rows: list[list[object]] = []
        if q.start is not None:
            bucket = max(lowest, -(-q.start // size) * size)
            while bucket <= highest and len(rows) < q.limit:
                self._append(rows, q.symbol, bucket, size, now)
                bucket += size
            return rows
        bucket = highest
        while bucket >= lowest and len(rows) < q.limit:
            self._append(rows, q.symbol, bucket, size, now)
            bucket -= size
        rows.reverse()
        return rows

    def _append(self, rows: list[list[object]], symbol: str, bucket: int, size: int, now: int) -> None:
        candles = []
        for minute in range(bucket, min(bucket + size, now + 1), MINUTE_MS):
            candle = self._candle(symbol, minute)
            if candle is not None:
                if minute + MINUTE_MS > now:  # the forming minute: what has traded so far
                    candle = partial_candle(candle, (now - minute) / MINUTE_MS)
                candles.append(candle)
        if candles:
            merged = candles[0] if len(candles) == 1 else aggregate(candles)
            rows.append(rest_row(replace_open(merged, bucket), bucket + size - 1))

    # --- aggTrades ----------------------------------------------------------------------------

    @staticmethod
    def _symbol_param(params) -> str:
        symbol = params.get("symbol")
        if not symbol:
            raise BinanceError(400, -1102, "Mandatory parameter 'symbol' was not sent, was empty/null, or malformed.")
        return symbol

    async def _agg_trades(self, request: web.Request) -> web.StreamResponse:
        """By `fromId`, or by `startTime`/`endTime` (within an hour), or the newest; at most
        `limit` (500, up to 1000) rows up to now; weight 20; nothing older than 48 hours."""
        self.stats.rest_requests += 1
        self.stats.rest_agg_trades += 1
        try:
            self._forced_limit_fault()
            params = request.query
            symbol = self._symbol_param(params)
            limit = self._int_param(params, "limit")
            limit = AGG_TRADES_DEFAULT_LIMIT if limit is None else limit
            if not 1 <= limit <= AGG_TRADES_MAX_LIMIT:
                raise BinanceError(400, -1130, "Data sent for parameter 'limit' is not valid.")
            from_id = self._int_param(params, "fromId")
            start, end = self._int_param(params, "startTime"), self._int_param(params, "endTime")
            if from_id is not None and (start is not None or end is not None):
                raise BinanceError(400, -1128, "Combination of optional parameters invalid.")
            if start is not None and end is not None and not 0 <= end - start < 3_600_000:
                raise BinanceError(400, -1127, "More than 1 hours between startTime and endTime.")
            if symbol not in self._symbols:
                raise BinanceError(400, -1121, "Invalid symbol.")
            status, retry_after = self.limiter.charge(AGG_TRADES_WEIGHT)
            if status != 200:
                raise self._limit_error(status, retry_after)
            rows = self._agg_trade_rows(symbol, from_id, start, end, limit)
        except BinanceError as error:
            return await self._fail(request, error)
        return await self._respond(request, 200, rows)

    def _agg_trade_rows(
        self, symbol: str, from_id: int | None, start: int | None, end: int | None, limit: int
    ) -> list[dict]:
        now = self.clock.now_ms()
        newest = min(now - now % MINUTE_MS, self.source.last_open_time)
        oldest_served = now - AGG_TRADES_WINDOW_MS
        if from_id is None and start is None:  # the newest `limit` trades
            rows: list[dict] = []
            minute = newest
            while minute >= max(self.source.first_open_time, oldest_served) and len(rows) < limit:
                rows[:0] = [r for r in self.trades.minute(symbol, minute) if r["T"] <= now]
                minute -= MINUTE_MS
            return rows[-limit:]
        if from_id is not None:
            found = self.trades.minute_of_id(symbol, from_id, newest)
            if found is None:
                return []
            minute, last_minute = found, newest

            def wanted(row: dict) -> bool:
                return row["a"] >= from_id
        else:
            first_ms = start or 0
            last_ms = min(now, end if end is not None else first_ms + 3_600_000 - 1)
            minute, last_minute = first_ms - first_ms % MINUTE_MS, last_ms - last_ms % MINUTE_MS

            def wanted(row: dict) -> bool:
                return first_ms <= row["T"] <= last_ms

        if minute < oldest_served - oldest_served % MINUTE_MS:
            raise BinanceError(400, -4166, "Search window is restricted to recent 2 days only.")
        rows = []
        while minute <= min(last_minute, newest) and len(rows) < limit:
            rows += [r for r in self.trades.minute(symbol, minute) if r["T"] <= now and wanted(r)]
            minute += MINUTE_MS
        return rows[:limit]

    # --- depth ---------------------------------------------------------------------------------

    async def _depth(self, request: web.Request) -> web.StreamResponse:
        """The order book now: limit 5..1000 (default 500), weight 2/5/10/20 by limit; the
        `stale_snapshots` fault answers an older book."""
        self.stats.rest_requests += 1
        self.stats.rest_depth += 1
        try:
            self._forced_limit_fault()
            params = request.query
            symbol = self._symbol_param(params)
            limit = self._int_param(params, "limit")
            limit = DEPTH_DEFAULT_LIMIT if limit is None else limit
            weight = depth_weight(limit)
            if weight is None:
                raise BinanceError(400, -1130, "Data sent for parameter 'limit' is not valid.")
            if symbol not in self._symbols or self.books is None:
                raise BinanceError(400, -1121, "Invalid symbol.")
            status, retry_after = self.limiter.charge(weight)
            if status != 200:
                raise self._limit_error(status, retry_after)
        except BinanceError as error:
            return await self._fail(request, error)
        faults = self._faults()
        stale = faults.stale_snapshots > 0
        if stale:
            faults.stale_snapshots -= 1
            self.stats.book_stale_snapshots += 1
        body = self.books.snapshot(
            symbol,
            self.clock.now_ms(),
            limit,
            self._book_step_ms(),
            listened=self._book_listened(symbol),
            stale=stale,
        )
        return await self._respond(request, 200, body)

    # --- exchangeInfo -------------------------------------------------------------------------

    def _exchange_info(self) -> dict[str, object]:
        return {
            "timezone": "UTC",
            "serverTime": self.clock.now_ms(),
            "futuresType": "U_MARGINED",
            "rateLimits": [
                {
                    "rateLimitType": "REQUEST_WEIGHT",
                    "interval": "MINUTE",
                    "intervalNum": 1,
                    "limit": self.limiter.limit,
                },
                {"rateLimitType": "ORDERS", "interval": "MINUTE", "intervalNum": 1, "limit": 1200},
                {"rateLimitType": "ORDERS", "interval": "SECOND", "intervalNum": 10, "limit": 300},
            ],
            "exchangeFilters": [],
            "assets": [{"asset": "USDT", "marginAvailable": True, "autoAssetExchange": "-10000"}],
            "symbols": [self._symbol_info(s) for s in self.source.symbols] + self.listings,
        }

    def _symbol_info(self, symbol: str) -> dict[str, object]:
        sample = self.source.candle(symbol, self.source.first_open_time)
        price_dp = max(0, -int(sample.close.as_tuple().exponent)) if sample else 4  # type: ignore[operator]
        qty_dp = max(0, -int(sample.volume.as_tuple().exponent)) if sample else 3  # type: ignore[operator]
        tick, step = _unit_str(price_dp), _unit_str(qty_dp)
        base = symbol.removesuffix("USDT")
        return {
            "symbol": symbol,
            "pair": symbol,
            "contractType": "PERPETUAL",
            "deliveryDate": 4133404800000,
            "onboardDate": 1569398400000,
            "status": "TRADING",
            "maintMarginPercent": "2.5000",
            "requiredMarginPercent": "5.0000",
            "baseAsset": base,
            "quoteAsset": "USDT",
            "marginAsset": "USDT",
            "pricePrecision": price_dp,
            "quantityPrecision": qty_dp,
            "baseAssetPrecision": 8,
            "quotePrecision": 8,
            "underlyingType": "COIN",
            "underlyingSubType": [],
            "triggerProtect": "0.0500",
            "liquidationFee": "0.015000",
            "marketTakeBound": "0.05",
            "maxMoveOrderLimit": 10000,
            "filters": [
                {"filterType": "PRICE_FILTER", "tickSize": tick, "minPrice": tick, "maxPrice": "1000000"},
                {"filterType": "LOT_SIZE", "stepSize": step, "minQty": step, "maxQty": "10000000"},
                {"filterType": "MARKET_LOT_SIZE", "stepSize": step, "minQty": step, "maxQty": "1000000"},
                {"filterType": "MAX_NUM_ORDERS", "limit": 200},
                {"filterType": "MIN_NOTIONAL", "notional": "5"},
                {
                    "filterType": "PERCENT_PRICE",
                    "multiplierUp": "1.0500",
                    "multiplierDown": "0.9500",
                    "multiplierDecimal": "4",
                },
            ],
            "orderTypes": [
                "LIMIT",
                "MARKET",
                "STOP",
                "STOP_MARKET",
                "TAKE_PROFIT",
                "TAKE_PROFIT_MARKET",
                "TRAILING_STOP_MARKET",
            ],
            "timeInForce": ["GTC", "IOC", "FOK", "GTX", "GTD"],
            "permissionSets": ["GRID", "COPY", "DCA"],
        }


def load_listings(path: str | Path) -> list[dict]:
    """The `symbols` entries of a saved exchangeInfo answer (e.g. the real one in
    ../shared/data/ws_frames/fstream_2026-10-07/rest_exchange_info_trimmed.json, which lists a
    SETTLING perpetual, a quarterly contract, a TradFi perpetual and a non-ASCII name), for
    `FakeExchange(listings=...)` / `--listings FILE`."""
    payload = orjson.loads(Path(path).read_bytes())
    symbols = payload.get("symbols") if isinstance(payload, dict) else None
    if not isinstance(symbols, list) or not all(
        isinstance(s, dict) and isinstance(s.get("symbol"), str) for s in symbols
    ):
        raise ValueError(f"{path}: not an exchangeInfo answer (no 'symbols' list of objects with a 'symbol')")
    return symbols


def _unit_str(decimals: int) -> str:
    return "1" if decimals == 0 else "0." + "0" * (decimals - 1) + "1"


def replace_open(candle: Candle, open_time: int) -> Candle:
    """An aggregated bucket is stamped with the bucket's open, not its first present minute's."""
    return candle if candle.open_time == open_time else replace(candle, open_time=open_time)
