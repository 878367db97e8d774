"""Local order books on Binance's documented rules (no servers): hand-built cases for
each rule, and the real 2024-07-19 recordings, whose book must agree with the recorded
bookTicker wherever the depth stream pins the book's state down."""

from __future__ import annotations

from bisect import bisect_right
from functools import cache

import pytest

from binance.book import (
    DepthDiff,
    DepthSnapshot,
    depth_snapshot_of,
    parse_book_ticker_frame,
    parse_depth_frame,
)
from binance.protocol import FrameError
from book.sync import BookSync, LocalBook
from market_data import recorded_book_frames

T = 1_721_347_200_000


def diff(first: int, last: int, previous: int, bids=(), asks=()) -> DepthDiff:
    return DepthDiff(first, last, previous, list(bids), list(asks), T, T)


def snapshot(last_update_id: int, bids=((100, 5),), asks=((101, 5),)) -> DepthSnapshot:
    return DepthSnapshot(last_update_id, list(bids), list(asks), T, T)


# --------------------------------------------------------------------------- the rules


def test_diffs_older_than_the_snapshot_are_dropped_and_the_one_spanning_it_applied_first():
    sync = BookSync()
    sync.on_diff(diff(1, 5, 0, bids=[(99, 1)]))  # u < lastUpdateId: already in the snapshot
    sync.on_diff(diff(6, 12, 5, bids=[(100, 7)]))  # U <= 10 <= u: the first applied
    sync.on_diff(diff(13, 15, 12, asks=[(101, 0), (102, 3)]))
    assert sync.on_snapshot(snapshot(10))
    book = sync.book
    assert book.update_id == 15 and book.levels() == ([(100, 7)], [(102, 3)])
    assert 99 not in book.bids  # the dropped diff's level never came back


def test_a_snapshot_newer_than_every_buffered_diff_waits_for_the_next():
    sync = BookSync()
    sync.on_diff(diff(1, 5, 0))
    assert not sync.on_snapshot(snapshot(20)) and sync.state == "syncing"
    assert sync.on_diff(diff(18, 25, 5, bids=[(100, 1)])) and sync.state == "synced"
    assert sync.book.best_bid() == (100, 1)


def test_a_snapshot_older_than_the_first_diff_after_it_is_stale_and_another_is_wanted():
    sync = BookSync()
    sync.on_diff(diff(30, 35, 29))
    sync.wants_snapshot = False  # the shell asked for one
    assert not sync.on_snapshot(snapshot(20))
    assert sync.state == "waiting" and sync.wants_snapshot and sync.stale_snapshots == 1
    assert sync.buffer == [diff(30, 35, 29)]  # kept for the next snapshot
    assert sync.on_snapshot(snapshot(32)) and sync.book.update_id == 35


def test_a_broken_chain_throws_the_book_away_counted_with_its_reason():
    sync = BookSync()
    sync.on_snapshot(snapshot(10))
    assert sync.on_diff(diff(9, 12, 8))
    assert sync.on_diff(diff(13, 14, 12))
    assert not sync.on_diff(diff(20, 22, 19))  # pu 19, the book is at 14: a diff was missed
    assert sync.state == "waiting" and sync.book is None and sync.resyncs == 1
    assert "follows 19" in sync.reason and sync.buffer == [diff(20, 22, 19)]


def test_the_buffer_is_bounded_oldest_first():
    sync = BookSync(buffer_max=3)
    for k in range(5):
        sync.on_diff(diff(k * 10, k * 10 + 5, k * 10 - 5))
    assert [d.first_id for d in sync.buffer] == [20, 30, 40]


def test_quantity_zero_deletes_and_the_book_reads_in_price_order():
    book = LocalBook(1, [(100, 1), (99, 2), (98, 3)], [(101, 1), (102, 2), (103, 3)])
    book.apply(diff(2, 2, 1, bids=[(100, 0), (97, 4)], asks=[(101, 0), (104, 0)]))
    assert book.best_bid() == (99, 2) and book.best_ask() == (102, 2)
    assert book.top(2) == ([(99, 2), (98, 3)], [(102, 2), (103, 3)])
    assert book.within(98, 102) == ([99, 98], [2, 3], [102], [2])


