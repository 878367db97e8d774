"""Runtime-switchable faults and the counters tests read back."""

from __future__ import annotations

import random
import time
from collections import Counter, defaultdict, deque
from dataclasses import dataclass, field


@dataclass
class Faults:
    """What to break. Tests mutate the fields while the exchange runs.

    Probabilities are drawn from `rng` (seeded by the exchange) so a run is reproducible.
    """

    drop_missing_close: float = 0.0  # a kline close (x=true) is never sent
    duplicate_close: float = 0.0  # a close is sent twice in a row
    late_close: float = 0.0  # a close is delayed by late_close_delay_ms of sim time (out of order)
    late_close_delay_ms: int = 90_000
    malformed_frame: float = 0.0  # per kline frame: inject a garbage frame before it
    unknown_frame: float = 0.0  # per kline frame: inject a valid frame the client never asked for before it
    silent: bool = False  # connections stay open, answer pings and requests, send no market data
    rest_429_count: int = 0  # the next N klines requests get 429 (Retry-After: retry_after_s)
    rest_418_after_429: bool = False  # ...then the next one gets 418 (Retry-After: ban_retry_after_s)
    rest_delay_s: float = 0.0  # every REST response is delayed (real seconds)
    rest_truncate_count: int = 0  # the next N REST responses are cut mid-body
    reject_subscribe_1008: bool = False  # a SUBSCRIBE closes the connection with 1008
    missing_minutes: set[tuple[str, int]] = field(default_factory=set)  # (symbol, open_time) never existed
    drop_trade: float = 0.0  # an aggTrade is never sent: a gap in `a` (REST still has it)
    duplicate_trade: float = 0.0  # an aggTrade is sent twice
    reorder_trade: float = 0.0  # an aggTrade is sent after the next one
    late_trade: float = 0.0  # an aggTrade is sent late_trade_delay_ms of sim time later
    late_trade_delay_ms: int = 1_000
    book_broken_pu: float = 0.0  # a diff depth event carries a wrong `pu` (a broken chain)
    book_drop_diff: float = 0.0  # a diff depth event is never sent: the next one's `pu` breaks the chain
    stale_snapshots: int = 0  # the next N GET /fapi/v1/depth answer an old book (older than diffs sent)
    book_burst_factor: float = 1.0  # while > 1: made-up books change (and bookTickers go out) this many times faster
    archive_corrupt: set[str] = field(default_factory=set)  # archive file names served damaged (checksum fails)
    retry_after_s: int = 1
    ban_retry_after_s: int = 2
    rng: random.Random = field(default_factory=lambda: random.Random(7), repr=False, compare=False)

    def chance(self, probability: float) -> bool:
        return probability > 0 and self.rng.random() < probability


CLOSE_LOG_SIZE = 100_000  # 200 minutes of 500 symbols; older entries go


@dataclass
class Stats:
    """Counters for tests and benchmarks (plain ints; reset with `reset()`)."""

    frames_sent: int = 0  # messages queued to connections (one per connection)
    kline_events: int = 0  # kline frames published (once per event, whatever the subscriber count)
    closes_sent: Counter[str] = field(default_factory=Counter)  # close frames published, per symbol
    closes_dropped: int = 0
    dropped_closes: list[tuple[str, int]] = field(default_factory=list)  # (symbol, open_time) never closed
    closes_duplicated: int = 0
    closes_delayed: int = 0
    malformed_sent: int = 0
    unknown_sent: int = 0
    unknown_kinds: Counter[str] = field(default_factory=Counter)  # unknown frames sent, per kind
    mark_events: int = 0  # mark price objects/arrays published
    connections_opened: int = 0
    connections_closed: int = 0
    slow_dropped: int = 0  # connections aborted because their send queue overflowed
    rate_limit_closes: int = 0  # connections closed with 1008 (message rate, stream count, fault)
    client_messages: int = 0
    client_errors: int = 0  # error objects answered to bad client requests
    pings_sent: int = 0
    rest_requests: int = 0
    rest_klines: int = 0
    rest_agg_trades: int = 0
    trades_sent: int = 0  # aggTrade frames published
    dropped_trades: list[tuple[str, int]] = field(default_factory=list)  # (symbol, agg id) never sent
    trades_duplicated: int = 0
    trades_reordered: int = 0
    trades_late: int = 0
    rest_depth: int = 0  # GET /fapi/v1/depth requests
    book_tickers_sent: int = 0  # bookTicker frames published
    depth_sent: int = 0  # diff depth frames published
    book_broken_pu: int = 0  # diffs sent with a wrong `pu`
    book_dropped_diffs: int = 0  # diffs never sent
    book_stale_snapshots: int = 0  # depth snapshots answered with an old book
    book_burst_steps: int = 0  # diff windows made up under a burst
    # Every book event sent, per symbol, as the JSON object that went out (faults included);
    # filled only when the exchange's BookConfig.log_events is on.
    book_sent: defaultdict[str, list[dict]] = field(default_factory=lambda: defaultdict(list))
    rest_429: int = 0
    rest_418: int = 0
    rest_400: int = 0
    rest_truncated: int = 0
    # When each close frame was published, as (symbol, open time, local epoch ms): the
    # moment it left this exchange, for latency benches that should not listen themselves.
    close_log: deque[tuple[str, int, float]] = field(default_factory=lambda: deque(maxlen=CLOSE_LOG_SIZE))
    closes_logged: int = 0  # ever: the index the next entry of close_log will have

    def log_close(self, symbol: str, open_time: int) -> None:
        self.close_log.append((symbol, open_time, time.time() * 1000))
        self.closes_logged += 1

    def reset(self) -> None:
        fresh = Stats()
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(fresh, name))
