"""The fake Binance exchange speaks the real protocol and injects the faults it promises.

Real sockets throughout: `websockets` as the WebSocket client, aiohttp as the REST client.
"""

from __future__ import annotations

import asyncio
import csv
import gzip
import itertools
import time
from collections import Counter, deque
from decimal import Decimal
from pathlib import Path
from unittest import mock

import aiohttp
import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosedError, ConnectionClosedOK

from candles import Candle
from fake_exchange import ArchiveSource, FakeExchange, SimClock, SyntheticSource, klines_weight
from fake_exchange.faults import Stats
from fake_exchange.frames import partial_candle
from fake_exchange.hub import Connection
from market_data import ARCHIVE_DIR, SHARED_DATA_DIR, archive_symbols

T0 = 1_769_904_000_000  # 2026-02-01T00:00Z, the archives' first minute
MIN = 60_000
HOUR = 60 * MIN
FRAMES_DIR = SHARED_DATA_DIR / "ws_frames" / "fstream_2026-10-07"


@pytest.fixture(scope="module")
def archive() -> ArchiveSource:
    """The seven real archives, first 30 hours (enough for 1500-row REST pages)."""
    return ArchiveSource(end_ms=T0 + 30 * HOUR)


def csv_row(symbol: str, open_time: int) -> list[str]:
    """The archive's own text for one minute (to prove the fake re-emits it byte for byte)."""
    path = next(Path(ARCHIVE_DIR).glob(f"{symbol}-1m-*.csv.gz"))
    with gzip.open(path, "rt", newline="") as handle:
        for row in csv.reader(handle):
            if row and row[0] == str(open_time):
                return row
    raise AssertionError(f"{symbol} {open_time} not in archive")


def sample(name: str) -> dict:
    return orjson.loads((FRAMES_DIR / name).read_bytes())


async def recv(ws: ClientConnection, timeout: float = 2.0) -> object:
    return orjson.loads(await asyncio.wait_for(ws.recv(), timeout))


async def request(ws: ClientConnection, payload: dict) -> object:
    await ws.send(orjson.dumps(payload).decode())
    while True:  # skip market data until the answer
        msg = await recv(ws)
        if isinstance(msg, dict) and ("result" in msg or "error" in msg):
            return msg


async def collect_closes(ws: ClientConnection, want: int, timeout: float) -> list[dict]:
    """Kline close events (unwrapped) until `want` arrived or `timeout` real seconds passed."""
    closes: list[dict] = []
    deadline = time.monotonic() + timeout
    while len(closes) < want:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            msg = orjson.loads(await asyncio.wait_for(ws.recv(), left))
        except TimeoutError:
            break
        data = msg.get("data", msg) if isinstance(msg, dict) else None
        if isinstance(data, dict) and data.get("e") == "kline" and data["k"]["x"]:
            closes.append(data)
    return closes


async def silent_for(ws: ClientConnection, seconds: float) -> bool:
    try:
        await asyncio.wait_for(ws.recv(), seconds)
    except TimeoutError:
        return True
    return False


# --- WebSocket: frames ------------------------------------------------------------------------


async def test_combined_stream_frames_have_the_real_shape_and_exact_close_values(archive: ArchiveSource) -> None:
    streams = "algousdt@kline_1m/ltcusdt@kline_1m/ltcusdt@markPrice@1s/!markPrice@arr@1s"
    async with FakeExchange(archive, start_ms=T0 + 55_000, speed=20) as ex:
        async with connect(f"{ex.ws_url}/stream?streams={streams}") as ws:
            seen: dict[str, list[dict]] = {}
            closes: dict[str, dict] = {}
            while len(closes) < 2:
                msg = await recv(ws)
                assert set(msg) == {"stream", "data"}
                seen.setdefault(msg["stream"], []).append(msg["data"])
                data = msg["data"]
                if msg["stream"].endswith("@kline_1m") and data["k"]["x"]:
                    closes[data["s"]] = data

    real_kline = sample("stream_btcusdt_kline_1m.json")["data"]
    for symbol, close in closes.items():
        assert list(close) == list(real_kline)
        assert list(close["k"]) == list(real_kline["k"])
        k = close["k"]
        assert (k["t"], k["T"], k["i"], k["s"], close["s"]) == (T0, T0 + 59_999, "1m", symbol, symbol)
        assert T0 + 59_999 + 200 <= close["E"] <= T0 + 59_999 + 2000
        row = csv_row(symbol, T0)
        assert [k["o"], k["h"], k["l"], k["c"], k["v"], k["q"], k["n"], k["V"], k["Q"]] == [
            row[1], row[2], row[3], row[4], row[5], row[7], int(row[8]), row[9], row[10]
        ]  # fmt: skip
        assert k["L"] - k["f"] + 1 == k["n"] and k["B"] == "0"
    mark = seen["ltcusdt@markPrice@1s"][0]
    assert list(mark) == list(sample("stream_btcusdt_markPrice_1s.json")["data"])
    assert mark["E"] % 1000 == 0 and mark["T"] == T0 + 8 * HOUR
    assert abs(float(mark["p"]) / float(csv_row("LTCUSDT", T0)[4]) - 1) < 0.01
    pushes = seen["!markPrice@arr@1s"]
    first_tick = [p for p in pushes if p[0]["E"] == pushes[0][0]["E"]]
    assert len(first_tick) >= 2  # split across several pushes
    assert sorted(o["s"] for p in first_tick for o in p) == archive.symbols


