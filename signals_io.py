"""Reads and writes of the signal router: the routing tables, the signal log, the
per-strategy streams. Thin, batched operations; the decisions come from
`signals_logic`, the loop around them lives in `signals_v4_main`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import asyncpg
from redis.asyncio import Redis

from signals_logic import (
    REASON_REPEAT,
    Decision,
    Delivery,
    RoutingSnapshot,
    as_duplicate,
    build_snapshot,
    datetime_to_ms,
    ms_to_datetime,
)

CONFIG_CHANNEL = "feed_v4_config"
STRATEGY_STREAM_PREFIX = "strategy_signals:"
DELIVERED_MARK_PREFIX = "strategy_signals:sent:"


def strategy_stream(strategy_id: int) -> str:
    """The Redis Stream a strategy reads its routed signals from."""
    return f"{STRATEGY_STREAM_PREFIX}{strategy_id}"


def delivered_mark(delivery: Delivery) -> str:
    """Key whose presence says this log row went out; the uid guards against a log id
    reused after the table was truncated with RESTART IDENTITY."""
    return f"{DELIVERED_MARK_PREFIX}{delivery.log_id}:{delivery.uid[:16]}"


# --------------------------------------------------------------------------- routing tables


async def load_snapshot(pool: asyncpg.Pool, timeout: float) -> RoutingSnapshot:
    """The four routing tables read in one repeatable-read transaction (one instant)."""
    async with pool.acquire(timeout=timeout) as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        tickers = await conn.fetch("SELECT symbol, status FROM tickers", timeout=timeout)
        phrases = await conn.fetch("SELECT id, phrase, action, enabled FROM signal_phrases", timeout=timeout)
        strategies = await conn.fetch("SELECT id, name, enabled, archived, allow_open FROM strategies", timeout=timeout)
        mappings = await conn.fetch("SELECT strategy_id, phrase_id FROM strategy_signals", timeout=timeout)
    return build_snapshot(
        [tuple(r) for r in tickers],
        [tuple(r) for r in phrases],
        [tuple(r) for r in strategies],
        [tuple(r) for r in mappings],
    )


# --------------------------------------------------------------------------- the signal log

# Log ids are drawn in stream order, but the rows go in in uid order: two routers whose
# batches share uids (repeats of one signal read by both) then wait for each other in one
# direction only, instead of deadlocking when they hold the shared uids in opposite
# orders (PostgreSQL would break that after deadlock_timeout, stalling both routers).
_INSERT_LOG_SQL = """
    WITH u AS (
        SELECT *
        FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[], $6::timestamptz[],
                    $7::text[], $8::text[], $9::text[], $10::text[])
             WITH ORDINALITY AS u(uid, symbol, message, action, bar_time, sent_at, status, reason, raw, stream_id, n)
    ), numbered AS (
        SELECT nextval('signals_v2_log_id_seq') AS id, s.*
        FROM (SELECT * FROM u ORDER BY n) s
    )
    INSERT INTO signals_v2_log
        (id, uid, symbol, message, action, bar_time, sent_at, status, reason, raw, stream_id)
    SELECT id, uid, symbol, message, action, bar_time, sent_at, status, reason, raw::jsonb, stream_id
    FROM numbered
    ORDER BY uid, n
    ON CONFLICT DO NOTHING
    RETURNING id, stream_id
"""

_LOGGED_ENTRIES_SQL = """
    SELECT l.stream_id, l.id, l.status
    FROM unnest($1::text[], $2::text[]) AS k(stream_id, uid)
    JOIN signals_v2_log l ON l.stream_id = k.stream_id AND l.uid = k.uid
"""

_NEW_ROWS_SQL = "SELECT uid, id FROM signals_v2_log WHERE status = 'new' AND uid = ANY($1::text[])"

_INSERT_ENTRIES_SQL = """
    INSERT INTO signal_log_entries_v2 (log_id, strategy_id, status, note)
    SELECT * FROM unnest($1::bigint[], $2::integer[], $3::text[], $4::text[])
"""

_PENDING_DELIVERIES_SQL = """
    SELECT l.id, l.uid, l.symbol, l.message, l.action, l.bar_time, l.sent_at,
           array_agg(e.strategy_id ORDER BY e.strategy_id) AS strategy_ids
    FROM signals_v2_log l
    JOIN signal_log_entries_v2 e ON e.log_id = l.id AND e.status = 'delivered'
    WHERE l.id = ANY($1::bigint[]) AND l.status = 'new'
    GROUP BY l.id
"""

_MARK_FAILED_SQL = """
    UPDATE signal_log_entries_v2 e SET status = 'failed', note = f.note
    FROM unnest($1::bigint[], $2::integer[], $3::text[]) AS f(log_id, strategy_id, note)
    WHERE e.log_id = f.log_id AND e.strategy_id = f.strategy_id AND e.status = 'delivered'
