"""`python feed_v4_main.py status`: the state of the feed, from Redis and PostgreSQL.

What an operator asks when something looks wrong: is a daemon alive, how far behind
the exchange is each ticker (candles and indicators), are consumers keeping up with
the streams, are there holes in the M1 history, what failed recently. Exit code 0 when
healthy, 1 when not (so it works as a cron or monitoring probe); a server that cannot
be reached raises BootError, which the CLI turns into exit 2. No daemon running is
unhealthy too (exit 1), but said plainly: the verdict is STOPPED with where the data
ends, and lags are measured there, not against the wall clock (a finished replay, a
daemon stopped months ago).

I/O is a few thin async reads (one SQL statement per question, one Redis pipeline);
the lag maths, the health rules and the rendering are pure functions over the report.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import asyncpg
import orjson
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ResponseError

import core_io
import infra
from candles import TF_MS, TIMEFRAMES, datetime_to_ms, ms_to_datetime
from connections import connect_pg
from infra import (
    REDIS_RETRY_ERRORS,
    BootError,
    Settings,
    cluster_aware,
    env_number,
    format_duration,
    make_redis,
    mask_url,
)
from ops.processes import mark_gone_groups, processes_of, workers_summary
from orderflow.chain import ORDERFLOW_TIMEFRAMES
from shards.keys import use_hash_tags
from storage.detect import detect_storage_mode
from storage.modes import StorageMode

STREAMS: tuple[str, ...] = (*core_io.CANDLE_STREAMS.values(), core_io.INDICATORS_READY_STREAM, core_io.SIGNALS_STREAM)
GAP_STATUSES: tuple[str, ...] = ("missing", "backfilled", "unfillable")
PROBLEM_LEVELS: tuple[str, ...] = ("WARNING", "ERROR", "CRITICAL")

DEFAULT_MAX_LAG_S = 180.0
DEFAULT_MAX_PENDING = 10_000
GAP_MAX_AGE_S = 600.0  # a missing minute still open this long after it began is a fault
CONNECT_WAIT_S = 5.0  # status is interactive: do not sit through the daemon's whole BOOT_WAIT_S
RECENT_ERRORS = 10
OLDEST_GAPS = 10
NAMES_IN_REASON = 10
ERRORS_WINDOW_MS = 24 * 3_600_000
LEVEL_COUNT_WINDOW_MS = 3_600_000

# --------------------------------------------------------------------------- pure: time and lag maths


def local_clock_ms() -> int:
    return int(time.time() * 1000)


def iso_ms(ms: int | None) -> str | None:
    """`2025-05-16T13:44:00.000Z`: ISO 8601 UTC, what JSON consumers parse."""
    if ms is None:
        return None
    return ms_to_datetime(ms).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def lag_seconds(open_time_ms: int | None, tf: str, now_ms: int) -> float | None:
    """Seconds since the bar opened at `open_time_ms` closed, never negative.

    0 means the newest bar is the one that just closed; a steady M1 feed reads 0-60 s.
    """
    if open_time_ms is None:
        return None
    return round(max(0, now_ms - (open_time_ms + TF_MS[tf])) / 1000, 3)


def age_seconds(then_ms: int | None, now_ms: int) -> float | None:
    if then_ms is None:
        return None
    return round(max(0, now_ms - then_ms) / 1000, 3)


def bar_point(open_time_ms: int | None, tf: str, now_ms: int) -> dict[str, Any] | None:
    """A bar's open time (ms and ISO) and its lag; None when there is no bar."""
    if open_time_ms is None:
        return None
    return {
        "open_time_ms": open_time_ms,
        "open_time": iso_ms(open_time_ms),
        "lag_s": lag_seconds(open_time_ms, tf, now_ms),
    }


def _int_or_none(raw: Any) -> int | None:
    try:
        return int(raw)
    except (TypeError, ValueError):
        return None


def _float_or_none(raw: Any) -> float | None:
    try:
        return float(raw)
    except (TypeError, ValueError):
        return None


REPLAY_SKEW_MS = 6 * 3_600_000  # exchange time this far from the local clock: a replay


def choose_now(daemons: Sequence[Mapping[str, Any]], local_now_ms: int) -> tuple[int, str]:
    """The local clock for a live feed; the exchange's clock as the daemons last saw it
    when that is far from the local one (an accelerated fake exchange living months in
    the past), so lags stay right there too. A live feed that stalls keeps aging on the
    local clock instead of freezing "now" with it.
    """
    seen = [d["exchange_time_ms"] for d in daemons if d.get("exchange_time_ms")]
    if seen and abs(local_now_ms - max(seen)) > REPLAY_SKEW_MS:
        return max(seen), "exchange"
    return local_now_ms, "local"


