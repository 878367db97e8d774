"""FakeExchange: the aiohttp application tying clock, scheduler, WebSocket and REST together."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterable

from aiohttp import web

from candles import Candle

from .archive import ArchiveTree
from .book import BookConfig, MadeUpBooks, RecordedBooks
from .clock import SimClock
from .faults import Faults, Stats
from .hub import StreamHub
from .recordings import RecordingSource, load_recorded_book
from .rest_api import RestApi, WeightLimiter
from .scheduler import PushConfig, Scheduler
from .sources import CandleSource, SyntheticSource
from .trades import MINUTE_MS, TRADES_PER_AGG, TradeBook
from .ws_api import WsGateway, WsLimits


class FakeExchange:
    """A protocol-faithful Binance USDⓈ-M futures exchange on one local port (HTTP + WebSocket).

    `ws_url` is the base the feed appends "/stream?streams=..." to (like
    wss://fstream.binance.com/market), `public_ws_url` the same for the book streams
    (wss://fstream.binance.com/public); `rest_url` replaces https://fapi.binance.com.
    Order books (`book`, None: none) are made up for synthetic and archive symbols and
    replayed for the recordings; they cost nothing until a symbol's book is asked for.
    `listings`: extra exchangeInfo entries (rest_api.load_listings) listed beside the
    replayed symbols, e.g. delisted or quarterly ones; nothing is served for them.
    """

    def __init__(
        self,
        source: CandleSource,
        *,
        start_ms: int | None = None,
        speed: float = 1.0,
        host: str = "127.0.0.1",
        port: int = 0,
        seed: int = 7,
        mark_prices: bool = True,
        close_delay_ms: tuple[int, int] = (200, 2000),
        updates_per_minute: int = 4,
        weight_limit: int = 2400,
        max_streams_per_connection: int = 1024,
        max_incoming_per_second: int = 10,
        weight_window_s: float = 60.0,
        ping_interval_s: float = 180.0,
        pong_timeout_s: float = 600.0,
        max_queue_frames: int = 20_000,
        mark_pushes_per_s: float = 4.0,
        mark_arr_chunk: int = 100,
        trades_per_agg: int = TRADES_PER_AGG,
        trades: TradeBook | None = None,
        book: BookConfig | None = None,
        books: bool = True,
        listings: Iterable[dict] = (),
    ) -> None:
        self.source = source
        self.host = host
        self.port = port
        self._start_ms = source.first_open_time if start_ms is None else start_ms
        self.faults = Faults(rng=random.Random(seed))
        self.stats = Stats()
        self.clock = SimClock(self._start_ms, speed)
        self.hub = StreamHub(self.stats)
        self.limiter = WeightLimiter(weight_limit, weight_window_s)
        # A synthetic source's trades (and their ids) begin at the replay's start: counting
        # ids from its first minute, a month back, made up every minute since at the first
        # boundary (2 million candles for 50 symbols), stalling the exchange for tens of
        # seconds. Earlier minutes have no aggTrades there, as if trading began at the start.
        trades_from = source.first_open_time
        if isinstance(source, SyntheticSource):
            trades_from = max(trades_from, self._start_ms - self._start_ms % MINUTE_MS)
        self.trades = trades or TradeBook(self.candle, trades_from, seed, trades_per_agg)
        self.books = self._make_books(book or BookConfig(seed=seed)) if books else None
        self.ws = WsGateway(
            self.hub,
            lambda: self.faults,
            self.stats,
            WsLimits(
                max_streams_per_connection=max_streams_per_connection,
                max_incoming_per_second=max_incoming_per_second,
                ping_interval_s=ping_interval_s,
                pong_timeout_s=pong_timeout_s,
                max_queue_frames=max_queue_frames,
            ),
        )
        self.rest = RestApi(
            clock=self.clock,
            source=source,
            candle=self.candle,
            faults=lambda: self.faults,
            stats=self.stats,
            limiter=self.limiter,
            trades=self.trades,
            books=self.books,
            book_listened=lambda symbol: self.scheduler.book_listened(symbol),
            book_step_ms=lambda: self.scheduler.book_step_ms(),
            listings=listings,
        )
        self.scheduler = Scheduler(
            clock=self.clock,
            hub=self.hub,
            source=source,
            candle=self.candle,
            faults=lambda: self.faults,
            stats=self.stats,
            config=PushConfig(close_delay_ms, updates_per_minute, mark_prices, mark_pushes_per_s, mark_arr_chunk),
            seed=seed,
            trades=self.trades,
            books=self.books,
        )
        self.archive = ArchiveTree(
            source.symbols,
            source.first_open_time,
            source.last_open_time,
            source.candle,
            self.trades.minute,
            self.clock.now_ms,
            lambda: self.faults.archive_corrupt,
        )
        self._runner: web.AppRunner | None = None

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Listen, then start the simulated clock at `start_ms` (time spent before start() does not count)."""
        app = web.Application()
        self.ws.add_routes(app)
        self.rest.add_routes(app)
        app.router.add_get("/{path:data/.+}", self._archive_file)
        # 64 KiB request lines: a /stream?streams= URL with 1024 streams is ~30 KB (aiohttp's default is 8 KiB).
        self._runner = web.AppRunner(
            app, handle_signals=False, access_log=None, shutdown_timeout=1.0, max_line_size=65_536
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        server = site._server
        if server is not None and self.port == 0:
            self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.clock.restart(self._start_ms)
        self.scheduler.start()
        self.ws.start()

    async def stop(self) -> None:
        await self.scheduler.stop()
        await self.ws.stop()
        for conn in tuple(self.hub.connections):
            conn.abort()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeExchange:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _archive_file(self, request: web.Request) -> web.Response:
        """data.binance.vision's files, as its bucket answers them (404 for no file)."""
        data = self.archive.file(request.match_info["path"])
        if data is None:
            return web.Response(status=404, text="<Error><Code>NoSuchKey</Code></Error>", content_type="text/xml")
        kind = "text/plain" if request.path.endswith(".CHECKSUM") else "application/zip"
        return web.Response(body=data, content_type=kind)

    # --- addresses ----------------------------------------------------------------------------

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.port}/market"

    @property
    def rest_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def archive_url(self) -> str:
        """The base of the archive tree (data.binance.vision's `https://data.binance.vision`)."""
        return f"http://{self.host}:{self.port}"

    @property
    def public_ws_url(self) -> str:
        return f"ws://{self.host}:{self.port}/public"

    # --- data ---------------------------------------------------------------------------------

    def _make_books(self, config: BookConfig) -> MadeUpBooks | RecordedBooks:
        if isinstance(self.source, RecordingSource):
            return RecordedBooks(config, self.source.symbols, load_recorded_book)
        return MadeUpBooks(config, self.source.candle, self.source.first_open_time)

    def candle(self, symbol: str, open_time_ms: int) -> Candle | None:
        """The exchange's view of a minute: the source's candle unless the minute is 'missing'."""
        if self.faults.missing_minutes and (symbol, open_time_ms) in self.faults.missing_minutes:
            return None
        return self.source.candle(symbol, open_time_ms)

    # --- connection control (tests) -----------------------------------------------------------

    def drop_all_connections(self) -> None:
        """Abort every TCP connection: no close frame, the client sees 1006."""
        for conn in tuple(self.hub.connections):
            conn.abort()

    async def close_all_connections(self, code: int = 1001, reason: str = "24h") -> None:
        """A clean server-initiated close of every connection, like Binance's 24-hour cut."""
        conns = tuple(self.hub.connections)
        await asyncio.gather(*(conn.close(code, reason) for conn in conns), return_exceptions=True)

    def subscriptions(self) -> list[set[str]]:
        """The streams of each open connection (legacy ones included: they subscribed, they just get nothing)."""
        return [set(conn.streams) for conn in self.hub.connections if not conn.closed]
