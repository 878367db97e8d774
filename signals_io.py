"""Reads and writes of the signal router: the routing tables, the signal log, the
per-strategy streams, and the incoming stream (read through a script that cuts every
entry inside Redis and bounds each batch in bytes; waited on by write notification).
Thin, batched operations; the decisions come from `signals_logic`, the loop around
them lives in `signals_v4_main`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import asyncpg
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError, ResponseError

import core_io
from signals_logic import (
    NO_CUTS,
    READ_EXTRA_FIELDS,
    READ_MESSAGE_BYTES,
    READ_NAME_BYTES,
    READ_VALUE_BYTES,
    REASON_REPEAT,
    REQUIRED_FIELDS,
    Cuts,
    Decision,
    Delivery,
    RoutingSnapshot,
    as_duplicate,
    build_snapshot,
    datetime_to_ms,
    ms_to_datetime,
)

log = logging.getLogger("SIGNALS")

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


def delivered_marks(delivery: Delivery, clustered: bool) -> list[str]:
    """The marks of a delivery: one per signal on a single Redis; on a Redis Cluster one
    per target, hash-tagged with the target stream's name so that it shares the stream's
    slot (`strategy_signals:sent:{strategy_signals:7}:<log id>:<uid>`): a script may
    then set the mark and write the stream together, atomically."""
    if not clustered:
        return [delivered_mark(delivery)]
    return [
        f"{DELIVERED_MARK_PREFIX}{{{strategy_stream(sid)}}}:{delivery.log_id}:{delivery.uid[:16]}"
        for sid in delivery.strategy_ids
    ]


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
    SELECT l.id, l.uid, l.symbol, l.message, l.action, l.bar_time, l.sent_at, l.delivered_at,
           array_agg(e.strategy_id ORDER BY e.strategy_id) AS strategy_ids
    FROM signals_v2_log l
    JOIN signal_log_entries_v2 e ON e.log_id = l.id AND e.status = 'delivered'
    WHERE l.id = ANY($1::bigint[]) AND l.status = 'new'
    GROUP BY l.id
"""

# After the delivery script: the deliveries Redis refused become 'failed', and the rows
# are recorded as sent (delivered_at), in one statement.
_RECORD_DELIVERIES_SQL = """
    WITH failed AS (
        UPDATE signal_log_entries_v2 e SET status = 'failed', note = f.note
        FROM unnest($2::bigint[], $3::integer[], $4::text[]) AS f(log_id, strategy_id, note)
        WHERE e.log_id = f.log_id AND e.strategy_id = f.strategy_id AND e.status = 'delivered'
    )
    UPDATE signals_v2_log SET delivered_at = now() WHERE id = ANY($1::bigint[]) AND delivered_at IS NULL
"""
# The same without failures (the usual case), as ONE simple-protocol round trip: the ids
# are integers, written into the text.
_RECORD_SENT_SQL = (
    "BEGIN; SET LOCAL synchronous_commit TO off; "
    "UPDATE signals_v2_log SET delivered_at = now() WHERE id = ANY('{{{ids}}}'::bigint[]) AND delivered_at IS NULL; "
    "COMMIT"
)

# Rows that conflicted are either already logged (this very entry, seen again) or lost
# the uid race; a few passes settle even rows racing several routers at once.
_MAX_PASSES = 4


@dataclass
class BatchLog:
    """What one committed batch amounts to.

    `rows` maps each entry id to (log id, final status); `replayed` holds the entries
    that were already logged before this batch (their rows are not new); `deliveries`
    are the 'new' signals to send: this batch's and, for replayed entries, the earlier
    ones not yet recorded as sent (the delivery mark keeps a signal that went out just
    before a crash from going out twice); `recorded` are replayed signals PostgreSQL
    already records as sent: never sent again, only their marks get their expiry.
    """

    rows: dict[str, tuple[int, str]] = field(default_factory=dict)
    replayed: set[str] = field(default_factory=set)
    deliveries: list[Delivery] = field(default_factory=list)
    recorded: list[Delivery] = field(default_factory=list)


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
            for r in await conn.fetch(_PENDING_DELIVERIES_SQL, replayed_new, timeout=timeout):
                (result.deliveries if r["delivered_at"] is None else result.recorded).append(_delivery_from_row(r))
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


