"""Every setting feed_v4 and its processes read from the environment: name, default as
shown, secret or not, one-line meaning, group. `feed-v4 config` prints it;
tests/test_config_cli.py fails when the code reads a name that is missing here."""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Setting:
    name: str
    default: str  # as shown ("unset", "REDIS_CANDLES x 15", ...)
    meaning: str
    group: str
    secret: bool = False  # the value is never shown (a length at most)
    url: bool = False  # shown through infra.mask_url


_SECRET_NAME = re.compile(r"TOKEN|PASSWORD|SECRET|KEY(?!_)|_KEY", re.IGNORECASE)

SYMBOLS_NOTE = (
    "comma list, enabled in `tickers` at boot; a row SYMBOLS enabled earlier and no longer lists is disabled; "
    "rows enabled otherwise (feed-v4 tickers, SQL) are left alone"
)

_ROWS: list[tuple[str, str, str, str]] = [
    # group, name, default, meaning
    ("servers", "REDIS_URL", "the Redis Stack `make services` started", "Redis, ideally with TimeSeries"),
    ("servers", "POSTGRES_URL", "the PostgreSQL `make services` found or started", "PostgreSQL, the source of truth"),
    ("servers", "DATABASE_URL", "unset", "stands in for POSTGRES_URL when that is unset"),
    ("servers", "POSTGRES_POOLER", "auto", "auto (detect PgBouncer/Supavisor), yes, no"),
    ("servers", "PG_POOL_MAX", "10", "PostgreSQL connections of the pool"),
    ("servers", "BOOT_WAIT_S", "30", "how long boot waits for Redis and PostgreSQL"),
    ("servers", "REDIS_CANDLES", "250", "candles kept in Redis per ticker and timeframe"),
    ("servers", "REDIS_CANDLE_STORE", "auto", "auto, timeseries, zset"),
    ("servers", "REDIS_HASH_TAGS", "off", "on: a single Redis names keys as a cluster does (`ohlcv:{SYMBOL}:...`)"),
    ("servers", "TIMESCALEDB", "auto", "auto: TimescaleDB (hypertables) where the server loads it; off: plain"),
    ("servers", "STREAM_MAXLEN", "100000", "approximate MAXLEN of every stream the daemon writes"),
    ("exchange", "SYMBOLS", "unset", SYMBOLS_NOTE),
    ("exchange", "BINANCE_WS_URL", "wss://fstream.binance.com/market", "base of the WebSocket route"),
    ("exchange", "BINANCE_PUBLIC_WS_URL", "BINANCE_WS_URL with /market -> /public", "route of the book streams"),
    ("exchange", "BINANCE_REST_URL", "https://fapi.binance.com", "base of the REST endpoint"),
    ("exchange", "EXCHANGE_INFO_REFRESH_S", "3600", "how often the exchange's listing is re-read"),
    ("exchange", "TICKER_REFRESH_S", "5", "how often `tickers` is re-read (subscribe / unsubscribe live)"),
    ("exchange", "REST_WEIGHT_LIMIT", "2400", "REST request weight allowed per window"),
    ("exchange", "REST_WEIGHT_WINDOW_S", "60", "the weight window"),
    ("exchange", "BINANCE_LIMIT_GROUP", "default", "processes of one group share one IP's Binance limits"),
    ("exchange", "BINANCE_CONNECT_LIMIT", "240", "WebSocket connection attempts per 5 minutes for the group"),
    ("exchange", "REST_CONCURRENCY", "4", "REST requests in flight"),
    ("exchange", "REST_FALLBACK_S", "30", "no WebSocket data this long: closed minutes fetched over REST"),
    ("feed", "FEED_ENABLED", "true", "run the feed in this process"),
    ("feed", "STREAMS_PER_CONNECTION", "200", "streams per WebSocket connection"),
    ("feed", "WS_SILENCE_S", "15", "a connection silent this long is replaced"),
    ("feed", "WS_FIRST_DATA_TIMEOUT_S", "10", "no data this long after connecting is an error"),
    ("feed", "WS_MAX_AGE_S", "82800", "planned replacement before Binance's 24-hour cut"),
    ("feed", "WS_BACKOFF_MAX_S", "60", "cap of the reconnect backoff"),
    ("feed", "GAP_GRACE_MS", "10000", "a minute whose close has not come this long after its end is a gap"),
    ("feed", "INITIAL_HISTORY_M1", "REDIS_CANDLES x 15", "M1 minutes fetched for a symbol with no candles"),
    ("feed", "RECONCILE_WINDOW_M1", "120", "minutes re-checked at boot"),
    ("feed", "FEED_BUFFER_MAX_CANDLES", "50000", "candles held in memory while a server is away"),
    ("feed", "FRAME_TIME_TOLERANCE_S", "3600", "a frame this far ahead of the exchange clock is held"),
    ("feed", "TIMEFRAMES", "m1,m5,m15", "candle timeframes built; h1, h4, d1 add the higher ones"),
    ("feed", "ORDERFLOW", "on", "off: no aggTrades, no order flow"),
    ("feed", "ORDERFLOW_RETENTION_DAYS", "30", "order flow and footprints kept (0: forever)"),
    ("feed", "RAW_TRADES", "off", "on: every aggTrade also kept in agg_trades4"),
    ("book", "RAW_BOOK_TICKERS", "off", "on: every bookTicker update also kept in book_tickers4"),
    ("feed", "RAW_RETENTION_H", "24", "hours of raw aggTrades and bookTicker updates kept"),
    ("feed", "RAW_BUFFER_MAX_ROWS", "1000000", "raw rows held per table while PostgreSQL is away"),
    ("feed", "WATCHDOG_STALE_S", "180", "no closed kline stored this long: exit 3 (0: off)"),
    ("book", "BOOK", "on", "off: no book streams"),
    ("book", "BOOK_RANGE_PCT", "1", "depth filter: levels within +- this % of the mid"),
    ("book", "BOOK_PUBLISH_MS", "250", "book:<SYMBOL> at most this often"),
    ("book", "BOOK_GRACE_MS", "30", "a second of book data is finished this late"),
    ("book", "TRADE_SECOND_GRACE_MS", "150", "a second of trades is finished this late"),
    ("book", "FEATURES_RETENTION_H", "48", "hours of one-second bars and features kept"),
    ("book", "VPIN_BUCKETS", "50", "VPIN's bucket = the last day's volume / this"),
    ("book", "VPIN_WINDOW", "50", "VPIN over this many buckets"),
    ("book", "VOLATILITY_WINDOW_S", "60", "one-second returns in the rolling volatility"),
    ("indicators", "INDICATORS_ENABLED", "true", "run the indicator worker in this process"),
    ("indicators", "INDICATOR_RETENTION_DAYS", "14", "indicator values kept (from the newest bar)"),
    ("indicators", "INDICATOR_HISTORY_MAX", "5000", "most bars a series is opened from"),
    ("indicators", "INDICATOR_SLOW_WINDOW", "250", "bars pandas-ta sees for the slow indicators"),
    ("indicators", "INDICATOR_SLOW_WORKERS", "1", "processes running pandas-ta"),
    ("indicators", "INDICATOR_READ_COUNT", "2000", "candle events per XREADGROUP"),
    ("indicators", "INDICATOR_PERSIST_INTERVAL_S", "0.25", "PostgreSQL write-behind interval"),
    ("indicators", "INDICATOR_PERSIST_BATCH", "5000", "rows per write-behind statement"),
    ("indicators", "INDICATOR_PERSIST_MAX_ROWS", "1000000", "values waiting beyond which reading pauses"),
    ("indicators", "INDICATOR_RELOAD_S", "5", "how often the instance tables are re-read"),
    ("indicators", "INDICATOR_PRUNE_INTERVAL_S", "60", "retention pruning interval"),
    ("indicators", "INDICATOR_GROUP_GRACE_S", "600", "a gone process's candle-stream group is destroyed after this"),
    ("indicators", "INDICATOR_CONSUMER", "indicators-<hostname>", "consumer name in the indicator group"),
    ("signals", "SIGNALS_ENABLED", "true", "run the signal router in this process"),
    ("signals", "SIGNAL_RELOAD_S", "300", "full reload of the routing tables"),
    ("signals", "SIGNAL_BATCH", "200", "most entries per batch"),
    ("signals", "SIGNAL_BATCH_BYTES", "1048576", "most bytes per batch (at least 262144)"),
    ("signals", "SIGNAL_BLOCK_MS", "1000", "longest wait for a write notification"),
    ("signals", "SIGNAL_POLL_MS", "20", "read interval without write notifications"),
    ("signals", "SIGNAL_CLAIM_IDLE_MS", "60000", "pending this long at another consumer: taken over"),
    ("signals", "SIGNAL_CLAIM_EVERY_S", "30", "how often XAUTOCLAIM runs"),
    ("signals", "SIGNAL_MARK_TTL_S", "86400", "lifetime of a delivery mark (> SIGNAL_CLAIM_IDLE_MS)"),
    ("signals", "SIGNAL_PG_TIMEOUT_S", "10", "bound on each PostgreSQL call"),
    ("signals", "SIGNAL_CONSUMER", "<hostname>-<pid>", "consumer name of the router"),
    ("retention", "SYSTEM_LOG_RETENTION_DAYS", "30", "system_log_v4 rows kept"),
    ("retention", "SIGNAL_LOG_RETENTION_DAYS", "90", "signals_v2_log rows kept"),
    ("retention", "GAP_LOG_RETENTION_DAYS", "90", "settled missing_m1_log_v4 rows kept"),
    ("retention", "RETENTION_INTERVAL_S", "300", "log pruning interval"),
    ("retention", "RETENTION_BATCH", "10000", "rows per pruning DELETE"),
    ("alerts", "TELEGRAM_BOT_TOKEN", "unset", "Telegram alerts for ERROR/CRITICAL (with TELEGRAM_CHAT_ID)"),
    ("alerts", "TELEGRAM_CHAT_ID", "unset", "the chat the alerts go to"),
    ("alerts", "TELEGRAM_API_URL", "https://api.telegram.org", "Bot API base"),
    ("alerts", "ALERT_RATE_PER_MIN", "10", "alerts sent per minute at most"),
    ("alerts", "ALERT_DEDUP_S", "600", "an identical alert within this window is counted, not sent"),
    ("alerts", "ALERT_QUEUE_MAX", "1000", "alerts waiting to be sent"),
    ("process", "DEBUG_MODE", "false", "DEBUG logging (same as LOG_LEVEL=DEBUG)"),
    ("process", "LOG_LEVEL", "INFO", "console and system log level (DEBUG_MODE=true means DEBUG)"),
    ("process", "LOG_FORMAT", "text", "console log lines: text or json"),
    ("process", "PROGRESS", "auto", "progress of long downloads: auto, bar, log, off"),
    ("process", "METRICS_PORT", "off", "Prometheus metrics on this port (off: none)"),
    ("process", "METRICS_HOST", "0.0.0.0", "address the metrics listen on"),
    ("process", "SYSTEM_LOG_BUFFER", "10000", "system_log_v4 rows held while PostgreSQL is away"),
    ("process", "HEARTBEAT_INTERVAL_S", "2", "how often the heartbeat key is refreshed"),
    ("process", "HEARTBEAT_TTL_S", "30", "when the heartbeat expires without refresh"),
    ("process", "SHUTDOWN_TIMEOUT_S", "8", "the orderly shutdown gives up after this long"),
    ("process", "WORKER_RETRY_S", "5", "first restart delay of a crashed worker"),
    ("process", "STATUS_MAX_LAG_S", "180", "status: M1 lag beyond which it is unhealthy"),
    ("process", "STATUS_MAX_PENDING", "10000", "status: pending entries beyond which it is unhealthy"),
    ("process", "NO_COLOR", "unset", "status: no colours even on a terminal"),
    ("web", "WEB_HOST", "127.0.0.1", "where `web` listens"),
    ("web", "WEB_PORT", "PORT or 8080", "the port `web` listens on"),
    ("web", "PORT", "unset", "set by Render for web services: WEB_PORT's default"),
    ("web", "WEB_TOKEN", "unset", "the bearer token; required to listen beyond loopback"),
    ("web", "WEB_RATE", "50", "requests a second per client"),
    ("web", "WEB_BURST", "200", "burst of requests per client"),
    ("web", "WEB_WS_PER_CLIENT", "50", "WebSockets per client"),
    ("web", "WEB_WS_MAX", "2000", "WebSockets in all"),
    ("web", "WEB_WS_CHANNELS", "200", "channels per WebSocket"),
    ("web", "WEB_WS_BUFFER_BYTES", "4194304", "unsent bytes a WebSocket may hold"),
    ("web", "WEB_TRUST_PROXY", "false", "client address from X-Forwarded-For"),
    ("web", "WEB_PG_POOL_MAX", "10", "PostgreSQL connections of the web process"),
    ("web", "WEB_FOOTPRINT_CACHE_MB", "64", "memory for cached footprints"),
    ("client", "FEED_V4_URL", "http://127.0.0.1:8080", "feed_v4_client.py: the read API's address"),
    ("client", "FEED_V4_TOKEN", "unset", "feed_v4_client.py: the read API's token"),
    ("make", "DEMO_DATABASE", "feed_v4_demo", "make demo: its database"),
    ("make", "DEMO_DIR", ".local/demo", "make demo: its logs and demo.env"),
    ("make", "DEMO_ARGS", "unset", "make demo: extra flags"),
    ("make", "PYTHON", "found", "interpreter for make setup"),
    ("make", "FEED_REDIS_PORT", "6390", "port of the Redis make services starts"),
    ("make", "FEED_PG_PORT", "5433", "port of the private PostgreSQL make services starts"),
    ("make", "REDIS_SERVER_BIN", "from make services", "the tests' private Redis servers: the binary"),
    ("make", "REDIS_TS_MODULE", "from make services", "the tests' private Redis servers: TimeSeries"),
    ("make", "REDIS_LD_LIBRARY_PATH", "from make services", "the tests' private Redis servers: libssl1.1"),
]

