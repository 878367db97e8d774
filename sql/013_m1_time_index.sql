-- The one time index the growing tables keep in every mode: the newest stored minute of
-- any symbol (the exchange's clock as storage knows it, read at boot, when a series
-- opens and by retention) and the recent minutes of all symbols (the boot's
-- reconciliation). Every other read names its symbol and uses the primary key.
-- TimescaleDB made the same index, by the same name, on hypertables it created before
-- storage.setup stopped asking for its default indexes.
CREATE INDEX IF NOT EXISTS ohlcv4_m1_open_time_idx ON ohlcv4_m1 (open_time DESC);
