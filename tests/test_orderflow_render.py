"""Footprint documents made row by row and kept (orderflow/render.py): the bytes always
equal the document made from scratch, however the bar changed in between. No servers."""

from __future__ import annotations

from itertools import groupby

import orjson

from binance.trades import agg_trades_of
from market_data import recorded_agg_trades
from orderflow.fold import BarFlow, fold, merge, to_units
from orderflow.output import footprint_document
from orderflow.profile import ImbalanceRules, profile
from orderflow.render import FootprintRenderer

M1 = 60_000
RULES = ImbalanceRules()


def minutes_of(symbol: str, row: str) -> list[tuple[int, list]]:
    trades = agg_trades_of(list(recorded_agg_trades(symbol)))
    return [(minute, list(group)) for minute, group in groupby(trades, key=lambda t: t.time_ms // M1 * M1)]


def scratch(bar: BarFlow, with_profile: bool) -> bytes:
    return orjson.dumps(footprint_document(bar, profile(bar.footprint(), RULES) if with_profile else None))


def test_closed_documents_equal_the_document_made_from_scratch():
    renderer = FootprintRenderer()
    for symbol, row in (("BTCUSDT", "1"), ("ETHUSDT", "0.1"), ("ETHUSDT", "0.05")):
        for minute, trades in minutes_of(symbol, row):
            bar = fold(minute, to_units(row), trades)
            p = profile(bar.footprint(), RULES)
            assert renderer.document((symbol, "m1"), bar, p) == scratch(bar, True)
            assert renderer.document((symbol, "m1"), bar) == scratch(bar, False)


def test_a_forming_bar_sent_as_it_grows_is_always_the_document_of_its_trades():
    """Rows are re-made only when they change: a trade into a kept row must show."""
    renderer = FootprintRenderer()
    minute, trades = minutes_of("BTCUSDT", "1")[2]
    bar = BarFlow(minute, to_units("1"))
    sent = 0
    for i, trade in enumerate(trades):
        bar.add(trade)
        if i % 7 == 0 or i == len(trades) - 1:
            assert renderer.document(("BTCUSDT", "m1"), bar) == scratch(bar, False)
            sent += 1
    assert sent > 20 and len(bar.rows) > 5
    assert renderer.document(("BTCUSDT", "m1"), bar, profile(bar.footprint(), RULES)) == scratch(bar, True)


def test_merged_bars_and_other_row_sizes_of_the_same_time_are_made_apart():
    renderer = FootprintRenderer()
    bars = [fold(minute, to_units("1"), trades) for minute, trades in minutes_of("BTCUSDT", "1")[1:6]]
    start = bars[0].open_time
    for n in range(1, len(bars) + 1):  # the forming M5 as its minutes come
        m5 = merge(start, to_units("2"), bars[:n])
        assert renderer.document(("BTCUSDT", "m5"), m5) == scratch(m5, False)
    coarser = merge(start, to_units("4"), bars)
    assert renderer.document(("BTCUSDT", "m5"), coarser) == scratch(coarser, False)


def test_each_series_keeps_its_newest_bars_and_a_rebuild_of_an_older_one_evicts_none():
    renderer = FootprintRenderer(kept=2)
    bars = [fold(minute, to_units("1"), trades) for minute, trades in minutes_of("BTCUSDT", "1")[1:5]]
    for bar in bars[1:]:
        renderer.document(("BTCUSDT", "m1"), bar)
    kept = {open_time for open_time, _ in renderer.rows[("BTCUSDT", "m1")]}
    assert kept == {bars[2].open_time, bars[3].open_time}
    assert renderer.document(("BTCUSDT", "m1"), bars[0]) == scratch(bars[0], False)  # a refetched minute
    assert {t for t, _ in renderer.rows[("BTCUSDT", "m1")]} == kept
    renderer.document(("ETHUSDT", "m1"), bars[0])
    renderer.forget({"BTCUSDT"})
    assert list(renderer.rows) == [("ETHUSDT", "m1")]
