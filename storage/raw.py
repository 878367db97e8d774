"""The exchange's raw events (RAW_TRADES, RAW_BOOK_TICKERS; off by default) written behind
the feed: the frame handler appends a tuple (no I/O), a task writes what piled up once a
second in one statement (`INSERT ... SELECT FROM unnest(...)`: column arrays, one round
trip), `ON CONFLICT DO NOTHING`, so a duplicate frame, a refetched trade or a batch sent
again after a lost reply is stored once.

While PostgreSQL is away the rows wait in memory up to RAW_BUFFER_MAX_ROWS; past that the
oldest are let go with one WARNING per outage (raw events are a convenience copy: the
bars and features are built from the frames themselves, never from this table).
"""

from __future__ import annotations

import asyncio
import os
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

import asyncpg

from infra import PG_DOWN_ERRORS, Outage, env_bool, env_number, log_system_event
from storage import partitions

MODULE = "RAW"


@dataclass(frozen=True)
class RawSettings:
    trades: bool = False  # RAW_TRADES
    book_tickers: bool = False  # RAW_BOOK_TICKERS
    retention_h: int = 24  # RAW_RETENTION_H
    buffer_max_rows: int = 1_000_000  # RAW_BUFFER_MAX_ROWS, per table
    flush_s: float = 1.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> RawSettings:
        env = os.environ if env is None else env
        return cls(
            trades=env_bool(env, "RAW_TRADES", False),
            book_tickers=env_bool(env, "RAW_BOOK_TICKERS", False),
            retention_h=env_number(env, "RAW_RETENTION_H", 24, int, 1, 24 * 3650),
            buffer_max_rows=env_number(env, "RAW_BUFFER_MAX_ROWS", 1_000_000, int, 1000, 100_000_000),
        )


@dataclass(frozen=True)
class RawTable:
    table: str
    columns: tuple[tuple[str, str], ...]  # (name, array element type); `ts` is sent as ms

    def insert_sql(self) -> str:
        names = [name for name, _ in self.columns]
        arrays = ", ".join(f"${i}::{kind}[]" for i, (_, kind) in enumerate(self.columns, 1))
        selected = [
            "'epoch'::timestamptz + u.ts * interval '1 millisecond'" if name == "ts" else f"u.{name}" for name in names
        ]
        return (
            f"INSERT INTO {self.table} ({', '.join(names)}) SELECT {', '.join(selected)} "
            f"FROM unnest({arrays}) AS u({', '.join(names)}) ON CONFLICT DO NOTHING"
        )


AGG_TRADES = RawTable(
    "agg_trades4",
    (
        ("symbol", "text"),
        ("ts", "int8"),
        ("agg_id", "int8"),
        ("price_units", "int8"),
        ("qty_units", "int8"),
        ("first_id", "int8"),
        ("last_id", "int8"),
        ("buyer_maker", "bool"),
    ),
)
BOOK_TICKERS = RawTable(
    "book_tickers4",
    (
        ("symbol", "text"),
        ("ts", "int8"),
        ("update_id", "int8"),
        ("bid_units", "int8"),
        ("bid_qty", "int8"),
        ("ask_units", "int8"),
        ("ask_qty", "int8"),
    ),
)


class RawWriter:
    """One raw table's rows on their way to PostgreSQL."""

    def __init__(self, pool: asyncpg.Pool, table: RawTable, settings: RawSettings) -> None:
        self.pool, self.table, self.settings = pool, table, settings
        self.rows: deque[tuple] = deque()
        self.sql = table.insert_sql()
        self.outage = Outage(MODULE, "PostgreSQL")
        self.stats = {"written": 0, "dropped": 0}
        self._warned = False

    def add(self, row: tuple) -> None:
        """From the frame handler: no I/O; the oldest let go when memory is full."""
        self.rows.append(row)
        if len(self.rows) > self.settings.buffer_max_rows:
            self.rows.popleft()
            self.stats["dropped"] += 1
            if not self._warned:
                self._warned = True
                log_system_event(
                    "WARNING",
                    MODULE,
                    f"{self.table.table}: {self.settings.buffer_max_rows} rows waiting for PostgreSQL; "
                    "the oldest raw events are let go (bars and features are not affected)",
                )

    async def flush(self) -> int:
        """Everything waiting now, in one statement; returns rows sent."""
        if not self.rows:
            return 0
        batch, self.rows = self.rows, deque()  # rows added while the statement runs wait for the next
        columns = [list(column) for column in zip(*batch)]
        try:
            await partitions.write_through(
                self.pool, {self.table.table: columns[1]}, lambda: self.pool.execute(self.sql, *columns)
            )
        except asyncpg.PostgresError as exc:
            if isinstance(exc, PG_DOWN_ERRORS):
                self._put_back(batch)
                raise
            self.stats["dropped"] += len(batch)  # refused, not lost on the way: sending it again changes nothing
            log_system_event("WARNING", MODULE, f"{self.table.table}: {len(batch)} raw rows refused: {exc!r}")
            return 0
        except BaseException:
            self._put_back(batch)
            raise
        self.stats["written"] += len(batch)
        self._warned = False
        return len(batch)

    def _put_back(self, batch: deque[tuple]) -> None:
        batch.extend(self.rows)
        self.rows = batch
        while len(self.rows) > self.settings.buffer_max_rows:
            self.rows.popleft()
            self.stats["dropped"] += 1

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.settings.flush_s)
            try:
                await self.flush()
                self.outage.ok()
            except PG_DOWN_ERRORS as exc:
                self.outage.fail(exc, f"writing {len(self.rows)} raw rows to {self.table.table}")

    async def drain(self) -> None:
        """At shutdown: what waits is written if PostgreSQL answers."""
        try:
            await self.flush()
        except PG_DOWN_ERRORS as exc:
            log_system_event("WARNING", MODULE, f"{len(self.rows)} raw rows not written at shutdown: {exc!r}")