async def test_unclosed_updates_grow_towards_the_close(archive: ArchiveSource) -> None:
    async with FakeExchange(archive, start_ms=T0, speed=30) as ex:
        async with connect(f"{ex.ws_url}/ws/algousdt@kline_1m") as ws:  # raw route: no wrapper
            frames = []
            while not frames or frames[-1]["k"]["t"] == T0:
                frames.append(await recv(ws))
    minute0 = [f for f in frames if f["k"]["t"] == T0]
    assert [f["k"]["x"] for f in minute0] == [False] * 4 + [True]
    assert [f["E"] - T0 for f in minute0[:4]] == [300, 19_300, 38_300, 57_300]
    volumes = [Decimal(f["k"]["v"]) for f in minute0]
    assert volumes == sorted(volumes)
    final = minute0[-1]["k"]
    for f in minute0[:-1]:
        k = f["k"]
        assert k["o"] == final["o"] and int(k["n"]) < final["n"]
        assert Decimal(final["l"]) <= Decimal(k["l"]) <= Decimal(k["h"]) <= Decimal(final["h"])
    assert frames[-1]["k"]["t"] == T0 + MIN and not frames[-1]["k"]["x"]
    assert frames[-1]["E"] >= minute0[-1]["E"]


async def test_quiet_symbols_close_after_others_started_the_next_minute(archive: ArchiveSource) -> None:
    streams = "/".join(f"{s.lower()}@kline_1m" for s in archive.symbols)
    async with FakeExchange(archive, start_ms=T0 + 59_000, speed=10) as ex:
        async with connect(f"{ex.ws_url}/stream?streams={streams}") as ws:
            frames = []
            while sum(f["k"]["x"] for f in frames) < len(archive.symbols):
                frames.append((await recv(ws))["data"])
    events = [(f["s"], f["k"]["t"], f["k"]["x"]) for f in frames]
    for symbol in archive.symbols:  # per symbol: its close comes before its next minute
        own = [(t, x) for s, t, x in events if s == symbol]
        assert own.index((T0, True)) < min((i for i, (t, _) in enumerate(own) if t == T0 + MIN), default=99)
    last_close = max(i for i, (_, t, x) in enumerate(events) if x)
    assert any(t == T0 + MIN for _, t, _ in events[:last_close])  # across symbols: interleaved
    assert [f["E"] for f in frames] == sorted(f["E"] for f in frames)


