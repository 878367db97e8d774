"""The chain of final minutes (orderflow/chain.py) and the row rule's inputs, no servers:
minutes published in order whatever order they come in, CVD as the running sum, M5/M15
merged when their last minute is published, unfillable minutes skipped, a restart
resumed from stored bars."""

from __future__ import annotations

import random

import pytest

from binance.symbols import parse_listing
from candles import DAY_MS, TF_MS
from orderflow.chain import SymbolChain, forming_parts, left_out_buckets, read_back_from
from orderflow.fold import AggTrade, BarFlow, fold, merge
from orderflow.output import CvdChain
from orderflow.rows import day_row, first_price_row

M1 = 60_000
DAY = 1_770_163_200_000  # 2026-02-04 00:00 UTC
ROW = 1_000_000  # 0.01


def minute_bar(minute: int, seed: int) -> BarFlow:
    rng = random.Random(seed)
    trades = [
        AggTrade(
            seed * 1000 + i,
            100_000_000 + rng.randrange(-50, 50) * ROW,
            rng.randrange(1, 10**8),
            i,
            i,
            minute,
            rng.random() < 0.5,
        )
        for i in range(rng.randrange(0, 12))
    ]
    return fold(minute, ROW, trades)


def published(chain: SymbolChain, offers: list[tuple[int, BarFlow | None]]) -> list:
    out = []
    for minute, bar in offers:
        out += chain.offer(minute, bar)
    return out


def test_minutes_offered_out_of_order_are_published_in_order_with_the_running_cvd():
    bars = {DAY + k * M1: minute_bar(DAY + k * M1, k) for k in range(15)}
    offers = list(bars.items())
    random.Random(3).shuffle(offers)
    chain = SymbolChain("LINKUSDT")
    chain.start(DAY)
    out = published(chain, offers)
    m1 = [b for b in out if b.tf == "m1"]
    assert [b.bar.open_time for b in m1] == sorted(bars)
    running = 0
    for bar in m1:
        running += bar.bar.delta
        assert bar.cvd == running == bar.cvd_day
    m5 = [b for b in out if b.tf == "m5"]
    assert [b.bar.open_time for b in m5] == [DAY, DAY + 5 * M1, DAY + 10 * M1]
    for b in m5:
        parts = [bars[b.bar.open_time + k * M1] for k in range(5)]
        assert b.bar == merge(b.bar.open_time, 2 * ROW, parts)
    [m15] = [b for b in out if b.tf == "m15"]
    assert m15.bar == merge(DAY, 4 * ROW, list(bars.values())) and m15.cvd == running
    assert chain.offer(DAY + 3 * M1, bars[DAY + 3 * M1]) == []  # a repeat changes nothing


def test_a_chain_that_starts_inside_a_bucket_skips_that_bucket_only():
    chain = SymbolChain("LINKUSDT")
    out = published(chain, [(DAY + k * M1, minute_bar(DAY + k * M1, k)) for k in range(3, 16)])
    assert [b.bar.open_time for b in out if b.tf == "m5"] == [DAY + 5 * M1, DAY + 10 * M1]
    assert [b for b in out if b.tf == "m15"] == []
    assert len([b for b in out if b.tf == "m1"]) == 13


def test_an_unfillable_minute_has_no_row_the_cvd_carries_on_and_its_buckets_are_not_written():
    chain = SymbolChain("LINKUSDT")
    chain.start(DAY)
    bars = {DAY + k * M1: minute_bar(DAY + k * M1, k + 1) for k in range(15)}
    offers = [(t, None if t == DAY + 7 * M1 else bar) for t, bar in bars.items()]
    out = published(chain, offers[8:] + offers[:8])  # the later minutes wait for the earlier
    m1 = [b for b in out if b.tf == "m1"]
    assert [b.bar.open_time for b in m1] == [t for t in bars if t != DAY + 7 * M1]
    assert m1[-1].cvd == sum(bar.delta for t, bar in bars.items() if t != DAY + 7 * M1)
    assert [b.bar.open_time for b in out if b.tf == "m5"] == [DAY, DAY + 10 * M1]
    assert [b for b in out if b.tf == "m15"] == []


