"""The indicator instances the worker computes: `indicator_instances_v4` and its
parameters, parsed into one layout per timeframe (TA-Lib kernels and pandas-ta
instances), re-read every few seconds. An instance that cannot be parsed, or that fails
while computing, is skipped, with its error written to the table, until its row changes;
the others go on."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping
from typing import Any

import asyncpg

import core_io
from candles import TF_MS, TIMEFRAMES
from indicators import slow
from indicators.registry import IndicatorConfigError, Instance, parse_common
from indicators.series import InstanceFailure, Layout, SlowInstance
from infra import log_system_event

log = logging.getLogger("INDICATORS")

MODULE = "INDICATORS"
TF_MINUTES = {tf: TF_MS[tf] // 60_000 for tf in TIMEFRAMES}


class InstanceConfig:
    """The layouts in use, and the instances skipped and why."""

    def __init__(self, pool: asyncpg.Pool, slow_runner: slow.SlowRunner) -> None:
        self.pool, self.slow_runner = pool, slow_runner
        self.layouts: dict[str, Layout] = {tf: Layout([], []) for tf in TIMEFRAMES}
        self.gone_names: dict[str, set[str]] = {}  # per timeframe: outputs of removed instances
        self._key: Any = None
        self._errors: dict[int, str] = {}
        self._rows: dict[int, str] = {}  # instance id -> its row, as text
        self._errors_written: dict[int, str] | None = None  # what indicator_instances_v4.error holds
        self._broken: dict[int, tuple[str, str]] = {}  # instance id -> (its row, why it was disabled)

    async def load(self) -> bool:
        """Re-read the instance tables; True when they changed (layouts rebuilt)."""
        rows = await fetch_indicator_config(self.pool)
        key = repr(rows)
        if key == self._key:
            return False
        incremental: dict[str, list[Instance]] = {tf: [] for tf in TIMEFRAMES}
        pandas_ta: dict[str, list[SlowInstance]] = {tf: [] for tf in TIMEFRAMES}
        errors: dict[int, str] = {}
        for instance_id, indicator, tf, raw in rows:
            row_key = repr((indicator, tf, raw))
            broken = self._broken.get(instance_id)
            if broken is not None and broken[0] == row_key:
                errors[instance_id] = broken[1]  # it failed as configured: not again until changed
                continue
            self._broken.pop(instance_id, None)
            try:
                if tf not in TIMEFRAMES:
                    raise IndicatorConfigError(f"timeframe {tf} is not built here: add it to TIMEFRAMES")
                instance = parse_common(instance_id, indicator, tf, TF_MINUTES[tf], raw)
                if instance is not None:
                    incremental[tf].append(instance)
                    continue
                kwargs, names = await self._describe_slow(indicator, raw)
                pandas_ta[tf].append(SlowInstance(instance_id, indicator, tf, kwargs, names))
            except IndicatorConfigError as exc:
                errors[instance_id] = str(exc)
                if self._errors.get(instance_id) != str(exc):
                    log_system_event(
                        "ERROR",
                        MODULE,
                        f"indicator instance {instance_id} ({indicator} {tf}) skipped: {exc}",
                        {"instance_id": instance_id, "indicator": indicator, "timeframe": tf, "params": raw},
                    )
        self._rows = {r[0]: repr((r[1], r[2], r[3])) for r in rows}
        if errors != self._errors_written:
            await set_instance_errors(self.pool, errors)
            self._errors_written = errors
        layouts = {tf: Layout(incremental[tf], pandas_ta[tf]) for tf in TIMEFRAMES}
        for tf, lay in layouts.items():  # outputs no longer configured leave the hashes as they are written
            before = {*self.layouts[tf].names, *(n for i in self.layouts[tf].slow for n in i.names)}
            now = {*lay.names, *(n for i in lay.slow for n in i.names)}
            self.gone_names[tf] = (self.gone_names.get(tf, set()) | before) - now
        self.layouts, self._key, self._errors = layouts, key, errors
        log.info(
            "indicator configuration: %s",
            ", ".join(
                f"{tf} {len(lay.instances)} incremental + {len(lay.slow)} pandas-ta" for tf, lay in layouts.items()
            ),
        )
        return True

    DESCRIBE_TIMEOUT_S = 60.0

    async def _describe_slow(self, indicator: str, raw: Mapping[str, str]) -> tuple[dict[str, Any], tuple[str, ...]]:
        """pandas-ta checks its own instance in the runner process; whatever goes wrong
        there (a crash of the process, a hang) is this instance's error, not the worker's."""
        try:
            return await asyncio.wait_for(self.slow_runner.call(slow.describe, indicator, raw), self.DESCRIBE_TIMEOUT_S)
        except IndicatorConfigError:
            raise
        except Exception as exc:
            raise IndicatorConfigError(f"pandas-ta could not check it: {type(exc).__name__}: {exc}") from None

    def disable(self, failure: InstanceFailure) -> None:
        """An instance whose kernel raised: skipped until its configuration changes."""
        row_key = self._rows.get(failure.instance_id, "")
        self._broken[failure.instance_id] = (row_key, f"failed while computing: {failure}")
        log_system_event(
            "ERROR",
            MODULE,
            f"indicator instance {failure.instance_id} disabled: it failed while computing ({failure}); "
            "the other instances go on",
            {"instance_id": failure.instance_id},
        )
        self._key = None  # the next load rebuilds the layouts without it


# --------------------------------------------------------------------------- the rows


async def fetch_indicator_config(pool: asyncpg.Pool) -> list[tuple[int, str, str, dict[str, str]]]:
    """Enabled instances as (id, indicator, timeframe, {param: value}), by id."""
    rows = await pool.fetch(
        "SELECT i.id, lower(btrim(i.indicator)) AS indicator, i.timeframe, "
        "coalesce(jsonb_object_agg(p.param, p.value) FILTER (WHERE p.param IS NOT NULL), '{}'::jsonb)::text AS params "
        "FROM indicator_instances_v4 i LEFT JOIN indicator_parameters_v4 p ON p.instance_id = i.id "
        "WHERE i.enabled GROUP BY i.id ORDER BY i.id"
    )
    return [(r["id"], r["indicator"], r["timeframe"], json.loads(r["params"])) for r in rows]


async def set_instance_errors(pool: asyncpg.Pool, errors: Mapping[int, str]) -> None:
    """Why each instance does not run (`indicator_instances_v4.error`); others cleared."""
    await core_io.set_reasons(pool, "indicator_instances_v4", "id", "integer", "error", errors)
