"""Indicators spread by symbol (indicators/groups.py): each process computes the symbols
it holds through a consumer group of its own; what a gone process's group left
unsettled is written again by the symbols' new owners; its group is swept away."""

from __future__ import annotations

import asyncio
import itertools
from itertools import islice

import pytest
from replay import until

import core_io
from candles import Candle
from feed_and_aggregate import CandleIntake
from indicators import groups
from indicators.groups import GroupState, Handover, abandoned_groups, oldest_bars
from indicators_main import IndicatorOptions, IndicatorWorker
from infra import load_settings
from market_data import read_archive
from shards.leases import LeaseTimes, assignment
from shards.ownership import Ownership
from tests.indicator_reference import COMMON_CASES, assert_values_match_talib, configure
from tests.test_indicators_worker import crash

FAST = LeaseTimes(ttl_ms=600, renew_every_ms=100, margin_ms=50)
SYMBOLS = ["ALGOUSDT", "AVAXUSDT", "DOTUSDT", "LINKUSDT"]
M1_STREAM = core_io.CANDLE_STREAMS["m1"]


# --------------------------------------------------------------------------- pure


def test_a_group_is_abandoned_when_its_member_is_gone_and_nobody_reads_it():
    seen: dict[str, float] = {}
    states = [
        GroupState("indicator_workers:me", None),
        GroupState("indicator_workers:live", 10_000_000),  # live member: kept, however idle
        GroupState("indicator_workers:dead-reading", 1_000),  # a consumer read a second ago
        GroupState("indicator_workers:dead-idle", 700_000),
        GroupState("indicator_workers:dead-never-read", None),
        GroupState("signal_processor", 10_000_000),  # not an indicator group
    ]
    live = {"me", "live"}
    got = abandoned_groups(states, "indicator_workers:me", live, 100.0, seen, 600.0)
    assert got == ["indicator_workers:dead-idle"]
    assert abandoned_groups(states, "indicator_workers:me", live, 699.0, seen, 600.0) == got
    later = abandoned_groups(states, "indicator_workers:me", live, 700.0, seen, 600.0)
    assert later == ["indicator_workers:dead-idle", "indicator_workers:dead-never-read"]
    assert abandoned_groups([], "indicator_workers:me", live, 800.0, seen, 600.0) == [] and seen == {}


def test_the_shared_group_is_abandoned_like_a_gone_members():
    seen: dict[str, float] = {}
    idle = [GroupState(core_io.INDICATOR_GROUP, 700_000)]
    assert abandoned_groups(idle, "indicator_workers:me", {"me"}, 0.0, seen, 600.0) == [core_io.INDICATOR_GROUP]
    read = [GroupState(core_io.INDICATOR_GROUP, 500)]  # an indicators-only process reads it
    assert abandoned_groups(read, "indicator_workers:me", {"me"}, 0.0, seen, 600.0) == []
    assert groups.member_of(groups.group_of("vm:12:ab3f01")) == "vm:12:ab3f01"
    assert groups.member_of(core_io.INDICATOR_GROUP) is None


def test_oldest_bars_per_series_of_the_symbols_asked():
    def event(symbol: str, t: int) -> dict[str, str]:
        return {"symbol": symbol, "open_time": str(t), **dict.fromkeys(("open", "high", "low", "close"), "1")} | {
            "volume": "2"
        }

    events = [("m1", event("A", 300)), ("m1", event("A", 120)), ("m5", event("A", 600)), ("m1", event("B", 60))]
    events.append(("m1", {"symbol": "A", "open_time": "x"}))  # malformed: skipped
    assert oldest_bars(events, {"A"}) == {("A", "m1"): 120, ("A", "m5"): 600}
    assert oldest_bars(events, None)[("B", "m1")] == 60