"""

# Rows that conflicted are either already logged (this very entry, seen again) or lost
# the uid race; a few passes settle even rows racing several routers at once.
_MAX_PASSES = 4


@dataclass
class BatchLog:
    """What one committed batch amounts to.

    `rows` maps each entry id to (log id, final status); `replayed` holds the entries
    that were already logged before this batch (their rows are not new); `deliveries`
    are the 'new' signals to send: this batch's and, for replayed entries, the earlier
    ones (the delivery mark keeps a signal already sent from going out twice).
    """

    rows: dict[str, tuple[int, str]] = field(default_factory=dict)
    replayed: set[str] = field(default_factory=set)
    deliveries: list[Delivery] = field(default_factory=list)


def _log_columns(decisions: Sequence[Decision]) -> list[list]:
    return [
        [d.uid for d in decisions],
        [d.symbol for d in decisions],
        [d.message for d in decisions],
        [d.action for d in decisions],
        [None if d.bar_time_ms is None else ms_to_datetime(d.bar_time_ms) for d in decisions],
        [None if d.sent_at_ms is None else ms_to_datetime(d.sent_at_ms) for d in decisions],
        [d.status for d in decisions],
        [d.reason for d in decisions],
        [d.raw for d in decisions],
        [d.entry_id for d in decisions],
    ]


async def commit_batch(pool: asyncpg.Pool, decisions: Sequence[Decision], timeout: float) -> BatchLog:
    """Log a batch in ONE transaction: the signals_v2_log rows (the partial unique index
    on uid decides which entry is 'new', also against other routers), and for each new
    row its signal_log_entries_v2 rows ('delivered' = to be sent before the entry is
    acknowledged, or 'skipped'). Nothing is sent here."""
    result = BatchLog()
    if not decisions:
        return result
    async with pool.acquire(timeout=timeout) as conn, conn.transaction():
        # Repeats within the batch wait for the first pass, so they can name the row
        # they repeat.
        held = [d for d in decisions if d.status == "duplicate"]
        todo = [d for d in decisions if d.status != "duplicate"]
        for _ in range(_MAX_PASSES):
            inserted: dict[str, int] = {}
            if todo:
                rows = await conn.fetch(_INSERT_LOG_SQL, *_log_columns(todo), timeout=timeout)
                inserted = {r["stream_id"]: r["id"] for r in rows}
            for d in todo:
                if d.entry_id in inserted:
                    result.rows[d.entry_id] = (inserted[d.entry_id], d.status)
            fresh = [d for d in todo if d.entry_id in inserted and d.status == "new"]
            await _insert_targets(conn, fresh, inserted, timeout)
            result.deliveries += [_delivery(inserted[d.entry_id], d) for d in fresh if d.deliveries]
            todo = [d for d in todo if d.entry_id not in inserted] + held
            held = []
            if not todo:
                break
            # A conflict means either this very entry is logged already (seen again) ...
            logged = await conn.fetch(
                _LOGGED_ENTRIES_SQL, [d.entry_id for d in todo], [d.uid for d in todo], timeout=timeout
            )
            for r in logged:
                result.rows[r["stream_id"]] = (r["id"], r["status"])
                result.replayed.add(r["stream_id"])
            todo = [d for d in todo if d.entry_id not in result.replayed]
            if not todo:
                break
            # ... or another entry with the uid was logged 'new' first: a duplicate.
            new_ids = dict(await conn.fetch(_NEW_ROWS_SQL, [d.uid for d in todo], timeout=timeout))
            todo = [
                as_duplicate(d, f"{REASON_REPEAT} {new_ids[d.uid]}")
                if d.status != "ignored" and d.uid in new_ids
                else d
                for d in todo
            ]
        else:
            raise RuntimeError(f"{len(todo)} signal log rows still conflicting after {_MAX_PASSES} passes")
        replayed_new = [result.rows[e][0] for e in result.replayed if result.rows[e][1] == "new"]
        if replayed_new:
            rows = await conn.fetch(_PENDING_DELIVERIES_SQL, replayed_new, timeout=timeout)
            result.deliveries += [_delivery_from_row(r) for r in rows]
    return result


def _as_repeat(d: Decision, new_ids: dict[str, int]) -> Decision:
    if d.status != "ignored" and d.uid in new_ids:
        return as_duplicate(d, f"{REASON_REPEAT} {new_ids[d.uid]}")
    return d  # no 'new' row for the uid after all (deleted meanwhile): try again as is


async def _insert_targets(conn: asyncpg.Connection, fresh: Sequence[Decision], ids: dict[str, int], timeout: float):
    targets = [(ids[d.entry_id], t) for d in fresh for t in d.targets]
    if targets:
        await conn.execute(
            _INSERT_ENTRIES_SQL,
            [log_id for log_id, _ in targets],
            [t.strategy_id for _, t in targets],
            [t.status for _, t in targets],
            [t.note for _, t in targets],
            timeout=timeout,
        )


def _delivery(log_id: int, d: Decision) -> Delivery:
    return Delivery(log_id, d.uid, d.symbol, d.message, d.action, d.bar_time_ms, d.sent_at_ms, d.deliveries)


def _delivery_from_row(r: asyncpg.Record) -> Delivery:
    return Delivery(
        r["id"],
        r["uid"],
        r["symbol"],
        r["message"],
        r["action"],
        datetime_to_ms(r["bar_time"]),
        datetime_to_ms(r["sent_at"]),
        tuple(r["strategy_ids"]),
    )


async def mark_failed(pool: asyncpg.Pool, failures: Iterable[tuple[int, int, str]], timeout: float) -> None:
    """(log id, strategy id, error) of deliveries Redis refused -> status 'failed'."""
    failures = list(failures)
    if failures:
        await pool.execute(
            _MARK_FAILED_SQL,
            [f[0] for f in failures],
            [f[1] for f in failures],
            [f[2][:500] for f in failures],
            timeout=timeout,
        )


# --------------------------------------------------------------------------- delivery

# For each signal: SET its delivery mark NX; only if that succeeds, XADD it to each
# strategy's stream. The script runs atomically, so a signal goes out completely or
# not at all, and a second attempt (a redelivered entry, a retried call whose reply was
# lost, a second router) finds the mark and sends nothing.
# KEYS: per signal, its mark then its target streams.
# ARGV: maxlen, mark ttl (ms), signal count; per signal: target count, field count,
#       the field/value pairs, then the strategy id of each target.
# Returns per signal {sent (1/0), error or '' per target}.
DELIVER_LUA = """
local maxlen, ttl, count = ARGV[1], ARGV[2], tonumber(ARGV[3])
local k, a = 1, 4
local results = {}
for s = 1, count do
    local targets, nfields = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
    local fields = {}
    for i = 1, nfields * 2 do fields[i] = ARGV[a + 1 + i] end
    a = a + 2 + nfields * 2
    local result = {0}
    if redis.call('SET', KEYS[k], '1', 'NX', 'PX', ttl) then
        result[1] = 1
        for t = 1, targets do
            local reply = redis.pcall('XADD', KEYS[k + t], 'MAXLEN', '~', maxlen, '*',
                                      'strategy_id', ARGV[a + t - 1], unpack(fields))
            if type(reply) == 'table' and reply.err then result[t + 1] = reply.err else result[t + 1] = '' end
        end
    end
    k = k + 1 + targets
    a = a + targets
    results[s] = result
