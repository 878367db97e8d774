"""The indicator worker's tuning, from the environment (documented in the README)."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field

from infra import env_number


@dataclass(frozen=True)
class IndicatorOptions:
    read_count: int = 2000
    block_ms: int = 1000
    history_max: int = 5000  # bars a series is opened from, at most
    slow_window: int = 250  # bars pandas-ta sees for the other indicators
    slow_workers: int = 1
    persist_interval_s: float = 0.25
    persist_batch_rows: int = 5_000
    persist_max_rows: int = 1_000_000  # beyond this, reading waits for PostgreSQL
    reload_s: float = 5.0
    prune_interval_s: float = 60.0
    group_grace_s: float = 600.0  # a gone process's consumer group is destroyed after this
    consumer: str = field(default_factory=lambda: f"indicators-{socket.gethostname()}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> IndicatorOptions:
        return cls(
            read_count=env_number(env, "INDICATOR_READ_COUNT", 2000, int, 1, 100_000),
            history_max=env_number(env, "INDICATOR_HISTORY_MAX", 5000, int, 50, 200_000),
            slow_window=env_number(env, "INDICATOR_SLOW_WINDOW", 250, int, 10, 20_000),
            slow_workers=env_number(env, "INDICATOR_SLOW_WORKERS", 1, int, 1, 16),
            persist_interval_s=env_number(env, "INDICATOR_PERSIST_INTERVAL_S", 0.25, float, 0.01, 60),
            persist_batch_rows=env_number(env, "INDICATOR_PERSIST_BATCH", 5_000, int, 100, 1_000_000),
            persist_max_rows=env_number(env, "INDICATOR_PERSIST_MAX_ROWS", 1_000_000, int, 1000, 50_000_000),
            reload_s=env_number(env, "INDICATOR_RELOAD_S", 5.0, float, 0.1, 3600),
            prune_interval_s=env_number(env, "INDICATOR_PRUNE_INTERVAL_S", 60.0, float, 1, 86_400),
            group_grace_s=env_number(env, "INDICATOR_GROUP_GRACE_S", 600.0, float, 1, 7 * 86_400),
            consumer=env.get("INDICATOR_CONSUMER", "").strip() or f"indicators-{socket.gethostname()}",
        )
