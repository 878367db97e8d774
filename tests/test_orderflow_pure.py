"""The order-flow fold, the footprint rules and the row size: pure, no servers. Checked by
hand-built cases for each rule, against an independent recomputation in decimals, and
against Binance's own klines for the real 2024-07-19 trades."""

from __future__ import annotations

import csv
import dataclasses
import json
from collections import defaultdict
from decimal import Decimal
from fractions import Fraction
from itertools import groupby, islice, pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import binance.trades as binance_trades
from binance.protocol import FrameError
from binance.trades import agg_trades_of, parse_agg_trade_frame
from fake_exchange.frames import first_trade_id
from fake_exchange.trades import Unreproducible, agg_count, synthesize
from market_data import STREAMS_DIR, archive_symbols, read_archive, recorded_agg_trades
from orderflow.fold import UNIT, AggTrade, BarFlow, fold, merge, to_units, units_decimal, units_text
from orderflow.profile import ImbalanceRules, point_of_control, profile, runs, value_area
from orderflow.rows import TF_ROW_MULTIPLE, m1_row_size, mean_true_range, row_size, snap

M1 = 60_000


def trade(a: int, price: str, qty: str, sold: bool, t: int = 0, trades: int = 1) -> AggTrade:
    return AggTrade(a, to_units(price), to_units(qty), 10 * a, 10 * a + trades - 1, t, sold)


# --------------------------------------------------------------------------- units