def parse_heartbeat(key: str, fields: Mapping[str, str], local_now_ms: int) -> dict[str, Any]:
    """One daemon's heartbeat hash as report data; missing or garbled fields read as None."""
    started = _int_or_none(fields.get("started_at"))
    updated = _int_or_none(fields.get("updated_at"))
    exchange = _int_or_none(fields.get("exchange_time"))
    return {
        "key": key,
        "host": fields.get("host") or key.removeprefix(infra.HEARTBEAT_PREFIX).rpartition(":")[0],
        "pid": _int_or_none(fields.get("pid")),
        "started_at_ms": started,
        "started_at": iso_ms(started),
        "updated_at_ms": updated,
        "updated_at": iso_ms(updated),
        "age_s": age_seconds(updated, local_now_ms),
        "uptime_s": age_seconds(started, local_now_ms),
        "exchange_time_ms": exchange,
        "exchange_time": iso_ms(exchange),
        "workers": [w for w in (fields.get("workers") or "").split(",") if w],
        "candles_stored": _int_or_none(fields.get("candles_stored")),
        "indicator_bars": _int_or_none(fields.get("indicator_bars")),
        "symbols": [s for s in (fields.get("symbols") or "").split(",") if s],
        "member": fields.get("member") or None,
        "draining": fields.get("draining") == "1",
        "drain_requested": bool(fields.get(infra.DRAIN_FIELD)),
        "cpu": _float_or_none(fields.get("cpu")),
        "loop_lag_ms": _float_or_none(fields.get("loop_lag_ms")),
    }


# --------------------------------------------------------------------------- raw reads (I/O)


@dataclass(frozen=True, slots=True)
class TickerRow:
    """What PostgreSQL knows about one enabled ticker (times in ms)."""

    symbol: str
    last_open_ms: dict[str, int | None]  # tf -> newest stored open time
    open_gaps: int
    oldest_gap_ms: int | None


@dataclass(frozen=True, slots=True)
class PgState:
    tickers: list[TickerRow]
    gap_totals: dict[str, int]
    oldest_gaps: list[tuple[str, int, int | None]]  # (symbol, open time ms, detected_at ms)
    recent_errors: list[tuple[int, str, str, str]]  # (ts ms, level, module, message), newest first
    level_counts: dict[str, int]  # last hour
    not_followed: list[tuple[str, str]] = field(default_factory=list)  # (symbol, why), enabled
    skipped_instances: list[tuple[int, str, str, str]] = field(default_factory=list)  # (id, indicator, tf, why)
    orderflow: dict[str, dict[str, int | None]] = field(default_factory=dict)  # symbol -> tf -> newest bar ms
    trade_gaps: dict[str, int] = field(default_factory=dict)  # status -> count
    oldest_trade_gap: tuple[str, int] | None = None  # (symbol, open time ms) of the oldest open one


# Correlated subqueries, not GROUP BY: max(open_time) per symbol is then one backward
# probe of the primary key each, where a GROUP BY would read the whole candle table.
_TICKERS_SQL = (
    "SELECT t.symbol, "
    + ", ".join(
        f"(SELECT max(c.open_time) FROM {core_io.candle_table(tf)} c WHERE c.symbol = t.symbol) AS last_{tf}"
        for tf in TIMEFRAMES
    )
    + ", g.open_gaps, g.oldest_gap FROM tickers t "
    "CROSS JOIN LATERAL (SELECT count(*) AS open_gaps, min(m.open_time) AS oldest_gap "
    "FROM missing_m1_log_v4 m WHERE m.symbol = t.symbol AND m.status = 'missing') g "
    "WHERE t.status = 'enabled' AND t.problem IS NULL ORDER BY t.symbol"
)

_NOT_FOLLOWED_SQL = (
    "SELECT symbol, problem FROM tickers WHERE status = 'enabled' AND problem IS NOT NULL ORDER BY symbol"
)

_SKIPPED_INSTANCES_SQL = (
    "SELECT id, indicator, timeframe, error FROM indicator_instances_v4 WHERE enabled AND error IS NOT NULL ORDER BY id"
)

_GAP_TOTALS_SQL = (
    "SELECT m.status, count(*) AS n FROM missing_m1_log_v4 m "
    "JOIN tickers t ON t.symbol = m.symbol AND t.status = 'enabled' GROUP BY m.status"
)

_OLDEST_GAPS_SQL = (
    "SELECT m.symbol, m.open_time, m.detected_at FROM missing_m1_log_v4 m "
    "JOIN tickers t ON t.symbol = m.symbol AND t.status = 'enabled' "
    "WHERE m.status = 'missing' ORDER BY m.open_time, m.symbol LIMIT $1"
)

# Tickers whose trades are followed and that have order flow: newest bar per timeframe.
_ORDERFLOW_SQL = (
    "SELECT t.symbol, "
    + ", ".join(
        f"(SELECT max(open_time) FROM orderflow4 o WHERE o.symbol = t.symbol AND o.tf = '{tf}') AS last_{tf}"
        for tf in ORDERFLOW_TIMEFRAMES
    )
    + " FROM tickers t WHERE t.status = 'enabled' AND t.trades"
)

