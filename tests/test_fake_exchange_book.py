"""The fake exchange's order books over real sockets: `/public` serves bookTicker and diff
depth (and `/market` does not), a client following Binance's procedure (buffer, REST
snapshot, `U`/`u`/`pu`) synchronises with book.sync.BookSync and its book's best levels
equal the bookTickers at the same update id, the recordings replay as recorded, and each
book fault does what it says."""

from __future__ import annotations

import asyncio
import contextlib
import time
from itertools import pairwise

import aiohttp
import orjson
import pytest

from binance.book import (
    book_ticker_stream,
    depth_snapshot_of,
    depth_stream,
    parse_book_ticker_frame,
    parse_depth_frame,
)
from book.sync import BookSync
from fake_exchange import FakeExchange, RecordingSource, SyntheticSource
from fake_exchange.book import BookConfig, MadeUpBooks, depth_weight
from market_data import recorded_book_frames

SYMBOL = "SYN0001USDT"
RECORDING_START = 1_721_347_022_000  # 2024-07-18 23:57:02, half a second before the first book frame


def streams(symbol: str) -> list[str]:
    return [book_ticker_stream(symbol), depth_stream(symbol)]


class Listener:
    """A combined-stream client that keeps every frame it gets, in order."""

    def __init__(self, session: aiohttp.ClientSession, url: str) -> None:
        self._session, self._url = session, url
        self.frames: list[str] = []
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Listener:
        self.ws = await self._session.ws_connect(self._url)
        self._task = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        assert self.ws is not None
        async for message in self.ws:
            self.frames.append(message.data if isinstance(message.data, str) else message.data.decode())

    async def __aexit__(self, *exc: object) -> None:
        assert self.ws is not None and self._task is not None
        await self.ws.close()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    def data(self) -> list[dict]:
        """The market events (replies to requests left out)."""
        return [f["data"] for f in map(orjson.loads, self.frames) if "data" in f]

    async def until(self, predicate, timeout_s: float = 5.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            assert time.monotonic() < deadline, "timed out"
            await asyncio.sleep(0.02)


async def snapshot(session: aiohttp.ClientSession, ex: FakeExchange, symbol: str, limit: int = 1000):
    async with session.get(f"{ex.rest_url}/fapi/v1/depth", params={"symbol": symbol, "limit": str(limit)}) as r:
        return r.status, r.headers, await r.read()


class Follower:
    """Binance's documented procedure over the frames a Listener got: diffs into BookSync,
    the snapshot when asked for; checks the book against each bookTicker at the same id."""

    def __init__(self) -> None:
        self.sync = BookSync()
        self.seen = 0
        self.tickers: dict[int, tuple[int, int, int, int]] = {}
        self.matches = 0
        self.mismatches: list[tuple] = []
        self.diffs: list = []

    def feed(self, frames: list[str]) -> None:
        for raw in frames[self.seen :]:
            self.seen += 1
            if "@bookTicker" in raw[:60]:
                _, tick = parse_book_ticker_frame(raw)
                self.tickers[tick.update_id] = (tick.bid, tick.bid_qty, tick.ask, tick.ask_qty)
            elif "depthUpdate" in raw:
                _, diff = parse_depth_frame(raw)
                self.diffs.append(diff)
                if self.sync.on_diff(diff):
                    self._check(diff.last_id)

    def on_snapshot(self, body: bytes) -> None:
        if self.sync.on_snapshot(depth_snapshot_of(body)):
            assert self.sync.book is not None
            self._check(self.sync.book.update_id)

    def _check(self, update_id: int) -> None:
        tick = self.tickers.get(update_id)
        book = self.sync.book
        if tick is None or book is None:
            return
        best = (*book.best_bid(), *book.best_ask())  # type: ignore[misc]
        if best == tick:
            self.matches += 1
        else:
            self.mismatches.append((update_id, best, tick))


async def test_public_route_serves_a_book_a_client_synchronises_with() -> None:
    config = BookConfig(log_events=True)
    async with (
        FakeExchange(SyntheticSource(3, seed=3), speed=1, book=config) as ex,
        aiohttp.ClientSession() as session,
    ):
        url = f"{ex.public_ws_url}/stream?streams={'/'.join(streams(SYMBOL))}"
        async with Listener(session, url) as listener:
            await listener.until(lambda: sum("depthUpdate" in f for f in listener.frames) >= 3)
            follower = Follower()
            follower.feed(listener.frames)
            status, headers, body = await snapshot(session, ex, SYMBOL)
            assert status == 200 and headers["X-MBX-USED-WEIGHT-1M"] == "20"
            follower.on_snapshot(body)
            await asyncio.sleep(1.5)
            follower.feed(listener.frames)
        sync = follower.sync
        assert sync.state == "synced" and sync.resyncs == 0 and sync.stale_snapshots == 0
        diffs = follower.diffs
        assert len(diffs) >= 15
        assert all(b.previous_id == a.last_id for a, b in pairwise(diffs))  # an unbroken chain
        assert all(b.event_ms - a.event_ms == 100 for a, b in pairwise(diffs))  # @100ms
        assert follower.matches >= 10 and not follower.mismatches
        # The book is never crossed, and its levels are what the exchange holds.
        assert sync.book is not None
        bids, asks = sync.book.levels()
        assert 40 <= len(bids) <= 200 and 40 <= len(asks) <= 200 and bids[-1][0] < asks[0][0]
        # Its mid is near the symbol's candle price now.
        price = ex.books.price(SYMBOL, diffs[-1].event_ms)  # type: ignore[union-attr]
        mid = (bids[-1][0] + asks[0][0]) / 2 / 1e8
        assert abs(mid / price - 1) < 0.002
        # The exchange's log holds exactly the events sent.
        assert ex.stats.book_sent[SYMBOL] == listener.data()


async def test_book_streams_only_on_public_and_live_subscribe() -> None:
    async with (
        FakeExchange(SyntheticSource(2, seed=3), speed=1) as ex,
        aiohttp.ClientSession() as session,
    ):
        market_url = f"{ex.ws_url}/stream?streams={book_ticker_stream(SYMBOL)}"
        public_url = f"{ex.public_ws_url}/stream?streams={SYMBOL.lower()}@kline_1m"
        async with Listener(session, market_url) as market, Listener(session, public_url) as public:
            assert market.ws is not None and public.ws is not None
            await market.ws.send_json({"method": "SUBSCRIBE", "params": [depth_stream(SYMBOL)], "id": 1})
            await public.ws.send_json({"method": "SUBSCRIBE", "params": [f"{SYMBOL.lower()}@aggTrade"], "id": 2})
            await public.ws.send_json({"method": "LIST_SUBSCRIPTIONS", "id": 3})
            await asyncio.sleep(0.6)
            assert market.data() == [] and public.data() == []  # acknowledged, then silent
            replies = [orjson.loads(f) for f in market.frames + public.frames]
            assert {"result": None, "id": 1} in replies and {"result": None, "id": 2} in replies
            assert {"result": [f"{SYMBOL.lower()}@kline_1m", f"{SYMBOL.lower()}@aggTrade"], "id": 3} in replies
            # Live: /public takes the book streams by SUBSCRIBE too, and lets them go.
            await public.ws.send_json({"method": "SUBSCRIBE", "params": [book_ticker_stream(SYMBOL)], "id": 4})
            await public.until(lambda: len(public.data()) >= 3)
            assert {e["e"] for e in public.data()} == {"bookTicker"}
            await public.ws.send_json({"method": "UNSUBSCRIBE", "params": [book_ticker_stream(SYMBOL)], "id": 5})
            await asyncio.sleep(0.1)
            count = len(public.data())
            await asyncio.sleep(0.3)
            assert len(public.data()) == count
            assert market.data() == []
        # A raw single stream: /public/ws/<stream>, unwrapped.
        async with Listener(session, f"{ex.public_ws_url}/ws/{depth_stream(SYMBOL)}") as raw:
            await raw.until(lambda: len(raw.frames) >= 2)
            event = orjson.loads(raw.frames[-1])
            assert event["e"] == "depthUpdate" and event["s"] == SYMBOL and {"U", "u", "pu", "E", "T"} <= set(event)


async def test_depth_weight_limits_and_rate_faults() -> None:
    assert [depth_weight(n) for n in (5, 10, 20, 50, 100, 500, 1000)] == [2, 2, 2, 2, 5, 10, 20]
    async with (
        FakeExchange(SyntheticSource(2, seed=3), speed=1) as ex,
        aiohttp.ClientSession() as session,
    ):
        used = []
        for limit in (5, 100, 500, 1000):
            status, headers, body = await snapshot(session, ex, SYMBOL, limit)
            answer = orjson.loads(body)
            assert status == 200 and len(answer["bids"]) <= limit and len(answer["asks"]) <= limit
            used.append(int(headers["X-MBX-USED-WEIGHT-1M"]))
        assert used == [2, 7, 17, 37] and len(answer["bids"]) >= 40
        status, _, body = await snapshot(session, ex, SYMBOL, 7)
        assert status == 400 and orjson.loads(body)["code"] == -1130
        status, _, body = await snapshot(session, ex, "NOPEUSDT", 5)
        assert status == 400 and orjson.loads(body)["code"] == -1121
        ex.faults.rest_429_count, ex.faults.rest_418_after_429 = 1, True
        status, headers, _ = await snapshot(session, ex, SYMBOL, 5)
        assert status == 429 and "Retry-After" in headers
        status, _, _ = await snapshot(session, ex, SYMBOL, 5)
        assert status == 418
        status, _, _ = await snapshot(session, ex, SYMBOL, 5)
        assert status == 200 and ex.stats.rest_depth == 9


async def test_faults_broken_pu_dropped_diff_stale_snapshot_burst() -> None:
    async with (
        FakeExchange(SyntheticSource(2, seed=5), speed=1) as ex,
        aiohttp.ClientSession() as session,
    ):
        url = f"{ex.public_ws_url}/stream?streams={'/'.join(streams(SYMBOL))}"
        async with Listener(session, url) as listener:
            await listener.until(lambda: sum("depthUpdate" in f for f in listener.frames) >= 3)
            # A stale snapshot: older than the diffs already sent, so BookSync asks again.
            follower = Follower()
            follower.feed(listener.frames)
            ex.faults.stale_snapshots = 1
            _, _, body = await snapshot(session, ex, SYMBOL)
            follower.on_snapshot(body)
            await asyncio.sleep(0.25)
            follower.feed(listener.frames)
            assert ex.stats.book_stale_snapshots == 1 and follower.sync.stale_snapshots == 1
            assert follower.sync.wants_snapshot and follower.sync.state == "waiting"
            _, _, body = await snapshot(session, ex, SYMBOL)
            follower.on_snapshot(body)
            await asyncio.sleep(0.25)
            follower.feed(listener.frames)
            assert follower.sync.state == "synced" and follower.sync.resyncs == 0
            # A broken pu: detected as a broken chain, a resync.
            ex.faults.book_broken_pu = 1.0
            await asyncio.sleep(0.15)
            ex.faults.book_broken_pu = 0.0
            await asyncio.sleep(0.15)
            follower.feed(listener.frames)
            assert ex.stats.book_broken_pu >= 1 and follower.sync.resyncs == 1
            _, _, body = await snapshot(session, ex, SYMBOL)
            follower.on_snapshot(body)
            await asyncio.sleep(0.25)
            follower.feed(listener.frames)
            assert follower.sync.state == "synced"
            # A dropped diff: the next one's pu does not follow.
            ex.faults.book_drop_diff = 1.0
            await asyncio.sleep(0.15)
            ex.faults.book_drop_diff = 0.0
            await asyncio.sleep(0.2)
            follower.feed(listener.frames)
            assert ex.stats.book_dropped_diffs >= 1 and follower.sync.resyncs == 2
            assert not follower.mismatches
            # A burst: bookTickers go out several times faster while it lasts.
            before = ex.stats.book_tickers_sent
            await asyncio.sleep(0.5)
            normal = ex.stats.book_tickers_sent - before
            ex.faults.book_burst_factor = 8.0
            before = ex.stats.book_tickers_sent
            await asyncio.sleep(0.5)
            burst = ex.stats.book_tickers_sent - before
            ex.faults.book_burst_factor = 1.0
            assert burst > 3 * normal and ex.stats.book_burst_steps >= 3


async def test_the_recordings_replay_as_recorded() -> None:
    recorded = [(kind, orjson.loads(text)) for kind, text in recorded_book_frames("BTCUSDT")]
    snap = next(body for kind, body in recorded if kind == "snapshot")
    async with (
        FakeExchange(RecordingSource(), start_ms=RECORDING_START, speed=4) as ex,
        aiohttp.ClientSession() as session,
    ):
        ex.clock.pause()  # before the recording's first book frame: the recorded snapshot
        _, _, body = await snapshot(session, ex, "BTCUSDT")
        assert orjson.loads(body) == snap
        url = f"{ex.public_ws_url}/stream?streams={'/'.join(streams('BTCUSDT'))}"
        async with Listener(session, url) as listener:
            await asyncio.sleep(0.1)
            ex.clock.resume()
            await asyncio.sleep(1.5)
            follower = Follower()
            follower.feed(listener.frames)
            follower.on_snapshot(body)
            await asyncio.sleep(0.3)
            follower.feed(listener.frames)
            got = listener.data()
            last = ex.clock.now_ms()
        sent = [(kind, frame["data"]) for kind, frame in recorded if kind != "snapshot"]
        expected = sorted((f for f in sent if f[1]["E"] <= got[-1]["E"]), key=lambda f: f[1]["E"])
        assert got == [data for _, data in expected][: len(got)] and len(got) >= 100
        assert last - got[-1]["E"] < 400  # 100 ms of real time at speed 4
        # The stream names: the recording's depth@0ms goes out as depth@100ms.
        assert {orjson.loads(f)["stream"] for f in listener.frames} == set(streams("BTCUSDT"))
        sync = follower.sync
        assert sync.state == "synced" and sync.resyncs == 0 and not follower.mismatches
        # Later in the replay REST answers the exchange's own book, one a listener syncs to.
        async with Listener(session, url) as late:
            await late.until(lambda: sum("depthUpdate" in f for f in late.frames) >= 1)
            again = Follower()
            again.feed(late.frames)
            _, _, body = await snapshot(session, ex, "BTCUSDT")
            assert orjson.loads(body)["lastUpdateId"] > snap["lastUpdateId"]
            again.on_snapshot(body)
            await asyncio.sleep(0.3)
            again.feed(late.frames)
        assert again.sync.state == "synced" and again.sync.resyncs == 0 and again.sync.stale_snapshots == 0
        assert not again.mismatches


def test_a_made_up_book_stays_consistent_over_a_clock_jump() -> None:
    source = SyntheticSource(1, seed=9)
    books = MadeUpBooks(BookConfig(), source.candle, source.first_open_time)
    t = source.first_open_time + 7_200_000
    symbol = source.symbols[0]
    assert books.emit(symbol, t, 100) is None  # the first window is planned
    sync = BookSync()
    sync.on_snapshot(depth_snapshot_of(books.snapshot(symbol, t, 1000, 100, listened=True, stale=False)))
    book = books.books[symbol]
    sizes = []
    for k in range(1, 1500):
        due = t + k * 100 + (3_600_000 if k >= 700 else 0)  # an hour's jump at k = 700
        step = books.emit(symbol, due, 100)
        assert step is not None and step.end_ms == due
        frame = orjson.dumps({"stream": depth_stream(symbol), "data": book.depth_event(step)})
        _, diff = parse_depth_frame(frame)
        sync.on_diff(diff)
        assert sync.state == "synced", sync.reason
        sizes.append(len(diff.bids) + len(diff.asks))
        bid, _, ask, _ = book.top()
        assert bid < ask and 40 <= len(book.bids) <= 200 and 40 <= len(book.asks) <= 200
    assert max(sizes) > 80  # the jump: the whole book moved in one diff
    assert sorted(sizes)[len(sizes) // 2] <= 8  # otherwise a few levels a diff
    price = books.price(symbol, due) * 10**book.price_dp  # type: ignore[operator]
    assert book.bids.peekitem(-1)[0] - 2 * book.gap <= price <= book.asks.peekitem(0)[0] + 2 * book.gap


@pytest.mark.parametrize("n_ticker,n_depth", [(200, 20)])
async def test_live_pace_costs_little(n_ticker: int, n_depth: int) -> None:
    """200 symbols' bookTickers and 20 symbols' depth at speed 1 on one listener."""
    source = SyntheticSource(n_ticker, seed=11)
    names = [book_ticker_stream(s) for s in source.symbols] + [depth_stream(s) for s in source.symbols[:n_depth]]
    async with FakeExchange(source, speed=1) as ex, aiohttp.ClientSession() as session:
        url = f"{ex.public_ws_url}/stream?streams={'/'.join(names)}"
        async with Listener(session, url):
            await asyncio.sleep(0.5)
            cpu, wall, sent = time.process_time(), time.monotonic(), ex.stats.frames_sent
            await asyncio.sleep(2.0)
            cpu, wall = time.process_time() - cpu, time.monotonic() - wall
            rate = (ex.stats.frames_sent - sent) / wall
    # Exchange and listener share this process: both fit in well under a core.
    assert rate > 1_500, rate
    assert cpu / wall < 0.6, (cpu / wall, rate)


def test_a_snapshot_asked_before_the_first_diff_is_covered_by_it() -> None:
    """A client asking for the snapshot as soon as it subscribed (before any diff went out,
    listened to or not) syncs on its first diff, without a stale-snapshot round."""
    source = SyntheticSource(2, seed=4)
    books = MadeUpBooks(BookConfig(), source.candle, source.first_open_time)
    t = source.first_open_time + 60_000
    for symbol, listened in zip(source.symbols, (True, False), strict=True):
        sync = BookSync()
        sync.on_snapshot(depth_snapshot_of(books.snapshot(symbol, t, 1000, 100, listened=listened, stale=False)))
        step = books.emit(symbol, t + 130, 100)
        assert step is not None and step.end_ms == t + 130
        _, diff = parse_depth_frame(
            orjson.dumps({"stream": depth_stream(symbol), "data": books.books[symbol].depth_event(step)})
        )
        assert sync.on_diff(diff) and sync.state == "synced" and sync.stale_snapshots == 0
