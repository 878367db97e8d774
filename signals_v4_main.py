"""Signal router: `signals_stream` -> the strategies that listen, deduplicated and logged.

    python signals_v4_main.py        run the router alone (the daemon runs it as a worker)

Per batch of entries read with the consumer group `signal_processor` (read by a script
that cuts every entry and bounds the batch in bytes, `signals_io.StreamReader`; the
router waits for writes by notification, `signals_io.StreamWatch`, never by reading):
  1. decide every entry against the routing snapshot (`signals_logic`, no I/O);
  2. ONE PostgreSQL transaction logs the batch: signals_v2_log rows ('new' decided by
     the partial unique index on uid, so two routers never both deliver a uid) and the
     signal_log_entries_v2 rows of each new signal;
  3. ONE Redis script call sends the new signals to `strategy_signals:<strategy_id>`,
     guarded by a per-signal delivery mark (no expiry yet) so a signal is never sent twice;
  4. ONE PostgreSQL statement records the rows as sent (delivered_at) and the refused
     deliveries as failed;
  5. ONE script call gives the marks their expiry and XACKs the entries.
Steps 4-5 of a batch run while the next batch is read and logged (at most one batch is
finishing; its entries are never acknowledged before its record). A crash anywhere
leaves the entries pending; they are read again (own pending entries at start, other
consumers' through XAUTOCLAIM), recognised by (stream entry id, uid), sent unless
PostgreSQL records them as sent or their mark is there, and acknowledged.
Redis or PostgreSQL faults pause the batch in hand (it is retried, never dropped) and
are logged once per outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import asyncpg
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

import core_io
import signals_io
from connections import behind_pooler, connect_pg, connect_redis, pg_connect_options
from infra import (
    REDIS_RETRY_ERRORS,
    BootError,
    ConfigError,
    Outage,
    Settings,
    env_number,
    load_settings,
    log_system_event,
    open_redis,
    run_safe_loop,
    setup_logging,
    system_event_log,
)
from migrations import apply_migrations
from signals_logic import EMPTY_SNAPSHOT, Decision, RoutingSnapshot, as_rejected, decide_batch

MODULE = "SIGNALS"
log = logging.getLogger(MODULE)

T = TypeVar("T")

# Faults that pass: the server is away, slow or restarting. Anything else is a bug and
# crashes the worker for run_safe_loop to restart (the entries stay pending).
PG_TRANSIENT: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.exceptions.TransactionRollbackError,
)
# Redis faults the loop rides out. The client itself retries a couple of times more
# broadly (infra.REDIS_RETRY_ERRORS, for redis-py's reset-connection bug); what still
# escapes as AttributeError/TypeError/RuntimeError is treated as a bug, not an outage.
REDIS_TRANSIENT: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    ConnectionError,
    TimeoutError,
    OSError,
)
# Errors PostgreSQL raises for a value it will not store: the entry, not the server.
PG_REJECTS: tuple[type[BaseException], ...] = (
    asyncpg.DataError,
    asyncpg.IntegrityConstraintViolationError,
)

RELOAD_DEBOUNCE_S = 0.1  # notifications within this window cause one reload
LISTEN_PING_S = 15.0  # a silent LISTEN connection is probed this often
CONFIG_POLL_S = 2.0  # behind a pooler (no LISTEN): how often the change counter is read
BACKOFF_START_S = 0.2
BACKOFF_MAX_S = 5.0
STOP_GRACE_S = 8.0  # SIGTERM: time for the batch in hand before it is cancelled
DEADLOCK_RETRIES = 3  # a batch aborted by a deadlock/serialisation failure is re-run at once


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class RouterOptions:
    """The router's settings (environment variables in brackets, see the README)."""

    reload_s: float = 300.0  # [SIGNAL_RELOAD_S] full reload of the routing tables
    batch: int = 200  # [SIGNAL_BATCH] entries per batch
    batch_bytes: int = 1_048_576  # [SIGNAL_BATCH_BYTES] bytes per batch as read from Redis
    block_ms: int = 1000  # [SIGNAL_BLOCK_MS] longest wait for a write notification before reading anyway
    poll_ms: int = 20  # [SIGNAL_POLL_MS] read interval when Redis gives no write notifications
    claim_idle_ms: int = 60_000  # [SIGNAL_CLAIM_IDLE_MS] idle time before a pending entry is taken over
    claim_every_s: float = 30.0  # [SIGNAL_CLAIM_EVERY_S] how often XAUTOCLAIM runs
    mark_ttl_s: int = 86_400  # [SIGNAL_MARK_TTL_S] lifetime of a delivery mark once the delivery is recorded
    pg_timeout_s: float = 10.0  # [SIGNAL_PG_TIMEOUT_S] bound on every PostgreSQL call
    consumer: str = ""  # [SIGNAL_CONSUMER] consumer name; default <hostname>-<pid>


