"""A daily aggTrades file into `agg_trades4` (the raw trades, storage/raw.py), with no
Python per row (a busy symbol's day is millions of rows).

- **A day with no trade of the symbol stored yet** (the usual import): the CSV is read in
  chunks of whole columns (pandas' C reader, in a thread), checked and converted to
  binary COPY rows by numpy (archive/trade_rows.py) and streamed straight into
  `agg_trades4` over two COPY streams while the next chunk is read: the server only
  stores. A value that path cannot convert exactly, a CSV it cannot read, or a trade
  already there (the daemon storing live trades meanwhile, a repeated id) undoes it, and
  the file takes the next path.
- **Otherwise** (exact, slower): the CSV goes to PostgreSQL as it is, one COPY into a
  temporary table that parses it, then one INSERT that checks each row, converts it to
  the table's units and keeps each trade once (`ON CONFLICT DO NOTHING`: a file taken
  again, or trades the daemon stored live).

Either way rows that fail the checks are counted and a few quoted, never stored.

On the full edition the trade rollups of the day are then materialised
(`refresh_continuous_aggregate`): their policy looks back two hours only, and what they
materialise outlives the raw rows' retention.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import zipfile
import zlib
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from datetime import date
from typing import IO

import asyncpg
import pandas as pd

from archive.files import ArchiveError, csv_member, day_start_ms
from archive.trade_rows import (
    COPY_HEADER,
    COPY_TRAILER,
    CSV_COLUMNS,
    CSV_TYPES,
    Converted,
    DecimalScanner,
    Unconvertible,
    copy_rows,
)
from candles import DAY_MS, ms_to_datetime
from storage import partitions
from storage.aggregates import continuous_aggregates
from storage.layout import HOUR_MS

_STAGE_SQL = (
    "CREATE TEMP TABLE IF NOT EXISTS archive_trades (agg_id int8, price numeric, quantity numeric, "
    "first_id int8, last_id int8, t int8, buyer_maker boolean) ON COMMIT DELETE ROWS"
)
# What a row must be to be stored: a positive price and a quantity of whole units (1e-8),
# ids in order, a time inside the file's day.
_VALID = (
    "price > 0 AND quantity >= 0 AND price * 100000000 = trunc(price * 100000000) "
    "AND quantity * 100000000 = trunc(quantity * 100000000) AND price < 92233720368 AND quantity < 92233720368 "
    "AND last_id >= first_id AND agg_id >= 0 AND t >= $2 AND t < $3"
)
_INSERT_SQL = (
    "INSERT INTO agg_trades4 (symbol, ts, agg_id, price_units, qty_units, first_id, last_id, buyer_maker) "
    "SELECT $1, 'epoch'::timestamptz + t * interval '1 millisecond', agg_id, (price * 100000000)::int8, "
    f"(quantity * 100000000)::int8, first_id, last_id, buyer_maker FROM archive_trades WHERE {_VALID} "
    "ON CONFLICT DO NOTHING"
)
_VALID_COUNT_SQL = f"SELECT count(*) FROM archive_trades WHERE $1::text IS NOT NULL AND {_VALID}"
_REJECTED_SQL = (
    f"SELECT $1::text AS symbol, agg_id, price, quantity, first_id, last_id, t FROM archive_trades "
    f"WHERE NOT ({_VALID}) LIMIT 3"
)
TRADE_ROLLUPS = ("raw_trades_1s4", "raw_trades_1m4")
log = logging.getLogger("ARCHIVE")


@dataclass(frozen=True)
class TradeFile:
    """A daily aggTrades zip, opened: whose trades, which day, the CSV inside."""

    symbol: str
    first: int  # the day's first millisecond
    name: str
    archive: zipfile.ZipFile
    member: zipfile.ZipInfo
    header: bool

    @classmethod
    def read(cls, symbol: str, day: date, data: bytes, name: str) -> TradeFile:
        archive, member, header = csv_member(data, name)
        return cls(symbol, day_start_ms(day), name, archive, member, header)

    @property
    def end(self) -> int:
        return self.first + DAY_MS

    def open(self) -> IO[bytes]:
        return self.archive.open(self.member)


async def store_trades(
    pool: asyncpg.Pool, symbol: str, day: date, data: bytes, name: str
) -> tuple[int, int, int, list]:
    """The file's trades stored: (rows in the file, rows refused, rows new, a few refused)."""
    file = TradeFile.read(symbol, day, data, name)
    await partitions.ensure(pool, "agg_trades4", range(file.first, file.end, HOUR_MS))
    if not await pool.fetchval(_DAY_HAS_TRADES_SQL, symbol, ms_to_datetime(file.first), ms_to_datetime(file.end)):
        try:
            return await _copy_converted(pool, file)
        except (
            ValueError,
            asyncpg.UniqueViolationError,
            asyncpg.LockNotAvailableError,
            zipfile.BadZipFile,
            EOFError,
            zlib.error,
        ) as exc:
            log.info("%s: taking the exact path (%s)", name, exc)
    return await _copy_checked(pool, file)