async def test_live_subscribe_unsubscribe_list_and_errors(archive: ArchiveSource) -> None:
    async with FakeExchange(archive, start_ms=T0, speed=120) as ex:
        async with connect(f"{ex.ws_url}/stream") as ws:
            assert await request(ws, {"method": "SUBSCRIBE", "params": ["dotusdt@kline_1m"], "id": 7}) == {
                "result": None,
                "id": 7,
            }
            assert await request(ws, {"method": "SUBSCRIBE", "params": ["nearusdt@kline_1m"], "id": 8}) == {
                "result": None,
                "id": 8,
            }
            assert await request(ws, {"method": "LIST_SUBSCRIPTIONS", "id": 9}) == {
                "result": ["dotusdt@kline_1m", "nearusdt@kline_1m"],
                "id": 9,
            }
            assert ex.subscriptions() == [{"dotusdt@kline_1m", "nearusdt@kline_1m"}]
            msg = await recv(ws)
            assert msg["stream"] in ("dotusdt@kline_1m", "nearusdt@kline_1m")
            assert await request(ws, {"method": "UNSUBSCRIBE", "params": ["dotusdt@kline_1m"], "id": 10}) == {
                "result": None,
                "id": 10,
            }
            later = [await recv(ws) for _ in range(10)]
            assert {m["stream"] for m in later} == {"nearusdt@kline_1m"}

            await ws.send("{not json")
            bad_json = await recv(ws)
            while "error" not in bad_json:
                bad_json = await recv(ws)
            assert bad_json["error"]["code"] == 3 and bad_json["id"] is None
            unknown = await request(ws, {"method": "FROBNICATE", "params": [], "id": 12})
            assert unknown["id"] == 12 and unknown["error"]["code"] == 2 and "FROBNICATE" in unknown["error"]["msg"]
            bad_params = await request(ws, {"method": "SUBSCRIBE", "params": "x", "id": 13})
            assert bad_params["error"]["code"] == 2
        assert ex.stats.client_errors == 3


async def test_legacy_routes_acknowledge_but_stay_silent(archive: ArchiveSource) -> None:
    async with FakeExchange(archive, start_ms=T0 + 50_000, speed=600) as ex:
        async with (
            connect(f"{ex.rest_url.replace('http', 'ws')}/stream?streams=algousdt@kline_1m") as combined,
            connect(f"{ex.rest_url.replace('http', 'ws')}/ws") as raw,
        ):
            assert await request(raw, {"method": "SUBSCRIBE", "params": ["ltcusdt@kline_1m"], "id": 1}) == {
                "result": None,
                "id": 1,
            }
            assert await request(raw, {"method": "LIST_SUBSCRIPTIONS", "id": 2}) == {
                "result": ["ltcusdt@kline_1m"],
                "id": 2,
            }
            assert await silent_for(combined, 0.5) and await silent_for(raw, 0.1)  # ~5 sim minutes
        assert ex.stats.kline_events == 0


# --- WebSocket: limits, keepalive, closes -------------------------------------------------------


async def test_too_many_messages_or_streams_close_with_1008(archive: ArchiveSource) -> None:
    async with FakeExchange(archive, start_ms=T0, max_streams_per_connection=3, max_incoming_per_second=10) as ex:
        async with connect(f"{ex.ws_url}/stream") as ws:
            for i in range(11):
                await ws.send(orjson.dumps({"method": "LIST_SUBSCRIPTIONS", "id": i}).decode())
            with pytest.raises(ConnectionClosedError):
                while True:
                    await recv(ws)
            assert ws.close_code == 1008 and ws.close_reason == "Too many requests"
        async with connect(f"{ex.ws_url}/stream?streams=a@kline_1m/b@kline_1m") as ws:
            await ws.send(
                orjson.dumps({"method": "SUBSCRIBE", "params": ["c@kline_1m", "d@kline_1m"], "id": 1}).decode()
            )
            with pytest.raises(ConnectionClosedError):
                await recv(ws)
            assert ws.close_code == 1008
        ex.faults.reject_subscribe_1008 = True
        async with connect(f"{ex.ws_url}/stream") as ws:
            await ws.send(orjson.dumps({"method": "SUBSCRIBE", "params": ["algousdt@kline_1m"], "id": 1}).decode())
            with pytest.raises(ConnectionClosedError):
                await recv(ws)
            assert ws.close_code == 1008
        assert ex.stats.rate_limit_closes == 3


async def test_server_pings_and_tolerates_unsolicited_pongs(archive: ArchiveSource) -> None:
    async with FakeExchange(archive, start_ms=T0, ping_interval_s=0.1, mark_prices=False) as ex:
        async with aiohttp.ClientSession() as session, session.ws_connect(f"{ex.ws_url}/stream", autoping=False) as ws:
            await ws.pong(b"unsolicited")
            msg = await ws.receive(timeout=2)
            assert msg.type is aiohttp.WSMsgType.PING
            await ws.pong(msg.data)
            await ws.send_str('{"method":"LIST_SUBSCRIPTIONS","id":1}')
            while (msg := await ws.receive(timeout=2)).type is aiohttp.WSMsgType.PING:
                pass
            assert orjson.loads(msg.data) == {"result": [], "id": 1}
        assert ex.stats.pings_sent >= 1


