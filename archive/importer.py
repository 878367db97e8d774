"""`feed-v4 import`: Binance's daily archive files into PostgreSQL, resumable and idempotent.

Per file: its `.CHECKSUM` first (a file already taken in with the same sha256 is skipped
without downloading it), then the zip, verified, parsed and checked row by row; its rows
go in with one COPY into a temporary table and one upsert from it (an identical row
changes nothing); the day's M5/M15 are built again (from the file, PostgreSQL filling in); the gap
log's rows for its minutes become 'backfilled'; last, the file is recorded in
`archive_imports_v4`. A stop anywhere leaves the file unrecorded, and the next run does
it again, changing nothing that is already right.

Consumers hear of it once a symbol's files are done: the candles within the Redis
cache's window are cached and announced as any backfill is (`history=1`); of older
changes, one `history=1` event per series for its oldest changed bar, from which the
indicator worker rewrites the series (one correction, not one per candle: a month is
43,200 minutes a symbol, more than the streams keep).
"""

from __future__ import annotations

import asyncio
import io
import logging
import operator
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import aiohttp
import asyncpg
from redis.asyncio import Redis

import core_io
from aggregation import AGGREGATED_TFS, SOURCE_TF, affected_buckets, bucket_parts
from aggregation_io import Bucket, build_buckets
from archive.files import (
    KINDS,
    ArchiveError,
    csv_rows,
    daily_path,
    day_start_ms,
    days,
    file_name,
    kline_candles,
    verify,
)
from archive.progress import ImportProgress
from archive.trades import refresh_rollups, store_trades
from candles import TF_MS, TIMEFRAMES, Candle, datetime_to_ms, ms_to_datetime
from infra import log_system_event
from orderflow.history import rebuild_days

log = logging.getLogger("IMPORT")

MODULE = "IMPORT"
DEFAULT_SOURCE = "https://data.binance.vision"
REJECTED_SHOWN = 3  # reasons quoted in the log line of a file with refused rows

_STAGE_SQL = (
    "CREATE TEMP TABLE IF NOT EXISTS archive_m1 (symbol text, t int8, "
    + ", ".join(f"{c} {'integer' if c == 'trades' else 'numeric'}" for c in core_io.CANDLE_COLUMNS)
    + ") ON COMMIT DELETE ROWS"
)
_COLUMNS = ", ".join(core_io.CANDLE_COLUMNS)
_UPSERT_SQL = (
    f"INSERT INTO ohlcv4_m1 (symbol, open_time, {_COLUMNS}) "
    f"SELECT symbol, 'epoch'::timestamptz + t * interval '1 millisecond', {_COLUMNS} FROM archive_m1 "
    f"{core_io.update_if_changed_sql('ohlcv4_m1', core_io.CANDLE_COLUMNS)} "
    "RETURNING (extract(epoch FROM open_time) * 1000)::int8 AS t, (xmax = 0) AS inserted"
)
_FIELDS = operator.attrgetter(*core_io.CANDLE_COLUMNS)  # a candle's values in the staging table's order
# The gap log's rows of the file's span whose minute is stored now (a stored candle wins).
_SETTLE_GAPS_SQL = (
    "UPDATE missing_m1_log_v4 g SET status = 'backfilled', fixed_at = now() "
    "WHERE g.symbol = $1 AND g.open_time >= $2 AND g.open_time <= $3 AND g.status <> 'backfilled' "
    "AND EXISTS (SELECT 1 FROM ohlcv4_m1 c WHERE c.symbol = g.symbol AND c.open_time = g.open_time)"
)
_RECORD_SQL = (
    "INSERT INTO archive_imports_v4 (kind, symbol, day, sha256, rows, rejected, changed) "
    "VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (kind, symbol, day) DO UPDATE SET sha256 = EXCLUDED.sha256, "
    "rows = EXCLUDED.rows, rejected = EXCLUDED.rejected, changed = EXCLUDED.changed, imported_at = now()"
)


