"""`python feed_v4_main.py web`: the read API and the chart page, its own process.

Read only: it never writes to Redis or PostgreSQL (but for its own lines in
`system_log_v4`). Routes are those of SPEC section 16 and `web/openapi.json`; the
logic of each answer lives in `web/reads.py` (I/O) and `web/params.py`, `web/shapes.py`
(pure). Security: a bearer token (`WEB_TOKEN`) for every path but the health check
and the static page (which holds no data); without a token the server listens only
on a loopback address; per-client request rate and WebSocket limits.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import logging
import mimetypes
import os
import re
import signal
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import orjson
from aiohttp import WSMsgType, web
from redis.asyncio import Redis
from redis.exceptions import RedisError

from candle_stores import CandleStore
from candles import TIMEFRAMES
from infra import ConfigError, RateLimitedLog, env_bool, env_number, log_system_event, system_event_log
from web import reads
from web.limits import ConnectionCounts, RequestBuckets
from web.params import (
    MAX_FEATURES,
    MAX_FOOTPRINTS,
    BadRequest,
    range_query,
    subscription_request,
    symbol_param,
    tf_param,
    time_param,
)
from web.push import Hub, Subscriber

log = logging.getLogger("WEB")
WEB_DIR = Path(__file__).resolve().parent
STATIC_DIR = WEB_DIR / "static"
VENDOR_DIR = WEB_DIR / "node_modules" / "lightweight-charts"
VENDOR_FILES = {
    "lightweight-charts.standalone.production.js": VENDOR_DIR / "dist" / "lightweight-charts.standalone.production.js",
    "LICENSE": VENDOR_DIR / "LICENSE",
}
OPENAPI_FILE = WEB_DIR / "openapi.json"
STATIC_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,80}")
LOOPBACK_NAMES = ("localhost",)
KNOWN_REFRESH_S = 5.0
CSP = (
    "default-src 'self'; script-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; "
    "style-src 'self' 'unsafe-inline'; frame-ancestors 'none'; base-uri 'none'"
)


@dataclass(frozen=True)
class WebSettings:
    host: str = "127.0.0.1"
    port: int = 8080
    token: str | None = field(default=None, repr=False)
    rate: float = 50.0  # requests a second per client
    burst: int = 200
    ws_per_client: int = 50
    ws_total: int = 2_000
    ws_buffer_bytes: int = 4 * 1024 * 1024
    ws_channels: int = 200
    trust_proxy: bool = False
    pool_max: int = 10
    footprint_cache_bytes: int = 64 * 1024 * 1024

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> WebSettings:
        env = os.environ if env is None else env
        token = env.get("WEB_TOKEN", "").strip() or None
        if token is not None and len(token) < 16:
            raise ConfigError("WEB_TOKEN is shorter than 16 characters: use a long random one (openssl rand -hex 24)")
        port_default = int(env_number(env, "PORT", 8080, int, 1, 65_535))  # Render sets PORT for web services
        settings = cls(
            host=env.get("WEB_HOST", "").strip() or "127.0.0.1",
            port=int(env_number(env, "WEB_PORT", port_default, int, 1, 65_535)),
            token=token,
            rate=env_number(env, "WEB_RATE", 50.0, float, 0.1, 1e6),
            burst=int(env_number(env, "WEB_BURST", 200, int, 1, 1_000_000)),
            ws_per_client=int(env_number(env, "WEB_WS_PER_CLIENT", 50, int, 1, 100_000)),
            ws_total=int(env_number(env, "WEB_WS_MAX", 2_000, int, 1, 1_000_000)),
            ws_buffer_bytes=int(env_number(env, "WEB_WS_BUFFER_BYTES", 4 * 1024 * 1024, int, 65_536, 1 << 30)),
            ws_channels=int(env_number(env, "WEB_WS_CHANNELS", 200, int, 1, 100_000)),
            trust_proxy=env_bool(env, "WEB_TRUST_PROXY", False),
            pool_max=int(env_number(env, "WEB_PG_POOL_MAX", 10, int, 1, 1000)),
            footprint_cache_bytes=int(env_number(env, "WEB_FOOTPRINT_CACHE_MB", 64, float, 0, 65_536) * 1024 * 1024),
        )
        if token is None and not is_loopback(settings.host):
            raise ConfigError(
                f"WEB_HOST={settings.host} listens beyond this machine: set WEB_TOKEN (a long random secret) "
                "or listen on 127.0.0.1"
            )
        return settings


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def error(status: int, text: str, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status, body=orjson.dumps({"error": text}), content_type="application/json", headers=headers
    )


def json_response(data: object) -> web.Response:
    body = data if isinstance(data, bytes) else orjson.dumps(data)
    return web.Response(body=body, content_type="application/json")


class ReadApi:
    """The routes and their shared state (servers, limits, the push hub)."""

    def __init__(self, settings: WebSettings, pool: asyncpg.Pool, redis: Redis, store: CandleStore) -> None:
        self.settings, self.pool, self.redis, self.store = settings, pool, redis, store
        self.footprint_cache = reads.FootprintCache(settings.footprint_cache_bytes)
        self.hub = Hub(redis, pool, self.footprint_cache)
        self.buckets = RequestBuckets(settings.rate, settings.burst)
        self.connections = ConnectionCounts(settings.ws_per_client, settings.ws_total)
        self.known: frozenset[str] = frozenset()
        self.known_at = -1e9
        self.faults = RateLimitedLog("WEB", 60.0)
        self.tasks: list[asyncio.Task] = []
        self.sockets: set[web.WebSocketResponse] = set()

    # ------------------------------------------------------------------ the app

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self.guard], client_max_size=64 * 1024)
        get = app.router.add_get
        get("/api/v1/health", self.health)
        get("/api/v1/openapi.json", self.openapi)
        get("/api/v1/symbols", self.symbols)
        get("/api/v1/candles", self.candles)
        get("/api/v1/indicators", self.indicators)
        get("/api/v1/orderflow", self.orderflow)
        get("/api/v1/footprint", self.footprint)
        get("/api/v1/footprints", self.footprints)
        get("/api/v1/book", self.book)
        get("/api/v1/features", self.features)
        get("/api/v1/ws", self.websocket)
        get("/", self.index)
        get("/vendor/{name}", self.vendor)
        get("/{name}", self.static)
        app.on_startup.append(self._start)
        app.on_shutdown.append(self._stop)
        return app

    async def _start(self, _: web.Application) -> None:
        self.tasks = [
            asyncio.create_task(self.hub.tail_streams(), name="web-streams"),
            asyncio.create_task(self.hub.poll_keys(), name="web-poll"),
        ]

    async def _stop(self, _: web.Application) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for ws in list(self.sockets):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(code=1001, message=b"server shutting down"), 1.0)

    def client_of(self, request: web.Request) -> str:
        if self.settings.trust_proxy:
            forwarded = request.headers.get("X-Forwarded-For", "")
            if forwarded:
                return forwarded.rsplit(",", 1)[-1].strip()[:64]  # the hop the proxy itself added
        return request.remote or "?"

    def authorised(self, request: web.Request) -> bool:
        token = self.settings.token
        if token is None:
            return True
        given = ""
        header = request.headers.get("Authorization", "")
        if header.startswith("Bearer "):
            given = header[7:].strip()
        elif request.path == "/api/v1/ws":
            given = request.query.get("token", "")
        return hmac.compare_digest(given.encode(), token.encode())

    @web.middleware
    async def guard(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
        """Rate, token and errors, for every request; security headers on every answer."""
        api = request.path.startswith("/api/")
        if api and request.path != "/api/v1/health":
            wait = self.buckets.take(self.client_of(request), time.monotonic())
            if wait:
                return error(429, f"too many requests: retry in {wait:.2f} s", {"Retry-After": str(int(wait) + 1)})
            if not self.authorised(request):
                return error(401, "missing or wrong token: send Authorization: Bearer <WEB_TOKEN>")
        try:
            response = await handler(request)
        except BadRequest as exc:
            response = error(400, str(exc))
        except web.HTTPException as exc:
            if exc.status >= 400 and api:
                response = error(exc.status, exc.reason)
            else:
                raise
        except (TimeoutError, asyncpg.PostgresError, OSError, RedisError) as exc:
            server = "Redis" if isinstance(exc, RedisError) else "PostgreSQL"
            self.faults.warn(server, f"{request.path}: {server} could not answer ({type(exc).__name__}: {exc})")
            response = error(503, f"{server} could not answer; try again shortly")
        if not isinstance(response, web.WebSocketResponse):
            response.headers.setdefault("X-Content-Type-Options", "nosniff")
            response.headers.setdefault("Referrer-Policy", "no-referrer")
            if not api:
                response.headers.setdefault("Content-Security-Policy", CSP)
        return response

    async def known_symbols(self, wanted: str | None = None) -> frozenset[str]:
        """The enabled tickers, re-read every few seconds (and at once for one not known yet);
        while PostgreSQL is away, the ones read last."""
        now = time.monotonic()
        stale = now - self.known_at > KNOWN_REFRESH_S
        if stale or (wanted is not None and wanted not in self.known and now - self.known_at > 1.0):
            try:
                rows = await self.pool.fetch("SELECT symbol FROM tickers WHERE status = 'enabled'")
            except reads.PG_DOWN:
                if not self.known:
                    raise
                return self.known  # PostgreSQL away: the tickers last read still stand
            self.known, self.known_at = frozenset(r["symbol"] for r in rows), now
        return self.known

    async def query_symbols(self, request: web.Request) -> frozenset[str]:
        wanted = (request.query.get("symbol") or "").strip().upper()
        return await self.known_symbols(wanted)

    # ------------------------------------------------------------------ routes

    async def health(self, request: web.Request) -> web.Response:
        async def check(probe: Awaitable) -> bool:
            try:
                await asyncio.wait_for(probe, 2.0)
                return True
            except Exception:
                return False

        redis_ok, pg_ok = await asyncio.gather(check(self.redis.ping()), check(self.pool.fetchval("SELECT 1")))
        return json_response(
            {
                "status": "ok" if redis_ok and pg_ok else "degraded",
                "redis": redis_ok,
                "postgres": pg_ok,
                "timeframes": list(TIMEFRAMES),
                "websockets": self.connections.open,
                "pushed_messages": self.hub.pushed,
                "pushed_bytes": self.hub.pushed_bytes,
            }
        )

    async def openapi(self, request: web.Request) -> web.Response:
        return web.Response(body=OPENAPI_FILE.read_bytes(), content_type="application/json")

    async def symbols(self, request: web.Request) -> web.Response:
        return json_response(await reads.enabled_tickers(self.pool, self.redis))

    async def candles(self, request: web.Request) -> web.Response:
        q = range_query(request.query, await self.query_symbols(request))
        try:
            return json_response(await reads.candles_json(self.pool, q.symbol, q.tf, q.limit, q.end))
        except reads.PG_DOWN as exc:
            self.faults.warn("candles-pg", f"candles from Redis: PostgreSQL could not answer ({exc})")
            rows = await reads.candles_from_redis(self.store, q.symbol, q.tf, q.limit, q.end)
            response = json_response(rows)
            response.headers["X-Feed-Source"] = "redis"
            return response

    async def indicators(self, request: web.Request) -> web.Response:
        q = range_query(request.query, await self.query_symbols(request))
        return json_response(await reads.indicator_rows(self.pool, self.redis, q.symbol, q.tf, q.limit, q.end))

    async def orderflow(self, request: web.Request) -> web.Response:
        q = range_query(request.query, await self.query_symbols(request))
        return json_response(await reads.orderflow_json(self.pool, q.symbol, q.tf, q.limit, q.end))

    async def footprint(self, request: web.Request) -> web.Response:
        unknown = set(request.query) - {"symbol", "tf", "open_time"}
        if unknown:
            raise BadRequest(f"unknown parameter(s): {', '.join(sorted(unknown))[:200]}")
        symbol = symbol_param(request.query, await self.query_symbols(request))
        tf = tf_param(request.query)
        open_time = time_param(request.query, "open_time")
        found = None
        if open_time is None:
            forming = await reads.forming_footprint(self.redis, symbol, tf)
            found = None if forming is None else forming[1]
        if found is None:
            found = await reads.footprint_at(self.footprint_cache, self.pool, symbol, tf, open_time)
        if found is None:
            return error(404, f"no footprint for {symbol} {tf}" + (f" at {open_time}" if open_time else ""))
        return json_response(found)

    async def footprints(self, request: web.Request) -> web.Response:
        q = range_query(request.query, await self.query_symbols(request), MAX_FOOTPRINTS)
        return json_response(
            await reads.footprints_json(self.pool, self.redis, self.footprint_cache, q.symbol, q.tf, q.limit, q.end)
        )

    async def book(self, request: web.Request) -> web.Response:
        unknown = set(request.query) - {"symbol"}
        if unknown:
            raise BadRequest(f"unknown parameter(s): {', '.join(sorted(unknown))[:200]}")
        symbol = symbol_param(request.query, await self.query_symbols(request))
        raw = await reads.book_raw(self.redis, symbol)
        if raw is None:
            return error(404, f"no book for {symbol}: its depth stream is off (tickers.depth) or not synced yet")
        return json_response(raw)

    async def features(self, request: web.Request) -> web.Response:
        q = range_query(request.query, await self.query_symbols(request), MAX_FEATURES, with_tf=False)
        return json_response(await reads.feature_rows(self.pool, self.redis, q.symbol, q.limit, q.end))

    # ------------------------------------------------------------------ WebSocket

    async def websocket(self, request: web.Request) -> web.StreamResponse:
        client = self.client_of(request)
        refusal = self.connections.refusal(client)
        if refusal is not None:
            return error(429 if "per client" in refusal else 503, refusal)
        ws = web.WebSocketResponse(heartbeat=30.0, max_msg_size=64 * 1024)
        sub = Subscriber(ws, client, self.settings.ws_buffer_bytes)
        try:
            await ws.prepare(request)
            self.sockets.add(ws)
            sender = asyncio.create_task(sub.send_loop())
            receiver = asyncio.create_task(self._receive(ws, sub))
            done, _ = await asyncio.wait([sender, receiver], return_when=asyncio.FIRST_COMPLETED)
            for task in (sender, receiver):
                task.cancel()
            await asyncio.gather(sender, receiver, return_exceptions=True)
            if sender in done and sub.overflowed:
                log_system_event(
                    "WARNING",
                    "WEB",
                    f"WebSocket client {client} cut off: more than {self.settings.ws_buffer_bytes} bytes waiting",
                    {"client": client, "sent": sub.sent},
                )
                await self._close(ws, request, 1008, b"too slow: messages were piling up")
            else:
                await self._close(ws, request, 1000, b"")
        finally:
            self.hub.drop(sub)
            self.sockets.discard(ws)
            self.connections.release(client)
        return ws

    async def _close(self, ws: web.WebSocketResponse, request: web.Request, code: int, text: bytes) -> None:
        """A client that does not read cannot take a close frame either: then the socket goes."""
        try:
            await asyncio.wait_for(ws.close(code=code, message=text), 1.0)
        except (TimeoutError, ConnectionError, RuntimeError):
            if request.transport is not None:
                request.transport.abort()

    async def _receive(self, ws: web.WebSocketResponse, sub: Subscriber) -> None:
        async for msg in ws:
            if msg.type != WSMsgType.TEXT:
                if msg.type in (WSMsgType.ERROR, WSMsgType.CLOSE):
                    return
                await ws.send_str('{"error":"send JSON text frames"}')
                continue
            if self.buckets.take(sub.client, time.monotonic()):
                sub.offer('{"error":"too many messages: slow down"}')
                continue
            try:
                request = orjson.loads(msg.data)
                action, channels = subscription_request(request, await self.known_symbols())
                if action == "subscribe":
                    if len(sub.channels | set(channels)) > self.settings.ws_channels:
                        raise BadRequest(f"at most {self.settings.ws_channels} channels per connection")
                    self.hub.subscribe(sub, channels)
                else:
                    self.hub.unsubscribe(sub, channels)
                sub.offer(orjson.dumps({action + "d": channels}).decode())
            except (BadRequest, orjson.JSONDecodeError) as exc:
                sub.offer(orjson.dumps({"error": str(exc)}).decode())

    # ------------------------------------------------------------------ the page

    async def index(self, request: web.Request) -> web.StreamResponse:
        return self._file(STATIC_DIR / "index.html")

    async def static(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if not STATIC_NAME.fullmatch(name):
            raise web.HTTPNotFound()
        return self._file(STATIC_DIR / name)

    async def vendor(self, request: web.Request) -> web.StreamResponse:
        path = VENDOR_FILES.get(request.match_info["name"])
        if path is None:
            raise web.HTTPNotFound()
        if not path.exists():
            return error(500, "lightweight-charts is not installed: run `make setup` (npm ci in web/)")
        return self._file(path)

    @staticmethod
    def _file(path: Path) -> web.StreamResponse:
        if not path.is_file():
            raise web.HTTPNotFound()
        kind = mimetypes.guess_type(path.name)[0] or "text/plain"
        if path.name == "LICENSE":
            kind = "text/plain"
        return web.Response(body=path.read_bytes(), content_type=kind, headers={"Cache-Control": "no-cache"})


async def run_web(pool: asyncpg.Pool, redis: Redis, store: CandleStore, settings: WebSettings) -> int:
    """Serve until SIGTERM/SIGINT."""
    api = ReadApi(settings, pool, redis, store)
    runner = web.AppRunner(api.app(), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port, backlog=1024)
    await site.start()
    flusher = asyncio.create_task(system_event_log.run_flusher(pool))
    log_system_event(
        "INFO",
        "WEB",
        f"read API and chart on http://{settings.host}:{settings.port}/ "
        f"({'token required' if settings.token else 'no token: loopback only'})",
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()
    flusher.cancel()
    await asyncio.gather(flusher, return_exceptions=True)
    with contextlib.suppress(Exception):
        await asyncio.wait_for(system_event_log.flush(pool), 2.0)
    return 0
