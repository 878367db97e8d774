-- Order flow intake (issue 15): what a restart needs to go on exactly. Idempotent.

-- A stored M1 bar is merged into the M5/M15 bar above it after a restart: the merge
-- needs the exact notional (VWAP is rounded), the price range and the trade ids.
ALTER TABLE orderflow4 ADD COLUMN IF NOT EXISTS notional numeric;  -- sum of price x quantity, units^2
ALTER TABLE orderflow4 ADD COLUMN IF NOT EXISTS high bigint;
ALTER TABLE orderflow4 ADD COLUMN IF NOT EXISTS low bigint;
ALTER TABLE orderflow4 ADD COLUMN IF NOT EXISTS first_trade_id bigint;
ALTER TABLE orderflow4 ADD COLUMN IF NOT EXISTS last_trade_id bigint;

-- The M1 footprint row of a symbol's UTC day, decided once (the first decision wins),
-- so that the same trades give the same footprint live and rebuilt.
CREATE TABLE IF NOT EXISTS orderflow_rows4 (
    symbol     text   NOT NULL,
    day        date   NOT NULL,
    m1_row     bigint NOT NULL CHECK (m1_row > 0),  -- units of 1e-8
    rule       text   NOT NULL,  -- how it was decided: 'atr', 'fixed', 'default'
    decided_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (symbol, day)
);

-- Minutes whose order flow is not (yet) final: refetched over REST, or beyond reach.
CREATE TABLE IF NOT EXISTS trade_gaps_v4 (
    symbol      text        NOT NULL,
    open_time   timestamptz NOT NULL,
    status      text        NOT NULL CHECK (status IN ('open', 'filled', 'unfillable')),
    reason      text        NOT NULL,
    attempts    integer     NOT NULL DEFAULT 0,
    detected_at timestamptz NOT NULL DEFAULT now(),
    resolved_at timestamptz,
    PRIMARY KEY (symbol, open_time)
);
CREATE INDEX IF NOT EXISTS trade_gaps_v4_open ON trade_gaps_v4 (open_time) WHERE status = 'open';