_DAY_HAS_TRADES_SQL = "SELECT EXISTS (SELECT FROM agg_trades4 WHERE symbol = $1 AND ts >= $2 AND ts < $3)"
CHUNK_ROWS = 250_000
STREAMS = 2
COPY_LOCK_TIMEOUT = "10s"  # then the exact path: a compression of the hour, a trade twice in the file
COPY_TIMEOUT_S = 1800.0  # a whole day of a busy symbol in one statement: not the pool's 20 s


async def _copy_converted(pool: asyncpg.Pool, file: TradeFile) -> tuple[int, int, int, list]:
    """The fast path: chunks converted in a thread while the server stores the previous
    ones, over two COPY streams when the day's pieces could be made first (the server's
    side is the slower: one stream left a core idle)."""
    fits = pool.get_max_size() > STREAMS  # a connection left for the others
    streams = STREAMS if fits and await _day_chunks_made(pool, file) else 1
    log.debug("%s: %d COPY stream(s)", file.name, streams)
    loop = asyncio.get_running_loop()
    total = refused = 0
    examples: list[tuple] = []
    queues: list[asyncio.Queue[bytes | None]] = [asyncio.Queue(maxsize=2) for _ in range(streams)]
    with file.open() as raw:
        scanner = DecimalScanner(raw)
        chunks = pd.read_csv(
            io.BufferedReader(scanner, 1 << 20),
            header=0 if file.header else None,
            names=list(CSV_COLUMNS),
            dtype=CSV_TYPES,
            engine="c",
            chunksize=CHUNK_ROWS,
        )

        def convert_next() -> Converted | None:
            frame = next(chunks, None)
            if scanner.too_precise:  # every byte of a chunk is read before it is returned
                raise Unconvertible("a value with more than 8 decimals")
            if frame is None:
                return None
            return copy_rows(file.symbol, file.first, file.end, {c: frame[c].to_numpy() for c in CSV_COLUMNS})

        async def produce() -> None:
            nonlocal total, refused
            turn = 0
            while (part := await loop.run_in_executor(None, convert_next)) is not None:
                total += part.kept + part.refused
                refused += part.refused
                examples.extend(part.examples[: 3 - len(examples)])
                await queues[turn % streams].put(part.rows)
                turn += 1
            for queue in queues:
                await queue.put(None)

        await _copy_together(pool, produce(), [_drain(queue) for queue in queues])
    return total, refused, total - refused, examples


async def _drain(queue: asyncio.Queue[bytes | None]) -> AsyncIterator[bytes]:
    """One COPY stream's binary rows, as the producer hands them over (None: the end)."""
    yield COPY_HEADER
    while (block := await queue.get()) is not None:
        yield block
    yield COPY_TRAILER


async def _copy_together(pool: asyncpg.Pool, producer: Coroutine, sources: list[AsyncIterator[bytes]]) -> None:
    """Each source COPYed into agg_trades4 on its own connection while `producer` feeds
    them; all committed once all have ended, or all rolled back (the first error raised).
    A crash between two commits leaves rows that the exact path, taken next, keeps once."""
    async with contextlib.AsyncExitStack() as stack:
        connections = [await stack.enter_async_context(pool.acquire()) for _ in sources]
        transactions = [conn.transaction() for conn in connections]
        try:
            for conn, transaction in zip(connections, transactions, strict=True):
                await transaction.start()
                # should a piece be made after all (retention dropped one meanwhile), no hang
                await conn.execute(f"SET LOCAL lock_timeout = '{COPY_LOCK_TIMEOUT}'")
            async with asyncio.TaskGroup() as group:
                group.create_task(producer)
                for conn, source in zip(connections, sources, strict=True):
                    copy = conn.copy_to_table("agg_trades4", source=source, format="binary", timeout=COPY_TIMEOUT_S)
                    group.create_task(copy)
        except BaseException as failed:
            for transaction in transactions:
                with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
                    await transaction.rollback()
            if isinstance(failed, BaseExceptionGroup):
                raise failed.exceptions[0] from None
            raise
        for transaction in transactions:
            await transaction.commit()


