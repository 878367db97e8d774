"""`feed-v4 tickers list|add|enable|disable|check`: the I/O around ops/tickers.py.

Exit codes: 0 done; 1 a symbol was refused (the others were applied) or, for `check`, an
enabled ticker cannot be followed (or none is enabled); 2 the exchange or PostgreSQL
cannot be reached (one line on stderr; `--no-check` skips the exchange).
Every change is one `system_log_v4` row (module TICKERS), written before the command exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import Sequence
from typing import Any, TextIO

import aiohttp
import asyncpg
import orjson

from binance.rest import RestClient, RestError, WeightLimiter
from binance.symbols import suggestion
from candles import datetime_to_ms
from connections import connect_pg, wait_for_schema
from infra import Settings, mask_url, system_event_log
from ops import tickers as t

EXIT_REFUSED = 1
EXIT_UNREACHABLE = 2
EXCHANGE_TIMEOUT_S = 20.0
LOG_FLUSH_TIMEOUT_S = 5.0

ROWS_SQL = """
    SELECT t.symbol, t.status, t.source, t.trades, t.book_ticker, t.depth, t.footprint_row::text AS footprint_row,
           t.problem, t.problem_at, t.updated_at,
           (SELECT max(m.open_time) FROM ohlcv4_m1 m WHERE m.symbol = t.symbol) AS newest_m1
    FROM tickers t
    ORDER BY t.symbol
"""
ADD_SQL = """
    INSERT INTO tickers (symbol, status, source) SELECT unnest($1::text[]), 'enabled', $2
    ON CONFLICT (symbol) DO NOTHING
    RETURNING symbol
"""
ENABLE_SQL = """
    INSERT INTO tickers (symbol, status, source) SELECT unnest($1::text[]), 'enabled', $2
    ON CONFLICT (symbol) DO UPDATE SET status = 'enabled', source = $2, updated_at = now()
        WHERE tickers.status <> 'enabled'
    RETURNING symbol
"""
DISABLE_SQL = """
    UPDATE tickers SET status = 'disabled', source = $2, updated_at = now()
    WHERE symbol = ANY($1::text[]) AND status <> 'disabled'
    RETURNING symbol
"""


class Unreachable(Exception):
    """The exchange or PostgreSQL cannot be used: one line, exit 2."""


def _ms(value: Any) -> int | None:
    return None if value is None else datetime_to_ms(value)


def _row(record: asyncpg.Record) -> t.Row:
    return t.Row(
        symbol=record["symbol"],
        status=record["status"],
        source=record["source"],
        trades=record["trades"],
        book_ticker=record["book_ticker"],
        depth=record["depth"],
        footprint_row=record["footprint_row"],
        problem=record["problem"],
        problem_at_ms=_ms(record["problem_at"]),
        updated_at_ms=_ms(record["updated_at"]),
        newest_m1_ms=_ms(record["newest_m1"]),
    )


async def read_rows(conn: asyncpg.Pool | asyncpg.Connection) -> list[t.Row]:
    return [_row(r) for r in await conn.fetch(ROWS_SQL)]


async def fetch_listing(settings: Settings, hint: str) -> dict[str, t.Listed]:
    """The exchange's listing through the daemon's REST client (weight limiter included),
    two attempts; Unreachable with `hint` when it cannot be read."""
    rest = RestClient(settings.binance_rest_url, WeightLimiter(2400, 60.0), attempts=2)
    where = f"{mask_url(settings.binance_rest_url)}/fapi/v1/exchangeInfo"
    try:
        payload = await asyncio.wait_for(rest.exchange_info(), EXCHANGE_TIMEOUT_S)
        return t.parse_exchange_info(payload)
    except (RestError, aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise Unreachable(f"cannot read the exchange's listing ({where}): {reason}; {hint}") from None
    finally:
        await rest.close()


async def open_pool(settings: Settings) -> asyncpg.Pool:
    pool = await connect_pg(settings, min_size=1, max_size=2)
    try:
        await wait_for_schema(pool, 0.0)  # a schema not migrated yet: one line, exit 2
    except BaseException:
        await pool.close()
        raise
    return pool


def _print(lines: Sequence[str], stream: TextIO) -> None:
    for line in lines:
        print(line, file=stream)


def _safe_streams() -> None:
    """A terminal whose encoding cannot show a name (a non-ASCII symbol under LANG=C on
    an old system) gets escapes, never a crash."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(errors="backslashreplace")  # type: ignore[union-attr]