class ArchiveReader:
    """The archive's files by path, from a base URL (data.binance.vision or a mirror) or a
    folder laid out the same way. None: no such file (HTTP 404)."""

    def __init__(self, source: str, timeout_s: float = 120.0) -> None:
        self.source = source.rstrip("/")
        self.remote = source.startswith(("http://", "https://"))
        self.timeout_s = timeout_s
        self._session: aiohttp.ClientSession | None = None

    async def read(self, path: str) -> bytes | None:
        if not self.remote:
            file = Path(self.source) / path
            return await asyncio.to_thread(file.read_bytes) if file.is_file() else None
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s))
        async with self._session.get(f"{self.source}/{path}") as response:
            if response.status == 404:
                return None
            if response.status != 200:
                raise ArchiveError(f"{path}: HTTP {response.status}")
            return await response.read()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


@dataclass
class FileOutcome:
    symbol: str
    day: date
    status: str  # imported, skipped (same sha256 already in), absent (no such file), failed
    rows: int = 0
    rejected: int = 0
    changed: int = 0
    size: int = 0
    reason: str = ""


@dataclass
class Announcements:
    """What a symbol's files changed, told to consumers once the symbol is done."""

    changed: dict[str, dict[int, Candle]] = field(default_factory=lambda: defaultdict(dict))

    def add(self, candles: Sequence[Candle]) -> None:
        for candle in candles:
            self.changed[candle.tf][candle.open_time] = candle


