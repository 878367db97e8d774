"""The read API's WebSocket pushes: the daemon's streams tailed once per process and
fanned out to the clients subscribed to each channel.

Each message is encoded once and queued to every subscriber; a subscriber's queue is
bounded in bytes (`WEB_WS_BUFFER_BYTES`), so a client that stops reading is cut off
instead of growing the server (its socket's own buffer is aiohttp's 64 KiB). Forming
footprints and books have no stream (their keys are rewritten up to four times a
second), so the keys of subscribed channels are polled every `POLL_S` and pushed when
they changed.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict, deque
from collections.abc import Mapping, Sequence
from typing import Any

import asyncpg
import orjson
from aiohttp import web
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from book.store import FEATURES_STREAM, book_key
from core_io import CANDLE_STREAM_TF, CANDLE_STREAMS, INDICATORS_READY_STREAM
from infra import Outage
from orderflow.store import ORDERFLOW_READY_STREAM, footprint_key
from shards.cluster import read_streams_apart
from web import reads

log = logging.getLogger("WEB")
POLL_S = 0.25
READ_BLOCK_MS = 1_000
CLUSTER_READ_BLOCK_MS = 100
READ_COUNT = 5_000
_CANDLE_EXTRAS = {"quote_volume": None, "trades": None, "taker_buy_volume": None}


def message(channel: str, data: bytes) -> str:
    """`{"channel", "data"}` with `data` already JSON: spliced, not encoded again."""
    return '{"channel":"' + channel + '","data":' + data.decode() + "}"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else value


class Subscriber:
    """One WebSocket client: its channels and a queue of messages bounded in bytes."""

    def __init__(self, ws: web.WebSocketResponse, client: str, max_bytes: int) -> None:
        self.ws, self.client, self.max_bytes = ws, client, max_bytes
        self.channels: set[str] = set()
        self.queue: deque[str] = deque()
        self.queued_bytes = 0
        self.overflowed = False
        self.wake = asyncio.Event()
        self.sent = 0

    def offer(self, text: str) -> None:
        if self.overflowed:
            return
        if self.queued_bytes + len(text) > self.max_bytes:
            self.overflowed = True  # the sender sees it and the handler cuts the client off
            self.queue.clear()
            self.queued_bytes = 0
        else:
            self.queue.append(text)
            self.queued_bytes += len(text)
        self.wake.set()

    async def send_loop(self) -> None:
        """Returns when the client fell too far behind."""
        while True:
            await self.wake.wait()
            self.wake.clear()
            while self.queue and not self.overflowed:
                text = self.queue.popleft()
                self.queued_bytes -= len(text)
                await self.ws.send_str(text)
                self.sent += 1
            if self.overflowed:
                return


class Hub:
    """Channels → subscribers, and the tasks that feed them."""

    def __init__(self, redis: Redis, pool: asyncpg.Pool, footprints: reads.FootprintCache) -> None:
        self.redis, self.pool, self.footprints = redis, pool, footprints
        self.by_channel: dict[str, set[Subscriber]] = defaultdict(set)
        self.last_polled: dict[str, bytes] = {}
        self.last_final: dict[str, int] = {}  # footprint channel -> newest final open time pushed
        self.pushed = 0
        self.pushed_bytes = 0
        self.redis_outage = Outage("WEB", "Redis")
        self.pg_outage = Outage("WEB", "PostgreSQL")

    # ------------------------------------------------------------------ subscriptions

    def subscribe(self, sub: Subscriber, channels: Sequence[str]) -> None:
        for channel in channels:
            sub.channels.add(channel)
            self.by_channel[channel].add(sub)

    def unsubscribe(self, sub: Subscriber, channels: Sequence[str]) -> None:
        for channel in channels:
            sub.channels.discard(channel)
            subs = self.by_channel.get(channel)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self.by_channel[channel]
                    self.last_polled.pop(channel, None)
                    self.last_final.pop(channel, None)

    def drop(self, sub: Subscriber) -> None:
        self.unsubscribe(sub, list(sub.channels))

    def publish(self, channel: str, data: bytes) -> None:
        subs = self.by_channel.get(channel)
        if not subs:
            return
        text = message(channel, data)
        for sub in subs:
            sub.offer(text)
        self.pushed += len(subs)
        self.pushed_bytes += len(text) * len(subs)

    def wanted(self, channel: str) -> bool:
        return channel in self.by_channel

    # ------------------------------------------------------------------ streams

    async def start_ids(self) -> dict[str, str]:
        streams = [*CANDLE_STREAMS.values(), INDICATORS_READY_STREAM, ORDERFLOW_READY_STREAM, FEATURES_STREAM]
        async with self.redis.pipeline(transaction=False) as pipe:
            for stream in streams:
                pipe.xrevrange(stream, count=1)
            replies = await pipe.execute()
        return {stream: (_text(reply[0][0]) if reply else "0-0") for stream, reply in zip(streams, replies)}

    async def read(self, ids: dict[str, str]) -> Any:
        if not isinstance(self.redis, RedisCluster):
            return await self.redis.xread(ids, count=READ_COUNT, block=READ_BLOCK_MS)

        async def read_part(part: dict[str, str], block: int | None) -> Any:
            return await self.redis.xread(part, count=READ_COUNT, block=block)

        # One stream waited on at a time (shards/cluster.py): briefly, so that the others
        # (features_1s every second) are not held back behind a quiet M1 stream.
        return await read_streams_apart(read_part, ids, CLUSTER_READ_BLOCK_MS)

    async def tail_streams(self) -> None:
        """Reads every announcement stream from where it stood at start (or reconnect)."""
        ids: dict[str, str] | None = None
        while True:
            try:
                if ids is None:
                    ids = await self.start_ids()
                replies = await self.read(ids)
                self.redis_outage.ok()
            except (RedisError, OSError) as exc:
                self.redis_outage.fail(exc, "reading the announcement streams")
                ids = None
                await asyncio.sleep(1.0)
                continue
            for stream, entries in replies or ():
                name = _text(stream)
                ids[name] = _text(entries[-1][0])
                try:
                    await self.dispatch(
                        name, [{_text(k): _text(v) for k, v in fields.items()} for _, fields in entries]
                    )
                except (RedisError, OSError, asyncpg.PostgresError) as exc:
                    log.warning("pushing %s entries failed: %s", name, exc)

    async def dispatch(self, stream: str, events: list[dict[str, str]]) -> None:
        if stream in CANDLE_STREAM_TF:
            await self.push_candles(CANDLE_STREAM_TF[stream], events)
        elif stream == INDICATORS_READY_STREAM:
            await self.push_indicators(events)
        elif stream == ORDERFLOW_READY_STREAM:
            await self.push_orderflow(events)
        elif stream == FEATURES_STREAM:
            for event in events:
                channel = f"features:{event.get('symbol')}"
                if self.wanted(channel):
                    self.publish(channel, orjson.dumps(reads.feature_second(event)))

    @staticmethod
    def _keys(events: Sequence[Mapping[str, str]], kinds: Sequence[str], want) -> dict[tuple[str, str, int], None]:
        """(symbol, tf, open_time) of the events some client wants, in order, once each."""
        keys: dict[tuple[str, str, int], None] = {}
        for event in events:
            try:
                key = (event["symbol"], event["tf"], int(event["open_time"]))
            except (KeyError, ValueError):
                continue
            if any(want(f"{kind}:{key[0]}:{key[1]}") for kind in kinds):
                keys[key] = None
        return keys

    async def push_candles(self, tf: str, events: list[dict[str, str]]) -> None:
        wanted = [e for e in events if self.wanted(f"candles:{e.get('symbol')}:{tf}")]
        if not wanted:
            return
        keys = list({(e["symbol"], int(e["open_time"])): e for e in wanted}.items())
        try:
            found = await reads.candles_at(self.pool, tf, [k for k, _ in keys])
            self.pg_outage.ok()
        except reads.PG_DOWN as exc:
            self.pg_outage.fail(exc, "reading closed bars for the WebSocket")
            found = {}
        for (symbol, open_time), event in keys:
            data = found.get((symbol, open_time))
            if data is None:  # PostgreSQL unreachable: the announcement's own fields
                fields = {"open_time": open_time, **{k: event.get(k) for k in ("open", "high", "low", "close")}}
                data = orjson.dumps(fields | {"volume": event.get("volume"), **_CANDLE_EXTRAS})
            self.publish(f"candles:{symbol}:{tf}", data)

    async def push_indicators(self, events: list[dict[str, str]]) -> None:
        keys = list(self._keys(events, ("indicators",), self.wanted))
        if not keys:
            return
        latest = await reads.latest_indicators(self.redis, [(s, tf) for s, tf, _ in keys])
        for (symbol, tf, open_time), row in zip(keys, latest):
            if row is None or row["open_time"] != open_time:  # a rebuilt older bar: its values are in PostgreSQL
                rows = await reads.indicator_rows(self.pool, self.redis, symbol, tf, 1, open_time)
                row = rows[-1] if rows and rows[-1]["open_time"] == open_time else None
            if row is not None:
                self.publish(f"indicators:{symbol}:{tf}", orjson.dumps(row))

    async def push_orderflow(self, events: list[dict[str, str]]) -> None:
        keys = list(self._keys(events, ("orderflow", "footprint"), self.wanted))
        if not keys:
            return
        hashes = await reads.orderflow_hashes(self.redis, [(s, tf) for s, tf, _ in keys])
        async with self.redis.pipeline(transaction=False) as pipe:
            for symbol, tf, _ in keys:
                pipe.get(footprint_key(symbol, tf))
            documents = await pipe.execute()
        for (symbol, tf, open_time), row, document in zip(keys, hashes, documents):
            current = row is not None and row["open_time"] == open_time
            flow_channel, print_channel = f"orderflow:{symbol}:{tf}", f"footprint:{symbol}:{tf}"
            if self.wanted(flow_channel):
                if current:
                    data = orjson.dumps(row)
                else:  # a rebuilt older bar: PostgreSQL has it
                    rows = orjson.loads(await reads.orderflow_json(self.pool, symbol, tf, 1, open_time))
                    data = orjson.dumps(rows[-1]) if rows else None
                if data is not None:
                    self.publish(flow_channel, data)
            if self.wanted(print_channel):
                if current and document:
                    data = reads.marked(document, True)
                else:
                    data = await reads.footprint_at(self.footprints, self.pool, symbol, tf, open_time)
                if data is not None:
                    self.last_final[print_channel] = max(self.last_final.get(print_channel, 0), open_time)
                    self.publish(print_channel, data)

    # ------------------------------------------------------------------ polled keys

    async def poll_keys(self) -> None:
        while True:
            await asyncio.sleep(POLL_S)
            channels = [c for c in self.by_channel if c.startswith(("footprint:", "book:"))]
            if not channels:
                continue
            try:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for channel in channels:
                        parts = channel.split(":")
                        pipe.get(book_key(parts[1]) if parts[0] == "book" else footprint_key(parts[1], parts[2], True))
                    replies = await pipe.execute()
                self.redis_outage.ok()
            except (RedisError, OSError) as exc:
                self.redis_outage.fail(exc, "reading forming footprints and books")
                continue
            for channel, raw in zip(channels, replies):
                if not raw or self.last_polled.get(channel) == raw:
                    continue
                self.last_polled[channel] = raw
                if channel.startswith("book:"):
                    self.publish(channel, raw)
                else:  # a forming footprint left over from a bar already pushed as final is not sent
                    open_time = reads.open_time_of(raw)
                    if open_time is not None and open_time > self.last_final.get(channel, 0):
                        self.publish(channel, reads.marked(raw, False))
