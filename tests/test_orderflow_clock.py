"""The order-flow intake's clock before its first frame: the exchange's time, which in
a replay is not the local clock. When REST cannot tell it (a process joining a busy
deployment whose shared REST weight is spent), the other processes' heartbeats do: the
local clock there would call every stored minute older than 48 hours, unfillable."""

from __future__ import annotations

import time

import infra
from binance.rest import RestClient, WeightLimiter
from orderflow.intake import OrderFlowIntake

REPLAY_NOW = 1_770_163_680_000  # 2026-02-04: a replay's exchange time, months behind the local clock


def test_the_freshest_heartbeat_that_knows_the_exchange_time_moved_on_by_its_age():
    beats = [
        {"exchange_time": str(REPLAY_NOW - 5_000), "updated_at": "1000"},  # older
        {"exchange_time": str(REPLAY_NOW), "updated_at": "3000"},
        {"exchange_time": "", "updated_at": "4000"},  # booting: does not know it yet
        {"updated_at": "4000"},
        {"exchange_time": "not a number", "updated_at": "4000"},
    ]
    assert infra.exchange_now_from_heartbeats(beats, local_now_ms=5_000) == REPLAY_NOW + 2_000
    assert infra.exchange_now_from_heartbeats(beats[2:], local_now_ms=5_000) is None


async def test_without_rest_the_intake_takes_the_deployments_exchange_time(pool, redis):
    dead_rest = RestClient("http://127.0.0.1:9", WeightLimiter(2400, 60), attempts=1)
    intake = OrderFlowIntake(pool, redis, dead_rest, 1000, lambda: 0)
    before = int(time.time() * 1000)
    alone = await intake._server_now()
    assert before <= alone <= int(time.time() * 1000)  # nobody else knows it: the local clock

    fields = {"host": "other", "pid": 7, "updated_at": int(time.time() * 1000) - 1_000, "exchange_time": REPLAY_NOW}
    await infra.write_heartbeat(redis, infra.heartbeat_key("other", 7), fields, 30)
    told = await intake._server_now()
    assert REPLAY_NOW + 1_000 <= told < REPLAY_NOW + 60_000
    await dead_rest.close()