async def test_drop_all_connections_is_abrupt_and_close_all_is_clean(archive: ArchiveSource) -> None:
    async with FakeExchange(archive, start_ms=T0) as ex:
        async with connect(f"{ex.ws_url}/stream?streams=algousdt@kline_1m") as ws:
            await asyncio.sleep(0.05)
            ex.drop_all_connections()
            with pytest.raises(ConnectionClosedError):
                await recv(ws)
            assert ws.close_code == 1006
        async with connect(f"{ex.ws_url}/stream?streams=algousdt@kline_1m") as ws:
            await asyncio.sleep(0.05)
            await ex.close_all_connections()
            with pytest.raises(ConnectionClosedOK):
                await recv(ws)
            assert (ws.close_code, ws.close_reason) == (1001, "24h")
        await asyncio.sleep(0.05)
        assert ex.subscriptions() == []


def test_a_client_that_does_not_keep_up_is_dropped() -> None:
    transport = mock.Mock()
    stats = Stats()
    conn = Connection(
        mock.Mock(), transport, path="/market/stream", combined=True, legacy=False, max_queue=3, stats=stats
    )
    for _ in range(4):
        conn.push(b"{}")
    transport.abort.assert_called_once()
    assert conn.closed and stats.slow_dropped == 1 and stats.frames_sent == 3


# --- faults on the kline stream -------------------------------------------------------------------


async def replay(ex: FakeExchange, streams: str, minutes: int, timeout: float) -> list[dict]:
    async with connect(f"{ex.ws_url}/stream?streams={streams}") as ws:
        return await collect_closes(ws, minutes, timeout)


async def test_duplicate_and_dropped_closes(archive: ArchiveSource) -> None:
    async with FakeExchange(archive, start_ms=T0, speed=1200) as ex:
        ex.faults.duplicate_close = 1.0
        closes = await replay(ex, "algousdt@kline_1m", 10, 2.0)
        times = Counter(c["k"]["t"] for c in closes)
        assert times and all(n == 2 for n in times.values())
        ex.faults.duplicate_close, ex.faults.drop_missing_close = 0.0, 1.0
        async with connect(f"{ex.ws_url}/stream?streams=algousdt@kline_1m") as ws:
            frames = [await recv(ws) for _ in range(12)]  # 3 minutes of unclosed updates, no close
        assert not any(f["data"]["k"]["x"] for f in frames)
        assert ex.stats.closes_dropped >= 2


async def test_late_closes_arrive_after_the_next_minutes_close(archive: ArchiveSource) -> None:
    async with FakeExchange(archive, start_ms=T0, speed=1200) as ex:
        ex.faults.late_close = 0.3
        closes = await replay(ex, "ltcusdt@kline_1m", 30, 3.0)
    order = [c["k"]["t"] for c in closes]
    assert len(order) == len(set(order)) and order != sorted(order)  # each once, some out of order
    late = [c for c in closes if c["E"] > c["k"]["T"] + 2000]
    assert late and all(c["E"] >= c["k"]["T"] + 90_000 for c in late)


async def test_malformed_frames_and_silence(archive: ArchiveSource) -> None:
    async with FakeExchange(archive, start_ms=T0, speed=600) as ex:
        ex.faults.malformed_frame = 0.5
        async with connect(f"{ex.ws_url}/stream?streams=algousdt@kline_1m") as ws:
            raw = [await asyncio.wait_for(ws.recv(), 2) for _ in range(40)]
        assert ex.stats.malformed_sent >= 5
        kinds = set()
        for text in raw:
            try:
                msg = orjson.loads(text)
            except orjson.JSONDecodeError:
                kinds.add("invalid_json")
                continue
            data = msg["data"]
            if msg["stream"] != "algousdt@kline_1m":
                kinds.add("other_stream")
            elif "k" not in data:
                kinds.add("missing_k")
            elif not isinstance(data["E"], int):
                kinds.add("wrong_types")
        assert len(kinds) >= 3

        ex.faults.malformed_frame, ex.faults.silent = 0.0, True
        async with connect(f"{ex.ws_url}/stream?streams=algousdt@kline_1m/!markPrice@arr@1s") as ws:
            assert await silent_for(ws, 0.3)
            assert await request(ws, {"method": "LIST_SUBSCRIPTIONS", "id": 1}) == {
                "result": ["algousdt@kline_1m", "!markPrice@arr@1s"],
                "id": 1,
            }
            ex.faults.silent = False
            assert (await recv(ws))["stream"] in ("algousdt@kline_1m", "!markPrice@arr@1s")


