"""Order books the fake exchange serves on `/public`: a made-up, consistent book per
symbol (synthetic and archive sources) and the replay plan of the real recordings. Pure:
the scheduler publishes what these return and the REST side answers their snapshots.

Why a step model: Binance's diff depth (`<s>@depth@100ms`) sums every change of a 100 ms
window into one event (`U` its first update id, `u` its last, `pu` the previous event's
`u`), while `<s>@bookTicker` reports each change of the best bid or ask at its own
update id. A step here is the changes of one window, each group of them with its own
update id; the bookTickers are the groups that moved the top, the diff is the step's
final quantities. Steps are planned one window ahead (the book already holds the next,
unsent step) so that a REST snapshot's `lastUpdateId` is the `u` of the next diff every
listener will get: a client following Binance's procedure syncs on its first diff and
re-applying that diff to the snapshot changes nothing (the diff carries final values).
"""

from __future__ import annotations

import bisect
import math
import random
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import islice
from typing import NamedTuple

import orjson
from sortedcontainers import SortedDict

from candles import Candle

MINUTE_MS = 60_000
DEPTH_WEIGHTS = {5: 2, 10: 2, 20: 2, 50: 2, 100: 5, 500: 10, 1000: 20}  # GET /fapi/v1/depth, by limit
DEPTH_DEFAULT_LIMIT = 500


def depth_weight(limit: int) -> int | None:
    """The request weight of `GET /fapi/v1/depth?limit=` (None: not a valid limit)."""
    return DEPTH_WEIGHTS.get(limit)


def book_streams(symbol: str) -> tuple[str, str]:
    """The two book streams of a symbol as the daemon names them (binance.book)."""
    lower = symbol.lower()
    return f"{lower}@bookTicker", f"{lower}@depth@100ms"


def is_public_stream(name: str) -> bool:
    """Streams Binance serves only on `/public` (book ticker, depth, rpiDepth, raw trades)."""
    return "@bookTicker" in name or "@depth" in name or "@rpiDepth" in name or name.endswith("@trade")


def text(units: int, decimals: int) -> str:
    """Integer units as Binance's decimal text with a fixed number of decimals."""
    if not decimals:
        return str(units)
    whole, frac = divmod(units, 10**decimals)
    return f"{whole}.{frac:0{decimals}d}"


@dataclass
class BookConfig:
    """How busy the made-up books are; defaults look like a mid-cap symbol at live pace."""

    depth_ms: int = 100  # one diff event per window of simulated time (the @100ms stream)
    book_ticker_per_s: float = 10.0  # changes of the best bid or ask per second and symbol (about)
    deep_changes: tuple[int, int] = (1, 4)  # changes below the best levels per 100 ms
    levels: tuple[int, int] = (50, 200)  # levels a side stay within
    band_pct: float = 0.5  # a fresh book spans about +- this percent of the price
    max_pushes_per_s: float = 20.0  # real-time cap per symbol: at high speed a window covers more sim time
    replay_ms: int = 10  # recordings: frames go out in slots this long (stretched with speed)
    history_every_ms: int = 1_000  # how often a past book is kept for stale snapshots...
    history_len: int = 10  # ...and how many are kept
    log_events: bool = False  # keep every book event sent in Stats.book_sent (tests only)
    seed: int = 7


class Tick(NamedTuple):
    """The top of the book after one update (one bookTicker), prices and quantities in units."""

    update_id: int
    bid: int
    bid_qty: int
    ask: int
    ask_qty: int
    time_ms: int


@dataclass(slots=True)
class Step:
    """One window's changes: a diff event (final quantity per changed level) and the
    bookTickers of the groups that moved the top."""

    first_id: int
    last_id: int
    previous_id: int
    start_ms: int
    end_ms: int
    time_ms: int  # `T`: the last change's time
    bids: dict[int, int]
    asks: dict[int, int]
    tickers: list[Tick]

    def restamp(self, end_ms: int, step_ms: int) -> None:
        """Move a step planned for another window into the one ending at `end_ms` (a clock
        jump, a symbol listened to again, a window planned by a REST call): its times
        move, its ids and the chain stay."""
        shift = end_ms - self.end_ms
        if shift == 0:
            return
        start = end_ms - step_ms
        self.start_ms, self.end_ms = start, end_ms
        self.time_ms = min(max(self.time_ms + shift, start), end_ms)
        self.tickers = [t._replace(time_ms=min(max(t.time_ms + shift, start), end_ms)) for t in self.tickers]


