"""The WebSocket side: routes, the SUBSCRIBE/UNSUBSCRIBE/LIST_SUBSCRIPTIONS protocol, limits, pings.

Market data itself is pushed by the scheduler through the hub; this module only manages
connections and answers what clients send.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import orjson
from aiohttp import WSMsgType, web

from .book import is_public_stream
from .faults import Faults, Stats
from .frames import error_reply, reply
from .hub import Connection, StreamHub

log = logging.getLogger("fake_exchange")

METHODS = ("SUBSCRIBE", "UNSUBSCRIBE", "LIST_SUBSCRIPTIONS", "SET_PROPERTY", "GET_PROPERTY")
TOO_MANY_REQUESTS = "Too many requests"


@dataclass
class WsLimits:
    max_streams_per_connection: int = 1024
    max_incoming_per_second: int = 10
    ping_interval_s: float = 180.0  # Binance pings every 3 minutes...
    pong_timeout_s: float = 600.0  # ...and drops a client that has not ponged for 10
    max_queue_frames: int = 20_000  # per connection; overflow drops the client
    close_timeout_s: float = 2.0  # how long a server-side close waits for the client's reply


class WsGateway:
    """Accepts connections on the /market routes (klines, aggTrades, mark prices), the
    /public ones (bookTicker, depth) and the legacy ones (silent). A stream asked for on
    the wrong route is acknowledged and never served, as on Binance."""

    def __init__(self, hub: StreamHub, faults: Callable[[], Faults], stats: Stats, limits: WsLimits) -> None:
        self.hub = hub
        self._faults = faults  # a getter: tests may replace the exchange's Faults object
        self.stats = stats
        self.limits = limits
        self._pinger: asyncio.Task[None] | None = None

    def add_routes(self, app: web.Application) -> None:
        for path, combined, legacy in (
            ("/market/stream", True, False),
            ("/market/ws", False, False),
            ("/market/ws/{tail:.+}", False, False),
            ("/public/stream", True, False),
            ("/public/ws", False, False),
            ("/public/ws/{tail:.+}", False, False),
            ("/stream", True, True),
            ("/ws", False, True),
            ("/ws/{tail:.+}", False, True),
        ):
            app.router.add_get(path, self._handler(combined, legacy))

    def start(self) -> None:
        self._pinger = asyncio.create_task(self._ping_loop(), name="fake-exchange-pinger")

    async def stop(self) -> None:
        if self._pinger is not None:
            self._pinger.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pinger
            self._pinger = None

    def _handler(self, combined: bool, legacy: bool):
        async def handle(request: web.Request) -> web.StreamResponse:
            return await self._serve(request, combined=combined, legacy=legacy)

        return handle

    # --- one connection ---------------------------------------------------------------

    async def _serve(self, request: web.Request, *, combined: bool, legacy: bool) -> web.StreamResponse:
        ws = web.WebSocketResponse(
            autoping=False, compress=False, timeout=self.limits.close_timeout_s, max_msg_size=1 << 20
        )
        transport = request.transport
        await ws.prepare(request)
        conn = Connection(
            ws,
            transport,  # type: ignore[arg-type]
            path=request.path,
            combined=combined,
            legacy=legacy,
            max_queue=self.limits.max_queue_frames,
            stats=self.stats,
        )
        self.hub.add(conn)
        self.stats.connections_opened += 1
        sender = asyncio.create_task(conn.run_sender())
        try:
            initial = self._url_streams(request)
            if len(initial) > self.limits.max_streams_per_connection:
                await self._reject(conn, "Too many streams")
            else:
                self._subscribe(conn, initial)
                await self._receive_loop(conn)
        finally:
            conn.closed = True
            self.hub.remove(conn)
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender
            self.stats.connections_closed += 1
        return ws

    def _subscribe(self, conn: Connection, streams: list[str]) -> None:
        """Streams of the connection's route are served; others are only listed."""
        public = conn.path.startswith("/public")
        for name in streams:
            if conn.legacy or is_public_stream(name) == public:
                self.hub.subscribe(conn, (name,))
            else:
                conn.streams[name] = None

    @staticmethod
    def _url_streams(request: web.Request) -> list[str]:
        raw = request.match_info.get("tail") or request.query.get("streams", "")
        return [name for name in raw.split("/") if name]

    async def _receive_loop(self, conn: Connection) -> None:
        ws = conn.ws
        async for msg in ws:
            if not self._within_rate(conn):
                await self._reject(conn, TOO_MANY_REQUESTS)
                return
            if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                self.stats.client_messages += 1
                await self._on_request(conn, msg.data)
                if conn.closed:
                    return
            elif msg.type is WSMsgType.PING:
                with contextlib.suppress(ConnectionError, RuntimeError):
                    await ws.pong(msg.data)
            elif msg.type is WSMsgType.PONG:  # solicited or not: both are fine
                conn.last_pong = time.monotonic()
            elif msg.type is WSMsgType.ERROR:
                return

    def _within_rate(self, conn: Connection) -> bool:
        """Binance counts every incoming frame (requests, pings, pongs): at most N per second."""
        now = time.monotonic()
        window = conn.incoming
        window.append(now)
        while window and now - window[0] >= 1.0:
            window.popleft()
        return len(window) <= self.limits.max_incoming_per_second

    async def _reject(self, conn: Connection, reason: str) -> None:
        self.stats.rate_limit_closes += 1
        await conn.close(1008, reason)

    # --- requests -----------------------------------------------------------------------

    async def _on_request(self, conn: Connection, raw: str | bytes) -> None:
        try:
            request = orjson.loads(raw)
        except orjson.JSONDecodeError:
            self._error(conn, None, 3, "Invalid JSON: expected value at line 1 column 1")
            return
        if not isinstance(request, dict):
            self._error(conn, None, 2, "Invalid request: expected a JSON object")
            return
        request_id = request.get("id")
        if request_id is not None and (
            isinstance(request_id, bool) or not isinstance(request_id, int | str) or request_id == -1
        ):
            self._error(conn, None, 2, "Invalid request: request ID must be an unsigned integer")
            return
        method = request.get("method")
        if method not in METHODS:
            if method is None:
                self._error(conn, request_id, 2, "Invalid request: missing field `method`")
            else:
                expected = ", ".join(f"`{m}`" for m in METHODS)
                self._error(
                    conn, request_id, 2, f"Invalid request: unknown variant `{method}`, expected one of {expected}"
                )
            return
        params = request.get("params", [])
        if not isinstance(params, list) or not all(isinstance(p, str) for p in params):
            self._error(conn, request_id, 2, "Invalid request: invalid type: params must be a sequence of strings")
            return
        await self._dispatch(conn, method, params, request_id)

    async def _dispatch(self, conn: Connection, method: str, params: list[str], request_id: object) -> None:
        if method == "SUBSCRIBE":
            if self._faults().reject_subscribe_1008:
                await self._reject(conn, TOO_MANY_REQUESTS)
                return
            if len(set(conn.streams) | set(params)) > self.limits.max_streams_per_connection:
                await self._reject(conn, "Too many streams")
                return
            self._subscribe(conn, params)
            conn.push(reply(request_id, None))
        elif method == "UNSUBSCRIBE":
            self.hub.unsubscribe(conn, params)
            conn.push(reply(request_id, None))
        elif method == "LIST_SUBSCRIPTIONS":
            conn.push(reply(request_id, list(conn.streams)))
        elif method == "SET_PROPERTY":
            if len(params) != 2 or params[0] != "combined" or not isinstance(params[1], bool):
                self._error(conn, request_id, 0, "Unknown property")
                return
            conn.combined = params[1]
            conn.push(reply(request_id, None))
        else:  # GET_PROPERTY
            if params != ["combined"]:
                self._error(conn, request_id, 0, "Unknown property")
                return
            conn.push(reply(request_id, conn.combined))

    def _error(self, conn: Connection, request_id: object, code: int, msg: str) -> None:
        self.stats.client_errors += 1
        conn.push(error_reply(request_id, code, msg))

    # --- keepalive ------------------------------------------------------------------------

    async def _ping_loop(self) -> None:
        """One task pings every connection each interval and drops those silent too long."""
        while True:
            await asyncio.sleep(self.limits.ping_interval_s)
            now = time.monotonic()
            for conn in tuple(self.hub.connections):
                if conn.closed:
                    continue
                if now - conn.last_pong > self.limits.pong_timeout_s:
                    log.info("dropping %s: no pong for %.0f s", conn.path, now - conn.last_pong)
                    conn.abort()
                    continue
                try:
                    await conn.ws.ping(str(int(now * 1000)).encode())
                    self.stats.pings_sent += 1
                except (ConnectionError, RuntimeError):
                    conn.abort()