def test_a_symbol_stopped_here_has_its_events_held_until_a_newer_owner_opens_it():
    handover = Handover()
    assert not handover.hold("A", "m1", 60, ("s1", "1-0"), 0.0)  # never computed here
    handover.opened("A", 5)
    handover.opened("B", 6)
    handover.stopped("A", 0.5)
    assert handover.hold("A", "m5", 300, ("s5", "2-0"), 1.0)
    assert handover.hold("A", "m5", 0, ("s5", "3-0"), 2.0)  # an older bucket, after the newer
    assert handover.hold("A", "m5", 0, ("s5", "3-0"), 2.5)  # read again (a backlog): once
    assert handover.own_unsettled({"A", "B"}) == {("A", "m5"): 0}
    assert handover.waiting() == ["A"]
    # Opened under the token it was computed under (a stale entry), or none: held on.
    assert handover.settle({"A": 5}, 3.0, 600.0) == ([], [])
    assert handover.settle({}, 3.0, 600.0) == ([], [])
    due, expired = handover.settle({"A": 7}, 4.0, 600.0)
    assert due == [("s5", "2-0"), ("s5", "3-0")] and expired == []
    assert handover.waiting() == [] and not handover.hold("A", "m5", 600, ("s5", "4-0"), 5.0)


def test_events_held_are_taken_back_when_the_symbol_comes_back():
    handover = Handover()
    handover.opened("A", 5)
    assert handover.hold("A", "m1", 120, ("s1", "1-0"), 0.0)  # the lease ran out, not yet seen as lost
    assert handover.own_unsettled({"A"}) == {("A", "m1"): 120}
    assert handover.opened("A", 5) == [("s1", "1-0")]  # opened again here, from that bar
    assert handover.waiting() == []


def test_a_symbol_no_process_opens_is_given_up_on():
    handover = Handover()
    handover.opened("A", 5)
    handover.opened("B", 6)
    handover.stopped("A", 0.0)
    handover.stopped("B", 0.0)
    handover.hold("A", "m1", 120, ("s1", "1-0"), 2.0)
    assert handover.settle({}, 10.0, 10.0) == ([], [])
    assert handover.settle({}, 12.5, 10.0) == ([("s1", "1-0")], ["A"])  # B held nothing: no warning
    assert handover.waiting() == []


# --------------------------------------------------------------------------- Redis


async def test_what_another_group_holds_unsettled_is_read_without_touching_it(redis):
    candles = [Candle(s, "m1", 60_000 * i, 1, 2, 0.5, 1.5, 3) for i in (5, 3, 4) for s in ("A", "B")]
    mine, gone = groups.group_of("me"), groups.group_of("gone")
    await core_io.ensure_groups(redis, {M1_STREAM: (mine, gone)})
    await core_io.publish(redis, M1_STREAM, [core_io.candle_event(c) for c in candles[:4]], 1000)
    read = await core_io.read_group(redis, gone, "w", [M1_STREAM], count=4, block_ms=None)
    await core_io.ack(redis, gone, [(M1_STREAM, read[0][1]), (M1_STREAM, read[1][1])])  # bar 5 is done
    await core_io.publish(redis, M1_STREAM, [core_io.candle_event(c) for c in candles[4:]], 1000)  # not read

    def unchanged(pending: list[dict]) -> list[tuple]:
        return [(p["message_id"], p["consumer"], p["times_delivered"]) for p in pending]

    pending_before = unchanged(await redis.xpending_range(M1_STREAM, gone, "-", "+", 100))

    found = await groups.unsettled_elsewhere(redis, mine, {"A"}, page=1)  # page 1: every page turn
    assert found == {("A", "m1"): 3 * 60_000}  # pending (bar 3) and never read (bar 4)
    # Seen from the other group: its own entries are not "elsewhere", this one's unread six are.
    assert await groups.unsettled_elsewhere(redis, gone, None) == {("A", "m1"): 180_000, ("B", "m1"): 180_000}
    assert unchanged(await redis.xpending_range(M1_STREAM, gone, "-", "+", 100)) == pending_before

    states, streams_of = await groups.group_states(redis)
    assert {s.name for s in states} == {mine, gone} and streams_of[gone] == [M1_STREAM]
    assert next(s for s in states if s.name == gone).idle_ms is not None
    assert next(s for s in states if s.name == mine).idle_ms is None
    await groups.destroy(redis, streams_of, [gone])
    assert [g["name"] for g in await redis.xinfo_groups(M1_STREAM)] == [mine]