async def test_unknown_frames_are_valid_json_the_client_did_not_ask_for(archive: ArchiveSource) -> None:
    async with FakeExchange(archive, start_ms=T0, speed=600) as ex:
        ex.faults.unknown_frame = 0.5
        async with connect(f"{ex.ws_url}/stream?streams=algousdt@kline_1m") as ws:
            raw = [await asyncio.wait_for(ws.recv(), 2) for _ in range(80)]
        assert ex.stats.unknown_sent >= 10 and ex.stats.malformed_sent == 0
        assert sum(ex.stats.unknown_kinds.values()) == ex.stats.unknown_sent
        seen = Counter()
        for text in raw:
            msg = orjson.loads(text)  # never garbage
            if "id" in msg:
                assert msg["result"] is None and msg["id"] >= 1_000_000
                seen["stray_reply"] += 1
                continue
            stream, data = msg["stream"], msg["data"]
            if stream == "algousdt@kline_1m":
                assert data["e"] == "kline" and data["k"]["i"] == "1m" and data["s"] == "ALGOUSDT"
                continue
            kind = {
                "algousdt@aggTrade": "agg_trade",
                "algousdt@bookTicker": "book_ticker",
                "algousdt@kline_5m": "kline_5m",
                "algousdt@depth5@100ms": "unknown_stream",
                "btcusdt@kline_1m": "unfollowed_symbol",
            }[stream]
            seen[kind] += 1
            if kind == "kline_5m":
                assert data["k"]["i"] == "5m" and data["k"]["t"] % (5 * MIN) == 0 and data["k"]["x"] is True
            if kind == "unfollowed_symbol":
                assert data["s"] == data["k"]["s"] == "BTCUSDT" and data["k"]["i"] == "1m"
        assert len(seen) >= 4 and set(seen) <= set(ex.stats.unknown_kinds)


async def test_missing_minutes_are_absent_from_ws_and_rest(archive: ArchiveSource) -> None:
    async with FakeExchange(archive, start_ms=T0, speed=1200) as ex:
        ex.faults.missing_minutes = {("NEARUSDT", T0 + 2 * MIN), ("NEARUSDT", T0 + 3 * MIN)}
        closes = await replay(ex, "nearusdt@kline_1m", 6, 2.0)
        assert [c["k"]["t"] for c in closes] == [T0 + m * MIN for m in (0, 1, 4, 5, 6, 7)]
        async with aiohttp.ClientSession() as session:
            params = {"symbol": "NEARUSDT", "interval": "1m", "startTime": str(T0), "endTime": str(T0 + 5 * MIN)}
            async with session.get(f"{ex.rest_url}/fapi/v1/klines", params=params) as resp:
                rows = await resp.json()
        assert [r[0] for r in rows] == [T0, T0 + MIN, T0 + 4 * MIN, T0 + 5 * MIN]


async def test_speed_1200_replay_delivers_every_close_exactly_once(archive: ArchiveSource) -> None:
    symbols = archive_symbols()
    streams = "/".join(f"{s.lower()}@kline_1m" for s in symbols) + "/!markPrice@arr@1s"
    async with FakeExchange(archive, start_ms=T0, speed=1200) as ex:
        ex.clock.pause()
        async with connect(f"{ex.ws_url}/stream?streams={streams}") as ws:
            started = time.monotonic()
            ex.clock.resume()
            closes = await collect_closes(ws, 60 * len(symbols), 8.0)
            elapsed = time.monotonic() - started
    got = Counter((c["s"], c["k"]["t"]) for c in closes)
    assert set(got) == {(s, T0 + m * MIN) for s in symbols for m in range(60)}
    assert set(got.values()) == {1}
    assert 2.9 < elapsed < 6.0, elapsed  # 3600 sim s / 1200 = 3 s, + the last close delay (+ CI slack)
    for close in closes[:: len(symbols) * 7]:
        row = csv_row(close["s"], close["k"]["t"])
        assert (close["k"]["o"], close["k"]["c"], close["k"]["v"]) == (row[1], row[4], row[5])
    assert ex.scheduler.max_lag_s < 0.5  # real seconds behind the sim clock, worst case