async def _day_chunks_made(pool: asyncpg.Pool, file: TradeFile) -> bool:
    """The day's pieces all there before two streams fill them: two COPYs that each make a
    chunk the other then needs wait on each other for ever, behind the one client feeding
    both. Native partitions are made by `store_trades`; TimescaleDB makes a chunk for a
    row, so a row per hour is written and removed in one transaction (nothing is seen of
    it; its chunk stays). False (one stream) where that fails."""
    if await partitions.table_kind(pool, "agg_trades4") != partitions.HYPERTABLE:
        return True
    hours = [ms_to_datetime(t) for t in range(file.first, file.end, HOUR_MS)]
    try:
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute(_PLACEHOLDERS_SQL, file.symbol, hours)
            await conn.execute(_PLACEHOLDERS_GONE_SQL, file.symbol, hours)
    except asyncpg.PostgresError as exc:
        log.info("agg_trades4: the day's chunks not made ahead (%s); one COPY stream", exc)
        return False
    return True


_PLACEHOLDERS_SQL = (  # agg_id -1: never a trade's
    "INSERT INTO agg_trades4 (symbol, ts, agg_id, price_units, qty_units, first_id, last_id, buyer_maker) "
    "SELECT $1, ts, -1, 1, 0, 0, 0, false FROM unnest($2::timestamptz[]) AS ts"
)
_PLACEHOLDERS_GONE_SQL = "DELETE FROM agg_trades4 WHERE symbol = $1 AND agg_id = -1 AND ts = ANY($2::timestamptz[])"


async def _copy_checked(pool: asyncpg.Pool, file: TradeFile) -> tuple[int, int, int, list]:
    """The exact path: PostgreSQL parses the CSV's decimals and checks each row."""
    day = (file.symbol, file.first, file.end)
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(_STAGE_SQL)
        try:
            with file.open() as csv_file:
                await conn.copy_to_table(
                    "archive_trades",
                    source=csv_file,
                    columns=list(CSV_COLUMNS),
                    format="csv",
                    header=file.header,
                    timeout=COPY_TIMEOUT_S,
                )
        except (asyncpg.DataError, zipfile.BadZipFile, EOFError, zlib.error) as exc:  # a field COPY cannot read
            raise ArchiveError(f"{file.name}: not a readable aggTrades CSV ({exc})") from exc
        total = int(await conn.fetchval("SELECT count(*) FROM archive_trades"))
        stored = int((await conn.execute(_INSERT_SQL, *day, timeout=COPY_TIMEOUT_S)).split()[-1])
        # Every row new: none refused (the common case; no second pass over the file's rows).
        valid = total if stored == total else await conn.fetchval(_VALID_COUNT_SQL, *day)
        refused = await conn.fetch(_REJECTED_SQL, *day) if valid < total else []
    return total, total - valid, stored, [tuple(r) for r in refused]


async def refresh_rollups(pool: asyncpg.Pool, day: date) -> None:
    """On the full edition, the day's trade rollups materialised (elsewhere they are views)."""
    continuous = await continuous_aggregates(pool)
    first = day_start_ms(day)
    for name in TRADE_ROLLUPS:
        if name in continuous:
            # One batch for the day: in TimescaleDB's default batches the 1-second rollup of a
            # day of one symbol took 18 s here, in one 1.4 s.
            await pool.execute(
                "CALL refresh_continuous_aggregate($1::regclass, $2::timestamptz, $3::timestamptz, "
                "options => '{\"buckets_per_batch\": 0}')",
                name,
                ms_to_datetime(first),
                ms_to_datetime(first + DAY_MS),
            )