async def record_deliveries(
    pool: asyncpg.Pool, log_ids: Iterable[int], failures: Iterable[tuple[int, int, str]], timeout: float
) -> None:
    """After the delivery script ran: the rows `log_ids` went out (delivered_at), and the
    (log id, strategy id, error) deliveries Redis refused are 'failed'. A replayed entry
    whose row is recorded is never sent again, whatever Redis holds.

    Committed without waiting for the WAL flush (synchronous_commit off: this update of
    up to a batch of wide rows costs a flush of several milliseconds, on the path of every
    batch). The next batch's commit flushes it; should PostgreSQL crash before (at most
    wal_writer_delay after the last batch), the record is lost but nothing else is: the
    entries were acknowledged right after it and their marks guard the signals for
    SIGNAL_MARK_TTL_S, as before this record existed; a crash of the router before that
    acknowledgement leaves the marks without expiry.
    """
    log_ids = [int(log_id) for log_id in log_ids]
    failures = list(failures)
    if not log_ids and not failures:
        return
    async with pool.acquire(timeout=timeout) as conn:
        if not failures:
            await conn.execute(_RECORD_SENT_SQL.format(ids=",".join(map(str, log_ids))), timeout=timeout)
            return
        async with conn.transaction():
            await conn.execute("SET LOCAL synchronous_commit TO off", timeout=timeout)
            await conn.execute(
                _RECORD_DELIVERIES_SQL,
                log_ids,
                [f[0] for f in failures],
                [f[1] for f in failures],
                [f[2][:500] for f in failures],
                timeout=timeout,
            )


# --------------------------------------------------------------------------- delivery

# For each signal: SET its delivery mark NX; only if that succeeds, XADD it to each
# strategy's stream. The script runs atomically, so a signal goes out completely or
# not at all, and a second attempt (a redelivered entry, a retried call whose reply was
# lost, a second router) finds the mark and sends nothing. The mark is set without an
# expiry: it gets one (`settle`) only once PostgreSQL records the row as sent, so a crash
# in between leaves it in place however long the router stays down.
# KEYS: per signal, its mark then its target streams.
# ARGV: maxlen, signal count; per signal: target count, field count, the field/value
#       pairs, then the strategy id of each target.
# Returns per signal {sent (1/0), error or '' per target}.
DELIVER_LUA = """
local maxlen, count = ARGV[1], tonumber(ARGV[2])
local k, a = 1, 3
local results = {}
for s = 1, count do
    local targets, nfields = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
    local fields = {}
    for i = 1, nfields * 2 do fields[i] = ARGV[a + 1 + i] end
    a = a + 2 + nfields * 2
    local result = {0}
    if redis.call('SET', KEYS[k], '1', 'NX') then
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


# The same for one signal and one target, on a Redis Cluster (the mark is in the
# target stream's slot). KEYS: the mark, the stream. ARGV: maxlen, the field/value pairs.
# 1 sent, 0 sent before, or the error XADD gave.
DELIVER_ONE_LUA = """
if not redis.call('SET', KEYS[1], '1', 'NX') then return 0 end
local reply = redis.pcall('XADD', KEYS[2], 'MAXLEN', '~', ARGV[1], '*', unpack(ARGV, 2))
if type(reply) == 'table' and reply.err then return reply.err end
return 1
"""


@dataclass
class DeliveryReport:
    sent: int = 0  # stream entries written
    already: int = 0  # signals whose mark was there: sent before
    failures: list[tuple[int, int, str]] = field(default_factory=list)  # (log id, strategy id, error)


class Deliverer:
    """Writes routed signals to `strategy_signals:<strategy_id>` (one script call per chunk)."""

    CHUNK = 500  # signals per script call: bounds how long Redis is busy with one call

    def __init__(self, redis: Redis | RedisCluster, maxlen: int) -> None:
        self.redis = redis
        self.maxlen = maxlen
        self._script = redis.register_script(DELIVER_LUA)

    async def deliver(self, deliveries: Sequence[Delivery]) -> DeliveryReport:
        if isinstance(self.redis, RedisCluster):
            return await self._deliver_apart(deliveries)
        report = DeliveryReport()
        for start in range(0, len(deliveries), self.CHUNK):
            chunk = [d for d in deliveries[start : start + self.CHUNK] if d.strategy_ids]
            if not chunk:
                continue
            keys: list[str] = []
            args: list[str | int] = [self.maxlen, len(chunk)]
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

    async def _deliver_apart(self, deliveries: Sequence[Delivery]) -> DeliveryReport:
        """On a cluster: each (signal, target) its own script in the target's slot, all
        in one round split by node. Exactly once per target, as on a single Redis; a
        signal is `already` sent when every target's mark was there."""
        report = DeliveryReport()
        commands: list[list] = []
        for d in deliveries:
            fields = [item for pair in d.fields().items() for item in pair]
            for sid, mark in zip(d.strategy_ids, delivered_marks(d, True), strict=True):
                commands.append(
                    ["EVAL", DELIVER_ONE_LUA, 2, mark, strategy_stream(sid), self.maxlen, "strategy_id", sid, *fields]
                )
        replies = iter(await core_io.execute_packed(self.redis, commands))
        for d in deliveries:
            answers = [next(replies) for _ in d.strategy_ids]
            if answers and all(answer == 0 for answer in answers):
                report.already += 1
                continue
            for sid, answer in zip(d.strategy_ids, answers, strict=True):
                if isinstance(answer, Exception) and not isinstance(answer, ResponseError):
                    raise answer
                if answer == 1:
                    report.sent += 1
                elif answer != 0:
                    error = answer.decode("utf-8", "replace") if isinstance(answer, bytes) else str(answer)
                    report.failures.append((d.log_id, sid, error))
        return report


