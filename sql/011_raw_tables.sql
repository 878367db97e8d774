-- The exchange's raw events, kept for a while when asked (issue 17; RAW_TRADES and
-- RAW_BOOK_TICKERS, off by default): every aggTrade and every bookTicker update of the
-- followed symbols, as they came (deduplicated). What they are for: an independent
-- check of the daemon's bars (TimescaleDB's continuous aggregates over them, the *_raw_*
-- views), research, and replays. Made plain here; storage/setup.py cuts them into hourly
-- pieces (partitions or chunks) like the one-second tables, and retention
-- (RAW_RETENTION_H) drops whole hours.
--
-- Prices and quantities in integer units of 1e-8 (exact, 8 bytes; the feed's own
-- units); the views give exact decimals. Every statement is idempotent.

CREATE TABLE IF NOT EXISTS agg_trades4 (
    symbol       text        NOT NULL,
    ts           timestamptz NOT NULL,  -- T: the trade time
    agg_id       bigint      NOT NULL,  -- a: contiguous per symbol, in time order
    price_units  bigint      NOT NULL CHECK (price_units > 0),
    qty_units    bigint      NOT NULL CHECK (qty_units >= 0),  -- the archives hold zero-quantity rows
    first_id     bigint      NOT NULL,  -- f
    last_id      bigint      NOT NULL CHECK (last_id >= first_id),  -- l
    buyer_maker  boolean     NOT NULL,  -- m: the taker sold
    PRIMARY KEY (symbol, agg_id, ts)
);

CREATE TABLE IF NOT EXISTS book_tickers4 (
    symbol       text        NOT NULL,
    ts           timestamptz NOT NULL,  -- E: the event time
    update_id    bigint      NOT NULL,  -- u
    bid_units    bigint      NOT NULL CHECK (bid_units > 0),
    bid_qty      bigint      NOT NULL CHECK (bid_qty >= 0),
    ask_units    bigint      NOT NULL CHECK (ask_units > bid_units),
    ask_qty      bigint      NOT NULL CHECK (ask_qty >= 0),
    PRIMARY KEY (symbol, update_id, ts)
);

CREATE OR REPLACE VIEW agg_trades_v4 AS
SELECT symbol, ts, agg_id,
       price_units * 0.00000001 AS price,
       qty_units * 0.00000001 AS quantity,
       first_id, last_id, buyer_maker
FROM agg_trades4;

CREATE OR REPLACE VIEW book_tickers_v4 AS
SELECT symbol, ts, update_id,
       bid_units * 0.00000001 AS bid, bid_qty * 0.00000001 AS bid_qty,
       ask_units * 0.00000001 AS ask, ask_qty * 0.00000001 AS ask_qty
FROM book_tickers4;