def load_router_options(env: Mapping[str, str] | None = None) -> RouterOptions:
    """RouterOptions from the environment; ConfigError names the bad key."""
    env = os.environ if env is None else env
    consumer = env.get("SIGNAL_CONSUMER", "").strip()
    if consumer and (len(consumer) > 100 or not consumer.isprintable() or " " in consumer):
        raise ConfigError(f"SIGNAL_CONSUMER={consumer!r}: use up to 100 printable characters without spaces")
    options = RouterOptions(
        reload_s=env_number(env, "SIGNAL_RELOAD_S", 300.0, float, 1.0, 86_400.0),
        batch=env_number(env, "SIGNAL_BATCH", 200, int, 1, 10_000),
        # At least the most one cut entry can take (~180 KB), so every batch holds one.
        batch_bytes=env_number(env, "SIGNAL_BATCH_BYTES", 1_048_576, int, 262_144, 268_435_456),
        block_ms=env_number(env, "SIGNAL_BLOCK_MS", 1000, int, 10, 60_000),
        poll_ms=env_number(env, "SIGNAL_POLL_MS", 20, int, 1, 10_000),
        claim_idle_ms=env_number(env, "SIGNAL_CLAIM_IDLE_MS", 60_000, int, 1000, 86_400_000),
        claim_every_s=env_number(env, "SIGNAL_CLAIM_EVERY_S", 30.0, float, 1.0, 86_400.0),
        mark_ttl_s=env_number(env, "SIGNAL_MARK_TTL_S", 86_400, int, 60, 30 * 86_400),
        pg_timeout_s=env_number(env, "SIGNAL_PG_TIMEOUT_S", 10.0, float, 0.5, 600.0),
        consumer=consumer,
    )
    if options.mark_ttl_s * 1000 <= options.claim_idle_ms:
        raise ConfigError(
            f"SIGNAL_MARK_TTL_S={options.mark_ttl_s} ({options.mark_ttl_s * 1000} ms) must exceed "
            f"SIGNAL_CLAIM_IDLE_MS={options.claim_idle_ms}: a delivery mark must outlive the wait before "
            "a pending entry is taken over"
        )
    return options


def default_consumer() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


# --------------------------------------------------------------------------- faults


class Stopped(Exception):
    """Stop was requested while a call was being retried."""


# --------------------------------------------------------------------------- the router


