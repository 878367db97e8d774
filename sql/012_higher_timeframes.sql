-- Higher timeframes (SPEC section 15): built from M15 → H1 → H4 → D1 when TIMEFRAMES
-- asks for them; the tables exist in every database so that any reader and `migrate`
-- find the same schema whatever a deployment builds. Every statement is idempotent.

CREATE TABLE IF NOT EXISTS ohlcv4_h1 (
    LIKE ohlcv4_m1 INCLUDING DEFAULTS INCLUDING CONSTRAINTS,
    m1_count smallint NOT NULL CHECK (m1_count BETWEEN 1 AND 60),
    PRIMARY KEY (symbol, open_time),
    CHECK (extract(epoch FROM open_time)::bigint % 3600 = 0)
);

CREATE TABLE IF NOT EXISTS ohlcv4_h4 (
    LIKE ohlcv4_m1 INCLUDING DEFAULTS INCLUDING CONSTRAINTS,
    m1_count smallint NOT NULL CHECK (m1_count BETWEEN 1 AND 240),
    PRIMARY KEY (symbol, open_time),
    CHECK (extract(epoch FROM open_time)::bigint % 14400 = 0)
);

-- UTC days, as the exchange's 1d klines.
CREATE TABLE IF NOT EXISTS ohlcv4_d1 (
    LIKE ohlcv4_m1 INCLUDING DEFAULTS INCLUDING CONSTRAINTS,
    m1_count smallint NOT NULL CHECK (m1_count BETWEEN 1 AND 1440),
    PRIMARY KEY (symbol, open_time),
    CHECK (extract(epoch FROM open_time)::bigint % 86400 = 0)
);

-- Indicator instances may use them. The check is replaced only while it still has the
-- base three (a lock on a small table, once per database).
DO $$
BEGIN
    IF EXISTS (
        SELECT 1 FROM pg_constraint
        WHERE conrelid = 'indicator_instances_v4'::regclass
          AND conname = 'indicator_instances_v4_timeframe_check'
          AND pg_get_constraintdef(oid) NOT LIKE '%d1%'
    ) THEN
        ALTER TABLE indicator_instances_v4 DROP CONSTRAINT indicator_instances_v4_timeframe_check;
        ALTER TABLE indicator_instances_v4 ADD CONSTRAINT indicator_instances_v4_timeframe_check
            CHECK (timeframe IN ('m1', 'm5', 'm15', 'h1', 'h4', 'd1'));
    END IF;
END $$;
