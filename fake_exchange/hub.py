"""Client connections and the stream -> subscribers index the scheduler fans out through."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Iterable

from aiohttp import WSMsgType, web

from .faults import Stats
from .frames import combined_prefix


class Connection:
    """One client WebSocket: its streams and a bounded outgoing queue with its own sender task.

    The scheduler only appends to the queue (never awaits a socket), so one slow client
    cannot hold back the others; a client whose queue overflows is dropped, as Binance drops
    clients that do not keep up.
    """

    def __init__(
        self,
        ws: web.WebSocketResponse,
        transport: asyncio.Transport | None,
        *,
        path: str,
        combined: bool,
        legacy: bool,
        max_queue: int,
        stats: Stats,
    ) -> None:
        self.ws = ws
        self.transport = transport
        self.path = path
        self.combined = combined
        self.legacy = legacy  # pre-2026 route: acknowledges requests, never gets market data
        self.streams: dict[str, None] = {}  # ordered set, for LIST_SUBSCRIPTIONS
        self.opened_at = time.monotonic()
        self.last_pong = self.opened_at
        self.incoming: deque[float] = deque()  # arrival times within the last second
        self.closed = False
        self._queue: deque[bytes] = deque()
        self._max_queue = max_queue
        self._wake = asyncio.Event()
        self._stats = stats

    def push(self, data: bytes) -> None:
        if self.closed:
            return
        if len(self._queue) >= self._max_queue:
            self._stats.slow_dropped += 1
            self.abort()
            return
        self._queue.append(data)
        self._stats.frames_sent += 1
        if not self._wake.is_set():
            self._wake.set()

    @property
    def queued(self) -> int:
        return len(self._queue)

    async def run_sender(self) -> None:
        """Drains the queue as text frames until the connection ends."""
        queue, send = self._queue, self.ws.send_frame
        try:
            while not self.closed:
                if not queue:
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                await send(queue.popleft(), WSMsgType.TEXT)
        except (ConnectionError, RuntimeError):
            self.closed = True
        finally:
            queue.clear()

    def abort(self) -> None:
        """Cut the TCP connection without a close frame (the client sees 1006)."""
        self.closed = True
        self._queue.clear()
        self._wake.set()
        if self.transport is not None:
            self.transport.abort()

    async def close(self, code: int, reason: str) -> None:
        """A clean server-side close (close frame with `code`), then stop sending."""
        self.closed = True
        self._queue.clear()
        self._wake.set()
        with contextlib.suppress(Exception):
            await self.ws.close(code=code, message=reason.encode())


class StreamHub:
    """All open connections and, for /market ones, who is subscribed to which stream."""

    def __init__(self, stats: Stats) -> None:
        self.connections: set[Connection] = set()
        self.subs: dict[str, set[Connection]] = {}
        self._prefixes: dict[str, bytes] = {}
        self._stats = stats

    def add(self, conn: Connection) -> None:
        self.connections.add(conn)

    def remove(self, conn: Connection) -> None:
        self.connections.discard(conn)
        self.unsubscribe(conn, list(conn.streams))

    def subscribe(self, conn: Connection, streams: Iterable[str]) -> None:
        for name in streams:
            conn.streams[name] = None
            if not conn.legacy:
                self.subs.setdefault(name, set()).add(conn)

    def unsubscribe(self, conn: Connection, streams: Iterable[str]) -> None:
        for name in streams:
            conn.streams.pop(name, None)
            subscribers = self.subs.get(name)
            if subscribers is not None:
                subscribers.discard(conn)
                if not subscribers:
                    del self.subs[name]

    def publish(self, stream: str, data: bytes, *, wrap_as: str | None = None, verbatim: bool = False) -> int:
        """Send one pre-built payload to every subscriber of `stream`; returns how many got it.

        Raw connections get `data`; combined ones get it wrapped once (as `wrap_as`, which
        lets fault injection mislabel a frame). `verbatim` sends `data` unwrapped to all.
        """
        subscribers = self.subs.get(stream)
        if not subscribers:
            return 0
        wrapped: bytes | None = None
        for conn in tuple(subscribers):
            if conn.combined and not verbatim:
                if wrapped is None:
                    name = wrap_as or stream
                    prefix = self._prefixes.get(name)
                    if prefix is None:
                        prefix = self._prefixes[name] = combined_prefix(name)
                    wrapped = prefix + data + b"}"
                conn.push(wrapped)
            else:
                conn.push(data)
        return len(subscribers)