def test_frames_are_checked():
    good = (
        '{"stream":"btcusdt@depth@100ms","data":{"e":"depthUpdate","E":1721347022504,"T":1721347022504,'
        '"s":"BTCUSDT","U":5,"u":9,"pu":4,"b":[["63943.9","1.5"]],"a":[["63944.0","0"]]}}'
    )
    symbol, event = parse_depth_frame(good)
    assert symbol == "BTCUSDT" and event.bids == [(6_394_390_000_000, 150_000_000)] and event.asks[0][1] == 0
    for bad in (
        good.replace('"u":9', '"u":3'),  # u before U
        good.replace("btcusdt@depth", "ethusdt@depth"),  # another symbol's stream
        good.replace('"63943.9"', '"-1"'),
        good.replace('"63943.9"', '"0"'),
        good[:-5],
    ):
        with pytest.raises(FrameError):
            parse_depth_frame(bad)
    ticker = (
        '{"stream":"btcusdt@bookTicker","data":{"e":"bookTicker","u":7,"s":"BTCUSDT","b":"63944.0",'
        '"B":"1","a":"63943.9","A":"2","T":1721347022507,"E":1721347022507}}'
    )
    with pytest.raises(FrameError, match="not below"):  # a crossed book ticker
        parse_book_ticker_frame(ticker)
    with pytest.raises(FrameError):
        depth_snapshot_of(b'{"lastUpdateId": 5, "bids": [], "asks": [["x", "1"]], "T": 1721347022507, "E": 1}')


# --------------------------------------------------------------------------- the recordings


@cache
def recorded(symbol: str) -> tuple[DepthSnapshot, list[DepthDiff], list]:
    snap, diffs, tickers = None, [], []
    for kind, text in recorded_book_frames(symbol):
        if kind == "snapshot":
            snap = depth_snapshot_of(text)
        elif kind == "depth":
            diffs.append(parse_depth_frame(text)[1])
        else:
            tickers.append(parse_book_ticker_frame(text)[1])
    return snap, diffs, tickers


def replay(symbol: str, drop: int | None = None, resnap_at: int | None = None) -> BookSync:
    """The recording's diffs and snapshot in the order received (the snapshot came after
    the first few diffs); `drop` leaves one diff out, `resnap_at` answers the snapshot
    the resync wants with the book as of that diff (as REST would, a little later)."""
    snap, diffs, _ = recorded(symbol)
    sync = BookSync()
    snapshot_after = next(i for i, d in enumerate(diffs) if d.last_id >= snap.last_update_id)
    for i, d in enumerate(diffs):
        if i != drop:
            sync.on_diff(d)
        if i == snapshot_after:
            sync.on_snapshot(snap)
        if resnap_at is not None and sync.state == "waiting" and i == resnap_at + 3:
            bids, asks = reference_levels(symbol, resnap_at)
            sync.on_snapshot(DepthSnapshot(diffs[resnap_at].last_id, bids, asks, d.time_ms, d.event_ms))
    return sync


@cache
def reference_levels(symbol: str, at: int) -> tuple[list, list]:
    snap, diffs, _ = recorded(symbol)
    sync = BookSync()
    sync.on_snapshot(snap)
    for d in diffs[: at + 1]:
        sync.on_diff(d)
    return sync.book.levels()


@pytest.mark.parametrize("symbol", ["BTCUSDT", "ETHUSDT"])
def test_the_recorded_book_agrees_with_every_book_ticker_it_pins_down(symbol):
    snap, diffs, tickers = recorded(symbol)
    sync = BookSync()
    sync.on_snapshot(snap)
    ends, bests = [], []  # after each applied diff: its u, and the best levels until the next diff's U
    for k, d in enumerate(diffs):
        if sync.on_diff(d):
            upto = diffs[k + 1].first_id if k + 1 < len(diffs) else d.last_id + 1
            ends.append((d.last_id, upto))
            bests.append((sync.book.best_bid(), sync.book.best_ask()))
    assert sync.state == "synced" and sync.resyncs == 0 and sync.stale_snapshots == 0
    matched = inside_a_diff = before_sync = 0
    starts = [u for u, _ in ends]
    for tick in tickers:
        k = bisect_right(starts, tick.update_id) - 1
        if k < 0:
            before_sync += 1
        elif tick.update_id >= ends[k][1]:
            inside_a_diff += 1  # a state the diff's aggregate skipped over
        else:
            (bid, bid_qty), (ask, ask_qty) = bests[k]
            assert (tick.bid, tick.bid_qty, tick.ask, tick.ask_qty) == (bid, bid_qty, ask, ask_qty), tick
            matched += 1
    print(f"{symbol}: {matched} book tickers matched, {inside_a_diff} inside a diff, {before_sync} before sync")
    assert matched >= 500 and matched + inside_a_diff + before_sync == len(tickers)


def test_a_broken_chain_resyncs_once_and_ends_in_the_same_book():
    _, diffs, _ = recorded("BTCUSDT")
    whole = replay("BTCUSDT")
    broken = replay("BTCUSDT", drop=4_000, resnap_at=4_100)
    assert broken.resyncs == 1 and "follows" in broken.reason and broken.state == "synced"
    assert broken.book.update_id == whole.book.update_id == diffs[-1].last_id
    assert broken.book.levels() == whole.book.levels()