@pytest.mark.parametrize(
    ("text", "units"),
    [
        ("63944.10", 6_394_410_000_000),
        ("0.001", 100_000),
        ("0.00000001", 1),
        ("5", 5 * UNIT),
        ("1.2300000000", 123 * UNIT // 100),
    ],
)
def test_decimal_text_becomes_exact_units_and_back(text, units):
    assert to_units(text) == units
    assert Decimal(units_text(units)) == Decimal(text)


@pytest.mark.parametrize("text", ["", "-1", "1e-5", ".5", "1.000000001", "NaN", "1,5", " 1"])
def test_anything_but_a_plain_decimal_is_refused(text):
    with pytest.raises(ValueError):
        to_units(text)


def test_negative_units_print_with_their_sign():
    assert units_text(-150_000_000) == "-1.5" and units_text(-1) == "-0.00000001" and units_text(0) == "0"


# --------------------------------------------------------------------------- the fold


def test_a_bar_by_hand():
    bar = fold(
        0,
        to_units("0.5"),
        [
            trade(1, "100.2", "2", sold=False, trades=3),  # taker bought 2 at 100.2: ask, row 100.0
            trade(2, "100.7", "1", sold=True),  # taker sold 1 at 100.7: bid, row 100.5
            trade(3, "100.1", "5", sold=True, trades=2),  # sold 5 at 100.1: bid, row 100.0
            trade(4, "100.9", "0.5", sold=False),
        ],
    )
    assert (bar.buy, bar.sell, bar.delta) == (to_units("2.5"), to_units("6"), -to_units("3.5"))
    # running delta after each trade: +2, +1, -4, -3.5
    assert (bar.delta_min, bar.delta_max) == (-to_units("4"), to_units("2"))
    assert (bar.agg_trades, bar.trades, bar.buy_trades, bar.sell_trades) == (4, 7, 2, 2)
    assert (bar.high, bar.low, bar.max_qty) == (to_units("100.9"), to_units("100.1"), to_units("5"))
    assert (bar.first_agg_id, bar.last_agg_id, bar.first_trade_id, bar.last_trade_id) == (1, 4, 10, 40)
    assert bar.footprint() == [
        (200, to_units("5"), to_units("2"), 1, 1),
        (201, to_units("1"), to_units("0.5"), 1, 1),
    ]
    # (100.2*2 + 100.7 + 100.1*5 + 100.9*0.5) / 8.5 = 852.05 / 8.5 = 100.241176470...
    assert bar.vwap() == Decimal("100.24117647")


def test_a_bar_without_trades_has_no_extremes_and_no_vwap():
    bar = fold(0, 100, [])
    assert bar.delta_min is None and bar.vwap() is None and bar.footprint() == [] and profile([]) is None


def test_a_trade_on_a_row_edge_belongs_to_the_row_above():
    bar = fold(0, to_units("0.5"), [trade(1, "100.5", "1", sold=False), trade(2, "100.49999999", "1", sold=False)])
    assert [row[0] for row in bar.footprint()] == [200, 201]


prices = st.integers(1, 400).map(lambda k: f"{99 + k * Decimal('0.01'):.2f}")
quantities = st.integers(1, 5_000).map(lambda k: str(Decimal(k) / 1000))
trade_lists = st.lists(st.tuples(prices, quantities, st.booleans(), st.integers(1, 4)), max_size=60)


def reference(trades: list[tuple[str, str, bool, int]], row: Decimal) -> dict:
    """The same bar in decimals, written from the definitions (SPEC section 13)."""
    running, path = Decimal(0), []
    rows: dict[Decimal, list] = defaultdict(lambda: [Decimal(0), Decimal(0), 0, 0])
    for price, qty, sold, _ in trades:
        p, q = Decimal(price), Decimal(qty)
        running += -q if sold else q
        path.append(running)
        cell = rows[(p / row).to_integral_value(rounding="ROUND_FLOOR") * row]
        cell[0 if sold else 1] += q
        cell[2 if sold else 3] += 1
    return {
        "buy": sum((Decimal(q) for _, q, s, _ in trades if not s), Decimal(0)),
        "sell": sum((Decimal(q) for _, q, s, _ in trades if s), Decimal(0)),
        "min": min(path, default=None),
        "max": max(path, default=None),
        "trades": sum(n for *_, n in trades),
        "rows": {edge: tuple(cell) for edge, cell in rows.items()},
    }


def as_agg(trades: list[tuple[str, str, bool, int]]) -> list[AggTrade]:
    out, next_id = [], 100
    for a, (price, qty, sold, n) in enumerate(trades, start=1):
        out.append(AggTrade(a, to_units(price), to_units(qty), next_id, next_id + n - 1, a, sold))
        next_id += n
    return out


@settings(max_examples=300, deadline=None)
@given(trade_lists, st.sampled_from(["0.01", "0.05", "0.1", "0.25", "1"]))
def test_the_fold_equals_its_definition_in_decimals(trades, row_text):
    bar = fold(0, to_units(row_text), as_agg(trades))
    want = reference(trades, Decimal(row_text))
    assert (units_decimal(bar.buy), units_decimal(bar.sell)) == (want["buy"], want["sell"])
    assert bar.trades == want["trades"] and bar.agg_trades == len(trades)
    if trades:
        assert (units_decimal(bar.delta_min), units_decimal(bar.delta_max)) == (want["min"], want["max"])
    got = {
        units_decimal(i * bar.row_size): (units_decimal(b), units_decimal(a), bn, an)
        for i, b, a, bn, an in bar.footprint()
    }
    assert got == want["rows"]


@settings(max_examples=300, deadline=None)
@given(st.lists(trade_lists, min_size=1, max_size=5), st.sampled_from([1, 2, 4, 5]))
def test_merged_minutes_equal_the_fold_of_all_their_trades(minutes, multiple):
    """M5/M15 from M1s: every field, including the running delta's extremes across the
    minutes and rows re-binned into the coarser size, as if folded from the trades."""
    every = as_agg([t for minute in minutes for t in minute])
    m1_row = to_units("0.05")
    m1_bars, start = [], 0
    for minute in minutes:
        m1_bars.append(fold(start, m1_row, every[start : start + len(minute)]))
        start += len(minute)
    merged = merge(0, m1_row * multiple, m1_bars)
    assert merged == fold(0, m1_row * multiple, every)


def test_merge_refuses_a_row_size_that_is_not_a_multiple():
    with pytest.raises(ValueError):
        merge(0, 3, [BarFlow(0, 2)])


# --------------------------------------------------------------------------- the profile


def rows_of(*cells: tuple[int, int]) -> list[tuple[int, int, int, int, int]]:
    """Rows from index 0 up, (bid, ask) each; trade counts 1 where there is volume."""
    return [(i, b, a, int(b > 0), int(a > 0)) for i, (b, a) in enumerate(cells) if b or a]


def test_point_of_control_ties_go_to_the_middle_then_down():
    assert point_of_control([5, 1, 5, 1, 5]) == 2  # the middle of three equal
    assert point_of_control([5, 1, 1, 5]) == 0  # equally far from the middle: the lower
    assert point_of_control([1, 5, 5, 1]) == 1
    assert point_of_control([7]) == 0


def test_value_area_grows_toward_the_larger_side_and_takes_both_on_a_tie():
    #          0  1  2   3   4  5  6
    totals = [1, 2, 10, 40, 10, 3, 1]  # 67 in all; 70% is 46.9
    assert value_area(totals, 3) == (2, 4)  # 40, then both 10s on a tie: 60
    assert value_area([10, 30, 5, 1], 1) == (0, 1)  # 30 + 10 = 40 of 46 (87%)
    assert value_area([0, 0, 9, 1], 2) == (2, 2)  # the POC alone holds 90%
    assert value_area([4], 0) == (0, 0)
    assert value_area([3, 3], 0, percent=100) == (0, 1)


def test_diagonal_imbalances_compare_a_row_with_its_neighbour_below_or_above():
    rules = ImbalanceRules(ratio=Fraction(3), min_volume=0)
    #          bid ask
    rows = rows_of((2, 0), (9, 6), (1, 7), (0, 0), (0, 4))
    p = profile(rows, rules)
    # buying: ask at 1 (6) vs bid at 0 (2): 3x; ask at 2 (7) vs bid at 1 (9): no; ask at 4 (4) vs bid at 3 (0): yes
    assert p.buy_imbalances == (1, 4)
    # selling: bid at 0 (2) vs ask at 1 (6): no; bid at 1 (9) vs ask at 2 (7): no; bid at 2 (1) vs ask at 3 (0): yes
    assert p.sell_imbalances == (2,)


def test_an_imbalance_needs_the_ratio_exactly_and_the_minimum_volume():
    rows = rows_of((10, 0), (0, 29), (10, 30))
    assert profile(rows, ImbalanceRules(ratio=Fraction(3))).buy_imbalances == (2,)  # 30 >= 3*10, 29 < 3*10
    assert profile(rows, ImbalanceRules(ratio=Fraction(29, 10))).buy_imbalances == (1, 2)
    assert profile(rows, ImbalanceRules(ratio=Fraction(3), min_volume=31)).buy_imbalances == ()


def test_stacked_imbalances_are_every_run_of_three_or_more_on_both_sides():
    assert runs([1, 2, 3, 5, 6, 8, 9, 10, 11], 3) == [(1, 3), (8, 11)]
    assert runs([], 3) == [] and runs([4], 1) == [(4, 4)]
    # asks over empty bids: buying imbalances at 1..4 and 6..8; bids over empty asks: selling at 9..11
    # (row 5: no ask to count, and its bid of 1 is under a third of the ask above it)
    cells = [(1, 0), (0, 5), (0, 5), (0, 5), (0, 5), (1, 0), (0, 9), (0, 9), (0, 9), (9, 0), (9, 0), (9, 0), (9, 0)]
    p = profile(rows_of(*cells), ImbalanceRules())
    assert p.stacked_buy == ((1, 4), (6, 8))
    assert p.stacked_sell == ((9, 11),)  # bid at 12 has no row above it in the bar


def test_unfinished_auctions_need_both_sides_at_the_extreme_row():
    assert profile(rows_of((1, 1), (0, 3), (2, 2))).unfinished_high and profile(rows_of((1, 1), (2, 2))).unfinished_low
    p = profile(rows_of((0, 1), (2, 2), (3, 0)))
    assert not p.unfinished_high and not p.unfinished_low
    one = profile(rows_of((4, 1)))  # one row: it is the high and the low
    assert one.unfinished_high and one.unfinished_low and (one.poc, one.val, one.vah) == (0, 0, 0)
    assert one.buy_imbalances == () and one.sell_imbalances == ()


def test_rows_missing_inside_the_range_are_rows_of_zero():
    rows = [(10, 1, 0, 1, 0), (14, 0, 2, 0, 1)]  # 11-13 printed nothing
    p = profile(rows)
    assert p.buy_imbalances == (14,) and p.sell_imbalances == (10,)
    # the POC holds 2 of 3 (67%): the area grows down through the empty rows to 10
    assert (p.poc, p.val, p.vah) == (14, 10, 14)
    assert (profile(rows, percent=60).val, profile(rows, percent=60).vah) == (14, 14)


# --------------------------------------------------------------------------- the row size


def test_snap_takes_the_largest_1_2_5_step_not_above():
    tick = 10  # 0.0000001
    assert snap(Fraction(1), tick) == 10  # at least one tick
    assert [snap(x, tick) for x in (19, 20, 49, 50, 99, 100, 199, 200, 4_999)] == [
        10,
        20,
        20,
        50,
        50,
        100,
        100,
        200,
        2000,
    ]
    with pytest.raises(ValueError):
        snap(5, 0)


def test_the_row_size_comes_from_the_previous_days_true_range():
    tick = to_units("0.1")
    # true ranges: 10 (first bar's high-low), then max(h, prev c) - min(l, prev c)
    bars = [
        (to_units(h), to_units(lo), to_units(c))
        for h, lo, c in [("110", "100", "105"), ("108", "106", "107"), ("120", "118", "119")]
    ]
    assert mean_true_range(bars) == Fraction(to_units("10") + to_units("3") + to_units("13"), 3)
    assert m1_row_size(bars, tick) == to_units("0.5")  # 8.67 / 10 rows -> 0.867 -> 0.5
    assert m1_row_size(bars, tick, target_rows=4) == to_units("2")  # 2.17 -> 2
    assert m1_row_size([], tick) == 10 * tick
    assert [row_size(to_units("0.5"), tf) for tf in ("m1", "m5", "m15")] == [to_units(x) for x in ("0.5", "1", "2")]
    assert row_size(to_units("0.5"), "m15", fixed=to_units("0.3")) == to_units("1.2")
    multiples = list(TF_ROW_MULTIPLE.values())
    assert all(b % a == 0 for a, b in pairwise(multiples)), "each merges the rows of those below"


# --------------------------------------------------------------------------- real trades


def recorded_klines(symbol: str) -> dict[int, dict]:
    with open(STREAMS_DIR / "klines_1m.csv", newline="") as f:
        return {int(r["open_time"]): r for r in csv.DictReader(f) if r["symbol"] == symbol}


@pytest.mark.parametrize("symbol", ["BTCUSDT", "ETHUSDT"])
def test_the_real_trades_of_seven_minutes_fold_into_binances_own_klines(symbol):
    klines = recorded_klines(symbol)
    trades = agg_trades_of(list(recorded_agg_trades(symbol)))
    assert all(b.agg_id == a.agg_id + 1 for a, b in pairwise(trades))
    by_minute = {m: list(g) for m, g in groupby(trades, key=lambda t: t.time_ms // M1 * M1)}
    complete = sorted(by_minute)[1:-1]  # the recording starts and ends inside a minute
    assert len(complete) == 7
    for minute in complete:
        kline = klines[minute]
        bar = fold(minute, to_units("0.1"), by_minute[minute])
        assert units_decimal(bar.volume) == Decimal(kline["volume"]), minute
        assert units_decimal(bar.buy) == Decimal(kline["taker_buy_volume"]), minute
        assert bar.trades == int(kline["count"]), minute
        assert (units_decimal(bar.high), units_decimal(bar.low)) == (Decimal(kline["high"]), Decimal(kline["low"]))
        assert sum(r[1] + r[2] for r in bar.footprint()) == bar.volume
    m5 = merge(complete[2], to_units("0.2"), [fold(m, to_units("0.1"), by_minute[m]) for m in complete[2:7]])
    assert m5 == fold(complete[2], to_units("0.2"), [t for m in complete[2:7] for t in by_minute[m]])


# --------------------------------------------------------------------------- frames


def agg_frame(**changes) -> str:
    event = {"e": "aggTrade", "E": 1721347022957, "s": "BTCUSDT", "a": 2263390785, "p": "63943.90", "q": "0.020"}
    event |= {"nq": "0.020", "f": 5182005737, "l": 5182005738, "T": 1721347022956, "m": True}
    stream = changes.pop("stream", "btcusdt@aggTrade")
    event |= changes
    return json.dumps({"stream": stream, "data": {k: v for k, v in event.items() if v is not None}})


def test_an_agg_trade_frame_becomes_a_trade_in_exact_units():
    symbol, got = parse_agg_trade_frame(agg_frame())
    assert symbol == "BTCUSDT"
    assert got == AggTrade(
        2263390785, to_units("63943.9"), to_units("0.02"), 5182005737, 5182005738, 1721347022956, True
    )
    assert parse_agg_trade_frame(agg_frame().encode())[1] == got


@pytest.mark.parametrize(
    "changes",
    [
        {"p": "0"},
        {"p": "-1.5"},
        {"q": "-0.001"},
        {"p": "1e3"},
        {"q": "abc"},
        {"p": 63943.9},  # a number, not Binance's text
        {"l": 5182005736},  # last trade id before the first
        {"T": 1721347022956000},  # microseconds
        {"a": -1},
        {"m": "true"},
        {"p": None},  # missing
        {"stream": "ethusdt@aggTrade"},  # another symbol's stream
        {"stream": "btcusdt@kline_1m"},
        {"e": "trade"},
        {"s": "btc usdt", "stream": "btc usdt@aggTrade"},
    ],
)
def test_a_bad_agg_trade_frame_is_refused_with_a_reason(changes):
    with pytest.raises(FrameError) as refused:
        parse_agg_trade_frame(agg_frame(**changes))
    assert str(refused.value)


def test_what_the_parser_remembers_never_lets_a_bad_frame_through_and_stays_bounded(monkeypatch):
    good = parse_agg_trade_frame(agg_frame())
    assert parse_agg_trade_frame(agg_frame()) == good  # the second time from what it remembered
    for changes in ({"p": "-63943.90"}, {"s": "btcusdt", "stream": "btcusdt@aggTrade"}, {"stream": "ethusdt@aggTrade"}):
        with pytest.raises(FrameError):
            parse_agg_trade_frame(agg_frame(**changes))
    assert parse_agg_trade_frame(agg_frame(s="ETHUSDT", stream="ethusdt@aggTrade"))[0] == "ETHUSDT"
    monkeypatch.setattr(binance_trades, "_UNITS_KEPT", 50)
    for i in range(1, 200):
        assert parse_agg_trade_frame(agg_frame(p=f"{i}.5"))[1].price == to_units(f"{i}.5")
    assert len(binance_trades._UNITS) <= 50


@pytest.mark.parametrize("raw", ["", "{", "[]", '{"stream": "btcusdt@aggTrade"}', b"\xff\xfe"])
def test_a_frame_that_is_no_agg_trade_at_all_is_refused(raw):
    with pytest.raises(FrameError):
        parse_agg_trade_frame(raw)


def test_rest_agg_trade_rows_parse_and_a_cut_body_is_refused():
    body = json.dumps(
        [
            {"a": 26129, "p": "0.01633102", "q": "4.70443515", "f": 27781, "l": 27781, "T": 1721347022956, "m": True},
            {"a": 26130, "p": "0.01633103", "q": "1", "f": 27782, "l": 27790, "T": 1721347022957, "m": False},
        ]
    )
    rows = agg_trades_of(body)
    assert [r.agg_id for r in rows] == [26129, 26130] and rows[1].last_trade_id - rows[1].first_trade_id == 8
    assert rows[0].price == 1_633_102 and rows[0].qty == 470_443_515 and rows[0].buyer_maker
    with pytest.raises(FrameError):
        agg_trades_of(body[:-20])
    assert agg_trades_of("[]") == []


def test_every_recorded_trade_survives_its_frame():
    """The recordings as aggTrade frames, as the fake exchange will send them."""
    events = list(recorded_agg_trades("ETHUSDT"))
    for event in events:
        symbol, got = parse_agg_trade_frame(json.dumps({"stream": "ethusdt@aggTrade", "data": event}))
        assert symbol == "ETHUSDT" and (got.agg_id, got.first_trade_id, got.time_ms) == (
            event["a"],
            event["f"],
            event["T"],
        )
        assert units_decimal(got.qty) == Decimal(event["q"]) and units_decimal(got.price) == Decimal(event["p"])


# --------------------------------------------------------------------------- the fake exchange's trades


@pytest.mark.parametrize("symbol", archive_symbols())
def test_made_up_trades_reproduce_every_archived_kline_exactly(symbol):
    """A day of each archived symbol: folded, the trades give the kline's open,
    high, low, close, volume, taker buy volume, trade count and first/last trade ids."""
    agg_id = 1
    for candle in islice(read_archive(symbol), 1440):
        first_trade = first_trade_id(symbol, candle.open_time)
        rows = synthesize(candle, agg_id, first_trade)
        assert len(rows) == agg_count(candle)
        trades = [AggTrade(r["a"], to_units(r["p"]), to_units(r["q"]), r["f"], r["l"], r["T"], r["m"]) for r in rows]
        bar = fold(candle.open_time, 1, trades)
        assert units_decimal(bar.volume) == candle.volume and units_decimal(bar.buy) == candle.taker_buy_volume
        assert bar.trades == candle.trades
        if trades:
            assert (units_decimal(trades[0].price), units_decimal(trades[-1].price)) == (candle.open, candle.close)
            assert (units_decimal(bar.high), units_decimal(bar.low)) == (candle.high, candle.low)
            assert (bar.first_trade_id, bar.last_trade_id) == (first_trade, first_trade + candle.trades - 1)
            assert all(candle.open_time <= t.time_ms < candle.open_time + M1 and t.qty > 0 for t in trades)
            assert [t.agg_id for t in trades] == list(range(agg_id, agg_id + len(trades)))
        agg_id += len(rows)
    assert synthesize(candle, 7, 9) == synthesize(candle, 7, 9)  # deterministic


def test_a_kline_no_trades_can_make_is_refused():
    candle = next(read_archive("LINKUSDT"))
    with pytest.raises(Unreproducible):
        synthesize(dataclasses.replace(candle, trades=2, high=candle.high + 1, low=candle.low - Decimal("0.001")), 1, 1)
