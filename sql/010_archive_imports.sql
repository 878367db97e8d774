-- History imported from Binance's public archives (`feed-v4 import`, issue 17): one row per
-- daily file taken in, written after its rows and the buckets built from them, so an import
-- that stopped resumes with the files it has not finished, and a second run skips a file
-- whose `.CHECKSUM` still names the same sha256 (a file the archive replaced is taken again).
CREATE TABLE IF NOT EXISTS archive_imports_v4 (
    kind        text        NOT NULL CHECK (kind IN ('klines', 'aggTrades')),
    symbol      text        NOT NULL,
    day         date        NOT NULL,
    sha256      text        NOT NULL CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    rows        integer     NOT NULL CHECK (rows >= 0),      -- rows of the file used
    rejected    integer     NOT NULL CHECK (rejected >= 0),  -- rows refused (logged)
    changed     integer     NOT NULL CHECK (changed >= 0),   -- candles new or different
    imported_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (kind, symbol, day)
);
