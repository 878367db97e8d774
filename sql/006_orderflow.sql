-- Order flow (issue 15, SPEC section 13). Every statement is idempotent.

-- Per ticker: whether its aggTrades are followed (on by default), and a fixed M1
-- footprint row (a price step) that overrides the daily rule; NULL: the rule.
ALTER TABLE tickers ADD COLUMN IF NOT EXISTS trades_enabled boolean NOT NULL DEFAULT true;
ALTER TABLE tickers ADD COLUMN IF NOT EXISTS footprint_row numeric
    CHECK (footprint_row IS NULL OR footprint_row > 0);

-- One row per bar: its order flow, and its footprint as parallel arrays (one row per
-- candle, not one per price: 500 symbols x 1,440 M1 a day would be ~20 million rows
-- a day otherwise). Quantities and prices in integer units of 1e-8 (exact, 8 bytes);
-- readers use the views, which give exact decimals.
CREATE TABLE IF NOT EXISTS orderflow4 (
    symbol         text        NOT NULL,
    tf             text        NOT NULL CHECK (tf IN ('m1', 'm5', 'm15')),
    open_time      timestamptz NOT NULL,
    buy_units      bigint      NOT NULL CHECK (buy_units >= 0),
    sell_units     bigint      NOT NULL CHECK (sell_units >= 0),
    delta_min      bigint      NOT NULL,
    delta_max      bigint      NOT NULL,
    cvd            numeric     NOT NULL,  -- units; numeric: a running sum has no bound
    cvd_day        numeric     NOT NULL,
    agg_trades     integer     NOT NULL CHECK (agg_trades >= 0),
    trades         integer     NOT NULL CHECK (trades >= 0),
    buy_trades     integer     NOT NULL CHECK (buy_trades >= 0),
    sell_trades    integer     NOT NULL CHECK (sell_trades >= 0),
    vwap           numeric,
    max_trade_qty  bigint      NOT NULL,
    row_size       bigint      NOT NULL CHECK (row_size > 0),
    poc            bigint,     -- row indices: the row's low edge is index x row_size
    vah            bigint,
    val            bigint,
    first_agg_id   bigint,
    last_agg_id    bigint,
    row_index      bigint[]    NOT NULL,
    bid_units      bigint[]    NOT NULL,
    ask_units      bigint[]    NOT NULL,
    bid_trades     integer[]   NOT NULL,
    ask_trades     integer[]   NOT NULL,
    written_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (symbol, tf, open_time),
    CHECK (cardinality(row_index) = cardinality(bid_units)
           AND cardinality(row_index) = cardinality(ask_units)
           AND cardinality(row_index) = cardinality(bid_trades)
           AND cardinality(row_index) = cardinality(ask_trades))
);

CREATE OR REPLACE VIEW orderflow_v4 AS
SELECT symbol, tf, open_time,
       buy_units * 0.00000001 AS buy_volume,
       sell_units * 0.00000001 AS sell_volume,
       (buy_units - sell_units) * 0.00000001 AS delta,
       delta_min * 0.00000001 AS delta_min,
       delta_max * 0.00000001 AS delta_max,
       cvd * 0.00000001 AS cvd,
       cvd_day * 0.00000001 AS cvd_day,
       agg_trades, trades, buy_trades, sell_trades, vwap,
       max_trade_qty * 0.00000001 AS max_trade_qty,
       row_size * 0.00000001 AS row_size,
       poc::numeric * row_size * 0.00000001 AS poc,
       vah::numeric * row_size * 0.00000001 AS vah,
       val::numeric * row_size * 0.00000001 AS val,
       first_agg_id, last_agg_id
FROM orderflow4;

CREATE OR REPLACE VIEW footprint_v4 AS
SELECT f.symbol, f.tf, f.open_time,
       r.row_index::numeric * f.row_size * 0.00000001 AS price,
       r.bid_units * 0.00000001 AS bid_volume,
       r.ask_units * 0.00000001 AS ask_volume,
       r.bid_trades, r.ask_trades
FROM orderflow4 f
CROSS JOIN LATERAL unnest(f.row_index, f.bid_units, f.ask_units, f.bid_trades, f.ask_trades)
    AS r(row_index, bid_units, ask_units, bid_trades, ask_trades);