_TRADE_GAPS_SQL = (
    "SELECT status, count(*) AS n, min(open_time) FILTER (WHERE status = 'open') AS oldest, "
    "(array_agg(symbol ORDER BY open_time) FILTER (WHERE status = 'open'))[1] AS oldest_symbol "
    "FROM trade_gaps_v4 GROUP BY status"
)

_RECENT_ERRORS_SQL = (
    "SELECT ts, level, module, message FROM system_log_v4 "
    "WHERE level IN ('ERROR', 'CRITICAL') AND ts >= $1 ORDER BY ts DESC, id DESC LIMIT $2"
)

_LEVEL_COUNTS_SQL = (
    "SELECT level, count(*) AS n FROM system_log_v4 WHERE level = ANY($2::text[]) AND ts >= $1 GROUP BY level"
)


async def read_pg_state(pool: asyncpg.Pool, local_now_ms: int) -> PgState:
    """Everything status needs from PostgreSQL, on one connection. The log windows are
    on the local clock because system_log_v4.ts is written with it."""
    async with pool.acquire() as conn:
        tickers = [
            TickerRow(
                r["symbol"],
                {tf: None if r[f"last_{tf}"] is None else datetime_to_ms(r[f"last_{tf}"]) for tf in TIMEFRAMES},
                r["open_gaps"],
                None if r["oldest_gap"] is None else datetime_to_ms(r["oldest_gap"]),
            )
            for r in await conn.fetch(_TICKERS_SQL)
        ]
        totals = {r["status"]: r["n"] for r in await conn.fetch(_GAP_TOTALS_SQL)}
        oldest = [
            (r["symbol"], datetime_to_ms(r["open_time"]), datetime_to_ms(r["detected_at"]))
            for r in await conn.fetch(_OLDEST_GAPS_SQL, OLDEST_GAPS)
        ]
        errors = [
            (datetime_to_ms(r["ts"]), r["level"], r["module"], r["message"])
            for r in await conn.fetch(
                _RECENT_ERRORS_SQL, ms_to_datetime(local_now_ms - ERRORS_WINDOW_MS), RECENT_ERRORS
            )
        ]
        counts = {
            r["level"]: r["n"]
            for r in await conn.fetch(
                _LEVEL_COUNTS_SQL, ms_to_datetime(local_now_ms - LEVEL_COUNT_WINDOW_MS), list(PROBLEM_LEVELS)
            )
        }
        not_followed = [(r["symbol"], r["problem"]) for r in await conn.fetch(_NOT_FOLLOWED_SQL)]
        skipped = [
            (r["id"], r["indicator"], r["timeframe"], r["error"]) for r in await conn.fetch(_SKIPPED_INSTANCES_SQL)
        ]
        orderflow = {
            r["symbol"]: {
                tf: None if r[f"last_{tf}"] is None else datetime_to_ms(r[f"last_{tf}"]) for tf in ORDERFLOW_TIMEFRAMES
            }
            for r in await conn.fetch(_ORDERFLOW_SQL)
            if r["last_m1"] is not None
        }
        gap_rows = await conn.fetch(_TRADE_GAPS_SQL)
        trade_gaps = {r["status"]: r["n"] for r in gap_rows}
        oldest_trade_gap = next(
            ((r["oldest_symbol"], datetime_to_ms(r["oldest"])) for r in gap_rows if r["oldest"] is not None), None
        )
    return PgState(
        tickers, totals, oldest, errors, counts, not_followed, skipped, orderflow, trade_gaps, oldest_trade_gap
    )


def orderflow_summary(pg: PgState, now_ms: int) -> dict[str, Any]:
    """Per timeframe the most lagging symbol's newest bar; the trade gaps."""
    lag: dict[str, Any] = {}
    for tf in ORDERFLOW_TIMEFRAMES:
        newest = [(t, symbol) for symbol, times in pg.orderflow.items() if (t := times.get(tf)) is not None]
        worst = min(newest, default=None)
        lag[tf] = None if worst is None else {"symbol": worst[1], **(bar_point(worst[0], tf, now_ms) or {})}
    oldest = pg.oldest_trade_gap
    return {
        "tickers": len(pg.orderflow),
        "worst": lag,
        "gaps": {
            **{status: pg.trade_gaps.get(status, 0) for status in ("open", "filled", "unfillable")},
            "oldest_open": None
            if oldest is None
            else {"symbol": oldest[0], "open_time_ms": oldest[1], "open_time": iso_ms(oldest[1])},
        },
    }


def stream_info(length: Any, groups: Any, newest: Any = None) -> dict[str, Any]:
    """XLEN, XINFO GROUPS and XREVRANGE COUNT 1 replies as report data; a missing stream
    is empty, not an error. A group that was given the newest entry has no lag, whatever
    Redis says: its `lag` counter goes wrong once the stream was trimmed or recreated."""
    newest_id = core_io.stream_id(newest[0][0]) if isinstance(newest, list) and newest else None
    info: dict[str, Any] = {"length": 0, "groups": {}}
    problems = [r for r in (length, groups) if isinstance(r, Exception) and "no such key" not in str(r).lower()]
    if problems:
        info["error"] = str(problems[0])
    if isinstance(length, int):
        info["length"] = length
    if isinstance(groups, list):
        for group in groups:
            delivered = group.get("last-delivered-id")
            caught_up = newest_id is not None and delivered and core_io.stream_id(delivered) >= newest_id
            info["groups"][str(group["name"])] = {
                "pending": int(group.get("pending") or 0),
                "lag": 0 if caught_up else group.get("lag"),  # None when the server cannot tell
                "consumers": int(group.get("consumers") or 0),
                "last_delivered_id": group.get("last-delivered-id"),
            }
    return info


