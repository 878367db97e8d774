"""One combined-stream WebSocket connection, for any route (`/market`, `/public`).

Binance's rules it keeps: reconnect with capped, jittered backoff; replace a silent
connection; open the successor before Binance's 24-hour cut; SUBSCRIBE/UNSUBSCRIBE in
batches paced under 10 messages a second; treat "no data after subscribing" (the
legacy routes acknowledge and stay silent) as an error.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Protocol
from urllib.parse import quote

import aiohttp

from binance.protocol import request_message
from infra import log_system_event, run_safe_loop

if TYPE_CHECKING:
    from binance.limits import AttemptLimiter


class StreamSettings(Protocol):
    silence_s: float
    first_data_timeout_s: float
    connection_max_age_s: float
    backoff_max_s: float
    subscribe_batch: int
    streams_per_connection: int


class Socket:
    """One WebSocket and the aiohttp session it lives in. aiohttp reads frames in C:
    ~2.5 µs a frame where the `websockets` library took ~15 (500 symbols push ~2,000
    kline updates a second, a burst of 500 every 250 ms)."""

    def __init__(self, session: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.session, self.ws = session, ws

    @classmethod
    async def open(cls, url: str, open_timeout_s: float = 10.0) -> Socket:
        session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=open_timeout_s))
        try:
            ws = await asyncio.wait_for(
                session.ws_connect(url, max_msg_size=2**24, autoping=True, heartbeat=None), open_timeout_s
            )
        except BaseException:
            await session.close()
            raise
        return cls(session, ws)

    async def recv(self, timeout_s: float | None = None) -> str | bytes:
        """The next text or binary frame (pings are answered by aiohttp); TimeoutError
        past `timeout_s`; ConnectionLost when the server closes or the stream breaks."""
        message = await self.ws.receive(timeout=timeout_s)
        if message.type is aiohttp.WSMsgType.TEXT or message.type is aiohttp.WSMsgType.BINARY:
            return message.data
        if message.type is aiohttp.WSMsgType.ERROR:
            raise ConnectionLost(f"stream error: {message.data!r}")
        raise ConnectionLost(f"closed by the server (code {self.ws.close_code} {message.extra or ''})".rstrip())

    async def send(self, data: bytes) -> None:
        await self.ws.send_str(data.decode())

    async def close(self, timeout_s: float = 2.0) -> None:
        try:
            await asyncio.wait_for(self.ws.close(), timeout_s)
        except Exception:
            pass
        finally:
            await self.session.close()


class Backoff:
    """Capped exponential backoff with full jitter; reset after a healthy connection."""

    def __init__(self, base_s: float = 0.5, cap_s: float = 60.0) -> None:
        self.base_s, self.cap_s, self.failures = base_s, cap_s, 0

    def next_delay(self) -> float:
        self.failures += 1
        return random.uniform(self.base_s, min(self.cap_s, self.base_s * 2 ** min(self.failures, 30)))

    def reset(self) -> None:
        self.failures = 0


def stream_url(base_url: str, streams: Iterable[str]) -> str:
    """The combined-stream URL; names are percent-encoded (symbols may be non-ASCII)."""
    return f"{base_url}/stream?streams={'/'.join(quote(s, safe='@!_') for s in sorted(streams))}"


def is_reply(raw: str | bytes) -> bool:
    """An answer to one of our requests, not market data (text or binary frame)."""
    head = raw[:8] if isinstance(raw, str) else raw[:8].decode("utf-8", "replace")
    return head.startswith(('{"result"', '{"id"'))


class ConnectionLost(Exception):
    pass


class StreamConnection:
    """One combined-stream connection: reconnects with backoff, replaces itself before
    the 24-hour cut (make before break), subscribes and unsubscribes live."""

    def __init__(
        self,
        conn_id: int,
        base_url: str,
        settings: StreamSettings,
        on_frame: Callable[[str | bytes], None],
        on_connected: Callable[[set[str]], None],
        attempts: AttemptLimiter | None = None,
    ) -> None:
        self.conn_id, self.base_url, self.settings = conn_id, base_url, settings
        self.attempts = attempts
        self.reconnects = 0  # connections lost (the metrics endpoint's counter)
        self.on_frame, self.on_connected = on_frame, on_connected
        self.streams: set[str] = set()
        self.ws: Socket | None = None
        self.request_id = 0
        self.last_frame_at = 0.0  # monotonic; while serving
        self.silent = False  # the connection was closed for its silence
        self.backoff = Backoff(0.5, settings.backoff_max_s)
        self.log = logging.getLogger(f"WS{conn_id}")

    def url(self, streams: set[str]) -> str:
        return stream_url(self.base_url, streams)

    async def run(self) -> None:
        while True:
            if not self.streams:
                await asyncio.sleep(0.2)
                continue
            try:
                ws = await self._open()
                self.backoff.reset()
                await self._serve(ws)
            except asyncio.CancelledError:
                # Stopping: a courtesy close, not worth waiting for a slow peer's TCP close.
                await self._close(self.ws, timeout_s=0.3)
                raise
            except (OSError, ConnectionLost, aiohttp.ClientError, TimeoutError) as exc:
                self.reconnects += 1
                delay = self.backoff.next_delay()
                log_system_event(
                    "WARNING",
                    f"WS{self.conn_id}",
                    f"connection lost ({type(exc).__name__}: {exc}); reconnecting in {delay:.1f}s",
                    {"streams": len(self.streams)},
                )
                await self._close(self.ws)
                self.ws = None
                await asyncio.sleep(delay)

    async def _open(self) -> Socket:
        """Connect and wait for the first data frame: the legacy routes acknowledge and
        then stay silent, so no data in time is an error, not a quiet market."""
        streams = set(self.streams)
        if self.attempts:  # Binance limits connection attempts per IP
            await self.attempts.acquire()
        ws = await Socket.open(self.url(streams))
        try:
            deadline = time.monotonic() + self.settings.first_data_timeout_s
            while True:
                raw = await ws.recv(max(0.01, deadline - time.monotonic()))
                self.on_frame(raw)
                if not is_reply(raw):
                    break
        except TimeoutError:
            await ws.close()
            raise ConnectionLost(
                f"no data within {self.settings.first_data_timeout_s:.0f}s of subscribing "
                f"(is BINANCE_WS_URL the /market route?)"
            ) from None
        except BaseException:
            await ws.close()
            raise
        self.on_connected({s for s in streams})
        # Changes made while this connection was opening (its URL was fixed before).
        missing, gone = self.streams - streams, streams - self.streams
        if missing:
            await self._request(ws, "SUBSCRIBE", sorted(missing))
        if gone:
            await self._request(ws, "UNSUBSCRIBE", sorted(gone))
        return ws

    async def _serve(self, ws: Socket) -> None:
        """Frames until the connection is lost or falls silent. Silence is watched by a
        timer task, not by a timeout on every read: aiohttp builds a timeout context per
        read, about half of a read's cost, at ~2,000 frames a second."""
        self.ws = ws
        opened = self.last_frame_at = time.monotonic()
        self.silent = False
        watch = asyncio.create_task(self._watch_silence())
        try:
            while True:
                if self.last_frame_at - opened > self.settings.connection_max_age_s:
                    ws = await self._replace(ws)
                    opened = self.last_frame_at = time.monotonic()
                    self.silent = False  # the old one may have fallen silent while the new one opened
                    continue
                raw = await ws.recv()
                self.last_frame_at = time.monotonic()
                self.on_frame(raw)
        except ConnectionLost:
            if self.silent:
                raise ConnectionLost(f"silent for {self.settings.silence_s:.0f}s") from None
            raise
        finally:
            watch.cancel()

    async def _watch_silence(self) -> None:
        """No frame for `silence_s`: the socket is closed, which ends `_serve`'s read."""
        silence_s = self.settings.silence_s
        while True:
            await asyncio.sleep(min(1.0, silence_s / 4))
            if not self.silent and self.ws is not None and time.monotonic() - self.last_frame_at > silence_s:
                self.silent = True
                await self.ws.close()

    async def _replace(self, old: Socket) -> Socket:
        """Open the successor first, drain the old one meanwhile, then close it."""
        drain = asyncio.create_task(self._drain(old))
        try:
            new = await self._open()
        finally:
            drain.cancel()
        await old.close()
        self.ws = new
        log_system_event("INFO", f"WS{self.conn_id}", "connection replaced before the 24-hour cut")
        return new

    async def _drain(self, ws: Socket) -> None:
        try:
            while True:
                self.on_frame(await ws.recv())
                self.last_frame_at = time.monotonic()
        except (ConnectionLost, aiohttp.ClientError, OSError):
            return

    async def _request(self, ws: Socket, method: str, streams: list[str]) -> None:
        """Batched and paced: Binance allows 10 incoming messages a second."""
        for i in range(0, len(streams), self.settings.subscribe_batch):
            self.request_id += 1
            await ws.send(request_message(method, streams[i : i + self.settings.subscribe_batch], self.request_id))
            await asyncio.sleep(0.25)

    async def subscribe(self, streams: set[str]) -> None:
        new = streams - self.streams
        self.streams |= new
        if new and self.ws is not None:
            try:
                await self._request(self.ws, "SUBSCRIBE", sorted(new))
            except (ConnectionError, aiohttp.ClientError, RuntimeError):
                pass  # the reconnect subscribes everything in self.streams

    async def unsubscribe(self, streams: set[str]) -> None:
        gone = streams & self.streams
        self.streams -= gone
        if gone and self.ws is not None:
            try:
                await self._request(self.ws, "UNSUBSCRIBE", sorted(gone))
            except (ConnectionError, aiohttp.ClientError, RuntimeError):
                pass

    @staticmethod
    async def _close(ws: Socket | None, timeout_s: float = 2.0) -> None:
        if ws is not None:
            await ws.close(timeout_s)


