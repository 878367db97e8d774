-- Signal router (issue 4). Every statement is idempotent.

-- The stream entry a log row came from, and the action of its phrase. (stream_id, uid)
-- identifies an entry already logged, so a redelivered entry (a reclaimed one, or one
-- read by a second consumer group) is recognised and acknowledged, not logged twice.
ALTER TABLE signals_v2_log ADD COLUMN IF NOT EXISTS stream_id text;
ALTER TABLE signals_v2_log ADD COLUMN IF NOT EXISTS action text;
CREATE UNIQUE INDEX IF NOT EXISTS signals_v2_log_stream_entry_idx
    ON signals_v2_log (stream_id, uid) WHERE stream_id IS NOT NULL;

-- A change to a routing table tells every listening router to reload its snapshot.
-- Statement-level: one notification per statement, and PostgreSQL folds identical
-- notifications of one transaction into one.
CREATE OR REPLACE FUNCTION feed_v4_config_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('feed_v4_config', TG_TABLE_NAME);
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS feed_v4_config_notify ON tickers;
CREATE TRIGGER feed_v4_config_notify
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON tickers
    FOR EACH STATEMENT EXECUTE FUNCTION feed_v4_config_notify();

DROP TRIGGER IF EXISTS feed_v4_config_notify ON strategies;
CREATE TRIGGER feed_v4_config_notify
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON strategies
    FOR EACH STATEMENT EXECUTE FUNCTION feed_v4_config_notify();

DROP TRIGGER IF EXISTS feed_v4_config_notify ON signal_phrases;
CREATE TRIGGER feed_v4_config_notify
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON signal_phrases
    FOR EACH STATEMENT EXECUTE FUNCTION feed_v4_config_notify();

DROP TRIGGER IF EXISTS feed_v4_config_notify ON strategy_signals;
CREATE TRIGGER feed_v4_config_notify
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON strategy_signals
    FOR EACH STATEMENT EXECUTE FUNCTION feed_v4_config_notify();