async def read_redis_state(
    redis: Redis, symbols: Sequence[str]
) -> tuple[dict[str, dict[str, Any]], dict[tuple[str, str], int | None]]:
    """Stream lengths and groups plus each ticker's newest indicator bar, one pipeline."""
    pipe = redis.pipeline(transaction=False)
    for stream in STREAMS:
        pipe.xlen(stream)
        pipe.xinfo_groups(stream)
        pipe.xrevrange(stream, count=1)
    keys = [(symbol, tf) for symbol in symbols for tf in TIMEFRAMES]
    for symbol, tf in keys:
        pipe.hget(core_io.indicator_key(symbol, tf), "open_time")
    replies = await pipe.execute(raise_on_error=False)
    streams = {stream: stream_info(*replies[3 * i : 3 * i + 3]) for i, stream in enumerate(STREAMS)}
    tail = replies[3 * len(STREAMS) :]
    indicators = {key: None if isinstance(raw, Exception) else _int_or_none(raw) for key, raw in zip(keys, tail)}
    return streams, indicators


# --------------------------------------------------------------------------- pure: the report


def build_report(
    *,
    heartbeats: Mapping[str, Mapping[str, str]],
    pg: PgState,
    streams: Mapping[str, dict[str, Any]],
    indicator_times: Mapping[tuple[str, str], int | None],
    local_now_ms: int,
    now_ms: int | None = None,
    max_lag_s: float = DEFAULT_MAX_LAG_S,
    max_pending: int = DEFAULT_MAX_PENDING,
    storage: StorageMode | None = None,
) -> dict[str, Any]:
    """Assemble the JSON-ready report (times as ms and ISO), health verdict included."""
    daemons = [parse_heartbeat(key, fields, local_now_ms) for key, fields in sorted(heartbeats.items())]
    closes = [t + TF_MS["m1"] for row in pg.tickers if (t := row.last_open_ms.get("m1")) is not None]
    data_end = max(closes, default=None)
    if now_ms is None and not daemons and data_end is not None:
        # No daemon: nothing moves the data on, so lags are measured against where the
        # data ends (a replay that finished, a daemon stopped months ago) and the verdict
        # says that no daemon runs, not that every ticker is months behind.
        now_ms, source = data_end, "data end"
    elif now_ms is None:
        now_ms, source = choose_now(daemons, local_now_ms)
        if source == "exchange" and data_end is not None:  # the heartbeat is up to a beat old:
            now_ms = max(now_ms, data_end)  # a stored close proves a later now
    else:
        source = "given"
    tickers = []
    for row in pg.tickers:
        ticker: dict[str, Any] = {"symbol": row.symbol}
        for tf in TIMEFRAMES:
            ticker[tf] = bar_point(row.last_open_ms.get(tf), tf, now_ms)
        ticker["indicators"] = {tf: bar_point(indicator_times.get((row.symbol, tf)), tf, now_ms) for tf in TIMEFRAMES}
        ticker["open_gaps"] = row.open_gaps
        ticker["oldest_gap"] = (
            None
            if row.oldest_gap_ms is None
            else {
                "open_time_ms": row.oldest_gap_ms,
                "open_time": iso_ms(row.oldest_gap_ms),
                "age_s": age_seconds(row.oldest_gap_ms, now_ms),
            }
        )
        tickers.append(ticker)
    tickers.sort(key=ticker_sort_key)
    report: dict[str, Any] = {
        "now_ms": now_ms,
        "now": iso_ms(now_ms),
        "now_source": source,
        "state": "running" if daemons else "stopped",
        "storage_mode": storage.mode if storage else None,
        "storage": storage.as_json() if storage else None,
        "data_end_ms": data_end,
        "data_end": iso_ms(data_end),
        "data_end_age_s": age_seconds(data_end, local_now_ms),
        "local_now_ms": local_now_ms,
        "local_now": iso_ms(local_now_ms),
        "healthy": True,
        "unhealthy": [],
        "thresholds": {"max_lag_s": max_lag_s, "max_pending": max_pending, "max_gap_age_s": GAP_MAX_AGE_S},
        "daemons": daemons,
        "processes": processes_of(daemons, tickers),
        "tickers": tickers,
        "streams": mark_gone_groups(streams, daemons),
        "gaps": {
            **{status: pg.gap_totals.get(status, 0) for status in GAP_STATUSES},
            "oldest_missing": [
                {
                    "symbol": symbol,
                    "open_time_ms": open_ms,
                    "open_time": iso_ms(open_ms),
                    "age_s": age_seconds(open_ms, now_ms),
                    "detected_at": iso_ms(detected_ms),
                }
                for symbol, open_ms, detected_ms in pg.oldest_gaps
            ],
        },
        "orderflow": orderflow_summary(pg, now_ms),
        "not_followed": [{"symbol": symbol, "problem": problem} for symbol, problem in pg.not_followed],
        "skipped_instances": [
            {"id": iid, "indicator": indicator, "timeframe": tf, "error": error}
            for iid, indicator, tf, error in pg.skipped_instances
        ],
        "errors": {
            "recent": [
                {"ts_ms": ts, "ts": iso_ms(ts), "level": level, "module": module, "message": message}
                for ts, level, module, message in pg.recent_errors
            ],
            "last_hour": {level: pg.level_counts.get(level, 0) for level in PROBLEM_LEVELS},
        },
    }
    report["unhealthy"] = unhealthy_reasons(report, max_lag_s, max_pending)
    report["healthy"] = not report["unhealthy"]
    report["warnings"] = warnings(report)
    return report