def test_cvd_day_restarts_at_midnight_and_cvd_runs_on():
    chain = SymbolChain("LINKUSDT")
    start = DAY + DAY_MS - 2 * M1
    out = published(chain, [(start + k * M1, minute_bar(start + k * M1, k + 5)) for k in range(4)])
    m1 = [b for b in out if b.tf == "m1"]
    deltas = [b.bar.delta for b in m1]
    assert [b.cvd for b in m1] == [sum(deltas[: k + 1]) for k in range(4)]
    assert [b.cvd_day for b in m1] == [deltas[0], deltas[0] + deltas[1], deltas[2], deltas[2] + deltas[3]]


def test_a_resumed_chain_merges_the_stored_minutes_of_its_buckets():
    bars = {DAY + k * M1: minute_bar(DAY + k * M1, k + 9) for k in range(15)}
    whole = SymbolChain("LINKUSDT")
    whole.start(DAY)
    expected = published(whole, list(bars.items()))
    before = SymbolChain("LINKUSDT")
    before.start(DAY)
    first_part = published(before, list(bars.items())[:7])
    resumed = SymbolChain("LINKUSDT")
    cvd = {
        tf: CvdChain(last.cvd, last.cvd_day, DAY)
        for tf in ("m1", "m5")
        for last in [[b for b in first_part if b.tf == tf][-1]]
    }
    cvd["m15"] = CvdChain()
    stored = list(bars.values())[:7]
    resumed.resume(DAY + 7 * M1, cvd, {"m5": [("m1", b) for b in stored[5:]], "m15": [("m1", b) for b in stored]})
    rest = published(resumed, list(bars.items())[7:])
    assert [(b.tf, b.bar, b.cvd) for b in first_part + rest] == [(b.tf, b.bar, b.cvd) for b in expected]


HIGHER = ("m5", "m15", "h1", "h4", "d1")


def test_h1_h4_and_d1_are_the_merge_of_their_minutes_and_a_restart_resumes_them_from_stored_bars():
    """Two days of minutes (some quiet) through a chain with every timeframe; a restart at
    random minutes resumes from the stored bars, coarsest first (forming_parts), and goes
    on to publish exactly what the unbroken chain published."""
    minutes = [DAY + k * M1 for k in range(2 * 1440)]
    bars = {t: minute_bar(t, k + 1) for k, t in enumerate(minutes)}
    whole = SymbolChain("LINKUSDT", higher=HIGHER)
    whole.start(DAY)
    expected = published(whole, list(bars.items()))
    for tf, multiple in (("h1", 8), ("h4", 16), ("d1", 32)):
        finals = [b for b in expected if b.tf == tf]
        assert len(finals) == 2 * DAY_MS // TF_MS[tf]
        for final in finals:
            start = final.bar.open_time
            parts = [bars[t] for t in range(start, start + TF_MS[tf], M1)]
            assert final.bar == merge(start, multiple * ROW, parts), (tf, start)
    assert [b.cvd for b in expected if b.tf == "d1"][-1] == sum(b.delta for b in bars.values())
    for restart in [*random.Random(5).sample(minutes[1:], 12), DAY + 1440 * M1 + 1439 * M1]:
        before = [b for b in expected if b.bar.open_time + TF_MS[b.tf] <= restart]
        stored = {(b.tf, b.bar.open_time): b.bar for b in before}
        newest = {b.tf: b for b in before}  # the newest stored bar of each series
        cvd = {
            tf: CvdChain(b.cvd, b.cvd_day, b.bar.open_time - b.bar.open_time % DAY_MS)
            if (b := newest.get(tf))
            else CvdChain()
            for tf in ("m1", *HIGHER)
        }
        resumed = SymbolChain("LINKUSDT", higher=HIGHER)
        parts = {tf: forming_parts(tf, restart, stored) for tf in HIGHER}
        if restart % DAY_MS > 4 * 3_600_000:
            assert len(parts["d1"]) < 30, "read back as coarse bars, not minutes"
        resumed.resume(restart, cvd, parts)
        rest = published(resumed, [(t, bars[t]) for t in minutes if t >= restart])
        after = [b for b in expected if b.bar.open_time + TF_MS[b.tf] > restart]
        assert [(b.tf, b.bar, b.cvd, b.cvd_day) for b in rest] == [(b.tf, b.bar, b.cvd, b.cvd_day) for b in after]