async def test_clock_jump_replans_from_the_new_instant(archive: ArchiveSource) -> None:
    async with FakeExchange(archive, start_ms=T0, speed=1) as ex:
        async with connect(f"{ex.ws_url}/stream?streams=linkusdt@kline_1m") as ws:
            ex.clock.set_speed(10)
            ex.clock.jump_to(T0 + 10 * HOUR - 1000)
            closes = await collect_closes(ws, 1, 3.0)
    assert closes[0]["k"]["t"] == T0 + 10 * HOUR - MIN


# --- REST -------------------------------------------------------------------------------------


async def get(session: aiohttp.ClientSession, ex: FakeExchange, path: str, **params: object):
    async with session.get(f"{ex.rest_url}{path}", params={k: str(v) for k, v in params.items()}) as resp:
        return resp.status, resp.headers, await resp.json()


async def test_klines_rows_limits_weights_and_the_forming_row(archive: ArchiveSource) -> None:
    now = T0 + 26 * HOUR + 30_000  # mid-minute
    async with FakeExchange(archive, start_ms=now, speed=1) as ex, aiohttp.ClientSession() as s:
        ex.clock.pause()
        status, headers, rows = await get(s, ex, "/fapi/v1/klines", symbol="ALGOUSDT", interval="1m", limit=2)
        assert status == 200 and headers["X-MBX-USED-WEIGHT-1M"] == "1"
        assert headers["Content-Type"].startswith("application/json")
        closed, forming = rows
        real = sample("rest_klines_BTCUSDT_1m_limit2.json")[0]
        assert [type(v) for v in closed] == [type(v) for v in real]
        assert closed == [*[int(x) if i in (0, 6, 8) else x for i, x in enumerate(csv_row("ALGOUSDT", now - 90_000))]]
        assert forming[0] == now - 30_000 and forming[6] == now + 29_999 > ex.clock.now_ms()
        assert forming[8] < int(csv_row("ALGOUSDT", now - 30_000)[8])  # partial

        used = 1
        for limit, weight, count in ((None, 5, 500), (99, 1, 99), (100, 2, 100), (1000, 5, 1000), (1500, 10, 1500)):
            params = {"symbol": "LTCUSDT", "interval": "1m"} | ({"limit": limit} if limit else {})
            status, headers, rows = await get(s, ex, "/fapi/v1/klines", **params)
            used += weight
            assert (status, len(rows), headers["X-MBX-USED-WEIGHT-1M"]) == (200, count, str(used))
            assert rows[-1][0] == now - 30_000 and [r[0] for r in rows] == sorted(r[0] for r in rows)
        assert klines_weight(1001) == 10

        status, _, rows = await get(
            s, ex, "/fapi/v1/klines", symbol="LTCUSDT", interval="1m", startTime=T0 + 1, limit=3
        )
        assert [r[0] for r in rows] == [T0 + MIN, T0 + 2 * MIN, T0 + 3 * MIN]
        status, _, rows = await get(s, ex, "/fapi/v1/klines", symbol="LTCUSDT", interval="1m", endTime=T0 + 5 * MIN)
        assert rows[0][0] == T0 and rows[-1][0] == T0 + 5 * MIN and len(rows) == 6
        status, _, rows = await get(s, ex, "/fapi/v1/klines", symbol="LTCUSDT", interval="15m", startTime=T0, limit=1)
        m1 = [csv_row("LTCUSDT", T0 + i * MIN) for i in range(15)]
        assert rows[0][4] == m1[-1][4] and rows[0][8] == sum(int(r[8]) for r in m1) and rows[0][6] == T0 + 15 * MIN - 1

        for params, code in (
            ({"symbol": "LTCUSDT", "interval": "1m", "limit": 1501}, -1130),
            ({"symbol": "XYZUSDT", "interval": "1m"}, -1121),
            ({"symbol": "LTCUSDT", "interval": "7m"}, -1120),
            ({"symbol": "LTCUSDT", "interval": "1m", "startTime": "abc"}, -1100),
        ):
            status, _, body = await get(s, ex, "/fapi/v1/klines", **params)
            assert (status, body["code"]) == (400, code) and body["msg"]