# --------------------------------------------------------------------------- two workers


class Process:
    """One daemon's ownership rounds and indicator worker, without the feed."""

    def __init__(self, pool, redis, member: str) -> None:
        self.ownership = Ownership(redis, FAST, member)
        options = IndicatorOptions(block_ms=50, group_grace_s=3.0)
        self.worker = IndicatorWorker(load_settings(), pool, redis, options)
        self.worker.share(self.ownership)
        self.tasks: list[asyncio.Task] = []

    async def start(self, worker: bool = True) -> None:
        await self.ownership.claim(SYMBOLS)
        self.tasks.append(asyncio.create_task(self.ownership.run()))
        if worker:
            await self.start_worker()

    async def start_worker(self) -> None:
        self.tasks += [asyncio.create_task(fn()) for fn in self.worker.workers().values()]

    async def kill(self) -> None:
        """Gone at once: nothing more written, values not in PostgreSQL lost, leases left to run out."""
        await crash(self.worker, self.tasks)

    def check(self) -> None:
        for task in self.tasks:
            if task.done() and not task.cancelled():
                task.result()


async def settled(redis, processes: list[Process]) -> bool:
    """Every live process's group has read and acknowledged everything, and nothing
    waits for PostgreSQL."""
    for process in processes:
        process.check()
        worker = process.worker
        if worker.pending or worker.pending.held() or not worker.ready.is_set():
            return False
        for stream in core_io.CANDLE_STREAMS.values():
            state = next(g for g in await redis.xinfo_groups(stream) if g["name"] == worker.group)
            if state["pending"] or state.get("lag"):
                return False
    return True


async def has_read_everything(redis, group: str) -> bool:
    for stream in core_io.CANDLE_STREAMS.values():
        state = next(g for g in await redis.xinfo_groups(stream) if g["name"] == group)
        if state.get("lag"):
            return False
    return True


async def until_settled(redis, processes: list[Process], timeout: float = 60.0) -> None:
    for _ in range(int(timeout / 0.05)):
        if await settled(redis, processes):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the workers did not settle")


def members_splitting(symbols: list[str]) -> tuple[str, str]:
    """Two member names the rendezvous hash gives two symbols each (a split to test)."""
    for n in itertools.count():
        names = (f"first-{n}", f"second-{n}")
        owners = assignment(symbols, names)
        if sorted(list(owners.values()).count(name) for name in names) == [2, 2]:
            return names
    raise AssertionError  # unreachable


async def archive_feed(pool, redis, minutes: int):
    """The indicators configured, the symbols enabled; returns each symbol's first
    `minutes` M1 from the archive, the intake, and `store(start, stop, step)`, which
    stores minutes [start, stop) of every symbol, `step` at a time."""
    await configure(pool, COMMON_CASES)
    await core_io.enable_symbols(pool, SYMBOLS)
    m1 = {s: list(islice(read_archive(s), minutes)) for s in SYMBOLS}
    intake = CandleIntake(pool, redis, core_io.make_candle_store(redis, True, 250), stream_maxlen=100_000)

    async def store(start: int, stop: int, step: int) -> None:
        for at in range(start, stop, step):
            await intake.store_m1([c for s in SYMBOLS for c in m1[s][at : at + step]])

    return m1, intake, store


def doubled(candle: Candle) -> Candle:
    """A correction of `candle`: high and close doubled."""
    c = candle
    return Candle(c.symbol, "m1", c.open_time, c.open, c.high * 2, c.low, c.close * 2, c.volume)