@pytest.mark.parametrize("higher", [HIGHER, ("m5", "m15")], ids=["to-d1", "m5-m15"])
def test_a_symbol_handed_over_between_its_minutes_and_their_buckets_gets_the_buckets_from_its_next_owner(higher):
    """The previous owner wrote part of what it published, as its writer does: in order,
    with the M1 bars of the minutes waiting sent before their buckets (under load, many
    minutes before: the M1 bars of every symbol go first). Wherever it lost the symbol,
    the next owner, resuming from what is stored, publishes the rest: the union is the
    unbroken chain's, every bar once, every CVD the same. (A bucket whose M1 bars were
    written without it was left out, and the buckets after it missed its delta; with
    M5 and M15 only, so was one whose minutes ahead crossed a quarter hour: the scale-out
    run's wrong M5 CVD.)"""
    minutes = [DAY + k * M1 for k in range(3 * 60)]
    bars = {t: minute_bar(t, k + 11) for k, t in enumerate(minutes)}
    whole = SymbolChain("LINKUSDT", higher=higher)
    whole.start(DAY)
    expected = published(whole, list(bars.items()))
    left_out_seen = 0
    for cut in range(1, len(expected), 3):
        for ahead in (0, 1, 7, 25):  # M1 bars of the minutes after the cut already written
            m1_ahead = [b for b in expected[cut:] if b.tf == "m1"][:ahead]
            written = expected[:cut] + m1_ahead
            stored = {(b.tf, b.bar.open_time): b.bar for b in written}
            newest = {b.tf: b for b in sorted(written, key=lambda b: b.bar.open_time)}
            restart = newest["m1"].bar.open_time + M1
            cvd = {
                tf: CvdChain(b.cvd, b.cvd_day, b.bar.open_time - b.bar.open_time % DAY_MS)
                if (b := newest.get(tf))
                else CvdChain()
                for tf in ("m1", *higher)
            }
            since = read_back_from(
                restart - M1, {tf: newest[tf].bar.open_time for tf in higher if tf in newest}, higher
            )
            left_out = {
                tf: left_out_buckets(tf, restart, newest[tf].bar.open_time if tf in newest else None, stored, since)
                for tf in higher
            }
            resumed = SymbolChain("LINKUSDT", higher=higher)
            first = resumed.resume(restart, cvd, {tf: forming_parts(tf, restart, stored) for tf in higher}, left_out)
            left_out_seen += len(first)
            rest = first + published(resumed, [(t, bars[t]) for t in minutes if t >= restart])
            union = {(b.tf, b.bar.open_time): (b.bar, b.cvd, b.cvd_day) for b in written + rest}
            assert len(written) + len(rest) == len(expected) == len(union), (cut, ahead)  # each once
            assert union == {(b.tf, b.bar.open_time): (b.bar, b.cvd, b.cvd_day) for b in expected}, (cut, ahead)
    assert left_out_seen > 50