async def test_time_ping_and_exchange_info(archive: ArchiveSource) -> None:
    async with FakeExchange(archive, start_ms=T0 + HOUR) as ex, aiohttp.ClientSession() as s:
        _, _, body = await get(s, ex, "/fapi/v1/time")
        assert abs(body["serverTime"] - (T0 + HOUR)) < 5000
        assert (await get(s, ex, "/fapi/v1/ping"))[2] == {}
        _, headers, info = await get(s, ex, "/fapi/v1/exchangeInfo")
        real = sample("rest_exchange_info_trimmed.json")
        assert set(real) <= set(info) and info["rateLimits"][0]["limit"] == 2400
        assert [x["symbol"] for x in info["symbols"]] == archive.symbols
        algo = next(x for x in info["symbols"] if x["symbol"] == "ALGOUSDT")
        assert set(algo) == set(real["symbols"][0])
        assert (algo["contractType"], algo["status"], algo["pricePrecision"]) == ("PERPETUAL", "TRADING", 4)
        assert headers["X-MBX-USED-WEIGHT-1M"] == "3"


async def test_over_the_weight_limit_429_then_418(archive: ArchiveSource) -> None:
    async with FakeExchange(archive, weight_limit=12, weight_window_s=30) as ex, aiohttp.ClientSession() as s:
        statuses = []
        for _ in range(3):
            status, headers, body = await get(s, ex, "/fapi/v1/klines", symbol="DOTUSDT", interval="1m", limit=500)
            statuses.append(status)
        assert statuses == [200, 200, 429]
        assert body["code"] == -1003 and 1 <= int(headers["Retry-After"]) <= 30
        status, headers, _ = await get(s, ex, "/fapi/v1/time")  # calling during Retry-After
        assert status == 418 and int(headers["Retry-After"]) > 30
        assert (ex.stats.rest_429, ex.stats.rest_418) == (1, 1)


async def test_rest_faults_forced_429_418_truncation_and_delay(archive: ArchiveSource) -> None:
    async with FakeExchange(archive) as ex, aiohttp.ClientSession() as s:
        ex.faults.rest_429_count, ex.faults.rest_418_after_429 = 2, True
        seen = []
        for _ in range(4):
            status, headers, _ = await get(s, ex, "/fapi/v1/klines", symbol="DOTUSDT", interval="1m", limit=5)
            seen.append((status, headers.get("Retry-After")))
        assert seen == [(429, "1"), (429, "1"), (418, "2"), (200, None)]

        ex.faults.rest_truncate_count = 1
        with pytest.raises(aiohttp.ClientPayloadError):
            await get(s, ex, "/fapi/v1/klines", symbol="DOTUSDT", interval="1m", limit=50)
        assert (await get(s, ex, "/fapi/v1/klines", symbol="DOTUSDT", interval="1m", limit=50))[0] == 200

        ex.faults.rest_delay_s = 0.3
        started = time.monotonic()
        await get(s, ex, "/fapi/v1/ping")
        assert time.monotonic() - started >= 0.3


# --- sources, clock, pure helpers --------------------------------------------------------------


def test_synthetic_source_is_deterministic_and_realistic() -> None:
    a, b, other = SyntheticSource(3, seed=5), SyntheticSource(3, seed=5), SyntheticSource(3, seed=6)
    assert a.symbols == ["SYN0001USDT", "SYN0002USDT", "SYN0003USDT"]
    minutes = [a.first_open_time + i * MIN for i in range(2000)]
    series = [a.candle("SYN0002USDT", t) for t in minutes]
    assert series == [b.candle("SYN0002USDT", t) for t in minutes]
    assert series[:50] != [other.candle("SYN0002USDT", t) for t in minutes[:50]]
    # on demand, in any order, without history: a fresh source gives the same late minute
    assert SyntheticSource(3, seed=5).candle("SYN0002USDT", minutes[-1]) == series[-1]
    quiet = 0
    for prev, c in itertools.pairwise(series):
        assert c.low <= min(c.open, c.close) <= max(c.open, c.close) <= c.high and c.low > 0
        assert c.close.as_tuple().exponent == -4 and c.volume.as_tuple().exponent in (-3, 0)
        if c.trades == 0:
            quiet += 1
            assert c.volume == 0 and c.open == c.high == c.low == c.close == prev.close
    assert quiet >= 1
    assert a.candle("SYN0002USDT", minutes[0] + 1) is None and a.candle("NOPE", minutes[0]) is None


