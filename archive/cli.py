"""`feed-v4 import`: the shell around archive.importer (connections, symbols, exit code)."""

from __future__ import annotations

import argparse
import time

import core_io
from archive.files import days
from archive.importer import ArchiveReader, Importer, log, summarize
from archive.progress import ImportProgress
from binance.protocol import valid_symbol
from connections import connect_pg, connect_redis, wait_for_schema
from infra import BootError, Settings, log_system_event, system_event_log
from ops.progress import progress_mode


async def run_import(settings: Settings, args: argparse.Namespace) -> int:
    if args.last < args.first:
        raise BootError(f"--to {args.last} is before --from {args.first}")
    bad = [s for s in args.symbols or () if not valid_symbol(s)]
    if bad:
        raise BootError(f"not a symbol Binance could list: {', '.join(bad)}")
    mode = progress_mode()
    pool = await connect_pg(settings)
    try:
        redis, use_ts = await connect_redis(settings)
        reader = ArchiveReader(args.source)
        try:
            await wait_for_schema(pool, settings.boot_wait_s)
            symbols = args.symbols or await core_io.enabled_symbols(pool)
            if not symbols:
                raise BootError("no symbol given and no ticker enabled: pass --symbols A,B")
            store = core_io.make_candle_store(redis, use_ts, settings.redis_candles)
            importer = Importer(pool, redis, store, reader, settings.redis_candles, settings.stream_maxlen)
            progress = ImportProgress(len(symbols) * len(days(args.first, args.last)), log, mode)
            started = time.monotonic()
            try:
                outcomes = await importer.run(args.kind, symbols, args.first, args.last, progress)
            finally:
                progress.close()
            text = summarize(outcomes, time.monotonic() - started)
            failed = [o for o in outcomes if o.status == "failed"]
            log_system_event("WARNING" if failed else "INFO", "IMPORT", text, {"source": args.source})
            print(text)
            for outcome in failed:
                print(f"failed: {outcome.symbol} {outcome.day}: {outcome.reason}")
            return 1 if failed else 0
        finally:
            await reader.close()
            await redis.aclose()
    finally:
        await system_event_log.flush(pool)
        await pool.close()
