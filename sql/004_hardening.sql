-- Hardening (issue 13). Every statement is idempotent.

-- Why an enabled ticker is not followed (bad name, not listed, not trading), written
-- by the feed and shown by `status`; NULL when it is followed.
ALTER TABLE tickers ADD COLUMN IF NOT EXISTS problem text;
ALTER TABLE tickers ADD COLUMN IF NOT EXISTS problem_at timestamptz;
-- 'SYMBOLS' for rows the SYMBOLS setting enabled: a later boot with SYMBOLS set
-- disables those it no longer lists. Rows added any other way are never touched.
ALTER TABLE tickers ADD COLUMN IF NOT EXISTS source text;

-- Why an indicator instance does not run (bad parameter, a failure while computing),
-- written by the indicator worker and shown by `status`; NULL when it runs.
ALTER TABLE indicator_instances_v4 ADD COLUMN IF NOT EXISTS error text;
ALTER TABLE indicator_instances_v4 ADD COLUMN IF NOT EXISTS error_at timestamptz;

-- Retention of the logs (pruned by the daemon in small batches, oldest first).
CREATE INDEX IF NOT EXISTS missing_m1_settled_idx
    ON missing_m1_log_v4 (detected_at) WHERE status <> 'missing';

-- Behind a connection pooler in transaction mode LISTEN never delivers: a routing
-- change also bumps this one-row counter, which such a router polls instead.
CREATE TABLE IF NOT EXISTS config_version_v4 (
    id         boolean PRIMARY KEY DEFAULT true CHECK (id),
    version    bigint NOT NULL DEFAULT 0,
    changed_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO config_version_v4 DEFAULT VALUES ON CONFLICT DO NOTHING;

CREATE OR REPLACE FUNCTION feed_v4_config_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('feed_v4_config', TG_TABLE_NAME);
    UPDATE config_version_v4 SET version = version + 1, changed_at = now();
    RETURN NULL;
END;
$$;
