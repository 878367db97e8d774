"""The tape: trades in `a` order, minutes final only on the exchange's check-sums. Pure,
no servers: hand-built cases for each rule, and a property over random faults (drops,
duplicates, reorders, closes before their last trades) that a bar declared final is
always exactly its minute's trades."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from orderflow.fold import AggTrade, fold
from orderflow.tape import KlineCheck, Tape

M1 = 60_000
T0 = 1_721_347_200_000  # a minute's start
ROW = 1_000_000


def make_trades(per_minute: list[int], seed: int = 1) -> list[AggTrade]:
    """Contiguous ids and trade ids; `per_minute[i]` trades in minute i."""
    rng = random.Random(seed)
    trades, agg_id, trade_id = [], 100, 5_000
    for minute, count in enumerate(per_minute):
        for k in range(count):
            n = rng.randint(1, 3)
            price = 100_000_000 * 50 + rng.randint(-30, 30) * ROW
            t = T0 + minute * M1 + (k + 1) * (M1 // (count + 2))
            trades.append(
                AggTrade(
                    agg_id, price, rng.randint(1, 9) * 1_000_000, trade_id, trade_id + n - 1, t, rng.random() < 0.5
                )
            )
            agg_id, trade_id = agg_id + 1, trade_id + n
    return trades


def minute_of(trade: AggTrade) -> int:
    return trade.time_ms - trade.time_ms % M1


def truth(trades: list[AggTrade], minute: int):
    return fold(minute, ROW, [t for t in trades if minute_of(t) == minute])


def check_of(trades: list[AggTrade], minute: int, with_ids: bool = True) -> KlineCheck:
    bar = truth(trades, minute)
    ids = (bar.first_trade_id, bar.last_trade_id) if with_ids and bar.agg_trades else (None, None)
    if with_ids and not bar.agg_trades:
        ids = (-1, -1)
    return KlineCheck(minute, bar.volume, bar.buy, bar.trades, *ids)


def tape() -> Tape:
    return Tape(row_size=lambda minute, price: ROW)


def finals(t: Tape) -> dict[int, object]:
    return {o.open_time: o.bar for o in t.outcomes if o.status == "final"}


def refetches(t: Tape) -> dict[int, str]:
    return {o.open_time: o.reason for o in t.outcomes if o.status == "refetch"}


def test_minutes_in_order_are_final_and_equal_their_trades():
    trades = make_trades([5, 7, 3])
    t = tape()
    for trade in trades:
        t.add(trade)
    for m in range(3):
        t.close(check_of(trades, T0 + m * M1), 0)
    assert finals(t) == {T0 + m * M1: truth(trades, T0 + m * M1) for m in range(3)}
    assert not refetches(t) and not t.bars


def test_a_close_before_its_last_trades_waits_for_the_trade_with_its_last_id():
    trades = make_trades([6])
    t = tape()
    for trade in trades[:4]:
        t.add(trade)
    t.close(check_of(trades, T0), 0)
    assert not t.outcomes
    t.add(trades[4])
    assert not t.outcomes
    t.add(trades[5])
    assert finals(t) == {T0: truth(trades, T0)}


def test_without_trade_ids_a_later_minutes_trade_completes_a_minute():
    trades = make_trades([4, 2])
    t = tape()
    for trade in trades[:4]:
        t.add(trade)
    t.close(check_of(trades, T0, with_ids=False), 0)  # a REST kline: no ids
    assert not t.outcomes
    t.add(trades[4])
    assert finals(t) == {T0: truth(trades, T0)}


def test_a_bar_that_disagrees_with_its_kline_is_refetched_not_final():
    trades = make_trades([4, 1])
    t = tape()
    for trade in trades:
        t.add(trade)
    wrong = check_of(trades, T0, with_ids=False)
    t.close(KlineCheck(T0, wrong.volume + 1, wrong.taker_buy_volume, wrong.trades), 0)
    assert not finals(t) and "volume" in refetches(t)[T0]


def test_duplicates_are_dropped_and_reorders_put_back_in_order():
    trades = make_trades([8])
    delivered = [trades[0], trades[2], trades[1], trades[1], trades[3], trades[0], *trades[4:], trades[7]]
    t = tape()
    for trade in delivered:
        t.add(trade)
    t.close(check_of(trades, T0), 0)
    assert finals(t) == {T0: truth(trades, T0)} and t.duplicates == 3 and not t.gaps


def test_a_missing_id_is_a_gap_after_the_wait_and_its_minutes_are_refetched():
    trades = make_trades([3, 3, 3])
    t = tape()
    for trade in trades:
        if trade is not trades[4]:  # minute 1's second trade never comes
            t.add(trade)
    assert t.held and not t.gaps
    t.tick(trades[5].time_ms + t.gap_wait_ms - 1)
    assert not t.gaps
    t.tick(trades[5].time_ms + t.gap_wait_ms + 1)
    assert t.gaps == [(trades[4].agg_id, trades[4].agg_id)] and not t.held
    for m in range(3):
        t.close(check_of(trades, T0 + m * M1), 0)
    assert finals(t) == {m: truth(trades, m) for m in (T0, T0 + 2 * M1)}
    assert set(refetches(t)) == {T0 + M1} and "gap" in refetches(t)[T0 + M1]


def test_after_a_reconnect_a_jump_is_a_gap_at_once():
    trades = make_trades([3, 3])
    t = tape()
    for trade in trades[:2]:
        t.add(trade)
    t.resume()
    for trade in trades[4:]:
        t.add(trade)
    assert t.gaps == [(trades[2].agg_id, trades[3].agg_id)] and not t.held
    t.close(check_of(trades, T0), 0)
    t.close(check_of(trades, T0 + M1), 0)
    assert set(refetches(t)) == {T0, T0 + M1}  # the missing trades could be in either


def test_the_minute_a_tape_starts_in_is_refetched_the_next_is_final():
    trades = make_trades([5, 4, 1])
    t = tape()
    for trade in trades[2:]:
        t.add(trade)
    t.close(check_of(trades, T0), 0)
    t.close(check_of(trades, T0 + M1), 0)
    assert "first trade" in refetches(t)[T0] and finals(t) == {T0 + M1: truth(trades, T0 + M1)}


def test_a_close_whose_trades_never_come_is_refetched_after_the_wait():
    trades = make_trades([4])
    t = tape()
    for trade in trades[:3]:
        t.add(trade)
    t.close(check_of(trades, T0), 1_000)
    t.tick(1_000 + t.close_wait_ms)
    assert not t.outcomes
    t.tick(1_001 + t.close_wait_ms)
    assert set(refetches(t)) == {T0} and not t.bars and not t.closes


def test_a_minute_without_trades_is_final_and_empty():
    trades = make_trades([2, 0, 2])
    t = tape()
    for trade in trades:
        t.add(trade)
    t.close(check_of(trades, T0 + M1), 0)
    bar = finals(t)[T0 + M1]
    assert bar.agg_trades == 0 and bar.volume == 0


def test_held_trades_past_the_limit_declare_the_gap():
    trades = make_trades([20])
    t = Tape(row_size=lambda minute, price: ROW, hold_max=5)
    t.add(trades[0])
    for trade in trades[2:8]:
        t.add(trade)
    assert t.gaps == [(trades[1].agg_id, trades[1].agg_id)] and t.next_id == trades[8].agg_id


@settings(max_examples=400, deadline=None)
@given(
    st.lists(st.integers(0, 6), min_size=1, max_size=5),
    st.integers(0, 10_000),
    st.floats(0, 0.3),
    st.floats(0, 0.3),
    st.floats(0, 0.3),
)
def test_a_final_bar_is_always_exactly_its_minutes_trades(per_minute, seed, drop, duplicate, swap):
    """Whatever the faults, a minute declared final equals the fold of its true trades;
    a minute that lost a trade is never final; every closed minute gets one outcome."""
    trades = make_trades(per_minute, seed)
    rng = random.Random(seed)
    delivered = []
    for trade in trades:
        if rng.random() < drop:
            continue
        delivered.append(trade)
        if rng.random() < duplicate:
            delivered.append(trade)
    for i in range(len(delivered) - 1):
        if rng.random() < swap:
            delivered[i], delivered[i + 1] = delivered[i + 1], delivered[i]
    minutes = [T0 + m * M1 for m in range(len(per_minute))]
    events: list[tuple[str, object]] = [("trade", trade) for trade in delivered]
    for minute in minutes:  # each close anywhere after its minute's first delivered trade
        first = next(
            (i for i, (kind, tr) in enumerate(events) if kind == "trade" and minute_of(tr) >= minute),  # type: ignore[arg-type]
            len(events),
        )
        events.insert(rng.randint(first, len(events)), ("close", check_of(trades, minute)))
    t = tape()
    for kind, item in events:
        if kind == "trade":
            t.add(item)  # type: ignore[arg-type]
        else:
            t.close(item, 0)  # type: ignore[arg-type]
    t.tick(10**15)
    lost = {minute_of(trade) for trade in trades if trade not in delivered}
    outcomes = {}
    for outcome in t.outcomes:
        assert outcome.open_time not in outcomes, "two outcomes for one minute"
        outcomes[outcome.open_time] = outcome
    assert set(outcomes) == set(minutes)
    for minute, outcome in outcomes.items():
        if outcome.status == "final":
            assert minute not in lost
            assert outcome.bar == truth(trades, minute)


def test_open_minutes_no_close_came_for_are_let_go_and_named():
    trades = make_trades([3, 3, 3])
    t = tape()
    for trade in trades:
        t.add(trade)
    t.broken.add(T0)
    assert t.drop_before(T0 + 2 * M1) == [T0, T0 + M1]  # their closes never came: refetched by the caller
    assert list(t.bars) == [T0 + 2 * M1] and not t.broken
    t.close(check_of(trades, T0 + 2 * M1), 0)
    assert finals(t) == {T0 + 2 * M1: truth(trades, T0 + 2 * M1)}