end
return results
"""


@dataclass
class DeliveryReport:
    sent: int = 0  # stream entries written
    already: int = 0  # signals whose mark was there: sent before
    failures: list[tuple[int, int, str]] = field(default_factory=list)  # (log id, strategy id, error)


class Deliverer:
    """Writes routed signals to `strategy_signals:<strategy_id>` (one script call per chunk)."""

    CHUNK = 500  # signals per script call: bounds how long Redis is busy with one call

    def __init__(self, redis: Redis, maxlen: int, mark_ttl_ms: int) -> None:
        self.redis = redis
        self.maxlen = maxlen
        self.mark_ttl_ms = mark_ttl_ms
        self._script = redis.register_script(DELIVER_LUA)

    async def deliver(self, deliveries: Sequence[Delivery]) -> DeliveryReport:
        report = DeliveryReport()
        for start in range(0, len(deliveries), self.CHUNK):
            chunk = [d for d in deliveries[start : start + self.CHUNK] if d.strategy_ids]
            if not chunk:
                continue
            keys: list[str] = []
            args: list[str | int] = [self.maxlen, self.mark_ttl_ms, len(chunk)]
            for d in chunk:
                fields = d.fields()
                keys.append(delivered_mark(d))
                keys += [strategy_stream(sid) for sid in d.strategy_ids]
                args += [len(d.strategy_ids), len(fields)]
                for name, value in fields.items():
                    args += [name, value]
                args += list(d.strategy_ids)
            replies = await self._script(keys=keys, args=args)
            for d, reply in zip(chunk, replies):
                if not int(reply[0]):
                    report.already += 1
                    continue
                for sid, error in zip(d.strategy_ids, reply[1:]):
                    error = error.decode("utf-8", "replace") if isinstance(error, bytes) else error
                    if error:
                        report.failures.append((d.log_id, sid, error))
                    else:
                        report.sent += 1
        return report


# --------------------------------------------------------------------------- the incoming stream

RawEntry = tuple[str, dict[bytes, bytes]]  # (entry id, fields as Redis gave them)


def _entries(reply) -> list[RawEntry]:
    out: list[RawEntry] = []
    for _stream, entries in reply or []:
        for entry_id, fields in entries:
            out.append((entry_id.decode() if isinstance(entry_id, bytes) else entry_id, fields or {}))
    return out


async def read_own_pending(redis: Redis, stream: str, group: str, consumer: str, count: int) -> list[RawEntry]:
    """Entries this consumer read earlier and never acknowledged (XREADGROUP ... 0).

    An entry trimmed from the stream meanwhile comes back with no fields.
    """
    return _entries(await redis.xreadgroup(group, consumer, {stream: "0"}, count=count))
