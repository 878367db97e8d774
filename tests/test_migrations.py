"""Migrations against the real PostgreSQL: idempotent, concurrent-safe, complete."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from migrations import SQL_DIR, apply_migrations, discover

REQUIRED_COLUMNS = {
    "tickers": {"symbol", "status", "trades", "book_ticker", "depth", "footprint_row"},  # SPEC sections 3, 13, 14
    "ohlcv4_m1": {
        "symbol",
        "open_time",
        "open",
        "high",
        "low",
        "close",
        "volume",
        "quote_volume",
        "trades",
        "taker_buy_volume",
        "taker_buy_quote_volume",
    },
    "ohlcv4_m5": {
        "symbol",
        "open_time",
        "open",
        "high",
        "low",
        "close",
        "volume",
        "quote_volume",
        "trades",
        "taker_buy_volume",
        "taker_buy_quote_volume",
        "m1_count",
    },
    "ohlcv4_m15": {
        "symbol",
        "open_time",
        "open",
        "high",
        "low",
        "close",
        "volume",
        "quote_volume",
        "trades",
        "taker_buy_volume",
        "taker_buy_quote_volume",
        "m1_count",
    },
    "indicator_instances_v4": {"id", "indicator", "timeframe", "enabled"},
    "indicator_parameters_v4": {"instance_id", "param", "value"},
    "indicator_values_v4": {"instance_id", "symbol", "open_time", "param_name", "value"},
    "missing_m1_log_v4": {"symbol", "open_time", "detected_at", "fixed_at", "status"},
    "system_log_v4": {"id", "ts", "level", "module", "message", "details"},
    "strategies": {"id", "name", "enabled", "archived", "allow_open"},
    "signal_phrases": {"id", "phrase", "action", "enabled"},
    "strategy_signals": {"strategy_id", "phrase_id"},
    "signals_v2_log": {
        "id",
        "uid",
        "symbol",
        "message",
        "bar_time",
        "sent_at",
        "received_at",
        "status",
        "reason",
        "raw",
    },
    "signal_log_entries_v2": {"id", "log_id", "strategy_id", "status", "note", "created_at"},
    "schema_migrations": {"version", "name", "applied_at"},
}

PRIMARY_KEYS = {
    "tickers": ["symbol"],
    "ohlcv4_m1": ["symbol", "open_time"],
    "ohlcv4_m5": ["symbol", "open_time"],
    "ohlcv4_m15": ["symbol", "open_time"],
    "indicator_parameters_v4": ["instance_id", "param"],
    "indicator_values_v4": ["instance_id", "symbol", "open_time", "param_name"],
    "missing_m1_log_v4": ["symbol", "open_time"],
    "strategy_signals": ["strategy_id", "phrase_id"],
}


async def _fresh_schema(pool: asyncpg.Pool) -> None:
    await pool.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")


async def test_second_run_applies_nothing(pool):
    await _fresh_schema(pool)
    first = await apply_migrations(pool)
    second = await apply_migrations(pool)
    assert first == [m.name for m in discover()]
    assert second == []
    assert await pool.fetchval("SELECT count(*) FROM schema_migrations") == len(first)


async def test_concurrent_runners_apply_each_migration_once(pool, pg_url):
    await _fresh_schema(pool)
    connections = [await asyncpg.connect(pg_url) for _ in range(3)]
    try:
        results = await asyncio.gather(*(apply_migrations(conn) for conn in connections))
    finally:
        for conn in connections:
            await conn.close()
    applied = [name for result in results for name in result]
    assert sorted(applied) == sorted(m.name for m in discover())
    assert await pool.fetchval("SELECT count(*) FROM indicator_instances_v4 WHERE timeframe = 'm1'") == 14


async def test_every_required_table_and_column_exists(pool):
    rows = await pool.fetch(
        "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = 'public'"
    )
    columns: dict[str, set[str]] = {}
    for row in rows:
        columns.setdefault(row["table_name"], set()).add(row["column_name"])
    for table, required in REQUIRED_COLUMNS.items():
        assert table in columns, f"missing table {table}"
        assert required <= columns[table], f"{table} lacks {required - columns[table]}"


async def test_primary_keys_are_as_specified(pool):
    for table, expected in PRIMARY_KEYS.items():
        key = await pool.fetch(
            """SELECT a.attname FROM pg_index i
               JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
               WHERE i.indrelid = $1::regclass AND i.indisprimary
               ORDER BY array_position(i.indkey, a.attnum)""",
            table,
        )
        assert [r["attname"] for r in key] == expected, table


async def test_money_columns_are_exact_numeric(pool):
    types = dict(
        await pool.fetch("SELECT column_name, data_type FROM information_schema.columns WHERE table_name = 'ohlcv4_m5'")
    )
    for column in ("open", "high", "low", "close", "volume", "quote_volume", "taker_buy_volume"):
        assert types[column] == "numeric"
    assert types["m1_count"] == "smallint"


@pytest.mark.parametrize(
    "statement",
    [
        "INSERT INTO tickers (symbol, status) VALUES ('X', 'paused')",
        "INSERT INTO indicator_instances_v4 (indicator, timeframe) VALUES ('ema', 'h2')",
        "INSERT INTO missing_m1_log_v4 (symbol, open_time, status) VALUES ('X', now(), 'lost')",
        "INSERT INTO system_log_v4 (level, module, message) VALUES ('LOUD', 'm', 'x')",
        "INSERT INTO signal_phrases (phrase, action) VALUES ('buy', 'open_sideways')",
        "INSERT INTO signals_v2_log (uid, status) VALUES ('u', 'maybe')",
        "INSERT INTO ohlcv4_m5 (symbol, open_time, open, high, low, close, volume, m1_count)"
        " VALUES ('X', '2026-02-01 00:01:00+00', 1, 1, 1, 1, 1, 5)",
        "INSERT INTO ohlcv4_m15 (symbol, open_time, open, high, low, close, volume, m1_count)"
        " VALUES ('X', '2026-02-01 00:00:00+00', 1, 1, 1, 1, 1, 16)",
    ],
)
async def test_checks_reject_bad_values(pool, statement):
    with pytest.raises(asyncpg.CheckViolationError):
        await pool.execute(statement)


async def test_only_one_new_signal_per_uid(pool):
    await pool.execute("INSERT INTO signals_v2_log (uid, status) VALUES ('abc', 'new'), ('abc', 'duplicate')")
    with pytest.raises(asyncpg.UniqueViolationError):
        await pool.execute("INSERT INTO signals_v2_log (uid, status) VALUES ('abc', 'new')")


async def test_default_indicator_set_is_inserted_only_into_an_empty_table(pool):
    per_tf = dict(await pool.fetch("SELECT timeframe, count(*) FROM indicator_instances_v4 GROUP BY 1"))
    assert per_tf == {"m1": 14, "m5": 14, "m15": 14}
    macd = await pool.fetch(
        """SELECT p.param, p.value FROM indicator_instances_v4 i JOIN indicator_parameters_v4 p
           ON p.instance_id = i.id WHERE i.indicator = 'macd' AND i.timeframe = 'm5' ORDER BY p.param"""
    )
    assert [(r["param"], r["value"]) for r in macd] == [("fast", "12"), ("signal", "9"), ("slow", "26")]
    # A user's configuration survives a re-run of the seed migration.
    await pool.execute("DELETE FROM indicator_instances_v4 WHERE indicator <> 'rsi'")
    await pool.execute("DELETE FROM schema_migrations WHERE version = '002'")
    await apply_migrations(pool)
    assert await pool.fetchval("SELECT count(*) FROM indicator_instances_v4") == 3
    await _fresh_schema(pool)
    await apply_migrations(pool)


async def test_an_older_database_keeps_its_trade_switches_under_the_new_name(pool, tmp_path):
    """Migration 008 renames `trades_enabled` (006) to SPEC section 14's `trades`."""
    await _fresh_schema(pool)
    for path in SQL_DIR.glob("*.sql"):
        if path.name < "008":
            (tmp_path / path.name).write_text(path.read_text())
    await apply_migrations(pool, tmp_path)
    await pool.execute("INSERT INTO tickers (symbol, trades_enabled) VALUES ('BTCUSDT', true), ('ETHUSDT', false)")
    await apply_migrations(pool)
    rows = await pool.fetch("SELECT symbol, trades, book_ticker, depth FROM tickers ORDER BY symbol")
    assert [tuple(r) for r in rows] == [("BTCUSDT", True, False, False), ("ETHUSDT", False, False, False)]


async def test_migration_009_runs_again_over_stored_seconds_and_partitions(pool):
    """The book's hourly-partitioned tables (SPEC section 14): re-running the file keeps
    the partitions and their rows, and the views read them."""
    from book import store
    from book.per_second import Features

    second = Features(1_721_347_200_000, 64000.5, 0.25, None, -1.5, None, None, None, None, None)
    await store.write_seconds(pool, [], [], [], [("BTCUSDT", second)], [])
    await pool.execute((SQL_DIR / "009_book_seconds.sql").read_text())
    row = await pool.fetchrow("SELECT microprice, i10, ofi FROM features_1s_v4 WHERE symbol = 'BTCUSDT'")
    assert tuple(row) == (64000.5, None, -1.5)
    assert await pool.fetchval("SELECT count(*) FROM pg_inherits WHERE inhparent = 'features_1s4'::regclass") >= 2
