"""Retention of the logs that grow with every event: the daemon's RETENTION worker.

`system_log_v4`, `signals_v2_log` (with its `signal_log_entries_v2` rows, by cascade)
and the settled rows of `missing_m1_log_v4` are deleted once older than their
retention, in small batches so no statement holds a lock for long. Their timestamps
are the database's own (`now()` when written), so age is judged on its clock.
Candles are kept forever; indicator values have their own pruning (indicators_main).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

import asyncpg

from infra import PG_DOWN_ERRORS, Outage, env_number

log = logging.getLogger("RETENTION")

# (table, timestamp column, extra condition): what each retention setting prunes.
TABLES: dict[str, tuple[str, str, str]] = {
    "system_log": ("system_log_v4", "ts", ""),
    "signal_log": ("signals_v2_log", "received_at", ""),
    "gap_log": ("missing_m1_log_v4", "detected_at", "AND status <> 'missing'"),
}


@dataclass(frozen=True)
class RetentionOptions:
    days: Mapping[str, int]  # TABLES key -> days kept
    interval_s: float = 300.0
    batch: int = 10_000

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> RetentionOptions:
        env = os.environ if env is None else env
        return cls(
            days={
                "system_log": env_number(env, "SYSTEM_LOG_RETENTION_DAYS", 30, int, 1, 36_500),
                "signal_log": env_number(env, "SIGNAL_LOG_RETENTION_DAYS", 90, int, 1, 36_500),
                "gap_log": env_number(env, "GAP_LOG_RETENTION_DAYS", 90, int, 1, 36_500),
            },
            interval_s=env_number(env, "RETENTION_INTERVAL_S", 300.0, float, 1, 86_400),
            batch=env_number(env, "RETENTION_BATCH", 10_000, int, 100, 1_000_000),
        )


def prune_sql(key: str) -> str:
    table, column, condition = TABLES[key]
    return (
        f"DELETE FROM {table} WHERE ctid = ANY(ARRAY(SELECT ctid FROM {table} "
        f"WHERE {column} < now() - make_interval(days => $1) {condition} LIMIT $2))"
    )


async def prune_once(pool: asyncpg.Pool, key: str, days: int, batch: int) -> int:
    """Delete one batch of rows older than `days`; how many went."""
    status = await pool.execute(prune_sql(key), days, batch, timeout=60)
    return int(status.split()[-1])


async def prune_all(pool: asyncpg.Pool, options: RetentionOptions) -> dict[str, int]:
    """Every table down to its retention, batch after batch."""
    pruned: dict[str, int] = {}
    for key, days in options.days.items():
        total = 0
        while True:
            deleted = await prune_once(pool, key, days, options.batch)
            total += deleted
            if deleted < options.batch:
                break
            await asyncio.sleep(0.05)  # between batches: never a long lock
        if total:
            pruned[key] = total
    return pruned


async def run_retention(pool: asyncpg.Pool, options: RetentionOptions) -> None:
    outage = Outage("RETENTION", "PostgreSQL")
    while True:
        try:
            pruned = await prune_all(pool, options)
            outage.ok()
        except PG_DOWN_ERRORS as exc:
            outage.fail(exc, "pruning old log rows")
        else:
            if pruned:
                log.info("pruned %s", ", ".join(f"{n} {TABLES[k][0]} rows" for k, n in pruned.items()))
        await asyncio.sleep(options.interval_s)