# After PostgreSQL recorded a batch's deliveries: each mark gets its expiry, then the
# entries are acknowledged. KEYS[1]: the stream, then the marks. ARGV: mark ttl (ms),
# group, entry ids.
SETTLE_LUA = """
for i = 2, #KEYS do redis.call('PEXPIRE', KEYS[i], ARGV[1]) end
for i = 3, #ARGV, 1000 do
    redis.call('XACK', KEYS[1], ARGV[2], unpack(ARGV, i, math.min(i + 999, #ARGV)))
end
return #ARGV - 2
"""


class Settler:
    """Gives recorded deliveries' marks their expiry and acknowledges a batch: one call."""

    def __init__(self, redis: Redis | RedisCluster, stream: str, group: str, mark_ttl_ms: int) -> None:
        self.redis = redis
        self.stream, self.group, self.mark_ttl_ms = stream, group, mark_ttl_ms
        self._script = redis.register_script(SETTLE_LUA)

    async def settle(self, entry_ids: Sequence[str], marks: Sequence[str]) -> None:
        if isinstance(self.redis, RedisCluster):
            # The marks are on the targets' slots: their expiry first, then the acks
            # (a crash in between leaves the entries to be read again: idempotent).
            await core_io.execute_checked(self.redis, [["PEXPIRE", m, self.mark_ttl_ms] for m in marks])
            acks = [["XACK", self.stream, self.group, *entry_ids[i : i + 1000]] for i in range(0, len(entry_ids), 1000)]
            await core_io.execute_checked(self.redis, acks)
        elif entry_ids or marks:
            await self._script(keys=[self.stream, *marks], args=[self.mark_ttl_ms, self.group, *entry_ids])


# --------------------------------------------------------------------------- the incoming stream