class Importer:
    def __init__(
        self,
        pool: asyncpg.Pool,
        redis: Redis,
        store: core_io.CandleStore,
        reader: ArchiveReader,
        cache_bars: int,
        stream_maxlen: int,
    ) -> None:
        self.pool, self.redis, self.store, self.reader = pool, redis, store, reader
        self.cache_bars, self.maxlen = cache_bars, stream_maxlen

    async def run(
        self, kind: str, symbols: Sequence[str], first: date, last: date, progress: ImportProgress | None = None
    ) -> list[FileOutcome]:
        if kind not in KINDS:
            raise ValueError(f"unknown archive kind {kind!r}: one of {', '.join(KINDS)}")
        outcomes: list[FileOutcome] = []
        for symbol in symbols:
            told = Announcements()
            traded: list[date] = []
            for day in days(first, last):
                if kind == "klines":
                    outcome = await self.import_file(symbol, day, told)
                else:
                    outcome = await self.import_trades(symbol, day)
                    if outcome.status == "imported":
                        traded.append(day)
                outcomes.append(outcome)
                if progress is not None:
                    progress.file_done(outcome.rows, outcome.size)
            await self.announce(symbol, told)
            for run in contiguous(traded):
                await self.rebuild_order_flow(symbol, run)
        if any(o.status == "imported" for o in outcomes):
            # Fresh planner statistics after a bulk load: without them the newest 1,000 M1
            # of a symbol were read by a sequential scan (25 ms, not 1 ms, after a month).
            tables = ", ".join(map(core_io.candle_table, TIMEFRAMES)) if kind == "klines" else "agg_trades4"
            await self.pool.execute(f"ANALYZE {tables}")
        return outcomes

    async def fetch_verified(self, kind: str, symbol: str, day: date) -> tuple[bytes, str] | FileOutcome:
        """The file and its sha256, checked against its `.CHECKSUM`; or why there is nothing
        to do (absent, skipped: the same sha256 is in already). ArchiveError: not usable."""
        path = daily_path(kind, symbol, day)
        name = file_name(kind, symbol, day)
        checksum = await self.reader.read(path + ".CHECKSUM")
        if checksum is None:
            if await self.reader.read(path) is None:
                return FileOutcome(symbol, day, "absent")
            raise ArchiveError(f"{name} has no .CHECKSUM: not verified, not imported")
        checksum_text = checksum.decode("ascii", "replace")
        expected = checksum_text.split()[0:1]
        done = await self.pool.fetchval(
            "SELECT sha256 FROM archive_imports_v4 WHERE kind = $1 AND symbol = $2 AND day = $3", kind, symbol, day
        )
        if expected and done == expected[0].lower():
            return FileOutcome(symbol, day, "skipped")
        data = await self.reader.read(path)
        if data is None:
            raise ArchiveError(f"{name}: its .CHECKSUM is there but the file is not")
        return data, verify(data, checksum_text, name)

    async def import_file(self, symbol: str, day: date, told: Announcements) -> FileOutcome:
        """One daily klines file; every failure is this file's alone."""
        name = file_name("klines", symbol, day)
        try:
            fetched = await self.fetch_verified("klines", symbol, day)
            if isinstance(fetched, FileOutcome):
                return fetched
            data, digest = fetched
            rejected: list[str] = []
            candles = kline_candles(symbol, day, csv_rows(data, name), rejected)
        except (ArchiveError, aiohttp.ClientError, TimeoutError, OSError) as exc:
            return _failed(symbol, day, name, exc)
        _log_refused(name, symbol, day, len(rejected), len(candles), rejected)
        changed = await self.store_m1(symbol, candles)
        buckets = await self.buckets_of(symbol, candles)
        changed_buckets = {(s, tf, t) for s, tf, t in await core_io.upsert_candles(self.pool, buckets)}
        told.add([c for c in candles if c.open_time in changed])
        told.add([b for b in buckets if (b.symbol, b.tf, b.open_time) in changed_buckets])
        if candles:
            first = ms_to_datetime(candles[0].open_time)
            await self.pool.execute(_SETTLE_GAPS_SQL, symbol, first, ms_to_datetime(candles[-1].open_time))
        count = len(changed) + len(changed_buckets)
        await self.pool.execute(_RECORD_SQL, "klines", symbol, day, digest, len(candles), len(rejected), count)
        return FileOutcome(symbol, day, "imported", len(candles), len(rejected), count, len(data))

    async def import_trades(self, symbol: str, day: date) -> FileOutcome:
        """One daily aggTrades file into the raw trades (archive/trades.py)."""
        name = file_name("aggTrades", symbol, day)
        try:
            fetched = await self.fetch_verified("aggTrades", symbol, day)
            if isinstance(fetched, FileOutcome):
                return fetched
            data, digest = fetched
            rows, refused, stored, examples = await store_trades(self.pool, symbol, day, data, name)
        except (ArchiveError, aiohttp.ClientError, TimeoutError, OSError) as exc:
            return _failed(symbol, day, name, exc)
        _log_refused(name, symbol, day, refused, rows - refused, examples)
        await refresh_rollups(self.pool, day)
        await self.pool.execute(_RECORD_SQL, "aggTrades", symbol, day, digest, rows - refused, refused, stored)
        return FileOutcome(symbol, day, "imported", rows - refused, refused, stored, len(data))

    async def rebuild_order_flow(self, symbol: str, run: list[date]) -> None:
        """The order flow of imported days, from their trades (orderflow/history.py)."""
        rebuilt = await rebuild_days(self.pool, self.redis, symbol, [day_start_ms(d) for d in run], self.maxlen)
        log_system_event(
            "WARNING" if rebuilt.refused else "INFO",
            MODULE,
            f"{symbol} {run[0]}..{run[-1]}: order flow rebuilt from the archive's trades: {rebuilt.minutes} minutes, "
            f"{rebuilt.bars} bars, {rebuilt.gaps_filled} gaps filled"
            + (f", {rebuilt.refused} minutes not written (no kline stored, or trades that disagree with it)"
               if rebuilt.refused else ""),
            {"symbol": symbol, "minutes": rebuilt.minutes, "refused": rebuilt.refused},
        )  # fmt: skip

    async def buckets_of(self, symbol: str, candles: Sequence[Candle]) -> list[Candle]:
        """The M5/M15 (and higher) buckets of the file's minutes: from the file where it
        holds all of a bucket's minutes (a whole day does), else from PostgreSQL (a minute
        only the feed had, or one REST and the archive never had)."""
        by_time = {c.open_time: c for c in candles}

        def in_file(bucket: Bucket, built: dict[Bucket, Candle]) -> list[Candle] | None:
            _, tf, start = bucket
            source = SOURCE_TF[tf]
            parts = [
                by_time.get(t) if source == "m1" else built.get((symbol, source, t)) for t in bucket_parts(tf, start)
            ]
            return parts if all(parts) else None  # type: ignore[return-value]

        return await build_buckets(self.pool, affected_buckets((symbol, c.open_time) for c in candles), in_file)

    async def store_m1(self, symbol: str, candles: Sequence[Candle]) -> set[int]:
        """COPY into a temporary table, one upsert from it: the open times new or changed."""
        text = "".join(f"{symbol},{c.open_time},{','.join(map(str, _FIELDS(c)))}\n" for c in candles)
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(_STAGE_SQL)
            await conn.copy_to_table("archive_m1", source=io.BytesIO(text.encode()), format="csv")
            rows = await conn.fetch(_UPSERT_SQL)
        replaced = sum(not r["inserted"] for r in rows)
        if replaced:
            log_system_event(
                "WARNING",
                MODULE,
                f"{symbol}: {replaced} stored M1 candles differed from the archive's and were replaced",
                {"symbol": symbol, "replaced": replaced},
            )
        return {r["t"] for r in rows}

    async def announce(self, symbol: str, told: Announcements) -> None:
        """Recent changes cached and announced; of older ones, the oldest per series."""
        for tf in ("m1", *AGGREGATED_TFS):
            changed = told.changed.get(tf)
            if not changed:
                continue
            newest = await self.pool.fetchval(
                f"SELECT max(open_time) FROM {core_io.candle_table(tf)} WHERE symbol = $1", symbol
            )
            horizon = datetime_to_ms(newest) - self.cache_bars * TF_MS[tf]
            recent = [changed[t] for t in sorted(changed) if t > horizon]
            older = [t for t in changed if t <= horizon]
            if recent:
                await core_io.publish_candles(self.store, self.redis, [(tf, core_io.HistoryBatch(recent))], self.maxlen)
            if older:
                event = core_io.announced_event(changed[min(older)], history=True)
                await core_io.publish(self.redis, core_io.candle_stream(tf), [event], self.maxlen)


