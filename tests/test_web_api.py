"""The read API on real Redis Stack and PostgreSQL, over a real socket: every endpoint
against data written by the daemon's own writers, bad parameters, tokens, limits, and
the WebSocket's pushes (including a client that never reads and 200 clients at once)."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
import orjson
import pytest
from tcp_proxy import TcpProxy
from web_data import BARS, FLOW_BARS, M1, OTHER, ROW, SYMBOL, T0, TOKEN, seed, serve, trades_of

import core_io
from book.store import FEATURES_STREAM
from candle_stores import make_candle_store, write_candles
from infra import system_event_log
from orderflow.fold import fold
from orderflow.output import CvdChain, FinalBar
from orderflow.profile import ImbalanceRules
from orderflow.render import FootprintRenderer
from orderflow.store import footprint_key, publish_commands, upsert_bars
from web.app import WebSettings
from web.reads import final_footprint

AUTH = {"Authorization": f"Bearer {TOKEN}"}
ENDPOINTS = ["symbols", "candles", "indicators", "orderflow", "footprint", "footprints", "book", "features"]


@pytest.fixture
async def seeded(pool, redis):
    return await seed(pool, redis)


async def get(session: aiohttp.ClientSession, url: str, **params) -> tuple[int, object]:
    async with session.get(url, params=params, headers=AUTH) as response:
        return response.status, await response.json()


async def test_every_endpoint_answers_what_was_stored(pool, redis, seeded):
    async with serve(pool, redis) as (base, _), aiohttp.ClientSession() as s:
        status, health = await get(s, f"{base}/api/v1/health")
        assert status == 200 and health["status"] == "ok" and health["timeframes"] == ["m1", "m5", "m15"]

        status, symbols = await get(s, f"{base}/api/v1/symbols")
        assert status == 200 and [x["symbol"] for x in symbols] == [SYMBOL, OTHER]
        assert symbols[0]["newest"] == {"m1": T0 + (BARS - 1) * M1, "m5": None, "m15": None}
        assert symbols[0]["trades"] is True and symbols[0]["depth"] is False
        assert symbols[0]["has_book"] is True and symbols[1]["has_book"] is False

        # candles: the newest `limit` ending at `end`, oldest first, exact text
        status, rows = await get(s, f"{base}/api/v1/candles", symbol=SYMBOL, tf="m1", limit=10, end=T0 + 20 * M1)
        want = [c for c in seeded["candles"] if c.symbol == SYMBOL][11:21]
        assert status == 200 and [r["open_time"] for r in rows] == [c.open_time for c in want]
        for row, c in zip(rows, want):
            assert row["open"] == str(c.open) and row["high"] == str(c.high) and row["close"] == str(c.close)
            assert row["volume"] == str(c.volume) and row["trades"] == c.trades
            assert row["quote_volume"] == str(c.quote_volume) and row["taker_buy_volume"] == str(c.taker_buy_volume)
        _, newest = await get(s, f"{base}/api/v1/candles", symbol="btcusdt")
        assert len(newest) == BARS and newest[-1]["open_time"] == T0 + (BARS - 1) * M1

        # indicators: PostgreSQL's bars, then Redis's newer one; every output named, null when absent
        _, ind = await get(s, f"{base}/api/v1/indicators", symbol=SYMBOL, limit=5)
        assert [r["open_time"] for r in ind] == [T0 + m * M1 for m in range(BARS - 5, BARS)]
        assert set(ind[0]["values"]) == {"EMA_TEST", "RSI_TEST", "MACD_TEST"}
        assert ind[0]["values"]["EMA_TEST"] == 65000.0 + (BARS - 5) / 8 and ind[0]["values"]["MACD_TEST"] is None
        assert ind[-1]["values"] == {"EMA_TEST": 65010.5, "RSI_TEST": None, "MACD_TEST": 0.25}
        _, early = await get(s, f"{base}/api/v1/indicators", symbol=SYMBOL, limit=3, end=T0 + 14 * M1)
        assert [r["values"]["RSI_TEST"] for r in early] == [None, None, 40.0 + 14 / 4]
        assert '""' not in json.dumps(ind)

        # order flow: the view's rows, decimals without trailing zeros, counts as numbers
        _, flow = await get(s, f"{base}/api/v1/orderflow", symbol=SYMBOL, limit=5)
        view = await pool.fetch("SELECT * FROM orderflow_v4 WHERE symbol = $1 ORDER BY open_time DESC LIMIT 5", SYMBOL)
        assert [r["open_time"] for r in flow] == [T0 + m * M1 for m in range(FLOW_BARS - 5, FLOW_BARS)]
        for row, record in zip(flow, reversed(view)):
            for name in ("buy_volume", "sell_volume", "delta", "cvd", "poc", "vah", "val", "row_size"):
                assert row[name] is None or float(row[name]) == float(record[name]), name
                assert not (row[name] or "0").endswith(".") and not ("." in (row[name] or "") and row[name][-1] == "0")
            assert row["agg_trades"] == record["agg_trades"] == 40 and row["trades"] == record["trades"]

        # footprints: PostgreSQL's bars read as the daemon's own documents, then the forming one
        _, prints = await get(s, f"{base}/api/v1/footprints", symbol=SYMBOL, limit=4)
        assert [p["final"] for p in prints] == [True, True, True, False]
        assert prints[-1]["open_time"] == T0 + FLOW_BARS * M1
        renderer, bars = FootprintRenderer(), seeded["bars"]
        for document, bar in zip(prints[:3], bars[-3:]):
            assert document == orjson.loads(renderer.document((SYMBOL, "m1"), bar.bar, bar.profile)) | {"final": True}
        assert all(len(p["rows"]) > 5 for p in prints)
        _, one = await get(s, f"{base}/api/v1/footprint", symbol=SYMBOL, open_time=prints[1]["open_time"])
        assert one == prints[1]
        _, forming = await get(s, f"{base}/api/v1/footprint", symbol=SYMBOL)
        assert forming == prints[-1]
        status, missing = await get(s, f"{base}/api/v1/footprint", symbol=SYMBOL, open_time=T0 - M1)
        assert status == 404 and "no footprint" in missing["error"]

        # book and features
        status, book = await get(s, f"{base}/api/v1/book", symbol=SYMBOL)
        assert status == 200 and book == seeded["book"] and book["bids"][0] == ["64999.9", "1.5"]
        status, no_book = await get(s, f"{base}/api/v1/book", symbol=OTHER)
        assert status == 404 and "depth" in no_book["error"]
        _, features = await get(s, f"{base}/api/v1/features", symbol=SYMBOL, limit=4)
        second0 = seeded["second0"]
        assert [f["ts"] for f in features] == [second0 + s * 1000 for s in (7, 8, 9, 10)]
        assert features[0]["microprice"] == 65007.0 and features[0]["vpin"] is None and features[0]["ofi"] is None
        assert features[-1]["microprice"] == 65010.5 and features[-1]["i1"] == 0.5

        status, spec = await get(s, f"{base}/api/v1/openapi.json")
        assert status == 200 and spec["openapi"].startswith("3.")


def test_the_openapi_description_names_every_route():
    from web.app import ReadApi

    spec = json.loads((Path(__file__).resolve().parents[1] / "web" / "openapi.json").read_text())
    app = ReadApi(WebSettings(), None, None, None).app()  # type: ignore[arg-type]
    routes = {r.resource.canonical for r in app.router.routes() if r.resource.canonical.startswith("/api/")}
    assert routes == set(spec["paths"])


async def test_a_stored_footprint_reads_the_same_from_postgresql_as_from_redis(pool, redis, seeded):
    bar = seeded["bars"][-1]
    await redis.execute_command(*publish_commands([bar], 1000)[0])
    from_redis = orjson.loads(await redis.get(footprint_key(SYMBOL, "m1")))
    record = await pool.fetchrow("SELECT * FROM orderflow4 WHERE symbol = $1 AND open_time = to_timestamp($2 / 1000.0)",
                                 SYMBOL, bar.bar.open_time)  # fmt: skip
    assert final_footprint(record) == from_redis | {"final": True}
    assert from_redis["imbalances"]["buy"] or from_redis["imbalances"]["sell"]  # the check compares something


BAD = [
    ("candles", {}, "symbol is required"),
    ("candles", {"symbol": "XYZUSDT"}, "not an enabled ticker"),
    ("candles", {"symbol": "BTC/USDT"}, "not a Binance"),
    ("candles", {"symbol": "BTCUSDT';DROP TABLE tickers;--"}, "not a Binance"),
    ("candles", {"symbol": SYMBOL, "tf": "m7"}, "tf 'm7' is not one of"),
    ("candles", {"symbol": SYMBOL, "limit": "0"}, "limit must be between 1 and 5000"),
    ("candles", {"symbol": SYMBOL, "limit": "5001"}, "limit must be between 1 and 5000"),
    ("candles", {"symbol": SYMBOL, "limit": "ten"}, "limit must be a whole number"),
    ("candles", {"symbol": SYMBOL, "end": "-5"}, "end must be between"),
    ("candles", {"symbol": SYMBOL, "end": "1e12"}, "end must be a whole number"),
    ("candles", {"symbol": SYMBOL, "start": "1"}, "unknown parameter(s): start"),
    ("indicators", {"symbol": SYMBOL, "tf": "h1"}, "is not one of"),
    ("orderflow", {"symbol": SYMBOL, "limit": "99999999999999999999"}, "limit must be between"),
    ("footprint", {"symbol": SYMBOL, "open_time": "yesterday"}, "open_time must be a whole number"),
    ("footprint", {"symbol": SYMBOL, "limit": "5"}, "unknown parameter(s): limit"),
    ("footprints", {"symbol": SYMBOL, "limit": "2001"}, "limit must be between 1 and 2000"),
    ("book", {}, "symbol is required"),
    ("book", {"symbol": SYMBOL, "depth": "5"}, "unknown parameter(s): depth"),
    ("features", {"symbol": SYMBOL, "tf": "m1"}, "unknown parameter(s): tf"),
]


async def test_bad_parameters_get_a_400_with_the_reason(pool, redis, seeded):
    async with serve(pool, redis) as (base, _), aiohttp.ClientSession() as s:
        for endpoint, params, reason in BAD:
            status, body = await get(s, f"{base}/api/v1/{endpoint}", **params)
            assert status == 400 and reason in body["error"], (endpoint, params, body)
        assert await pool.fetchval("SELECT count(*) FROM tickers") == 2  # the injection reached nothing


async def test_a_missing_or_wrong_token_gets_a_401_and_health_needs_none(pool, redis, seeded):
    async with serve(pool, redis) as (base, _), aiohttp.ClientSession() as s:
        for endpoint in [*ENDPOINTS, "openapi.json"]:
            for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"}, {"Authorization": TOKEN}):
                async with s.get(f"{base}/api/v1/{endpoint}", params={"symbol": SYMBOL}, headers=headers) as r:
                    assert r.status == 401 and "token" in (await r.json())["error"], (endpoint, headers)
        async with s.get(f"{base}/api/v1/candles", params={"symbol": SYMBOL, "token": TOKEN}) as r:
            assert r.status == 401  # a token in the query is for the WebSocket only (URLs end up in logs)
        async with s.get(f"{base}/api/v1/health") as r:
            assert r.status == 200
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await s.ws_connect(f"{base}/api/v1/ws?token=wrong")
        assert refused.value.status == 401
        async with s.ws_connect(f"{base}/api/v1/ws?token={TOKEN}") as ws:
            await ws.send_json({"subscribe": [f"candles:{SYMBOL}:m1"]})
            assert (await ws.receive_json(timeout=5)) == {"subscribed": [f"candles:{SYMBOL}:m1"]}


def test_without_a_token_the_server_listens_only_on_loopback():
    assert WebSettings.from_env({}).host == "127.0.0.1"
    assert WebSettings.from_env({"WEB_HOST": "::1"}).token is None
    with pytest.raises(Exception, match="set WEB_TOKEN"):
        WebSettings.from_env({"WEB_HOST": "0.0.0.0"})
    with pytest.raises(Exception, match="shorter than 16"):
        WebSettings.from_env({"WEB_HOST": "0.0.0.0", "WEB_TOKEN": "short"})
    listening = WebSettings.from_env({"WEB_HOST": "0.0.0.0", "WEB_TOKEN": TOKEN, "PORT": "10000"})
    assert listening.port == 10000 and listening.token == TOKEN


async def test_per_client_request_rate_and_connection_limits(pool, redis, seeded):
    async with serve(pool, redis, rate=0.5, burst=3, ws_per_client=2) as (base, _), aiohttp.ClientSession() as s:
        statuses = [(await get(s, f"{base}/api/v1/symbols"))[0] for _ in range(4)]
        assert statuses == [200, 200, 200, 429]
        async with s.get(f"{base}/api/v1/symbols", headers=AUTH) as r:
            assert r.status == 429 and int(r.headers["Retry-After"]) >= 1
    async with serve(pool, redis, ws_per_client=2) as (base, api), aiohttp.ClientSession() as s:
        first = await s.ws_connect(f"{base}/api/v1/ws?token={TOKEN}")
        second = await s.ws_connect(f"{base}/api/v1/ws?token={TOKEN}")
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await s.ws_connect(f"{base}/api/v1/ws?token={TOKEN}")
        assert refused.value.status == 429
        await first.close()
        await asyncio.sleep(0.1)
        third = await s.ws_connect(f"{base}/api/v1/ws?token={TOKEN}")  # a slot freed
        assert api.connections.open == 2
        await second.close()
        await third.close()


async def receive_channel(ws, channel: str, timeout: float = 5.0) -> dict:
    while True:
        message = await ws.receive_json(timeout=timeout)
        if message.get("channel") == channel:
            return message["data"]


async def test_the_websocket_pushes_what_lands_in_the_streams(pool, redis, seeded):
    async with serve(pool, redis) as (base, api), aiohttp.ClientSession() as s:
        async with s.ws_connect(f"{base}/api/v1/ws?token={TOKEN}") as ws:
            await ws.send_json({"subscribe": ["candles:BTCUSDT:m1", "nonsense"]})
            assert "channel 'nonsense'" in (await ws.receive_json(timeout=5))["error"]
            channels = [f"{k}:{SYMBOL}:m1" for k in ("candles", "indicators", "orderflow", "footprint")]
            channels += [f"book:{SYMBOL}", f"features:{SYMBOL}"]
            await ws.send_json({"subscribe": channels})
            assert (await ws.receive_json(timeout=5)) == {"subscribed": channels}
            await asyncio.sleep(0.3)  # the hub's first poll has run

            # a new closed bar: stored, then announced as the daemon does
            new = seeded["candles"][BARS - 1]
            new.open_time = T0 + BARS * M1
            await core_io.upsert_candles(pool, [new])
            await core_io.publish_candles(make_candle_store(redis, True, 250), redis, [("m1", [new])], 1000)
            data = await receive_channel(ws, f"candles:{SYMBOL}:m1")
            assert data["open_time"] == new.open_time and data["close"] == str(new.close)
            assert data["trades"] == new.trades and data["quote_volume"] == str(new.quote_volume)

            await redis.hset(
                core_io.indicator_key(SYMBOL, "m1"), mapping={"open_time": new.open_time, "EMA_TEST": "1.5"}
            )
            await redis.xadd(
                core_io.INDICATORS_READY_STREAM, {"symbol": SYMBOL, "tf": "m1", "open_time": new.open_time}
            )
            data = await receive_channel(ws, f"indicators:{SYMBOL}:m1")
            assert data["open_time"] == new.open_time and data["values"]["EMA_TEST"] == 1.5
            assert data["values"]["RSI_TEST"] is None

            bar = seeded["bars"][-1]
            for command in publish_commands([bar], 1000):
                await redis.execute_command(*command)
            flow = await receive_channel(ws, f"orderflow:{SYMBOL}:m1")
            assert flow["open_time"] == bar.bar.open_time and flow["agg_trades"] == 40 and flow["vwap"]
            final = await receive_channel(ws, f"footprint:{SYMBOL}:m1")
            assert final["final"] is True and final == final_footprint(
                await pool.fetchrow(
                    "SELECT * FROM orderflow4 WHERE open_time = to_timestamp($1 / 1000.0)", bar.bar.open_time
                )
            )

            await redis.xadd(FEATURES_STREAM, {"symbol": SYMBOL, "ts": 5000, "vpin": "0.25"})
            data = await receive_channel(ws, f"features:{SYMBOL}")
            assert data["ts"] == 5000 and data["vpin"] == 0.25 and data["microprice"] is None

            # polled keys: a changed forming footprint and book are pushed, an unchanged one not again
            forming = orjson.loads(await redis.get(footprint_key(SYMBOL, "m1", True)))
            forming["rows"][0]["bid_trades"] += 1
            await redis.set(footprint_key(SYMBOL, "m1", True), orjson.dumps(forming))
            data = await receive_channel(ws, f"footprint:{SYMBOL}:m1")
            assert data == forming | {"final": False}
            book = seeded["book"] | {"update_id": 999}
            await redis.set(f"book:{SYMBOL}", orjson.dumps(book))
            assert (await receive_channel(ws, f"book:{SYMBOL}")) == book
            await asyncio.sleep(0.8)
            with pytest.raises(asyncio.TimeoutError):
                await receive_channel(ws, f"book:{SYMBOL}", timeout=0.6)

            _, health = await get(s, f"{base}/api/v1/health")
            assert health["pushed_messages"] >= 8 and health["pushed_bytes"] > 1000
            await ws.send_json({"unsubscribe": channels})
            assert (await ws.receive_json(timeout=5)) == {"unsubscribed": channels}
        await asyncio.sleep(0.1)
        assert not api.hub.by_channel and api.connections.open == 0


async def test_a_client_that_never_reads_is_cut_off_and_the_server_stays_bounded(pool, redis, seeded):
    limit = 256 * 1024
    async with serve(pool, redis, ws_buffer_bytes=limit) as (base, api):
        host, port = base.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            f"GET /api/v1/ws?token={TOKEN} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        assert b"101" in await reader.readline()
        payload = b'{"subscribe":["book:BTCUSDT"]}'
        mask = b"\x01\x02\x03\x04"
        writer.write(bytes([0x81, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
        await writer.drain()
        await asyncio.sleep(0.2)
        (sub,) = api.hub.by_channel["book:BTCUSDT"]
        big = orjson.dumps({"bids": [["1.0", "2.0"]] * 20_000})  # ~300 KB a message; the client reads none
        most = 0
        for _ in range(200):
            api.hub.publish("book:BTCUSDT", big)
            most = max(most, sub.queued_bytes)
            await asyncio.sleep(0.005)
            if sub.overflowed:
                break
        assert sub.overflowed and most <= limit
        for _ in range(100):
            if api.connections.open == 0:
                break
            await asyncio.sleep(0.05)
        assert api.connections.open == 0 and not api.hub.by_channel
        await system_event_log.flush(pool)
        assert await pool.fetchval("SELECT count(*) FROM system_log_v4 WHERE message LIKE '%cut off%'") == 1
        writer.close()


async def test_two_hundred_clients_at_once_each_get_the_new_bar(pool, redis, seeded):
    async with serve(pool, redis, ws_per_client=250, rate=1000, burst=1000) as (base, api):
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as s:
            sockets = await asyncio.gather(*(s.ws_connect(f"{base}/api/v1/ws?token={TOKEN}") for _ in range(200)))
            for ws in sockets:
                await ws.send_json({"subscribe": [f"candles:{SYMBOL}:m1"]})
            assert all([(await ws.receive_json(timeout=10))["subscribed"] for ws in sockets])
            assert api.connections.open == 200
            new = seeded["candles"][0]
            new.open_time = T0 + (BARS + 5) * M1
            await core_io.upsert_candles(pool, [new])
            await core_io.publish_candles(make_candle_store(redis, True, 250), redis, [("m1", [new])], 1000)
            got = await asyncio.gather(*(receive_channel(ws, f"candles:{SYMBOL}:m1", 10) for ws in sockets))
            assert {g["open_time"] for g in got} == {new.open_time} and len(got) == 200
            status, _ = await get(s, f"{base}/api/v1/candles", symbol=SYMBOL)  # REST still answers
            assert status == 200
            await asyncio.gather(*(ws.close() for ws in sockets))


async def test_the_page_and_its_chart_library_are_served_without_a_token(pool, redis, seeded):
    async with serve(pool, redis) as (base, _), aiohttp.ClientSession() as s:
        async with s.get(f"{base}/") as r:
            assert r.status == 200 and "text/html" in r.headers["Content-Type"]
            assert "default-src 'self'" in r.headers["Content-Security-Policy"]
        async with s.get(f"{base}/vendor/lightweight-charts.standalone.production.js") as r:
            assert r.status == 200 and "LightweightCharts" in await r.text()
        async with s.get(f"{base}/vendor/LICENSE") as r:
            assert r.status == 200 and "Apache License" in await r.text()
        for path in ("/..%2Fapp.py", "/vendor/..%2F..%2Fapp.py", "/.env", "/nothing.js"):
            async with s.get(f"{base}{path}") as r:
                assert r.status == 404, path


async def test_cached_footprints_follow_a_rebuilt_bar_and_the_cache_stays_bounded(pool, redis, seeded):
    bars = seeded["bars"]
    async with serve(pool, redis, footprint_cache_bytes=20_000) as (base, api), aiohttp.ClientSession() as s:
        _, first = await get(s, f"{base}/api/v1/footprints", symbol=SYMBOL, limit=FLOW_BARS, end=T0 + 29 * M1)
        _, again = await get(s, f"{base}/api/v1/footprints", symbol=SYMBOL, limit=5, end=T0 + 29 * M1)
        assert again == first[-5:] and api.footprint_cache.hits >= 5
        assert 0 < api.footprint_cache.bytes <= 20_000 and len(api.footprint_cache.documents) < FLOW_BARS
        # a late trade rebuilds the newest bar: the next answer is the new bar, not the cached one
        rebuilt = fold(bars[-1].bar.open_time, ROW, trades_of(FLOW_BARS - 1, random.Random(99), 50_000))
        await upsert_bars(pool, [FinalBar.of(SYMBOL, "m1", rebuilt, CvdChain(), ImbalanceRules())])
        _, after = await get(s, f"{base}/api/v1/footprints", symbol=SYMBOL, limit=5, end=T0 + 29 * M1)
        assert after[:4] == first[-5:-1] and after[-1] != first[-1]
        assert after[-1] == orjson.loads(FootprintRenderer().document((SYMBOL, "m1"), rebuilt, None)) | {
            k: after[-1][k] for k in ("poc", "vah", "val", "imbalances", "stacked", "unfinished", "final")
        }


async def test_while_postgresql_is_away_candles_come_from_redis_and_the_rest_says_503(pool, redis, pg_url, seeded):
    await write_candles(make_candle_store(redis, True, 250), seeded["candles"])
    parts = urlsplit(pg_url)
    proxy = await TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432).start()
    away = await asyncpg.create_pool(
        urlunsplit(parts._replace(netloc=f"{parts.username}@127.0.0.1:{proxy.port}")), min_size=1, max_size=2,
        command_timeout=3,
    )  # fmt: skip
    try:
        async with serve(away, redis) as (base, _), aiohttp.ClientSession() as s:
            assert (await get(s, f"{base}/api/v1/candles", symbol=SYMBOL))[0] == 200  # running before the outage
            proxy.set_mode("down")
            async with s.get(f"{base}/api/v1/candles", params={"symbol": SYMBOL, "limit": 5}, headers=AUTH) as r:
                rows = await r.json()
                assert r.status == 200 and r.headers["X-Feed-Source"] == "redis"
            want = [c for c in seeded["candles"] if c.symbol == SYMBOL][-5:]
            assert [row["open_time"] for row in rows] == [c.open_time for c in want]
            assert [float(row["close"]) for row in rows] == [float(c.close) for c in want]
            assert rows[0]["trades"] is None and rows[0]["quote_volume"] is None
            status, body = await get(s, f"{base}/api/v1/orderflow", symbol=SYMBOL)
            assert status == 503 and "PostgreSQL could not answer" in body["error"]
            _, health = await get(s, f"{base}/api/v1/health")
            assert health["status"] == "degraded" and health["postgres"] is False and health["redis"] is True
            proxy.set_mode("pass")
            async with s.get(f"{base}/api/v1/candles", params={"symbol": SYMBOL, "limit": 5}, headers=AUTH) as r:
                assert r.status == 200 and "X-Feed-Source" not in r.headers
                assert [row["trades"] for row in await r.json()] == [c.trades for c in want]
    finally:
        away.terminate()
        await proxy.close()
