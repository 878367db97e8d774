-- One-second bars and features of the order book (issue 16, SPEC section 14), and their
-- per-minute rollup beside each M1 candle. Every statement is idempotent.
--
-- The four one-second tables are partitioned by hour on `ts` (the second's start):
-- ~220 symbols x 3,600 s is ~0.8 million rows an hour per table, so an hour is a
-- partition whose index stays in memory while it is written, and retention
-- (FEATURES_RETENTION_H, default 48) drops whole hours (DROP TABLE of a partition: no
-- row DELETE, no vacuum debt) and keeps at most an hour more than asked (a day's
-- partition would keep up to 24 h more: half again the default). ~50 partitions a
-- table are few enough for the planner. No DEFAULT partition: a row for an hour
-- without a partition fails loudly instead of piling up where retention never drops
-- it. Partitions (`<table>_pYYYYMMDDHH`, UTC) are made by book/store.py on demand,
-- ahead of the hour; none are made here (replays run on the exchange's clock, any
-- year).
--
-- Prices and quantities are exact `numeric` (the bars' integer units / 10^8); derived
-- values (ratios, the weighted mid, VPIN, volatility, returns) double precision.
-- Readers use the `*_v4` views.

CREATE TABLE IF NOT EXISTS trades_1s4 (
    symbol       text        NOT NULL,
    ts           timestamptz NOT NULL,
    open         numeric     NOT NULL,
    high         numeric     NOT NULL,
    low          numeric     NOT NULL,
    close        numeric     NOT NULL,
    buy_volume   numeric     NOT NULL CHECK (buy_volume >= 0),   -- taker bought
    sell_volume  numeric     NOT NULL CHECK (sell_volume >= 0),  -- taker sold
    quote_volume numeric     NOT NULL,  -- sum of price x quantity, exact
    vwap         numeric,               -- quote_volume / volume, rounded half-even to 1e-8
    agg_trades   integer     NOT NULL CHECK (agg_trades > 0),
    PRIMARY KEY (symbol, ts)
) PARTITION BY RANGE (ts);

CREATE TABLE IF NOT EXISTS book_ticker_1s4 (
    symbol         text        NOT NULL,
    ts             timestamptz NOT NULL,
    bid_open       numeric     NOT NULL,
    bid_high       numeric     NOT NULL,
    bid_low        numeric     NOT NULL,
    bid_close      numeric     NOT NULL,
    ask_open       numeric     NOT NULL,
    ask_high       numeric     NOT NULL,
    ask_low        numeric     NOT NULL,
    ask_close      numeric     NOT NULL,
    bid_qty_close  numeric     NOT NULL,
    ask_qty_close  numeric     NOT NULL,
    microprice_close double precision NOT NULL,  -- weighted mid of the last update
    spread_sum     numeric     NOT NULL,  -- sum of (ask - bid) over the updates, exact
    ofi            numeric     NOT NULL,  -- level-1 OFI of the second's best-quote changes
    updates        integer     NOT NULL CHECK (updates > 0),
    last_update_id bigint      NOT NULL,
    PRIMARY KEY (symbol, ts)
) PARTITION BY RANGE (ts);

CREATE TABLE IF NOT EXISTS depth_1s4 (
    symbol             text        NOT NULL,
    ts                 timestamptz NOT NULL,
    ofi_l1             numeric     NOT NULL,
    ofi_l10            numeric     NOT NULL,
    imbalance_1        double precision NOT NULL,
    imbalance_5        double precision NOT NULL,
    imbalance_10       double precision NOT NULL,
    bid_depth_in_range numeric     NOT NULL,
    ask_depth_in_range numeric     NOT NULL,
    last_update_id     bigint      NOT NULL,
    diffs              integer     NOT NULL CHECK (diffs >= 0),
    PRIMARY KEY (symbol, ts)
) PARTITION BY RANGE (ts);

CREATE TABLE IF NOT EXISTS features_1s4 (
    symbol           text        NOT NULL,
    ts               timestamptz NOT NULL,
    microprice       double precision,
    i1               double precision,
    i10              double precision,
    ofi              double precision,
    volume_imbalance double precision,
    vpin             double precision,
    vpin_bulk        double precision,
    volatility       double precision,
    log_return       double precision,
    PRIMARY KEY (symbol, ts)
) PARTITION BY RANGE (ts);

CREATE OR REPLACE VIEW trades_1s_v4 AS
SELECT symbol, ts, open, high, low, close,
       buy_volume + sell_volume AS volume,
       buy_volume, sell_volume, vwap, agg_trades,
       quote_volume,
       buy_volume - sell_volume AS delta
FROM trades_1s4;

CREATE OR REPLACE VIEW book_ticker_1s_v4 AS
SELECT symbol, ts,
       bid_open, bid_high, bid_low, bid_close,
       ask_open, ask_high, ask_low, ask_close,
       bid_qty_close, ask_qty_close, microprice_close, updates, last_update_id,
       (spread_sum / updates)::double precision AS mean_spread,
       ask_close - bid_close AS spread_close,
       ofi
FROM book_ticker_1s4;

CREATE OR REPLACE VIEW depth_1s_v4 AS
SELECT symbol, ts, ofi_l1, ofi_l10, imbalance_1, imbalance_5, imbalance_10,
       bid_depth_in_range, ask_depth_in_range, last_update_id, diffs
FROM depth_1s4;

CREATE OR REPLACE VIEW features_1s_v4 AS
SELECT symbol, ts, microprice, i1, i10, ofi, volume_imbalance, vpin, vpin_bulk, volatility, log_return
FROM features_1s4;

-- Per-minute rollup (book/minutes.py), keyed like the M1 candle it sits beside and kept
-- like candles (forever). `seconds` says how many of the minute's seconds had data: a
-- minute rolled up around a restart holds only what one process saw (book/store.py).
CREATE TABLE IF NOT EXISTS book_m1_4 (
    symbol              text        NOT NULL,
    open_time           timestamptz NOT NULL,
    ofi                 numeric,           -- sum of features_1s_v4.ofi (book ticker's level 1, else depth's)
    ofi_l1              numeric,           -- sum of depth_1s_v4.ofi_l1
    ofi_l10             numeric,           -- sum of depth_1s_v4.ofi_l10
    mean_spread         double precision,  -- over every book ticker update of the minute
    microprice          double precision,  -- the newest of the minute
    vpin                double precision,  -- the newest of the minute
    vpin_bulk           double precision,
    i1_mean             double precision,  -- mean of the seconds' i1
    volume_imbalance    double precision,  -- of the minute's trades
    volatility          double precision,  -- at the minute's last second with a value
    book_ticker_updates integer     NOT NULL CHECK (book_ticker_updates >= 0),
    depth_diffs         integer     NOT NULL CHECK (depth_diffs >= 0),
    seconds             smallint    NOT NULL CHECK (seconds BETWEEN 1 AND 60),
    written_at          timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (symbol, open_time),
    CHECK (extract(epoch FROM open_time)::numeric % 60 = 0)
);

CREATE OR REPLACE VIEW book_m1_v4 AS
SELECT symbol, open_time, ofi, ofi_l1, ofi_l10, mean_spread, microprice, vpin, vpin_bulk, i1_mean,
       volume_imbalance, volatility, book_ticker_updates, depth_diffs, seconds
FROM book_m1_4;