class SignalRouter:
    """Consumes `signals_stream` with the group `signal_processor`.

    start() connects and loads the routing snapshot; run() starts if needed, routes
    until stop() is called, then closes; stop() lets the batch in hand finish. run() is
    re-entrant, so it can be handed to `run_safe_loop` as is.
    """

    def __init__(
        self,
        settings: Settings,
        pool: asyncpg.Pool,
        options: RouterOptions | None = None,
        *,
        group: str = core_io.SIGNAL_GROUP,
        stream: str = core_io.SIGNALS_STREAM,
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.options = options or RouterOptions()
        self.group = group
        self.stream = stream
        self.consumer = self.options.consumer or default_consumer()
        self.snapshot: RoutingSnapshot = EMPTY_SNAPSHOT
        self.snapshot_version = 0
        self.stats: dict[str, int] = dict.fromkeys(
            ("batches", "entries", "new", "duplicate", "ignored", "replayed", "sent", "failed", "skipped"), 0
        )
        self.redis: Redis | None = None
        self._deliverer: signals_io.Deliverer | None = None
        self._reader: signals_io.StreamReader | None = None
        self._watch: signals_io.StreamWatch | None = None
        self._settler: signals_io.Settler | None = None
        self._stop = asyncio.Event()
        self._reload_wanted = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._started = False
        self._resume_pending = True
        self._drained = False  # the last read found no more entries: wait for a write first
        self._next_claim_at = 0.0
        self._claim_cursor = "0-0"
        self.largest_batch_bytes = 0  # the largest batch read, in reply bytes (bounded by batch_bytes)
        self._finishing: asyncio.Task | None = None  # the previous batch's record and acknowledgement
        self._redis_outage = Outage(MODULE, "Redis")
        self._pg_outage = Outage(MODULE, "PostgreSQL")
        self._config_outage = Outage(MODULE, "PostgreSQL (routing tables)")
        self._listen_outage = Outage(MODULE, "PostgreSQL (LISTEN)")

    # ----------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Open the bytes Redis client, make sure the group exists, load the snapshot,
        start the LISTEN and reload tasks. Waits (stop-aware) while a server is away."""
        if self._started:
            return
        # decode_responses=False: a non-UTF-8 entry must reach the validation, not
        # crash the client; fields are decoded in signals_logic.
        # Few client retries: a longer outage is the loop's to handle (and log), not
        # something to sit out silently for 15 s inside one call.
        retry = Retry(ExponentialBackoff(cap=0.5, base=0.02), retries=2, supported_errors=REDIS_RETRY_ERRORS)
        self.redis = await self._retry_redis(  # the server's kind: a Redis Cluster is recognised (SPEC 17)
            "connecting", lambda: open_redis(self.settings.redis_url, decode_responses=False, retry=retry)
        )
        self._deliverer = signals_io.Deliverer(self.redis, self.settings.stream_maxlen)
        self._reader = signals_io.StreamReader(
            self.redis, self.stream, self.group, self.consumer, self.options.batch_bytes
        )
        self._watch = signals_io.StreamWatch(self.redis, self.stream)
        self._settler = signals_io.Settler(self.redis, self.stream, self.group, self.options.mark_ttl_s * 1000)
        self._started = True
        self._resume_pending = True
        self._drained = False
        self._next_claim_at = 0.0
        self._claim_cursor = "0-0"
        await self._retry_redis("creating the consumer group", self._ensure_group)
        await self._retry(self._config_outage, "loading the routing tables", lambda: self.reload("start"))
        self._tasks = [
            asyncio.create_task(self._listen_forever(), name="signals-listen"),
            asyncio.create_task(self._reload_forever(), name="signals-reload"),
            asyncio.create_task(self._watch.run(), name="signals-watch"),
        ]
        log.info("router %s started on %s/%s: %s", self.consumer, self.stream, self.group, self.snapshot.counts())

    async def run(self) -> None:
        try:
            await self.start()
            while not self._stop.is_set():
                self._check_tasks()
                batch = await self._next_entries()
                if batch:
                    await self.process(batch.entries, batch.gone)
            await self._finished()
        except Stopped:
            pass
        finally:
            await self._drop_finishing()
            await self.close()

    @property
    def running(self) -> bool:
        """Started and not closed (not waiting for run_safe_loop's restart after a crash)."""
        return self._started

    def stop(self) -> None:
        """Finish the batch in hand, then return from run()."""
        self._stop.set()
        if self._watch is not None:
            self._watch.changed.set()  # end a wait for writes at once

    async def close(self) -> None:
        """Cancel the helper tasks and close the Redis client (in reverse order)."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                try:
                    await task
                except Exception as exc:  # a crashed helper: report, keep closing
                    log.error("%s had crashed: %r", task.get_name(), exc)
        if self.redis is not None:
            with contextlib.suppress(Exception):
                await self.redis.aclose()
        self.redis = None
        self._started = False
        log.info("router %s stopped: %s", self.consumer, self.stats)

    def _check_tasks(self) -> None:
        """A helper task that died is a bug: surface it so run_safe_loop restarts us. A
        batch whose record or acknowledgement failed raises what it raised."""
        for task in self._tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise RuntimeError(f"{task.get_name()} crashed") from task.exception()
        if self._finishing is not None and self._finishing.done():
            task, self._finishing = self._finishing, None
            task.result()

    # ----------------------------------------------------------------- retries

    async def _pause(self, delay: float) -> None:
        """Sleep `delay` (jittered), waking early on stop()."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), delay * random.uniform(0.8, 1.2))

    async def _retry(self, outage: Outage, doing: str, call: Callable[[], Awaitable[T]], errors=PG_TRANSIENT) -> T:
        """Run `call` until it succeeds, logging the outage once; Stopped on stop()."""
        delay = BACKOFF_START_S
        while True:
            try:
                result = await call()
            except errors as exc:
                outage.fail(exc, doing)
                log.debug("%s failed again: %r", doing, exc)
                if self._stop.is_set():
                    raise Stopped from exc
                await self._pause(delay)
                if self._stop.is_set():
                    raise Stopped from exc
                delay = min(delay * 2, BACKOFF_MAX_S)
                continue
            outage.ok()
            return result

    async def _retry_redis(self, doing: str, call: Callable[[], Awaitable[T]]) -> T:
        async def guarded() -> T:
            try:
                return await call()
            except REDIS_TRANSIENT:
                self._resume_pending = True  # replies may have been lost: reread our own
                raise

        return await self._retry(self._redis_outage, doing, guarded, REDIS_TRANSIENT)

    async def _ensure_group(self) -> None:
        await core_io.ensure_groups(self.redis, {self.stream: (self.group,)})

    # ----------------------------------------------------------------- reading

    async def _next_entries(self) -> signals_io.ReadBatch:
        """Own pending entries first (after a start or a Redis fault), then entries
        idle too long at other consumers (every claim_every_s), then new ones; every read
        bounded in entries and bytes (signals_io.StreamReader)."""
        loop = asyncio.get_running_loop()
        opts = self.options
        reader = self._reader
        if self._resume_pending or loop.time() >= self._next_claim_at:
            await self._finished()  # its entries are pending until acknowledged: not to be read again
        if self._resume_pending:
            batch = await self._retry_redis("reading pending entries", lambda: reader.read_pending(opts.batch))
            if batch:
                return self._measured(batch)
            self._resume_pending = False
        if loop.time() >= self._next_claim_at:
            batch = await self._retry_redis(
                "reclaiming stale entries",
                lambda: reader.claim(opts.claim_idle_ms, opts.batch, self._claim_cursor),
            )
            self._claim_cursor = batch.cursor
            if batch:
                log.info(
                    "took over %d entries idle for %d ms at other consumers",
                    len(batch.entries) + len(batch.gone),
                    opts.claim_idle_ms,
                )
                return self._measured(batch)
            if batch.cursor == "0-0":  # every pending entry looked at: until the next round
                self._next_claim_at = loop.time() + opts.claim_every_s
            return batch  # nothing taken over yet: go on with the pending list at once
        if self._drained:
            await self._wait_for_writes()
            if self._stop.is_set():
                return signals_io.ReadBatch()
        self._watch.changed.clear()  # a write from now on wakes the next wait
        batch = await self._retry_redis("reading signals_stream", lambda: reader.read_new(opts.batch))
        self._drained = not batch.more
        return self._measured(batch)

    async def _wait_for_writes(self) -> None:
        """Until signals_stream is written to (notified by StreamWatch), at most
        block_ms (poll_ms when Redis gives no notifications) and not past the next
        claim round. Reads nothing."""
        watch = self._watch
        timeout = (self.options.block_ms if watch.active else self.options.poll_ms) / 1000
        timeout = min(timeout, max(0.0, self._next_claim_at - asyncio.get_running_loop().time()))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(watch.changed.wait(), timeout)

    def _measured(self, batch: signals_io.ReadBatch) -> signals_io.ReadBatch:
        self.largest_batch_bytes = max(self.largest_batch_bytes, batch.reply_bytes)
        return batch

    # ----------------------------------------------------------------- one batch

    async def process(self, entries: Sequence[signals_io.RawEntry], gone: Sequence[str] = ()) -> None:
        """Decide, log, deliver one batch, then leave its record and acknowledgement to
        a task that runs while the next batch is read (one such task at a time); faults
        retry the failed step. `gone` are pending entries deleted from the stream
        meanwhile (acknowledged)."""
        decisions = decide_batch(entries, self.snapshot)
        batch = await self._retry(self._pg_outage, "logging signals", lambda: self._commit(decisions))
        report = await self._retry_redis("delivering signals", lambda: self._deliver(batch))
        for log_id, strategy_id, error in report.failures:
            log_system_event(
                "ERROR",
                MODULE,
                f"delivery of log {log_id} to strategy {strategy_id} failed: {error}",
                {"log_id": log_id, "strategy_id": strategy_id, "error": error},
            )
        self._count(decisions, batch, report, len(gone))
        ids = [entry.entry_id for entry in entries] + list(gone)
        clustered = isinstance(self.redis, RedisCluster)
        marks = [m for d in batch.deliveries + batch.recorded for m in signals_io.delivered_marks(d, clustered)]
        await self._finished()
        self._finishing = asyncio.create_task(self._finish(batch, report, ids, marks), name="signals-finish")
        self._finishing.add_done_callback(self._on_finished)

    async def _finish(
        self, batch: signals_io.BatchLog, report: signals_io.DeliveryReport, ids: list[str], marks: list[str]
    ) -> None:
        """PostgreSQL records the batch's signals as sent; then their marks get their
        expiry and the entries are acknowledged."""
        if batch.deliveries:
            await self._retry(self._pg_outage, "recording deliveries", lambda: self._record(batch, report))
        await self._retry_redis("acknowledging entries", lambda: self._ack(ids, marks))

    def _on_finished(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None and self._watch is not None:
            self._watch.changed.set()  # wake a waiting loop: it raises the failure

    async def _finished(self) -> None:
        """Wait for the previous batch's record and acknowledgement (raises what it raised)."""
        task, self._finishing = self._finishing, None
        if task is not None:
            await task

    async def _drop_finishing(self) -> None:
        """On the way out after a failure: the batch still finishing stays pending."""
        task, self._finishing = self._finishing, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task

    async def _commit(self, decisions: list[Decision]) -> signals_io.BatchLog:
        """Commit the batch; if PostgreSQL refuses a value, isolate the entry that
        caused it and log it 'ignored' instead, so one entry never blocks the rest."""
        timeout = self.options.pg_timeout_s
        try:
            for attempt in range(1, DEADLOCK_RETRIES + 1):
                try:
                    return await signals_io.commit_batch(self.pool, decisions, timeout)
                except asyncpg.exceptions.TransactionRollbackError as exc:
                    # Rows go in in uid order (signals_io), so routers racing on shared
                    # uids do not deadlock each other; should PostgreSQL still abort the
                    # batch, nothing was committed, so simply run it again.
                    if attempt == DEADLOCK_RETRIES:
                        raise
                    log.info("batch of %d rolled back (%s); retrying", len(decisions), exc)
        except PG_REJECTS as exc:
            log.warning("PostgreSQL refused a batch of %d (%s); committing one by one", len(decisions), exc)
        merged = signals_io.BatchLog()
        for decision in decisions:
            try:
                one = await signals_io.commit_batch(self.pool, [decision], timeout)
            except PG_REJECTS as exc:
                log_system_event(
                    "ERROR", MODULE, f"entry {decision.entry_id} refused by PostgreSQL: {exc}", {"uid": decision.uid}
                )
                one = await signals_io.commit_batch(self.pool, [as_rejected(decision, str(exc))], timeout)
            merged.rows.update(one.rows)
            merged.replayed |= one.replayed
            merged.deliveries += one.deliveries
        return merged

    async def _deliver(self, batch: signals_io.BatchLog) -> signals_io.DeliveryReport:
        return await self._deliverer.deliver(batch.deliveries)

    async def _record(self, batch: signals_io.BatchLog, report: signals_io.DeliveryReport) -> None:
        """PostgreSQL records the batch's signals as sent: from now on a replay of their
        entries sends nothing, whatever Redis holds."""
        log_ids = [d.log_id for d in batch.deliveries]
        await signals_io.record_deliveries(self.pool, log_ids, report.failures, self.options.pg_timeout_s)

    async def _ack(self, ids: list[str], marks: list[str]) -> None:
        """The recorded deliveries' marks get their expiry, the entries are acknowledged."""
        await self._settler.settle(ids, marks)

    def _count(self, decisions, batch: signals_io.BatchLog, report: signals_io.DeliveryReport, gone: int) -> None:
        stats = self.stats
        stats["batches"] += 1
        stats["entries"] += len(decisions) + gone
        for entry_id, (_, status) in batch.rows.items():
            if entry_id in batch.replayed:
                stats["replayed"] += 1
            else:
                stats[status] += 1
        stats["sent"] += report.sent
        stats["failed"] += len(report.failures)
        stats["skipped"] += sum(
            1
            for d in decisions
            if d.entry_id not in batch.replayed and batch.rows.get(d.entry_id, (0, ""))[1] == "new"
            for t in d.targets
            if t.status == "skipped"
        )
        if batch.replayed:
            log.info(
                "%d entries were logged before (read again after a fault); %d of their signals had already gone out",
                len(batch.replayed),
                report.already,
            )

    # ----------------------------------------------------------------- routing snapshot

    async def reload(self, reason: str) -> RoutingSnapshot:
        """Read the routing tables into a new snapshot and swap the reference."""
        snapshot = await signals_io.load_snapshot(self.pool, self.options.pg_timeout_s)
        changed = snapshot.fingerprint() != self.snapshot.fingerprint()
        self.snapshot = snapshot  # one assignment: readers see the old or the new view
        self.snapshot_version += 1
        if changed:
            for warning in snapshot.warnings:
                log_system_event("WARNING", MODULE, warning)
            log.info("routing tables loaded (%s): %s", reason, snapshot.counts())
        return snapshot

    def _on_notify(self, _conn, _pid, _channel, payload: str) -> None:
        log.debug("routing table %s changed", payload)
        self._reload_wanted.set()

    async def _reload_forever(self) -> None:
        """Reload on notification (debounced) and every reload_s; a failed reload keeps
        the current snapshot and is retried with backoff."""
        delay = BACKOFF_START_S
        while True:
            try:
                await asyncio.wait_for(self._reload_wanted.wait(), self.options.reload_s)
                reason = "change"
                await asyncio.sleep(RELOAD_DEBOUNCE_S)
            except TimeoutError:
                reason = "periodic"
            self._reload_wanted.clear()
            try:
                await self.reload(reason)
            except PG_TRANSIENT as exc:
                self._config_outage.fail(exc, "reloading the routing tables")
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, BACKOFF_MAX_S)
                self._reload_wanted.set()
                continue
            self._config_outage.ok()
            delay = BACKOFF_START_S

    async def _listen_forever(self) -> None:
        """Hold a dedicated connection LISTENing on feed_v4_config; reconnect when it
        dies, and reload after each (re)connect to catch changes made meanwhile. Behind
        a connection pooler (transaction mode) LISTEN never delivers: the router polls
        the change counter the same trigger bumps instead."""
        delay = BACKOFF_START_S
        dsn, options, _ = pg_connect_options(self.settings.postgres_url)
        options["timeout"] = self.options.pg_timeout_s
        while True:
            conn: asyncpg.Connection | None = None
            try:
                if self.settings.postgres_pooler == "yes":
                    await self._poll_config_version()
                conn = await asyncpg.connect(
                    dsn,
                    statement_cache_size=0,
                    server_settings={"application_name": "feed_v4_signals_listen"},
                    **options,
                )
                if self.settings.postgres_pooler == "auto" and await behind_pooler(conn):
                    conn.terminate()
                    conn = None
                    await self._poll_config_version()
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _c, lost=lost: lost.set())
                await conn.add_listener(signals_io.CONFIG_CHANNEL, self._on_notify)
                self._listen_outage.ok()
                delay = BACKOFF_START_S
                self._reload_wanted.set()
                while not lost.is_set():
                    try:
                        await asyncio.wait_for(lost.wait(), LISTEN_PING_S)
                    except TimeoutError:
                        await conn.fetchval("SELECT 1", timeout=self.options.pg_timeout_s)
                raise ConnectionResetError("LISTEN connection closed")
            except PG_TRANSIENT as exc:
                self._listen_outage.fail(exc, "listening for routing changes")
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, BACKOFF_MAX_S)
            finally:
                if conn is not None:
                    conn.terminate()

    async def _poll_config_version(self) -> None:
        """Reload whenever config_version_v4 moves (every CONFIG_POLL_S); never returns."""
        log_system_event(
            "INFO",
            MODULE,
            f"PostgreSQL is behind a connection pooler: routing changes are polled every {CONFIG_POLL_S:g} s",
        )
        seen = None
        while True:
            try:
                version = await self.pool.fetchval(
                    "SELECT version FROM config_version_v4", timeout=self.options.pg_timeout_s
                )
                self._listen_outage.ok()
            except PG_TRANSIENT as exc:
                self._listen_outage.fail(exc, "polling for routing changes")
            else:
                if version != seen:
                    seen = version
                    self._reload_wanted.set()
            await asyncio.sleep(CONFIG_POLL_S)