def warnings(report: Mapping[str, Any]) -> list[str]:
    """Configuration the daemon runs without (it is healthy, but not doing all it was
    asked): enabled tickers it cannot follow, indicator instances it skips."""
    out = []
    if report["not_followed"]:
        named = [t["symbol"] for t in report["not_followed"]]
        out.append(f"{len(named)} enabled ticker(s) not followed (see NOT FOLLOWED): {_names(named)}")
    if report["skipped_instances"]:
        named = [f"{i['id']} {i['indicator']} {i['timeframe']}" for i in report["skipped_instances"]]
        out.append(f"{len(named)} indicator instance(s) skipped (see SKIPPED INSTANCES): {_names(named)}")
    return out


def stopped_reason(report: Mapping[str, Any]) -> str:
    """No daemon alive, said plainly: where the data ends and how long ago (on the local
    clock), rather than as a lag of every ticker."""
    reason = "no live heartbeat: no daemon is running (or none can reach Redis)"
    end, age = report.get("data_end_ms"), report.get("data_end_age_s")
    if end is None:
        return reason + "; no M1 candle stored"
    return f"{reason}; data ends at {format_time(end)[:16]} UTC ({format_ago(age)})"


def format_ago(seconds: float | None) -> str:
    """`3 days ago`, `5h12m ago`, `just now`."""
    if seconds is None:
        return "-"
    if seconds >= 2 * 86_400:
        return f"{int(seconds // 86_400)} days ago"
    if seconds < 1:
        return "just now"
    return f"{format_duration(seconds)} ago"


def ticker_sort_key(ticker: Mapping[str, Any]) -> tuple[int, float, str]:
    """Worst first: no M1 at all, then the largest M1 lag; ties by symbol."""
    m1 = ticker.get("m1")
    if m1 is None:
        return (0, 0.0, ticker["symbol"])
    return (1, -m1["lag_s"], ticker["symbol"])


def _names(items: Sequence[str], limit: int = NAMES_IN_REASON) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" (+{len(items) - limit} more)" if len(items) > limit else "")


def unhealthy_reasons(report: Mapping[str, Any], max_lag_s: float, max_pending: int) -> list[str]:
    """Why the system is unhealthy, one human line per kind of fault; [] when healthy.

    Symbols are named (the worst first, up to ten a line) so 500 stale tickers make
    one readable line instead of 500.
    """
    reasons: list[str] = []
    if not report["daemons"]:
        reasons.append(stopped_reason(report))
    tickers = report["tickers"]
    no_m1 = sorted(t["symbol"] for t in tickers if t["m1"] is None)
    if no_m1:
        reasons.append(f"{len(no_m1)} enabled ticker(s) with no M1 candle stored: {_names(no_m1)}")
    stale = sorted(
        ((t["m1"]["lag_s"], t["symbol"]) for t in tickers if t["m1"] is not None and t["m1"]["lag_s"] > max_lag_s),
        key=lambda item: (-item[0], item[1]),
    )
    if stale:
        named = [f"{symbol} {format_duration(lag)}" for lag, symbol in stale]
        reasons.append(f"{len(stale)} ticker(s) with M1 lag above {max_lag_s:g} s: {_names(named)}")
    old_gaps = sorted(
        (
            (t["oldest_gap"]["open_time_ms"], t["symbol"])
            for t in tickers
            if t["oldest_gap"] is not None and t["oldest_gap"]["age_s"] > GAP_MAX_AGE_S
        ),
    )
    if old_gaps:
        named = [f"{symbol} since {format_clock(ms, report['now_ms'])}" for ms, symbol in old_gaps]
        limit = f"{GAP_MAX_AGE_S / 60:g} min"
        reasons.append(f"{len(old_gaps)} ticker(s) with a missing M1 open for more than {limit}: {_names(named)}")
    for stream, info in report["streams"].items():
        if info.get("error"):
            reasons.append(f"stream {stream} cannot be read: {info['error']}")
        for group, state in info["groups"].items():
            if state["pending"] > max_pending and not state.get("gone"):
                reasons.append(f"stream {stream} group {group}: {state['pending']} pending (limit {max_pending})")
    critical = report["errors"]["last_hour"].get("CRITICAL", 0)
    if critical:
        reasons.append(f"{critical} CRITICAL event(s) in system_log_v4 in the last hour")
    return reasons


