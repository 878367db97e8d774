-- feed_v4 base schema (SPEC section 6). Every statement is idempotent.

CREATE TABLE IF NOT EXISTS tickers (
    symbol      text PRIMARY KEY,
    status      text NOT NULL DEFAULT 'enabled'
                CHECK (status IN ('enabled', 'disabled')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS tickers_enabled_idx ON tickers (symbol) WHERE status = 'enabled';

-- Candles: exact decimals, keyed by (symbol, open_time); kept forever.
CREATE TABLE IF NOT EXISTS ohlcv4_m1 (
    symbol                  text        NOT NULL,
    open_time               timestamptz NOT NULL,
    open                    numeric     NOT NULL,
    high                    numeric     NOT NULL,
    low                     numeric     NOT NULL,
    close                   numeric     NOT NULL,
    volume                  numeric     NOT NULL,
    quote_volume            numeric     NOT NULL DEFAULT 0,
    trades                  integer     NOT NULL DEFAULT 0,
    taker_buy_volume        numeric     NOT NULL DEFAULT 0,
    taker_buy_quote_volume  numeric     NOT NULL DEFAULT 0,
    PRIMARY KEY (symbol, open_time)
);

CREATE TABLE IF NOT EXISTS ohlcv4_m5 (
    LIKE ohlcv4_m1 INCLUDING DEFAULTS INCLUDING CONSTRAINTS,
    m1_count smallint NOT NULL CHECK (m1_count BETWEEN 1 AND 5),
    PRIMARY KEY (symbol, open_time),
    CHECK (extract(epoch FROM open_time)::bigint % 300 = 0)
);

CREATE TABLE IF NOT EXISTS ohlcv4_m15 (
    LIKE ohlcv4_m1 INCLUDING DEFAULTS INCLUDING CONSTRAINTS,
    m1_count smallint NOT NULL CHECK (m1_count BETWEEN 1 AND 15),
    PRIMARY KEY (symbol, open_time),
    CHECK (extract(epoch FROM open_time)::bigint % 900 = 0)
);

-- Indicator configuration: one row per instance, parameters as text.
CREATE TABLE IF NOT EXISTS indicator_instances_v4 (
    id          serial PRIMARY KEY,
    indicator   text NOT NULL CHECK (indicator <> ''),
    timeframe   text NOT NULL CHECK (timeframe IN ('m1', 'm5', 'm15')),
    enabled     boolean NOT NULL DEFAULT true,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS indicator_instances_tf_idx
    ON indicator_instances_v4 (timeframe) WHERE enabled;

CREATE TABLE IF NOT EXISTS indicator_parameters_v4 (
    instance_id integer NOT NULL REFERENCES indicator_instances_v4 (id) ON DELETE CASCADE,
    param       text NOT NULL,
    value       text NOT NULL,
    PRIMARY KEY (instance_id, param)
);

-- Derived and voluminous: no foreign key (it would cost a lookup per inserted row);
-- pruned by open_time, so that column has its own index.
CREATE TABLE IF NOT EXISTS indicator_values_v4 (
    instance_id integer          NOT NULL,
    symbol      text             NOT NULL,
    open_time   timestamptz      NOT NULL,
    param_name  text             NOT NULL,
    value       double precision,
    PRIMARY KEY (instance_id, symbol, open_time, param_name)
);
CREATE INDEX IF NOT EXISTS indicator_values_open_time_idx ON indicator_values_v4 (open_time);

CREATE TABLE IF NOT EXISTS missing_m1_log_v4 (
    symbol      text        NOT NULL,
    open_time   timestamptz NOT NULL,
    detected_at timestamptz NOT NULL DEFAULT now(),
    fixed_at    timestamptz,
    status      text        NOT NULL DEFAULT 'missing'
                CHECK (status IN ('missing', 'backfilled', 'unfillable')),
    attempts    integer     NOT NULL DEFAULT 0,
    PRIMARY KEY (symbol, open_time)
);
CREATE INDEX IF NOT EXISTS missing_m1_open_idx
    ON missing_m1_log_v4 (symbol, open_time) WHERE status = 'missing';

CREATE TABLE IF NOT EXISTS system_log_v4 (
    id       bigserial PRIMARY KEY,
    ts       timestamptz NOT NULL DEFAULT now(),
    level    text NOT NULL CHECK (level IN ('DEBUG', 'INFO', 'WARNING', 'ERROR', 'CRITICAL')),
    module   text NOT NULL,
    message  text NOT NULL,
    details  jsonb
);
CREATE INDEX IF NOT EXISTS system_log_ts_idx ON system_log_v4 (ts DESC);
CREATE INDEX IF NOT EXISTS system_log_problems_idx
    ON system_log_v4 (ts DESC) WHERE level IN ('WARNING', 'ERROR', 'CRITICAL');

-- Signal routing (SPEC section 9).
CREATE TABLE IF NOT EXISTS strategies (
    id          serial PRIMARY KEY,
    name        text NOT NULL UNIQUE,
    enabled     boolean NOT NULL DEFAULT true,
    archived    boolean NOT NULL DEFAULT false,
    allow_open  boolean NOT NULL DEFAULT true,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS signal_phrases (
    id       serial PRIMARY KEY,
    phrase   text NOT NULL UNIQUE,
    action   text NOT NULL
             CHECK (action IN ('open_long', 'open_short', 'close_long', 'close_short', 'close')),
    enabled  boolean NOT NULL DEFAULT true
);

CREATE TABLE IF NOT EXISTS strategy_signals (
    strategy_id integer NOT NULL REFERENCES strategies (id) ON DELETE CASCADE,
    phrase_id   integer NOT NULL REFERENCES signal_phrases (id) ON DELETE CASCADE,
    PRIMARY KEY (strategy_id, phrase_id)
);
CREATE INDEX IF NOT EXISTS strategy_signals_phrase_idx ON strategy_signals (phrase_id);

CREATE TABLE IF NOT EXISTS signals_v2_log (
    id           bigserial PRIMARY KEY,
    uid          text NOT NULL,
    symbol       text,
    message      text,
    bar_time     timestamptz,
    sent_at      timestamptz,
    received_at  timestamptz NOT NULL DEFAULT now(),
    status       text NOT NULL CHECK (status IN ('new', 'duplicate', 'ignored')),
    reason       text,
    raw          jsonb
);
-- The database, not a router's memory, decides which entry is the first of its uid.
CREATE UNIQUE INDEX IF NOT EXISTS signals_v2_log_new_uid_idx
    ON signals_v2_log (uid) WHERE status = 'new';
CREATE INDEX IF NOT EXISTS signals_v2_log_received_idx ON signals_v2_log (received_at DESC);

CREATE TABLE IF NOT EXISTS signal_log_entries_v2 (
    id           bigserial PRIMARY KEY,
    log_id       bigint NOT NULL REFERENCES signals_v2_log (id) ON DELETE CASCADE,
    strategy_id  integer NOT NULL,
    status       text NOT NULL CHECK (status IN ('delivered', 'skipped', 'failed')),
    note         text,
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS signal_log_entries_log_idx ON signal_log_entries_v2 (log_id);