# --------------------------------------------------------------------------- standalone


async def run_standalone(settings: Settings, options: RouterOptions) -> int:
    """Boot (PostgreSQL, Redis, migrations), route until SIGTERM/SIGINT, exit 0."""
    pool = await connect_pg(settings)
    try:
        redis, _ = await connect_redis(settings)  # bounded wait and a clear boot error
        await redis.aclose()
        await apply_migrations(pool)
        router = SignalRouter(settings, pool, options)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: (router.stop(), stop.set()))
        flusher = asyncio.create_task(system_event_log.run_flusher(pool), name="system-log")
        worker = asyncio.create_task(run_safe_loop(router.run, MODULE), name=MODULE)
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait({worker, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if not worker.done():
            try:
                await asyncio.wait_for(asyncio.shield(worker), STOP_GRACE_S)
            except TimeoutError:
                worker.cancel()
        for task in (worker, stopper, flusher):
            task.cancel()
        await asyncio.gather(worker, stopper, flusher, return_exceptions=True)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(system_event_log.flush(pool)), 2.0)
    finally:
        await pool.close()
    return 0


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        print("usage: python signals_v4_main.py   (settings come from the environment)", file=sys.stderr)
        return 2
    try:
        settings = load_settings()
        options = load_router_options()
        setup_logging(settings.debug_mode)
        return asyncio.run(run_standalone(settings, options))
    except (ConfigError, BootError) as exc:
        print(f"signals_v4: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
