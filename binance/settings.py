"""The feed's tuning (streams, REST, gaps, buffers), from the environment; documented
in the README."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from infra import ConfigError, Settings, env_bool, env_number


@dataclass(frozen=True)
class FeedSettings:
    """Feed tuning, from the environment (documented in the README)."""

    streams_per_connection: int = 200
    silence_s: float = 15.0
    first_data_timeout_s: float = 10.0
    connection_max_age_s: float = 23 * 3600
    gap_grace_ms: int = 10_000
    initial_history_m1: int = 250 * 15
    rest_weight_limit: int = 2400
    rest_weight_window_s: float = 60.0
    rest_concurrency: int = 4
    ticker_refresh_s: float = 5.0
    backoff_max_s: float = 60.0
    subscribe_batch: int = 50
    reconcile_window_m1: int = 120
    buffer_max_candles: int = 50_000
    rest_fallback_s: float = 30.0
    frame_time_tolerance_s: float = 3600.0
    exchange_info_refresh_s: float = 3600.0
    orderflow: bool = True  # aggTrades and footprints; ORDERFLOW=off turns them off
    limit_group: str = "default"  # processes of one group share one IP's limits (binance/limits.py)
    connect_limit: int = 240  # connection attempts per 5 minutes for the group

    @classmethod
    def from_env(cls, settings: Settings, env: Mapping[str, str] | None = None) -> FeedSettings:
        env = os.environ if env is None else env
        return cls(
            streams_per_connection=env_number(env, "STREAMS_PER_CONNECTION", 200, int, 1, 1024),
            silence_s=env_number(env, "WS_SILENCE_S", 15.0, float, 0.5, 3600),
            first_data_timeout_s=env_number(env, "WS_FIRST_DATA_TIMEOUT_S", 10.0, float, 0.5, 600),
            connection_max_age_s=env_number(env, "WS_MAX_AGE_S", 23 * 3600.0, float, 5, 86_000),
            gap_grace_ms=env_number(env, "GAP_GRACE_MS", 10_000, int, 0, 3_600_000),
            initial_history_m1=env_number(env, "INITIAL_HISTORY_M1", settings.redis_candles * 15, int, 1, 1_000_000),
            rest_weight_limit=env_number(env, "REST_WEIGHT_LIMIT", 2400, int, 10, 100_000),
            rest_weight_window_s=env_number(env, "REST_WEIGHT_WINDOW_S", 60.0, float, 0.1, 3600),
            rest_concurrency=env_number(env, "REST_CONCURRENCY", 4, int, 1, 64),
            ticker_refresh_s=env_number(env, "TICKER_REFRESH_S", 5.0, float, 0.05, 3600),
            backoff_max_s=env_number(env, "WS_BACKOFF_MAX_S", 60.0, float, 0.1, 3600),
            reconcile_window_m1=env_number(env, "RECONCILE_WINDOW_M1", 120, int, 15, 100_000),
            buffer_max_candles=env_number(env, "FEED_BUFFER_MAX_CANDLES", 50_000, int, 100, 10_000_000),
            rest_fallback_s=env_number(env, "REST_FALLBACK_S", 30.0, float, 1, 3600),
            frame_time_tolerance_s=env_number(env, "FRAME_TIME_TOLERANCE_S", 3600.0, float, 60, 30 * 86_400),
            exchange_info_refresh_s=env_number(env, "EXCHANGE_INFO_REFRESH_S", 3600.0, float, 60, 7 * 86_400),
            orderflow=env_bool(env, "ORDERFLOW", True),
            limit_group=_limit_group(env.get("BINANCE_LIMIT_GROUP", "")),
            connect_limit=env_number(env, "BINANCE_CONNECT_LIMIT", 240, int, 1, 10_000),
        )


def _limit_group(value: str) -> str:
    group = value.strip() or "default"
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", group):
        raise ConfigError(f"BINANCE_LIMIT_GROUP={value[:80]!r}: letters, digits, '_', '.' and '-' only (1-64)")
    return group
