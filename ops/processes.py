"""The daemon processes as `status` shows them (pure): what each runs, and SPEC 17's
`processes` (what each follows, its load and its lag), from the parsed heartbeats."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import infra
from indicators.groups import member_of


def workers_summary(workers: Sequence[str]) -> str:
    """`FEED(8) INDICATORS(4) SIGNALS ...`: the full list is in --json."""
    groups: dict[str, int] = {}
    for name in workers:
        prefix = name.split("_")[0]
        groups[prefix] = groups.get(prefix, 0) + 1
    return " ".join(f"{g}({n})" if n > 1 else g for g, n in groups.items()) or "-"


def processes_of(daemons: Sequence[Mapping[str, Any]], tickers: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """SPEC 17's `processes`: every live daemon process and the symbols it owns (a
    heartbeat exists only while its process beats, so each listed is alive), with its
    load (CPU as a share of one core, event-loop lag) and its lag: the worst M1 lag
    among its symbols (None while it owns none)."""
    m1_lag = {t["symbol"]: t["m1"]["lag_s"] for t in tickers if t.get("m1")}
    out = []
    for d in daemons:
        lags = [m1_lag[s] for s in d["symbols"] if s in m1_lag]
        out.append(
            {
                "id": d["key"].removeprefix(infra.HEARTBEAT_PREFIX),
                "host": d["host"],
                "pid": d["pid"],
                "alive": True,
                "symbols": d["symbols"],
                "member": d["member"],
                "draining": d["draining"] or d["drain_requested"],
                "cpu": d["cpu"],
                "loop_lag_ms": d["loop_lag_ms"],
                "m1_lag_s": max(lags, default=None),
            }
        )
    return out


def mark_gone_groups(streams: Mapping[str, dict[str, Any]], daemons: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The streams' report, each indicator group of a process no heartbeat names marked
    `gone`: what it holds pending stays until the lead sweeps it (indicators/groups.py),
    and is not a backlog anyone is behind on."""
    members = {d["member"] for d in daemons if d.get("member")}
    marked: dict[str, Any] = {}
    for stream, info in streams.items():
        groups = {
            name: {**state, "gone": (member := member_of(name)) is not None and member not in members}
            for name, state in info.get("groups", {}).items()
        }
        marked[stream] = {**info, "groups": groups}
    return marked