# Reads a consumer group's entries ONE AT A TIME inside Redis (XREADGROUP/XAUTOCLAIM with
# COUNT 1), cuts each before anything leaves the server and stops before the reply could
# outgrow its byte budget: an entry of any size costs the client at most `entry_max`
# bytes, a batch at most `budget`. Entries the script does not return are not read (nor
# claimed): they stay for the next call. Scripts cannot block; the router waits for
# writes with `StreamWatch` instead.
# Per entry: the required fields (their last occurrence, first, in the order given) and
# the first `extra_fields` others (in stream order); every name cut to `name_limit`
# bytes, every value to its field's limit (the required fields') or `value_limit`; each
# cut string is reported as (position, original length, SHA-1 of the whole string);
# fields left out as a count and their bytes.
# KEYS[1]: the stream.
# ARGV: mode ('new', 'pending' or 'claim'), group, consumer, count, budget, entry_max,
#       scan_max (bytes of whole entries gone through per call), steps_max (XAUTOCLAIM
#       calls per call), min_idle_ms, cursor (claim), name_limit, value_limit,
#       extra_fields, then (name, value limit) of each required field.
# Returns {more (1: stopped at a bound), cursor, bytes counted, gone ids,
#          {{id, {name, value, ...}, {position, length, sha1, ...}, dropped, dropped bytes}, ...}}.
READ_LUA = """
local stream = KEYS[1]
local mode, group, consumer = ARGV[1], ARGV[2], ARGV[3]
local count, budget, entry_max = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local scan_max, steps_max, min_idle, cursor = tonumber(ARGV[7]), tonumber(ARGV[8]), ARGV[9], ARGV[10]
local name_limit, value_limit, extra_fields = tonumber(ARGV[11]), tonumber(ARGV[12]), tonumber(ARGV[13])
local required, order = {}, {}
for i = 14, #ARGV, 2 do
    required[ARGV[i]] = tonumber(ARGV[i + 1])
    order[#order + 1] = ARGV[i]
end

local ITEM = 16  -- reply framing per element, counted generously
local used, scanned, taken = 0, 0, 0
local gone, entries = {}, {}

local function keep(list, cuts, s, limit)
    local size = #s
    if size > limit then
        cuts[#cuts + 1] = #list + 1
        cuts[#cuts + 1] = size
        cuts[#cuts + 1] = redis.sha1hex(s)
        used = used + 3 * ITEM + 80
        s = string.sub(s, 1, limit)
        size = limit
    end
    list[#list + 1] = s
    used = used + ITEM + size
end

local function take(id, fields)
    taken = taken + 1
    used = used + 6 * ITEM + #id + 40
    local found, extra = {}, {}
    local dropped, dropped_bytes = 0, 0
    for i = 1, #fields, 2 do
        local name, value = fields[i], fields[i + 1]
        scanned = scanned + #name + #value
        if required[name] then
            local before = found[name]
            if before then  -- a repeated required field: its last value counts
                dropped = dropped + 1
                dropped_bytes = dropped_bytes + #name + #before
            end
            found[name] = value
        elseif #extra < 2 * extra_fields then
            extra[#extra + 1] = name
            extra[#extra + 1] = value
        else
            dropped = dropped + 1
            dropped_bytes = dropped_bytes + #name + #value
        end
    end
    local flat, cuts = {}, {}
    for i = 1, #order do
        local name = order[i]
        local value = found[name]
        if value then
            keep(flat, cuts, name, name_limit)
            keep(flat, cuts, value, required[name])
        end
    end
    for i = 1, #extra, 2 do
        keep(flat, cuts, extra[i], name_limit)
        keep(flat, cuts, extra[i + 1], value_limit)
    end
    entries[#entries + 1] = {id, flat, cuts, dropped, dropped_bytes}
end

local function lost(id)
    taken = taken + 1
    used = used + ITEM + #id
    gone[#gone + 1] = id
end

local more = 0
while true do
    if taken >= count or scanned >= scan_max or (taken > 0 and used + entry_max > budget) then
        more = 1
        break
    end
    if mode == 'new' then
        local reply = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', 1, 'STREAMS', stream, '>')
        if not reply then break end
        local entry = reply[1][2][1]
        take(entry[1], entry[2])
    elseif mode == 'pending' then
        local reply = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', 1, 'STREAMS', stream, cursor)
        local entry = reply[1][2][1]
        if not entry then break end
        cursor = entry[1]
        if entry[2] then take(entry[1], entry[2]) else lost(entry[1]) end
    else
        if steps_max <= 0 then
            more = 1
            break
        end
        steps_max = steps_max - 1
        local reply = redis.call('XAUTOCLAIM', stream, group, consumer, min_idle, cursor, 'COUNT', 1)
        cursor = reply[1]
        for _, entry in ipairs(reply[2]) do
            if entry and entry[2] then take(entry[1], entry[2]) elseif entry then lost(entry[1]) end
        end
        for _, id in ipairs(reply[3] or {}) do lost(id) end
        if cursor == '0-0' then break end
    end
end
return {more, cursor, used, gone, entries}
"""

READ_ITEM_BYTES = 16  # as ITEM in READ_LUA
READ_SCAN_BYTES = 16 * 1024 * 1024  # whole-entry bytes one script call goes through (bounds its run time)
READ_CLAIM_STEPS = 1000  # XAUTOCLAIM COUNT 1 calls per script call (each looks at up to 10 pending entries)
READ_LIMITS: dict[str, int] = {name: READ_VALUE_BYTES for name in REQUIRED_FIELDS} | {"message": READ_MESSAGE_BYTES}