def test_a_forming_bucket_with_a_part_missing_is_not_resumed():
    stored = {("h1", DAY): minute_bar(DAY, 1), ("m1", DAY + 60 * M1): minute_bar(DAY + 60 * M1, 2)}
    assert forming_parts("h4", DAY + 61 * M1, stored) == [
        ("h1", stored[("h1", DAY)]),
        ("m1", stored[("m1", DAY + 60 * M1)]),
    ]
    assert forming_parts("h4", DAY + 62 * M1, stored) is None  # 01:01 is not there
    assert forming_parts("d1", DAY, stored) == []  # nothing formed yet


def test_the_forming_bucket_merges_its_published_minutes_and_the_forming_one():
    chain = SymbolChain("LINKUSDT")
    chain.start(DAY)
    bars = [minute_bar(DAY + k * M1, k + 20) for k in range(7)]
    published(chain, [(b.open_time, b) for b in bars[:6]])
    assert chain.forming("m5", bars[6]) == merge(DAY + 5 * M1, 2 * ROW, bars[5:7])
    assert chain.forming("m15", bars[6]) == merge(DAY, 4 * ROW, bars)


def test_the_row_rule_snaps_the_mean_true_range_to_the_tick_and_knows_no_day():
    # 1,380 bars whose true ranges sum to 1,380 x 0.37 USDT: 0.037 a row, snapped down to 0.02
    assert day_row(1380 * 37_000_000, 1380, 4, 100_000) == (2_000_000, "atr")
    # no tick from the exchange: one unit of the closes' last decimal (4 -> 0.0001)
    assert day_row(1380 * 37_000_000, 1380, 4, None) == (2_000_000, "atr")
    assert day_row(0, 0, 2, None) is None  # no day before: the day's first price decides


def test_without_a_day_before_the_first_price_decides_the_row():
    # BTCUSDT at 63,944.1 with a 0.1 tick: half a basis point is 3.19, snapped down to 2
    assert first_price_row(6_394_410_000_000, 10_000_000) == (200_000_000, "price")
    # no tick from the exchange: the largest power of ten dividing the price (0.1 here)
    assert first_price_row(6_394_410_000_000, None) == (200_000_000, "price")
    # ALGOUSDT at 0.0971 (tick 0.0001): one tick
    assert first_price_row(9_710_000, 10_000) == (10_000, "price")
    assert first_price_row(None, 10_000) == (100_000, "default")  # an empty first minute: 10 ticks


def test_the_tick_comes_from_the_listings_price_filter():
    listing = parse_listing(
        {
            "symbols": [
                {
                    "symbol": "BTCUSDT",
                    "status": "TRADING",
                    "contractType": "PERPETUAL",
                    "filters": [{"filterType": "LOT_SIZE"}, {"filterType": "PRICE_FILTER", "tickSize": "0.10"}],
                },
                {
                    "symbol": "ODDUSDT",
                    "status": "TRADING",
                    "filters": [{"filterType": "PRICE_FILTER", "tickSize": "1e-3"}],
                },
                {"symbol": "NEWUSDT", "status": "PENDING_TRADING"},
            ]
        }
    )
    assert {s: item.tick for s, item in listing.items()} == {"BTCUSDT": 10_000_000, "ODDUSDT": None, "NEWUSDT": None}


def test_skipping_a_long_outage_carries_the_cvd_and_drops_the_buckets_it_cut():
    chain = SymbolChain("LINKUSDT")
    chain.start(DAY)
    first = published(chain, [(DAY + k * M1, minute_bar(DAY + k * M1, k + 30)) for k in range(3)])
    chain.skip_to(DAY + 17 * M1)
    later = published(chain, [(DAY + k * M1, minute_bar(DAY + k * M1, k + 30)) for k in range(17, 31)])
    assert later[0].tf == "m1" and later[0].bar.open_time == DAY + 17 * M1
    assert later[0].cvd == first[-1].cvd + later[0].bar.delta
    assert [b.bar.open_time for b in later if b.tf == "m5"] == [DAY + 20 * M1, DAY + 25 * M1]
    assert [b for b in later if b.tf == "m15"] == []  # 00:15-00:30 lost its first two minutes