URLS = {"REDIS_URL", "POSTGRES_URL", "DATABASE_URL", "BINANCE_WS_URL", "BINANCE_PUBLIC_WS_URL", "BINANCE_REST_URL"}
URLS |= {"TELEGRAM_API_URL", "FEED_V4_URL"}

CATALOG: dict[str, Setting] = {
    name: Setting(
        name,
        default,
        meaning,
        group,
        secret=bool(_SECRET_NAME.search(name)),
        url=name in URLS,
    )
    for group, name, default, meaning in _ROWS
}
GROUPS = tuple(dict.fromkeys(group for group, *_ in _ROWS))

# Names that look like ours but belong to something else: never reported as misspelt.
PREFIXES = (
    "SYMBOL", "REDIS_", "POSTGRES", "PG_", "DATABASE", "WEB_", "BOOK", "INDICATOR", "SIGNAL", "FEED_", "WS_",
    "REST_", "TELEGRAM_", "BINANCE_", "ALERT_", "HEARTBEAT_", "WATCHDOG_", "STATUS_", "RETENTION_", "METRICS_",
    "LOG_", "DEMO_", "GAP_", "VPIN_", "ORDERFLOW", "EXCHANGE_", "STREAM", "SYSTEM_LOG", "TRADE_", "FEATURES_",
    "SHUTDOWN_", "WORKER_", "BOOT_", "DEBUG", "INITIAL_", "RECONCILE_", "FRAME_", "TICKER", "VOLATILITY_", "RAW_",
)  # fmt: skip