def entry_max_bytes(
    limits: dict[str, int] = READ_LIMITS,
    value_limit: int = READ_VALUE_BYTES,
    name_limit: int = READ_NAME_BYTES,
    extra_fields: int = READ_EXTRA_FIELDS,
) -> int:
    """The most one entry can add to a reply of READ_LUA, as the script counts it."""
    item, cut = READ_ITEM_BYTES, 3 * READ_ITEM_BYTES + 80
    field_cost = 2 * item + name_limit + 2 * cut
    entry = 6 * item + 41 + 40  # an id is at most 41 characters
    entry += sum(field_cost + limit for limit in limits.values())
    return entry + extra_fields * (field_cost + value_limit)


ENTRY_MAX_BYTES = entry_max_bytes()


class RawEntry(NamedTuple):
    """An entry as read: its fields (values and names cut to the read limits) and what was cut."""

    entry_id: str
    fields: dict[bytes, bytes]
    cuts: Cuts = NO_CUTS


@dataclass
class ReadBatch:
    """One call of READ_LUA: the entries read (and now pending at this consumer), the ids
    of pending entries deleted from the stream meanwhile (`gone`: to acknowledge), whether
    it stopped at a bound (`more`: read again at once), the claim cursor, and the bytes of
    the reply as the script counted them (at most the budget)."""

    entries: list[RawEntry] = field(default_factory=list)
    gone: list[str] = field(default_factory=list)
    more: bool = False
    cursor: str = "0-0"
    reply_bytes: int = 0

    def __bool__(self) -> bool:
        return bool(self.entries or self.gone)


class StreamReader:
    """Reads `stream` for `consumer` of `group` through READ_LUA, each batch at most
    `budget_bytes` (and `count` entries), an entry at most ENTRY_MAX_BYTES. The script is
    loaded once and loaded again when Redis answers NOSCRIPT (redis-py's Script)."""

    def __init__(self, redis: Redis, stream: str, group: str, consumer: str, budget_bytes: int) -> None:
        self.redis, self.stream, self.group, self.consumer = redis, stream, group, consumer
        self.budget_bytes = budget_bytes
        self._script = redis.register_script(READ_LUA)
        self._limits = [x for name, limit in READ_LIMITS.items() for x in (name, limit)]

    async def read_new(self, count: int) -> ReadBatch:
        """Entries never delivered to the group (XREADGROUP ... >), now pending here."""
        return await self._call("new", count)

    async def read_pending(self, count: int) -> ReadBatch:
        """Entries this consumer read earlier and never acknowledged (XREADGROUP ... 0)."""
        return await self._call("pending", count, cursor="0")

    async def claim(self, min_idle_ms: int, count: int, cursor: str = "0-0") -> ReadBatch:
        """Entries idle `min_idle_ms` at other consumers, taken over (XAUTOCLAIM) from
        `cursor` on; `cursor` of the result is where to go on ('0-0': all looked at)."""
        return await self._call("claim", count, cursor=cursor, min_idle_ms=min_idle_ms)

    async def _call(self, mode: str, count: int, cursor: str = "0-0", min_idle_ms: int = 0) -> ReadBatch:
        args = [mode, self.group, self.consumer, count, self.budget_bytes, ENTRY_MAX_BYTES, READ_SCAN_BYTES]
        args += [READ_CLAIM_STEPS, min_idle_ms, cursor, READ_NAME_BYTES, READ_VALUE_BYTES, READ_EXTRA_FIELDS]
        try:
            reply = await self._script(keys=[self.stream], args=args + self._limits)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            # Redis lost the group (a wipe): nothing is pending; recreate it.
            await core_io.ensure_groups(self.redis, {self.stream: (self.group,)})
            return ReadBatch(cursor="0-0")
        more, cursor_out, used, gone, entries = reply
        return ReadBatch(
            entries=[_raw_entry(entry) for entry in entries],
            gone=[_text(entry_id) for entry_id in gone],
            more=bool(int(more)),
            cursor=_text(cursor_out),
            reply_bytes=int(used),
        )