async def run_tickers(settings: Settings, args: argparse.Namespace) -> int:
    _safe_streams()
    try:
        if args.action == "list":
            return await run_list(settings, args.json)
        if args.action == "check":
            return await run_check(settings, args.json)
        return await run_change(settings, args.action, args.symbols, not getattr(args, "no_check", False))
    except Unreachable as exc:
        print(f"feed_v4: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE


async def run_list(settings: Settings, as_json: bool) -> int:
    pool = await open_pool(settings)
    try:
        rows = await read_rows(pool)
    finally:
        await pool.close()
    if as_json:
        print(orjson.dumps([r.as_json() for r in rows], option=orjson.OPT_INDENT_2).decode())
    else:
        _print(t.list_lines(rows), sys.stdout)
    return 0


async def run_check(settings: Settings, as_json: bool) -> int:
    listing = await fetch_listing(settings, "`feed-v4 tickers list` shows the table without asking the exchange")
    pool = await open_pool(settings)
    try:
        rows = await read_rows(pool)
    finally:
        await pool.close()
    results = t.check_results(rows, listing)
    ok = bool(results) and all(r.ok for r in results)
    disabled = sum(r.status != "enabled" for r in rows)
    if as_json:
        report = {"ok": ok, "enabled": len(results), "disabled": disabled, "tickers": [r.as_json() for r in results]}
        print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
    else:
        _print(t.check_lines(results, disabled), sys.stdout)
    return 0 if ok else EXIT_REFUSED


async def run_change(settings: Settings, action: str, typed: Sequence[str], check: bool) -> int:
    """add / enable / disable: every SYMBOL judged on its own; the good ones applied in
    one statement, the others refused with their reason (exit 1)."""
    listing: dict[str, t.Listed] | None = None
    if action != "disable" and check:
        listing = await fetch_listing(settings, "rerun with --no-check to skip the exchange check")
    pool = await open_pool(settings)
    try:
        outcomes, warnings, enabled_left = await _apply(pool, settings, action, typed, listing)
        changed = [o for o in outcomes if o.what in ("added", "enabled", "disabled")]
        if changed or any(o.refused for o in outcomes):
            system_event_log.record(
                "INFO",
                "TICKERS",
                f"tickers {action} (CLI): "
                + (", ".join(o.name or "" for o in changed) if changed else "nothing changed")
                + (f"; {sum(o.refused for o in outcomes)} refused" if any(o.refused for o in outcomes) else ""),
                {
                    "action": action,
                    "checked": listing is not None,
                    "changed": [o.name for o in changed],
                    "refused": {t.shown(o.typed): o.detail for o in outcomes if o.refused},
                },
            )
            with contextlib.suppress(Exception):
                await asyncio.wait_for(system_event_log.flush(pool), LOG_FLUSH_TIMEOUT_S)
    finally:
        await pool.close()
    _print(t.change_lines(outcomes), sys.stdout)
    if changed:
        print("a running daemon picks the change up within TICKER_REFRESH_S (default 5 s)")
    _print(warnings, sys.stderr)
    if enabled_left == 0:
        print(f"warning: no ticker is enabled: the daemon follows nothing; {t.HOW_TO_ADD}", file=sys.stderr)
    return EXIT_REFUSED if any(o.refused for o in outcomes) else 0


async def _apply(
    pool: asyncpg.Pool,
    settings: Settings,
    action: str,
    typed: Sequence[str],
    listing: dict[str, t.Listed] | None,
) -> tuple[list[t.Outcome], list[str], int]:
    async with pool.acquire() as conn, conn.transaction():
        existing = {
            r["symbol"]: (r["status"], r["source"])
            for r in await conn.fetch("SELECT symbol, status, source FROM tickers")
        }
        verdicts: list[t.Verdict] = []
        for item in dict.fromkeys(typed):  # a symbol given twice is judged once
            if action == "disable":
                verdict = t.judge_name(item, existing)
                if verdict.ok and verdict.name not in existing:
                    hint = suggestion(verdict.name or "", existing)
                    verdict = t.Verdict(
                        item,
                        None,
                        "not in tickers"
                        + (f" (did you mean {hint}?)" if hint else "; `feed-v4 tickers list` shows them"),
                    )
            elif listing is None:
                verdict = t.judge_name(item)
            else:
                verdict = t.judge(item, listing)
            verdicts.append(verdict)
        names = list(dict.fromkeys(v.name for v in verdicts if v.name))
        sql = {"add": ADD_SQL, "enable": ENABLE_SQL, "disable": DISABLE_SQL}[action]
        changed = {r["symbol"] for r in await conn.fetch(sql, names, t.CLI_SOURCE)} if names else set()
        enabled_left = await conn.fetchval("SELECT count(*) FROM tickers WHERE status = 'enabled'")
    outcomes = []
    seen: set[str] = set()
    for v in verdicts:
        if v.name is None:
            outcomes.append(t.Outcome(v.typed, None, "refused", v.reason))
            continue
        if v.name in seen:
            continue
        seen.add(v.name)
        before = existing.get(v.name, (None, None))[0]
        if v.name in changed:
            what = {"add": "added", "enable": "added" if before is None else "enabled", "disable": "disabled"}[action]
        elif action == "add" and before == "disabled":
            outcomes.append(
                t.Outcome(
                    v.typed,
                    v.name,
                    "already in tickers, disabled",
                    f"`feed-v4 tickers enable {t.shown(v.name)}` enables it",
                )
            )
            continue
        else:
            what = f"already {before}"
        outcomes.append(t.Outcome(v.typed, v.name, what, v.note))
    warnings = []
    if action == "disable":
        disabled = [o.name for o in outcomes if o.name and not o.refused]
        warnings = t.disable_warnings(disabled, {s: src for s, (_, src) in existing.items()}, settings.symbols)
    return outcomes, warnings, enabled_left