def contiguous(sorted_days: Sequence[date]) -> list[list[date]]:
    """Runs of consecutive days."""
    runs: list[list[date]] = []
    for day in sorted_days:
        if runs and (day - runs[-1][-1]).days == 1:
            runs[-1].append(day)
        else:
            runs.append([day])
    return runs


def _log_refused(name: str, symbol: str, day: date, refused: int, kept: int, examples: Sequence[object]) -> None:
    """One WARNING a file for the rows it refused, a few quoted (the others are kept)."""
    if refused:
        quoted = [str(example) for example in examples[:REJECTED_SHOWN]]
        log_system_event(
            "WARNING",
            MODULE,
            f"{name}: {refused} rows refused, the other {kept} imported: " + "; ".join(quoted),
            {"symbol": symbol, "day": str(day), "refused": refused, "examples": [str(e) for e in examples[:100]]},
        )


def _failed(symbol: str, day: date, name: str, exc: BaseException) -> FileOutcome:
    reason = str(exc) if isinstance(exc, ArchiveError) else f"{name}: {exc!r}"
    log_system_event("ERROR", MODULE, f"not imported: {reason}", {"symbol": symbol, "day": str(day)})
    return FileOutcome(symbol, day, "failed", reason=reason)


def summarize(outcomes: Sequence[FileOutcome], elapsed_s: float) -> str:
    counts: dict[str, int] = defaultdict(int)
    for outcome in outcomes:
        counts[outcome.status] += 1
    rows = sum(o.rows for o in outcomes)
    size = sum(o.size for o in outcomes)
    parts = ", ".join(f"{counts[s]} {s}" for s in ("imported", "skipped", "absent", "failed") if counts[s])
    rate = rows / elapsed_s if elapsed_s > 0 else 0.0
    return (
        f"import done: {len(outcomes)} files ({parts or 'none'}), {rows:,} rows, {size / 1e6:.1f} MB "
        f"in {elapsed_s:.1f} s ({rate:,.0f} rows/s)"
    )