class MadeUpBook:
    """One symbol's book: price units -> quantity units per side, never crossed, planned a
    step ahead (see the module's note). Deterministic for a seed and the same calls."""

    def __init__(self, symbol: str, price_dp: int, qty_dp: int, config: BookConfig, price_units: int) -> None:
        self.symbol = symbol
        self.price_dp, self.qty_dp = price_dp, qty_dp
        self.config = config
        crc = zlib.crc32(f"{symbol} {config.seed}".encode())
        self.rng = random.Random(crc)
        self.bids: SortedDict = SortedDict()
        self.asks: SortedDict = SortedDict()
        self.update_id = 1_000_000_000 + (crc % 1_000_000) * 1_000  # `u` of the newest planned step
        low, high = config.levels
        self._mid_levels = (low + high) // 2
        band = max(1, round(price_units * config.band_pct / 100))
        self.gap = max(1, round(band / self._mid_levels))  # mean distance between levels
        self.lot = max(1, round(2_000 / max(price_units / 10**price_dp, 1e-9) * 10**qty_dp / 20))
        self.pending: Step | None = None  # planned, not yet published
        self.history: deque[tuple[int, int, dict[int, int], dict[int, int]]] = deque(maxlen=config.history_len)
        self._history_at = -(10**18)
        self._top = (0, 0, 0, 0)
        self._rebuild(price_units, {}, {})  # the first book: no diff carries it, the snapshot does
        self._top = self.top()
        self._keep_history(0)

    # --- reading -----------------------------------------------------------------------

    def top(self) -> tuple[int, int, int, int]:
        bid, bid_qty = self.bids.peekitem(-1)
        ask, ask_qty = self.asks.peekitem(0)
        return bid, bid_qty, ask, ask_qty

    def levels(self, limit: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """The best `limit` levels a side: bids from the best down, asks from the best up."""
        bids = [(p, self.bids[p]) for p in islice(reversed(self.bids), limit)]
        asks = [(p, self.asks[p]) for p in islice(self.asks, limit)]
        return bids, asks

    def stale_levels(self, limit: int) -> tuple[int, list[tuple[int, int]], list[tuple[int, int]]]:
        """The oldest kept past book (its update id and levels): what a lagging Binance
        server answers, older than diffs already sent."""
        update_id, _, bids, asks = self.history[0]
        return (
            update_id,
            sorted(bids.items(), reverse=True)[:limit],
            sorted(asks.items())[:limit],
        )

    # --- planning ----------------------------------------------------------------------

    def plan(self, start_ms: int, end_ms: int, target: float | None, intensity: float = 1.0) -> Step:
        """Plan (and apply) the window (start_ms, end_ms]: follow the price to `target` (units),
        change a few levels, keep the side sizes; returns the step to publish at end_ms."""
        rng, cfg = self.rng, self.config
        step_s = (end_ms - start_ms) / 1000
        bids: dict[int, int] = {}
        asks: dict[int, int] = {}
        groups: list[Callable[[], None]] = []
        if target is not None:
            groups += self._follow(target, bids, asks)
        groups += self._maintain(bids, asks)
        deep = rng.randint(*cfg.deep_changes) * intensity * step_s * 10
        for _ in range(min(200, _count(deep, rng))):
            groups.append(lambda: self._deep_change(bids, asks))
        for _ in range(min(200, _count(cfg.book_ticker_per_s * step_s * intensity, rng))):
            groups.append(lambda: self._top_change(bids, asks))
        if not groups:
            groups.append(lambda: self._deep_change(bids, asks))
        previous = self.update_id
        first = 0
        raw_ticks: list[tuple[int, int, tuple[int, int, int, int]]] = []  # (update id, group, top) when it moved
        n = len(groups)
        for index, group in enumerate(groups):
            self.update_id += rng.randint(1, 9)
            if not first:
                first = self.update_id
            group()
            top = self.top()
            if top != self._top:
                self._top = top
                raw_ticks.append((self.update_id, index, top))
        span = end_ms - start_ms
        times = [start_ms + (i + 1) * span // (n + 1) for i in range(n)]
        tickers = [Tick(update_id, *top, times[index]) for update_id, index, top in raw_ticks]
        step = Step(first, self.update_id, previous, start_ms, end_ms, times[-1], bids, asks, tickers)
        self._keep_history(end_ms)
        return step

    def _keep_history(self, end_ms: int) -> None:
        if end_ms - self._history_at >= self.config.history_every_ms:
            self._history_at = end_ms
            self.history.append((self.update_id, end_ms, dict(self.bids), dict(self.asks)))

    # The groups. Each returns nothing and records its changes in the step's dicts.

    def _set(self, side: SortedDict, changes: dict[int, int], price: int, qty: int) -> None:
        if qty:
            side[price] = qty
        else:
            side.pop(price, None)
        changes[price] = qty

    def _qty(self) -> int:
        return max(1, int(self.lot * self.rng.expovariate(1.0) * 3))

    def _rebuild(self, target: float, bids: dict[int, int], asks: dict[int, int]) -> None:
        """A fresh book around `target`: every old level deleted, new ones set."""
        rng = self.rng
        for price in list(self.bids):
            self._set(self.bids, bids, price, 0)
        for price in list(self.asks):
            self._set(self.asks, asks, price, 0)
        spread = rng.choice((1, 1, 1, 2, max(1, self.gap // 2)))
        best_bid = max(1, math.floor(target - spread / 2))
        low, high = self.config.levels
        quarter = (high - low) // 4
        price = best_bid
        for _ in range(rng.randint(low + quarter, high - quarter)):
            if price < 1:
                break
            self._set(self.bids, bids, price, self._qty())
            price -= rng.randint(1, max(1, 2 * self.gap - 1))
        price = best_bid + spread
        for _ in range(rng.randint(low + quarter, high - quarter)):
            self._set(self.asks, asks, price, self._qty())
            price += rng.randint(1, max(1, 2 * self.gap - 1))

    def _follow(self, target: float, bids: dict[int, int], asks: dict[int, int]) -> list[Callable[[], None]]:
        """Groups that move the book so that best bid < target < best ask: the levels the
        price went through are taken, a new level appears on the other side."""
        bid, _, ask, _ = self.top()
        band = self.gap * self._mid_levels
        if abs(target - (bid + ask) / 2) > band:
            return [lambda: self._rebuild(target, bids, asks)]
        if target >= ask:
            taken = list(self.asks.irange(maximum=math.floor(target)))
            if len(taken) > 40 or len(taken) >= len(self.asks):
                return [lambda: self._rebuild(target, bids, asks)]
            return [
                lambda: [self._set(self.asks, asks, p, 0) for p in taken],
                lambda: self._new_best(self.bids, bids, math.floor(target), up=True),
            ]
        if target <= bid:
            taken = list(self.bids.irange(minimum=math.ceil(target)))
            if len(taken) > 40 or len(taken) >= len(self.bids):
                return [lambda: self._rebuild(target, bids, asks)]
            return [
                lambda: [self._set(self.bids, bids, p, 0) for p in taken],
                lambda: self._new_best(self.asks, asks, math.ceil(target), up=False),
            ]
        return []

    def _new_best(self, side: SortedDict, changes: dict[int, int], near: int, *, up: bool) -> None:
        """A level at `near` (or a little behind it) on `side`, if it fits inside the spread."""
        bid, _, ask, _ = self.top()
        back = self.rng.randint(0, self.gap // 2)
        price = near - back if up else near + back
        if bid < price < ask:
            self._set(side, changes, price, self._qty())

    def _maintain(self, bids: dict[int, int], asks: dict[int, int]) -> list[Callable[[], None]]:
        """Trim a side past the maximum at its far end, extend one below the minimum."""
        low, high = self.config.levels
        out: list[Callable[[], None]] = []
        for side, changes, far in ((self.bids, bids, 0), (self.asks, asks, -1)):
            if len(side) > high:
                out.append(lambda s=side, c=changes, f=far: self._trim(s, c, f, len(s) - high))
            elif len(side) < low:
                out.append(lambda s=side, c=changes, f=far: self._extend(s, c, f, low - len(s)))
        return out

    def _trim(self, side: SortedDict, changes: dict[int, int], far: int, count: int) -> None:
        for _ in range(count):
            self._set(side, changes, side.peekitem(far)[0], 0)

    def _extend(self, side: SortedDict, changes: dict[int, int], far: int, count: int) -> None:
        price = side.peekitem(far)[0]
        for _ in range(count):
            price += (-1 if far == 0 else 1) * self.rng.randint(1, max(1, 2 * self.gap - 1))
            if price < 1:
                return
            self._set(side, changes, price, self._qty())

    def _deep_change(self, bids: dict[int, int], asks: dict[int, int]) -> None:
        """A change below the best level: a quantity changes, a level comes or goes."""
        rng = self.rng
        side, changes, is_bid = (self.bids, bids, True) if rng.random() < 0.5 else (self.asks, asks, False)
        n = len(side)
        if n < 2:
            return
        index = rng.randint(0, n - 2) if is_bid else rng.randint(1, n - 1)  # never the best
        price = side.peekitem(index)[0]
        roll = rng.random()
        if roll < 0.6:
            self._set(side, changes, price, self._qty())
        elif roll < 0.8 and n > self.config.levels[0]:
            self._set(side, changes, price, 0)
        else:
            best = side.peekitem(-1 if is_bid else 0)[0]
            worst = side.peekitem(0 if is_bid else -1)[0]
            lo, hi = (worst, best - 1) if is_bid else (best + 1, worst)
            if lo <= hi:
                self._set(side, changes, rng.randint(lo, hi), self._qty())

    def _top_change(self, bids: dict[int, int], asks: dict[int, int]) -> None:
        """A change of the best bid or ask: its quantity, a better level, or its removal."""
        rng = self.rng
        bid, _, ask, _ = self.top()
        is_bid = rng.random() < 0.5
        side, changes = (self.bids, bids) if is_bid else (self.asks, asks)
        best = bid if is_bid else ask
        roll = rng.random()
        if roll < 0.6:
            self._set(side, changes, best, self._qty())
        elif roll < 0.8 and ask - bid > 1:
            price = rng.randint(bid + 1, ask - 1)
            self._set(side, changes, price, self._qty())
        elif len(side) > self.config.levels[0]:
            self._set(side, changes, best, 0)
        else:
            self._set(side, changes, best, self._qty())

    # --- events ------------------------------------------------------------------------

    def depth_event(self, step: Step) -> dict:
        p, q = self.price_dp, self.qty_dp
        return {
            "e": "depthUpdate",
            "E": step.end_ms,
            "T": step.time_ms,
            "s": self.symbol,
            "U": step.first_id,
            "u": step.last_id,
            "pu": step.previous_id,
            "b": [[text(price, p), text(qty, q)] for price, qty in sorted(step.bids.items())],
            "a": [[text(price, p), text(qty, q)] for price, qty in sorted(step.asks.items())],
        }

    def ticker_event(self, tick: Tick) -> dict:
        p, q = self.price_dp, self.qty_dp
        return {
            "e": "bookTicker",
            "u": tick.update_id,
            "s": self.symbol,
            "b": text(tick.bid, p),
            "B": text(tick.bid_qty, q),
            "a": text(tick.ask, p),
            "A": text(tick.ask_qty, q),
            "T": tick.time_ms,
            "E": tick.time_ms,
        }

    def snapshot(self, limit: int, now_ms: int, stale: bool = False) -> dict:
        """`GET /fapi/v1/depth`'s answer: the book as of the next diff's `u` (or, `stale`,
        the oldest kept past book)."""
        if stale:
            update_id, bids, asks = self.stale_levels(limit)
        else:
            update_id = self.update_id
            bids, asks = self.levels(limit)
        p, q = self.price_dp, self.qty_dp
        return {
            "lastUpdateId": update_id,
            "E": now_ms,
            "T": now_ms,
            "bids": [[text(price, p), text(qty, q)] for price, qty in bids],
            "asks": [[text(price, p), text(qty, q)] for price, qty in asks],
        }


def _count(mean: float, rng: random.Random) -> int:
    """An integer with expectation `mean`: its floor, plus one with the fraction's chance."""
    whole = int(mean)
    return whole + (1 if rng.random() < mean - whole else 0)


class MadeUpBooks:
    """Every symbol's made-up book, created when first listened to or asked for.

    `candle(symbol, minute)` gives the price path: within a minute the book's mid follows
    a straight line from the candle's open to its close. Tick and step are the decimals of
    the source's first candle, as exchangeInfo reports them.
    """

    def __init__(self, config: BookConfig, candle: Callable[[str, int], Candle | None], first_open_time: int) -> None:
        self.config = config
        self._candle = candle
        self._first = first_open_time
        self.books: dict[str, MadeUpBook] = {}
        self._paths: dict[tuple[str, int], tuple[float, float] | None] = {}

    def price(self, symbol: str, t_ms: int) -> float | None:
        """The book's target price at `t_ms` (None: the source has no price near then)."""
        minute = t_ms - t_ms % MINUTE_MS
        path = self._path(symbol, minute)
        if path is None:
            before = self._path(symbol, minute - MINUTE_MS)
            return before[1] if before is not None else None
        open_, close = path
        return open_ + (close - open_) * ((t_ms - minute) / MINUTE_MS)

    def _path(self, symbol: str, minute: int) -> tuple[float, float] | None:
        key = (symbol, minute)
        if key not in self._paths:
            if len(self._paths) > 50_000:
                self._paths.clear()
            candle = self._candle(symbol, minute)
            self._paths[key] = None if candle is None else (float(candle.open), float(candle.close))
        return self._paths[key]

    def book(self, symbol: str, now_ms: int) -> MadeUpBook | None:
        book = self.books.get(symbol)
        if book is None:
            price = self.price(symbol, now_ms)
            if price is None:
                return None
            sample = self._candle(symbol, self._first) or self._candle(symbol, now_ms - now_ms % MINUTE_MS)
            price_dp, qty_dp = _decimals(sample) if sample is not None else (4, 3)
            book = self.books[symbol] = MadeUpBook(symbol, price_dp, qty_dp, self.config, round(price * 10**price_dp))
        return book

    def _target(self, book: MadeUpBook, t_ms: int) -> float | None:
        price = self.price(book.symbol, t_ms)
        return None if price is None else price * 10**book.price_dp

    def emit(self, symbol: str, due_ms: int, step_ms: int, intensity: float = 1.0) -> Step | None:
        """The step to publish at `due_ms` (None the first time: one is planned for the next
        window), and the next window planned."""
        book = self.book(symbol, due_ms)
        if book is None:
            return None
        step = book.pending
        if step is not None:
            step.restamp(due_ms, step_ms)
        book.pending = book.plan(due_ms, due_ms + step_ms, self._target(book, due_ms + step_ms), intensity)
        return step

    def snapshot(self, symbol: str, now_ms: int, limit: int, step_ms: int, *, listened: bool, stale: bool) -> dict:
        """`GET /fapi/v1/depth` now, as of the next diff (planned here if none is). A symbol
        nobody listens to is brought to the present first (its unsent step is dropped:
        nobody could have missed it)."""
        book = self.book(symbol, now_ms)
        if book is None:
            return {"lastUpdateId": 0, "E": now_ms, "T": now_ms, "bids": [], "asks": []}
        if book.pending is None or (not listened and book.pending.end_ms < now_ms - step_ms):
            book.pending = book.plan(now_ms, now_ms + step_ms, self._target(book, now_ms + step_ms))
        return book.snapshot(limit, now_ms, stale)


def _decimals(candle: Candle) -> tuple[int, int]:
    return (
        max(0, -int(candle.close.as_tuple().exponent)),  # type: ignore[arg-type]
        max(0, -int(candle.volume.as_tuple().exponent)),  # type: ignore[arg-type]
    )


# --- the recordings ------------------------------------------------------------------


class Frame(NamedTuple):
    """One recorded book message: its event time, kind, and payload as received."""

    event_ms: int
    kind: str  # "bookTicker" or "depth"
    data: bytes  # the `data` object of the envelope, verbatim


@dataclass
class RecordedBook:
    """One symbol's recorded bookTicker and depth frames in event-time order, a cursor of
    what has gone out, and the exchange's own book (the recorded snapshot plus the diffs
    after it) for REST answers later in the replay."""

    symbol: str
    frames: list[Frame]
    snapshot_body: dict
    cursor: int = 0  # frames[:cursor] are out (or were skipped)
    _times: list[int] = field(default_factory=list)
    _depth_at: list[int] = field(default_factory=list)  # frame index of each depth frame
    _covering: int = 0  # the depth frame (its number) the recorded snapshot falls in
    _applied: int = 0  # depth frames (by number) applied to the exchange's own book
    _bids: dict[str, str] = field(default_factory=dict)
    _asks: dict[str, str] = field(default_factory=dict)
    _book_id: int = 0

    def __post_init__(self) -> None:
        self._times = [f.event_ms for f in self.frames]
        self._depth_at = [i for i, f in enumerate(self.frames) if f.kind == "depth"]
        last = self.snapshot_body["lastUpdateId"]
        self._covering = len(self._depth_at)
        for number, index in enumerate(self._depth_at):
            event = orjson.loads(self.frames[index].data)
            if event["u"] >= last:
                self._covering = number
                break
        self._reset_book()

    def _reset_book(self) -> None:
        self._bids = {p: q for p, q in self.snapshot_body["bids"]}
        self._asks = {p: q for p, q in self.snapshot_body["asks"]}
        self._book_id = self.snapshot_body["lastUpdateId"]
        self._applied = self._covering

    def take(self, until_ms: int) -> list[Frame]:
        """The frames due by `until_ms` not yet out; the cursor moves past them."""
        end = bisect.bisect_right(self._times, until_ms, lo=self.cursor)
        out = self.frames[self.cursor : end]
        self.cursor = end
        return out

    def seek(self, now_ms: int) -> None:
        """Frames up to `now_ms` count as gone (a clock jump skips them); back in time, the
        replay starts over from there."""
        target = bisect.bisect_right(self._times, now_ms)
        if target < self.cursor:
            self._reset_book()
        self.cursor = target

    def _depth_sent(self) -> int:
        """How many depth frames are out."""
        return bisect.bisect_left(self._depth_at, self.cursor)

    def snapshot(self, limit: int, now_ms: int, stale: bool = False) -> dict:
        """The recorded snapshot until the replay passed it (or `stale`), afterwards the
        exchange's own book as of the next diff to go out (one a client will get)."""
        sent = self._depth_sent()
        if stale or sent <= self._covering:
            body = self.snapshot_body
            return {**body, "bids": body["bids"][:limit], "asks": body["asks"][:limit]}
        upto = min(sent + 1, len(self._depth_at))  # the next unsent diff included
        while self._applied < upto:
            event = orjson.loads(self.frames[self._depth_at[self._applied]].data)
            for side, levels in ((self._bids, event["b"]), (self._asks, event["a"])):
                for price, qty in levels:
                    if float(qty):
                        side[price] = qty
                    else:
                        side.pop(price, None)
            self._book_id = event["u"]
            self._applied += 1
        bids = sorted(self._bids.items(), key=lambda level: -float(level[0]))[:limit]
        asks = sorted(self._asks.items(), key=lambda level: float(level[0]))[:limit]
        return {
            "lastUpdateId": self._book_id,
            "E": now_ms,
            "T": now_ms,
            "bids": [list(level) for level in bids],
            "asks": [list(level) for level in asks],
        }


def recorded_book(symbol: str, messages: list[tuple[str, str]]) -> RecordedBook:
    """A RecordedBook from `market_data.recorded_book_frames`' messages (kind, text)."""
    frames: list[Frame] = []
    snapshot: dict | None = None
    for kind, raw in messages:
        if kind == "snapshot":
            snapshot = orjson.loads(raw)
            continue
        body = raw.rstrip()
        data = body[body.index(',"data":') + 8 : -1].encode()
        frames.append(Frame(orjson.loads(data)["E"], kind, data))
    if snapshot is None:
        raise ValueError(f"{symbol}: the recording has no depth snapshot")
    frames.sort(key=lambda f: f.event_ms)  # stable: the order received within one time
    return RecordedBook(symbol, frames, snapshot)


class RecordedBooks:
    """The recorded symbols' books, each loaded when first listened to or asked for (a
    symbol's recording is ~60,000 messages): the replay starts at the present moment."""

    def __init__(self, config: BookConfig, symbols: list[str], load: Callable[[str], RecordedBook]) -> None:
        self.config = config
        self.symbols = list(symbols)
        self._load = load
        self._books: dict[str, RecordedBook] = {}

    def loaded(self, symbol: str) -> RecordedBook | None:
        return self._books.get(symbol)

    def get(self, symbol: str, now_ms: int) -> RecordedBook | None:
        book = self._books.get(symbol)
        if book is None and symbol in self.symbols:
            book = self._books[symbol] = self._load(symbol)
            book.seek(now_ms)
        return book

    def seek(self, now_ms: int) -> None:
        for book in self._books.values():
            book.seek(now_ms)

    def snapshot(self, symbol: str, now_ms: int, limit: int, step_ms: int, *, listened: bool, stale: bool) -> dict:
        book = self.get(symbol, now_ms)
        if book is None:
            return {"lastUpdateId": 0, "E": now_ms, "T": now_ms, "bids": [], "asks": []}
        if not listened:
            book.take(now_ms)  # nobody listens: the replay moves on unseen
        return book.snapshot(limit, now_ms, stale)