@pytest.mark.timeout(300)
async def test_two_processes_compute_their_own_symbols_and_one_takes_over_a_killed_ones(pool, redis):
    m1, intake, store = await archive_feed(pool, redis, 900)
    await store(0, 600, 300)  # history before either process ran
    first, second = (Process(pool, redis, name) for name in members_splitting(SYMBOLS))
    await first.start()
    await second.start()
    for _ in range(40):  # the first hands the second its share on its next rounds
        if first.ownership.owned() and second.ownership.owned():
            break
        await asyncio.sleep(0.1)
    await store(600, 700, 5)
    await until_settled(redis, [first, second])
    shares = {p: p.ownership.owned() for p in (first, second)}
    assert shares[first] and shares[second] and shares[first] | shares[second] == set(SYMBOLS)
    for process in (first, second):
        assert {symbol for symbol, _ in process.worker.series} == shares[process]  # only its own
        assert process.worker.stats["bars"] > 0

    # A correction the first process reads and dies before writing (its values never
    # reach PostgreSQL), then more bars while its leases run out.
    victim = sorted(shares[first])[0]
    first.worker.persist_once = _never  # type: ignore[method-assign]
    await intake.store_m1([doubled(m1[victim][650])])
    await asyncio.sleep(0.5)
    await first.kill()
    await store(700, 800, 5)
    for _ in range(50):
        if second.ownership.owned() == set(SYMBOLS):
            break
        await asyncio.sleep(0.1)
    assert second.ownership.owned() == set(SYMBOLS)
    await store(800, 900, 10)
    await until_settled(redis, [second])
    assert {symbol for symbol, _ in second.worker.series} == set(SYMBOLS)
    checked = await assert_values_match_talib(pool, SYMBOLS)
    assert checked > 10_000

    # The killed process's group goes once its grace period is over (the lead sweeps).
    gone = groups.group_of(first.ownership.id)
    for _ in range(100):
        names = {g["name"] for g in await redis.xinfo_groups(M1_STREAM)}
        if gone not in names:
            break
        await asyncio.sleep(0.1)
    assert names == {second.worker.group}
    await second.kill()


async def _never() -> int:
    raise asyncio.CancelledError  # the persister stops here: as if the process died


@pytest.mark.timeout(300)
async def test_a_change_read_while_a_symbol_changes_hands_is_written_by_the_new_owner(pool, redis):
    """The first process computed a symbol and hands it to a newcomer; a change to one of
    its past bars comes after the first stopped computing it and before the newcomer
    opened it (like the older buckets of a history whose newest ones came first, CI run
    11): the newcomer writes the series again from that bar, and the first acknowledges
    the events it held once the newcomer has opened the symbol."""
    m1, intake, store = await archive_feed(pool, redis, 700)
    await store(0, 600, 300)
    first, second = (Process(pool, redis, name) for name in members_splitting(SYMBOLS))
    await first.start()
    await store(600, 650, 5)
    await until_settled(redis, [first])
    assert first.worker.shared and first.worker.shared.following == set(SYMBOLS)

    await second.start(worker=False)  # takes its share of the leases; computes nothing yet
    shared = first.worker.shared
    await until(lambda: len(shared.following) == len(second.ownership.owned()) == 2, 5, "the hand-over", 0.05)
    moved = sorted(set(SYMBOLS) - shared.following)
    assert second.ownership.owned() == set(moved)
    await intake.store_m1([doubled(m1[moved[0]][620])])  # a bar the first process wrote values for
    await until(lambda: has_read_everything(redis, first.worker.group), 5, "the first to read it", 0.05)

    await second.start_worker()
    await store(650, 700, 5)
    await until_settled(redis, [first, second])  # the first's held events acknowledged too
    assert await assert_values_match_talib(pool, SYMBOLS) > 10_000
    await first.kill()
    await second.kill()