# --------------------------------------------------------------------------- pure: rendering

_GREEN, _RED, _YELLOW, _BOLD, _RESET = "\033[32m", "\033[31m", "\033[33m", "\033[1m", "\033[0m"


def format_clock(ms: int | None, now_ms: int) -> str:
    """HH:MM for a time on `now`'s UTC day, MM-DD HH:MM otherwise, YYYY-MM-DD HH:MM another year."""
    if ms is None:
        return "-"
    moment, now = ms_to_datetime(ms), ms_to_datetime(now_ms)
    if moment.date() == now.date():
        return moment.strftime("%H:%M")
    if moment.year == now.year:
        return moment.strftime("%m-%d %H:%M")
    return moment.strftime("%Y-%m-%d %H:%M")


def format_time(ms: int | None) -> str:
    return "-" if ms is None else ms_to_datetime(ms).strftime("%Y-%m-%d %H:%M:%S")


def _paint(text: str, code: str, colour: bool) -> str:
    return f"{code}{text}{_RESET}" if colour and code else text


def render_table(
    headers: Sequence[str], rows: Sequence[Sequence[Any]], paint: Sequence[Sequence[str]] = ()
) -> list[str]:
    """Left-aligned columns sized to their widest cell; `paint` holds an ANSI code per
    cell (or "") applied after padding so colour never shifts the alignment."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    for index, row in enumerate(cells):
        codes = paint[index] if index < len(paint) else ()
        parts = []
        for col, (cell, width) in enumerate(zip(row, widths)):
            padded = cell.ljust(width)
            code = codes[col] if col < len(codes) else ""
            parts.append(f"{code}{padded}{_RESET}" if code else padded)
        lines.append("  ".join(parts).rstrip())
    return lines


def render_status(report: Mapping[str, Any], colour: bool) -> str:
    """The report for a terminal: verdict first, then tickers (worst first), streams,
    gaps and errors. Colour only when asked (a TTY), never in pipes or logs."""
    now_ms = report["now_ms"]
    max_lag = report["thresholds"]["max_lag_s"]
    clock = {
        "exchange": "exchange clock",
        "local": "local clock, no exchange time",
        "given": "given",
        "data end": "where the data ends: no daemon running",
    }
    if report["healthy"]:
        verdict = _paint("HEALTHY", _GREEN + _BOLD, colour)
    elif report.get("state") == "stopped":
        verdict = _paint("STOPPED (no daemon running)", _RED + _BOLD, colour)
    else:
        verdict = _paint("UNHEALTHY", _RED + _BOLD, colour)
    out = [f"feed_v4 status: {verdict}"]
    out += [_paint(f"  - {reason}", _RED, colour) for reason in report["unhealthy"]]
    out += [_paint(f"  ! {warning}", _YELLOW, colour) for warning in report["warnings"]]
    out += [
        f"now      {format_time(now_ms)} UTC ({clock.get(report['now_source'], report['now_source'])})",
        f"daemons  {len(report['daemons'])} alive",
    ]
    if storage := report.get("storage"):
        out.append(f"storage  {StorageMode(**storage).describe()}")
    if report.get("state") == "stopped":
        end = report.get("data_end_ms")
        out.append(
            "data     none stored"
            if end is None
            else f"data     ends {format_time(end)} UTC "
            f"({format_ago(report.get('data_end_age_s'))}; lags below are measured there)"
        )

    if report["daemons"]:
        out += ["", "DAEMONS (CPU: share of one core; LOOP: event-loop lag; M1 LAG: its worst symbol's)"]
        rows = [
            [
                f"{d['host']}:{d['pid']}" + (" (draining)" if p["draining"] else ""),
                format_duration(d["age_s"]),
                format_duration(d["uptime_s"]),
                format_time(d["exchange_time_ms"]),
                workers_summary(d["workers"]),
                "-" if d["candles_stored"] is None else d["candles_stored"],
                "-" if d["indicator_bars"] is None else d["indicator_bars"],
                len(d["symbols"]),
                "-" if d["cpu"] is None else f"{d['cpu']:.0%}",
                "-" if d["loop_lag_ms"] is None else f"{d['loop_lag_ms']:.0f} ms",
                format_duration(p["m1_lag_s"]),
            ]
            for d, p in zip(report["daemons"], report["processes"], strict=True)
        ]
        out += render_table(
            [
                "HOST:PID",
                "BEAT",
                "UPTIME",
                "EXCHANGE TIME",
                "WORKERS",
                "M1 STORED",
                "IND BARS",
                "SYMBOLS",
                "CPU",
                "LOOP",
                "M1 LAG",
            ],
            rows,
        )

    tickers = report["tickers"]
    out += ["", f"TICKERS ({len(tickers)} enabled, worst M1 lag first; lag = time since the newest bar closed)"]
    if tickers:
        rows, paint = [], []
        for t in tickers:
            row: list[Any] = [t["symbol"]]
            codes = [""]
            for tf in TIMEFRAMES:
                point = t[tf]
                row += [
                    format_clock(point and point["open_time_ms"], now_ms),
                    format_duration(point and point["lag_s"]),
                ]
                bad = tf == "m1" and (point is None or point["lag_s"] > max_lag)
                codes += ["", _RED if colour and bad else ""]
            row.append("/".join(format_duration(p and p["lag_s"]) for p in t["indicators"].values()))
            gap = t["oldest_gap"]
            row += [t["open_gaps"], format_clock(gap["open_time_ms"], now_ms) if gap else "-"]
            codes += ["", _YELLOW if colour and t["open_gaps"] else "", ""]
            rows.append(row)
            paint.append(codes)
        headers = ["SYMBOL", *(h for tf in TIMEFRAMES for h in (tf.upper(), "LAG")), f"IND LAG {'/'.join(TIMEFRAMES)}"]
        headers += ["GAPS", "OLDEST GAP"]
        out += render_table(headers, rows, paint)
    else:
        out.append("  no enabled ticker in `tickers` (set SYMBOLS or enable rows)")

    if report["not_followed"]:
        out += ["", "NOT FOLLOWED (enabled in `tickers`, but the feed cannot follow them)"]
        out += render_table(["SYMBOL", "WHY"], [[t["symbol"], t["problem"]] for t in report["not_followed"]])
    if report["skipped_instances"]:
        out += ["", "SKIPPED INSTANCES (indicator_instances_v4 rows that do not run)"]
        rows = [[i["id"], i["indicator"], i["timeframe"], _one_line(i["error"])] for i in report["skipped_instances"]]
        out += render_table(["ID", "INDICATOR", "TF", "WHY"], rows)

    out += ["", "STREAMS"]
    rows = []
    for stream, info in report["streams"].items():
        length = info["length"] if "error" not in info else f"error: {info['error']}"
        if not info["groups"]:
            rows.append([stream, length, "-", "", "", ""])
        for group, state in info["groups"].items():
            lag = "-" if state["lag"] is None else state["lag"]
            name = f"{group} (gone)" if state.get("gone") else group
            rows.append([stream, length, name, state["pending"], lag, state["consumers"]])
            stream, length = "", ""  # name the stream once
    out += render_table(["STREAM", "LENGTH", "GROUP", "PENDING", "LAG", "CONSUMERS"], rows)

    flow = report["orderflow"]
    out += ["", f"ORDER FLOW ({flow['tickers']} tickers with order flow; the most lagging symbol per timeframe)"]
    if flow["tickers"]:
        worst = [
            f"{tf} {p['symbol']} {format_clock(p['open_time_ms'], now_ms)} lag {format_duration(p['lag_s'])}"
            for tf, p in flow["worst"].items()
            if p is not None
        ]
        out.append("  " + "   ".join(worst))
    trade_gaps = flow["gaps"]
    counts = "  ".join(f"{k} {trade_gaps[k]}" for k in ("open", "filled", "unfillable"))
    line = f"  trade gaps (trade_gaps_v4): {counts}"
    if trade_gaps["oldest_open"]:
        oldest_open = trade_gaps["oldest_open"]
        line += f"; oldest open: {oldest_open['symbol']} {format_clock(oldest_open['open_time_ms'], now_ms)}"
    out.append(line)

    gaps = report["gaps"]
    out += ["", "GAPS (missing_m1_log_v4, enabled tickers)"]
    out.append("  " + "  ".join(f"{status} {gaps[status]}" for status in GAP_STATUSES))
    if gaps["oldest_missing"]:
        oldest = ", ".join(f"{g['symbol']} {format_clock(g['open_time_ms'], now_ms)}" for g in gaps["oldest_missing"])
        out.append(f"  oldest missing: {oldest}")

    errors = report["errors"]
    counts = "  ".join(f"{level} {n}" for level, n in errors["last_hour"].items())
    out += ["", f"ERRORS (last hour: {counts})"]
    if errors["recent"]:
        rows = [[format_time(e["ts_ms"]), e["level"], e["module"], _one_line(e["message"])] for e in errors["recent"]]
        paint = [["", _RED if colour else "", "", ""] for _ in rows]
        out += render_table(["TIME (UTC)", "LEVEL", "MODULE", "MESSAGE (newest first, last 24 h)"], rows, paint)
    else:
        out.append("  no ERROR or CRITICAL in the last 24 h")
    return "\n".join(out) + "\n"


def _one_line(message: str, limit: int = 160) -> str:
    text = " ".join(message.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def report_json(report: Mapping[str, Any]) -> str:
    return orjson.dumps(report, option=orjson.OPT_INDENT_2).decode()


# --------------------------------------------------------------------------- I/O entry points


async def collect_status(
    pool: asyncpg.Pool,
    redis: Redis,
    now_ms: int | None = None,
    *,
    local_now_ms: int | None = None,
    max_lag_s: float = DEFAULT_MAX_LAG_S,
    max_pending: int = DEFAULT_MAX_PENDING,
) -> dict[str, Any]:
    """Read PostgreSQL and Redis (heartbeats in parallel with SQL, then one pipeline)
    and build the report. `now_ms` defaults to the newest exchange time a heartbeat
    carries, else the local clock."""
    local_now_ms = local_clock_ms() if local_now_ms is None else local_now_ms
    try:
        async with asyncio.TaskGroup() as group:  # a failure of one cancels the other
            heartbeats_task = group.create_task(infra.read_heartbeats(redis))
            pg_task = group.create_task(read_pg_state(pool, local_now_ms))
            storage_task = group.create_task(detect_storage_mode(pool))
    except ExceptionGroup as failed:
        raise failed.exceptions[0] from None
    heartbeats, pg = heartbeats_task.result(), pg_task.result()
    streams, indicator_times = await read_redis_state(redis, [t.symbol for t in pg.tickers])
    return build_report(
        heartbeats=heartbeats,
        pg=pg,
        streams=streams,
        indicator_times=indicator_times,
        local_now_ms=local_now_ms,
        now_ms=now_ms,
        max_lag_s=max_lag_s,
        max_pending=max_pending,
        storage=storage_task.result(),
    )


def status_thresholds(env: Mapping[str, str]) -> tuple[float, int]:
    """STATUS_MAX_LAG_S (default 180) and STATUS_MAX_PENDING (default 10000); ConfigError if bad."""
    max_lag_s = env_number(env, "STATUS_MAX_LAG_S", DEFAULT_MAX_LAG_S, float, 1.0, 30 * 86_400.0)
    max_pending = env_number(env, "STATUS_MAX_PENDING", DEFAULT_MAX_PENDING, int, 0, 1_000_000_000)
    return max_lag_s, max_pending


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="feed_v4_main.py status",
        description=(
            "Print the state of feed_v4 from Redis and PostgreSQL: daemons (heartbeats), per-ticker "
            "M1/M5/M15 and indicator lag, stream lengths and pending entries, missing minutes, recent errors. "
            "Exit 0 when healthy, 1 when unhealthy, 2 when a server cannot be reached."
        ),
        epilog=(
            f"Environment: STATUS_MAX_LAG_S (default {DEFAULT_MAX_LAG_S:g}) M1 lag above which a ticker is stale; "
            f"STATUS_MAX_PENDING (default {DEFAULT_MAX_PENDING}) pending entries above which a consumer group "
            "is behind."
        ),
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON (times as ms and ISO UTC)")
    return parser


async def _ping_redis(redis: Redis, url: str) -> None:
    try:
        await redis.ping()
    except (*REDIS_RETRY_ERRORS, ResponseError) as exc:
        raise BootError(
            f"Redis at {mask_url(url)} unreachable ({type(exc).__name__}: {exc}): "
            "check REDIS_URL or run `make services`"
        ) from None


async def run_status(settings: Settings, argv: list[str], env: Mapping[str, str] | None = None) -> int:
    """The `status` command: 0 healthy, 1 unhealthy (2 for bad arguments); BootError
    and ConfigError propagate for the CLI to report."""
    args = list(argv)
    if args[:1] == ["status"]:
        args = args[1:]
    try:
        options = _parser().parse_args(args)
    except SystemExit as exit_:  # --help prints and exits 0; a bad option prints usage and exits 2
        return int(exit_.code or 0)
    max_lag_s, max_pending = status_thresholds(os.environ if env is None else env)
    quick = replace(settings, boot_wait_s=min(settings.boot_wait_s, CONNECT_WAIT_S))
    # JIT only adds compile time to these short index probes.
    pool = await connect_pg(quick, min_size=1, max_size=2, server_settings={"jit": "off"})
    redis: Redis | RedisCluster = make_redis(settings.redis_url)
    try:
        await _ping_redis(redis, settings.redis_url)
        redis = await cluster_aware(redis, settings.redis_url)
        use_hash_tags(isinstance(redis, RedisCluster) or settings.redis_hash_tags)
        report = await collect_status(pool, redis, max_lag_s=max_lag_s, max_pending=max_pending)
    except (asyncpg.UndefinedTableError, asyncpg.UndefinedColumnError) as exc:
        raise BootError(
            f"PostgreSQL at {mask_url(settings.postgres_url)} has no feed_v4 schema, or an older one ({exc}): "
            "run `python feed_v4_main.py migrate` (or start the daemon once)"
        ) from None
    finally:
        await redis.aclose()
        await pool.close()
    if options.json:
        print(report_json(report))
    else:
        colour = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
        print(render_status(report, colour), end="")
    return 0 if report["healthy"] else 1
