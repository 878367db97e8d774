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

-- Indicator instances and order flow may use them. A check that still lists only the
-- base three is replaced (found by its definition: a table made over again in place keeps
-- its checks but not always their names); a lock on each table, once per database.
-- TimescaleDB takes this on a hypertable with compressed chunks too.
DO $$
DECLARE
    item record;
BEGIN
    FOR item IN
        SELECT c.conrelid::regclass AS tab, c.conname, t.col
        FROM pg_constraint c
        JOIN (VALUES ('indicator_instances_v4'::regclass, 'timeframe'), ('orderflow4'::regclass, 'tf')) AS t(tab, col)
          ON c.conrelid = t.tab
        WHERE c.contype = 'c' AND NOT c.coninhcount > 0
          AND pg_get_constraintdef(c.oid) LIKE '%''m15''%' AND pg_get_constraintdef(c.oid) NOT LIKE '%''d1''%'
    LOOP
        EXECUTE format('ALTER TABLE %s DROP CONSTRAINT %I', item.tab, item.conname);
        EXECUTE format(
            'ALTER TABLE %s ADD CONSTRAINT %I CHECK (%I IN (''m1'', ''m5'', ''m15'', ''h1'', ''h4'', ''d1''))',
            item.tab, item.conname, item.col
        );
    END LOOP;
END $$;
