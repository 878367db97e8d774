"""The fake exchange's aggTrades over REST (real sockets): every closed minute's trades
fold into its kline exactly, ids run on across minutes and pages, and the endpoint keeps
Binance's rules (paging modes, weight 20, the one-hour window, 48 hours served)."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from itertools import pairwise

import aiohttp
import orjson
import pytest
import websockets

from binance.rest import RestClient, RestError, WeightLimiter
from binance.trades import agg_trades_of, parse_agg_trade_frame
from fake_exchange import ArchiveSource, FakeExchange
from orderflow.fold import fold, units_decimal

T0 = 1_769_904_000_000  # 2026-02-01T00:00Z, the archives' first minute
MIN = 60_000
HOUR = 60 * MIN
SYMBOL = "LINKUSDT"


@pytest.fixture(scope="module")
def archive() -> ArchiveSource:
    return ArchiveSource([SYMBOL, "ALGOUSDT"], end_ms=T0 + 50 * HOUR)


async def get(session: aiohttp.ClientSession, ex: FakeExchange, path: str, **params) -> tuple[int, dict, object]:
    async with session.get(f"{ex.rest_url}{path}", params={k: str(v) for k, v in params.items()}) as response:
        return response.status, dict(response.headers), await response.json(content_type=None)


async def test_a_minutes_trades_fold_into_its_kline_and_ids_run_on_across_pages(archive: ArchiveSource) -> None:
    now = T0 + 49 * HOUR + 30_000
    async with FakeExchange(archive, start_ms=now, speed=1) as ex, aiohttp.ClientSession() as s:
        ex.clock.pause()
        first_minute = now - now % MIN - 20 * MIN
        status, headers, body = await get(s, ex, "/fapi/v1/aggTrades", symbol=SYMBOL, startTime=first_minute, limit=1)
        assert status == 200 and headers["X-MBX-USED-WEIGHT-1M"] == "20"
        trades = []
        from_id = body[0]["a"]
        while True:  # page by id to the newest trade
            status, _, body = await get(s, ex, "/fapi/v1/aggTrades", symbol=SYMBOL, fromId=from_id, limit=1000)
            page = agg_trades_of(body)
            if not page:
                break
            trades += page
            from_id = page[-1].agg_id + 1
        assert [b.agg_id - a.agg_id for a, b in pairwise(trades)] == [1] * (len(trades) - 1)
        assert trades[-1].time_ms <= now
        _, _, klines = await get(
            s, ex, "/fapi/v1/klines", symbol=SYMBOL, interval="1m", startTime=first_minute, limit=20
        )
        assert len(klines) == 20
        for kline in klines:
            minute = kline[0]
            bar = fold(minute, 1, [t for t in trades if minute <= t.time_ms < minute + MIN])
            assert units_decimal(bar.volume) == Decimal(kline[5]) and units_decimal(bar.buy) == Decimal(kline[9])
            assert bar.trades == kline[8]
            assert (units_decimal(bar.high), units_decimal(bar.low)) == (Decimal(kline[2]), Decimal(kline[3]))
        # By time: the same minute's trades, whatever the page size.
        minute = klines[5][0]
        _, _, by_time = await get(
            s, ex, "/fapi/v1/aggTrades", symbol=SYMBOL, startTime=minute, endTime=minute + MIN - 1, limit=1000
        )
        assert [r["a"] for r in by_time] == [t.agg_id for t in trades if minute <= t.time_ms < minute + MIN]
        # The newest: up to now only (the forming minute's trades so far).
        _, _, newest = await get(s, ex, "/fapi/v1/aggTrades", symbol=SYMBOL, limit=5)
        assert [r["a"] for r in newest] == [t.agg_id for t in trades[-5:]]


async def test_the_endpoint_keeps_binances_rules(archive: ArchiveSource) -> None:
    now = T0 + 49 * HOUR + 30_000
    async with FakeExchange(archive, start_ms=now, speed=1) as ex, aiohttp.ClientSession() as s:
        ex.clock.pause()
        for params, code in (
            ({"symbol": SYMBOL, "startTime": now - 49 * HOUR}, -4166),  # older than 48 hours
            ({"symbol": SYMBOL, "fromId": 1}, -4166),  # the first trade of the source: 49 hours old
            ({"symbol": SYMBOL, "fromId": 5, "startTime": now - HOUR}, -1128),
            ({"symbol": SYMBOL, "startTime": now - 2 * HOUR, "endTime": now}, -1127),
            ({"symbol": SYMBOL, "limit": 1001}, -1130),
            ({"symbol": "XYZUSDT"}, -1121),
            ({}, -1102),
        ):
            status, _, body = await get(s, ex, "/fapi/v1/aggTrades", **params)
            assert (status, body["code"]) == (400, code), params
        status, _, body = await get(s, ex, "/fapi/v1/aggTrades", symbol=SYMBOL, fromId=10**12)
        assert (status, body) == (200, [])
        assert ex.stats.rest_agg_trades == 8


async def test_ids_of_two_exchanges_agree(archive: ArchiveSource) -> None:
    """Deterministic: a restarted exchange (or another process) serves the same ids."""
    now = T0 + 3 * HOUR
    bodies = []
    for _ in range(2):
        async with FakeExchange(archive, start_ms=now, speed=1) as ex, aiohttp.ClientSession() as s:
            ex.clock.pause()
            bodies.append((await get(s, ex, "/fapi/v1/aggTrades", symbol="ALGOUSDT", startTime=now - HOUR))[2])
    assert bodies[0] == bodies[1] and len(bodies[0]) == 500


async def stream_trades(ex: FakeExchange, symbol: str, sim_minutes: int) -> tuple[list[dict], list[dict]]:
    """(aggTrade events, closed kline events) of one symbol for `sim_minutes` of sim time."""
    lower = symbol.lower()
    trades, closes = [], []
    async with websockets.connect(f"{ex.ws_url}/stream?streams={lower}@aggTrade/{lower}@kline_1m") as ws:
        end = ex.clock.now_ms() + sim_minutes * MIN
        while ex.clock.now_ms() < end:
            try:
                message = orjson.loads(await asyncio.wait_for(ws.recv(), 5))
            except TimeoutError:
                break
            data = message["data"]
            if data["e"] == "aggTrade":
                trades.append(data)
            elif data["e"] == "kline" and data["k"]["x"]:
                closes.append(data["k"])
    return trades, closes


async def test_streamed_trades_fold_into_every_closed_kline(archive: ArchiveSource) -> None:
    async with FakeExchange(archive, start_ms=T0 + 2 * HOUR, speed=120, trades_per_agg=20) as ex:
        events, closes = await stream_trades(ex, SYMBOL, 5)
    trades = [parse_agg_trade_frame(orjson.dumps({"stream": "linkusdt@aggTrade", "data": e}))[1] for e in events]
    assert [b.agg_id - a.agg_id for a, b in pairwise(trades)] == [1] * (len(trades) - 1)
    first_full = trades[0].time_ms - trades[0].time_ms % MIN  # the minute it subscribed in has none
    checked = 0
    for k in closes:
        if k["t"] < first_full or k["t"] + MIN > trades[-1].time_ms:
            continue
        bar = fold(k["t"], 1, [t for t in trades if k["t"] <= t.time_ms < k["t"] + MIN])
        assert (bar.first_trade_id, bar.last_trade_id, bar.trades) == (k["f"], k["L"], k["n"])
        assert units_decimal(bar.volume) == Decimal(k["v"]) and units_decimal(bar.buy) == Decimal(k["V"])
        checked += 1
    assert checked >= 3


async def test_trade_faults_drop_duplicate_reorder_and_delay(archive: ArchiveSource) -> None:
    async with FakeExchange(archive, start_ms=T0 + 2 * HOUR, speed=120, trades_per_agg=10) as ex:
        faults = ex.faults
        faults.drop_trade = faults.duplicate_trade = faults.reorder_trade = faults.late_trade = 0.05
        events, _ = await stream_trades(ex, SYMBOL, 4)
        stats = ex.stats
    ids = [e["a"] for e in events]
    assert stats.dropped_trades and stats.trades_duplicated and stats.trades_reordered and stats.trades_late
    assert not {a for _, a in stats.dropped_trades} & set(ids)
    assert len(ids) - len(set(ids)) == stats.trades_duplicated
    assert sum(1 for a, b in pairwise(ids) if b < a) >= stats.trades_reordered
    assert set(range(min(ids), max(ids) + 1)) - set(ids) <= {a for _, a in stats.dropped_trades}


async def test_the_rest_client_pages_through_a_busy_minute(archive: ArchiveSource) -> None:
    """One aggTrade per exchange trade: a busy minute spans several pages of 1,000."""
    now = T0 + 49 * HOUR
    busy = max((c for c in (archive.candle(SYMBOL, now - k * MIN) for k in range(2, 600)) if c), key=lambda c: c.trades)
    quiet = min(
        (c for c in (archive.candle(SYMBOL, now - k * MIN) for k in range(2, 600)) if c), key=lambda c: c.trades
    )
    assert busy.trades > 2_000
    async with FakeExchange(archive, start_ms=now, speed=1, trades_per_agg=1) as ex:
        ex.clock.pause()
        client = RestClient(ex.rest_url, WeightLimiter(2400, 60))
        try:
            for candle in (busy, quiet):
                trades = await client.agg_trades_between(SYMBOL, candle.open_time, candle.open_time + MIN)
                bar = fold(candle.open_time, 1, trades)
                assert bar.trades == candle.trades and units_decimal(bar.volume) == candle.volume
                assert units_decimal(bar.buy) == candle.taker_buy_volume
                assert [b.agg_id - a.agg_id for a, b in pairwise(trades)] == [1] * (len(trades) - 1)
            before = client.requests
            pages = -(-len(await client.agg_trades_between(SYMBOL, busy.open_time, busy.open_time + MIN)) // 1000)
            assert client.requests - before == pages == 3  # weight 20 each
            with pytest.raises(RestError) as refused:
                await client.agg_trades_between(SYMBOL, now - 49 * HOUR, now - 49 * HOUR + MIN)
            assert refused.value.code == -4166
        finally:
            await client.close()