def _raw_entry(reply: list) -> RawEntry:
    entry_id, flat, cut_list, dropped, dropped_bytes = reply
    flat = [_bytes(x) for x in flat]
    fields = dict(zip(flat[0::2], flat[1::2]))
    if not cut_list and not int(dropped):
        return RawEntry(_text(entry_id), fields)
    names: dict[bytes, tuple[int, str]] = {}
    values: dict[bytes, tuple[int, str]] = {}
    for i in range(0, len(cut_list), 3):
        position, size, sha1 = int(cut_list[i]), int(cut_list[i + 1]), _text(cut_list[i + 2])
        if position % 2:  # a name (positions are 1-based: name, value, name, ...)
            names[flat[position - 1]] = (size, sha1)
        else:
            values[flat[position - 2]] = (size, sha1)
    return RawEntry(_text(entry_id), fields, Cuts(values, names, int(dropped), int(dropped_bytes)))


def _bytes(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# --------------------------------------------------------------------------- waiting for writes


class StreamWatch:
    """Wakes the router when `stream` is written to, without reading a byte of it.

    Scripts cannot block, so the router does not wait inside XREADGROUP BLOCK (which
    would hand it the next entry whole). Instead a dedicated connection asks Redis for
    CLIENT TRACKING ON REDIRECT <itself> BCAST PREFIX <stream> and subscribes to
    `__redis__:invalidate` (RESP2): Redis then publishes the key's name after every write
    to it (an XADD, a trim, a DEL; not reads, acks or group changes), and `changed` is
    set. A server that refuses tracking leaves `active` false (the router polls);
    a lost connection is reconnected with backoff and sets `changed` (writes may have
    come meanwhile). Nothing here is read from the stream itself.
    """

    PING_S = 15.0  # a silent connection is probed this often
    PONG_S = 5.0  # ... and replaced if it does not answer within this
    REFUSED_RETRY_S = 300.0  # a server that refused tracking is asked again after this

    def __init__(self, redis: Redis, stream: str) -> None:
        self.redis = redis
        self.stream = stream
        self.changed = asyncio.Event()
        self.active = False
        self.refused: str | None = None  # the server's answer, when it refuses tracking

    async def run(self) -> None:
        delay = 0.2
        while True:
            conn = None
            try:
                conn = await self._connection()
                await conn.connect()
                await self._subscribe(conn)
                if not self.active:
                    log.info("waiting for writes to %s by notification (CLIENT TRACKING)", self.stream)
                self.active, self.refused, delay = True, None, 0.2
                self.changed.set()
                await self._listen(conn)
            except ResponseError as exc:
                self._inactive()
                if self.refused is None:
                    log.warning("Redis refuses CLIENT TRACKING (%s): polling %s instead", exc, self.stream)
                self.refused = str(exc)
                await asyncio.sleep(self.REFUSED_RETRY_S)
            except (RedisError, OSError, TimeoutError) as exc:
                self._inactive()
                log.debug("write notifications for %s lost: %r", self.stream, exc)
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, 5.0)
            finally:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.disconnect()

    async def _connection(self) -> Any:
        """A connection of its own (RESP2) to the server holding the stream: on a Redis
        Cluster the node whose slot it is, which alone sees its writes."""
        if isinstance(self.redis, RedisCluster):
            await self.redis.initialize()
            node = self.redis.get_node_from_key(self.stream)
            cls, kwargs = node.connection_class, node.connection_kwargs
        else:
            cls, kwargs = self.redis.connection_pool.connection_class, self.redis.connection_pool.connection_kwargs
        return cls(**{**kwargs, "protocol": 2, "health_check_interval": 0})

    def _inactive(self) -> None:
        self.active = False
        self.changed.set()  # the waiter falls back to polling at once

    async def _subscribe(self, conn) -> None:
        await conn.send_command("CLIENT", "ID")
        client_id = await conn.read_response(timeout=self.PONG_S)
        await conn.send_command("CLIENT", "TRACKING", "ON", "REDIRECT", client_id, "BCAST", "PREFIX", self.stream)
        await conn.read_response(timeout=self.PONG_S)
        await conn.send_command("SUBSCRIBE", "__redis__:invalidate")
        if await conn.read_response(timeout=self.PONG_S) is None:
            raise TimeoutError("no answer to SUBSCRIBE")

    async def _listen(self, conn) -> None:
        while True:
            message = await conn.read_response(timeout=self.PING_S)
            if message is None:  # quiet: make sure the connection still works
                await conn.send_command("PING")
                message = await conn.read_response(timeout=self.PONG_S)
                if message is None:
                    raise TimeoutError("no answer to PING")
            self.changed.set()