class StreamPool:
    """A route's connections, each carrying at most `streams_per_connection` streams;
    new streams fill the existing connections first."""

    def __init__(
        self,
        base_url: str,
        settings: StreamSettings,
        on_frame: Callable[[str | bytes], None],
        on_connected: Callable[[set[str]], None],
        attempts: AttemptLimiter | None = None,
    ) -> None:
        self.base_url, self.settings = base_url, settings
        self.on_frame, self.on_connected = on_frame, on_connected
        self.attempts = attempts  # shared by every route's pool of the process
        self.connections: list[StreamConnection] = []
        self._tasks: set[asyncio.Task] = set()

    async def update(self, added: Iterable[str], removed: Iterable[str]) -> None:
        gone = set(removed)
        for connection in self.connections:
            await connection.unsubscribe(gone)
        subscribed = set().union(*(connection.streams for connection in self.connections))
        pending = sorted(set(added) - subscribed)  # a change tried again is not subscribed twice
        per_connection = self.settings.streams_per_connection
        for connection in self.connections:
            room = per_connection - len(connection.streams)
            if room > 0 and pending:
                await connection.subscribe(set(pending[:room]))
                pending = pending[room:]
        while pending:
            connection = self._new_connection()
            await connection.subscribe(set(pending[:per_connection]))
            pending = pending[per_connection:]

    def _new_connection(self) -> StreamConnection:
        connection = StreamConnection(
            len(self.connections), self.base_url, self.settings, self.on_frame, self.on_connected, self.attempts
        )
        self.connections.append(connection)
        self._spawn(connection)
        return connection

    def _spawn(self, connection: StreamConnection) -> None:
        name = f"WS{connection.conn_id}"
        task = asyncio.create_task(run_safe_loop(connection.run, name, 1.0), name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def run(self) -> None:
        """Owns the connection tasks; cancelling it closes every connection."""
        for connection in self.connections:
            if not any(t.get_name() == f"WS{connection.conn_id}" for t in self._tasks):
                self._spawn(connection)
        try:
            await asyncio.Event().wait()
        finally:
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
