-- A ticker's streams come from its row (SPEC section 14, issue 16): klines always;
-- `trades` (aggTrade, on by default: the order-flow switch, until now `trades_enabled`),
-- `book_ticker` and `depth` (off by default) on the `/public` route.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM information_schema.columns
               WHERE table_schema = current_schema() AND table_name = 'tickers' AND column_name = 'trades_enabled')
       AND NOT EXISTS (SELECT 1 FROM information_schema.columns
                       WHERE table_schema = current_schema() AND table_name = 'tickers' AND column_name = 'trades') THEN
        ALTER TABLE tickers RENAME COLUMN trades_enabled TO trades;
    END IF;
END $$;
ALTER TABLE tickers ADD COLUMN IF NOT EXISTS trades boolean NOT NULL DEFAULT true;
ALTER TABLE tickers ADD COLUMN IF NOT EXISTS book_ticker boolean NOT NULL DEFAULT false;
ALTER TABLE tickers ADD COLUMN IF NOT EXISTS depth boolean NOT NULL DEFAULT false;