async def test_synthetic_exchange_with_500_symbols_streams_them() -> None:
    source = SyntheticSource(500)
    streams = "/".join(f"{s.lower()}@kline_1m" for s in source.symbols[:200])
    async with FakeExchange(source, start_ms=source.first_open_time + 58_000, speed=60) as ex:
        async with connect(f"{ex.ws_url}/stream?streams={streams}") as ws:
            closes = await collect_closes(ws, 200, 3.0)
    assert len({c["s"] for c in closes}) == 200


def test_sim_clock_speed_pause_jump() -> None:
    clock = SimClock(1_000_000, speed=1000)
    events: list[bool] = []
    clock.add_listener(events.append)
    time.sleep(0.01)
    assert 1_000_000 + 9_000 <= clock.now_ms() < 1_000_000 + 600_000
    clock.pause()
    frozen = clock.now_ms()
    time.sleep(0.005)
    assert clock.now_ms() == frozen and clock.real_seconds_until(frozen + 1) is None
    clock.resume()
    clock.jump_to(5_000_000)
    assert 5_000_000 <= clock.now_ms() < 5_010_000
    clock.set_speed(1)
    assert 0.9 < (clock.real_seconds_until(clock.now_ms() + 1000) or 0) <= 1.0
    assert events == [False, False, True, False]


def test_partial_candles_stay_inside_the_final_candle(archive: ArchiveSource) -> None:
    for symbol in archive.symbols:
        for minute in range(0, 300, 7):
            final = archive.candle(symbol, T0 + minute * MIN)
            assert isinstance(final, Candle)
            for fraction in (0.005, 0.3, 0.6, 0.95):
                p = partial_candle(final, fraction)
                assert p.open == final.open and final.low <= p.low <= p.high <= final.high
                assert p.low <= p.close <= p.high and 0 <= p.volume <= final.volume and p.trades <= final.trades
                assert str(p.close).count(".") == str(final.close).count(".")
                assert p.close.as_tuple().exponent == final.close.as_tuple().exponent


async def test_closed_connection_state_is_cleaned_up(archive: ArchiveSource) -> None:
    async with FakeExchange(archive, start_ms=T0) as ex:
        async with connect(f"{ex.ws_url}/stream?streams=a/b"):
            await asyncio.sleep(0.05)
            assert ex.subscriptions() == [{"a", "b"}]
        await asyncio.sleep(0.05)
        assert ex.hub.subs == {} and ex.subscriptions() == []
        assert ex.stats.connections_opened == ex.stats.connections_closed == 1


async def test_the_close_log_says_when_each_close_left(archive: ArchiveSource) -> None:
    """GET /fake/closes: every published close with the moment it left, before any client
    had it; paged by `next`; a bad `from` is refused; the log keeps its newest entries."""
    streams = "/".join(f"{s.lower()}@kline_1m" for s in archive.symbols)
    async with FakeExchange(archive, start_ms=T0 + 58_000, speed=10) as ex, aiohttp.ClientSession() as s:
        received: dict[tuple[str, int], float] = {}
        async with connect(f"{ex.ws_url}/stream?streams={streams}") as ws:
            while len(received) < len(archive.symbols):
                msg = await recv(ws)
                if msg["data"]["k"]["x"]:
                    received[(msg["data"]["s"], msg["data"]["k"]["t"])] = time.time() * 1000
        status, _, body = await get(s, ex, "/fake/closes")
        assert status == 200 and body["next"] == len(body["closes"]) >= len(archive.symbols)
        sent = {(symbol, t): at for symbol, t, at in body["closes"]}
        assert set(received) <= set(sent)
        assert all(sent[key] <= at for key, at in received.items())
        assert (await get(s, ex, "/fake/closes", **{"from": body["next"]}))[2]["closes"] == []
        assert (await get(s, ex, "/fake/closes", **{"from": "x"}))[0] == 400
    stats = Stats()
    stats.close_log = deque(maxlen=3)
    for minute in range(5):
        stats.log_close("X", minute)
    assert [t for _, t, _ in stats.close_log] == [2, 3, 4] and stats.closes_logged == 5
