"""The drain command's rules (ops/drain.py): whom it may drain, and when a drain is done."""

from __future__ import annotations

import pytest

import infra
from ops.drain import DrainError, check_request, handed_over, parse_shares

BEATS = {
    "heartbeat:a:1": {"symbols": "BTCUSDT,ETHUSDT", "draining": "0"},
    "heartbeat:b:2": {"symbols": "XRPUSDT", "draining": "0"},
    "heartbeat:c:3": {"symbols": "", "draining": "0", infra.DRAIN_FIELD: "1733000000000"},
}


def test_shares_read_from_the_heartbeats():
    assert parse_shares(BEATS) == {
        "a:1": ({"BTCUSDT", "ETHUSDT"}, False),
        "b:2": ({"XRPUSDT"}, False),
        "c:3": (set(), True),  # asked: counts as draining before it answers
    }


def test_a_drain_needs_the_process_and_another_to_take_its_symbols():
    shares = parse_shares(BEATS)
    check_request(shares, "a:1", force=False)
    with pytest.raises(DrainError, match="no live daemon process 'z:9'"):
        check_request(shares, "z:9", force=False)
    alone = {k: v for k, v in shares.items() if k != "b:2"}  # c:3 is draining: it takes nothing
    with pytest.raises(DrainError, match="no other live process"):
        check_request(alone, "a:1", force=False)
    check_request(alone, "a:1", force=True)


def test_a_drain_is_done_once_every_symbol_is_followed_elsewhere():
    symbols = {"BTCUSDT", "ETHUSDT"}
    before = parse_shares(BEATS)
    assert handed_over(before, "a:1", symbols) == (False, symbols)
    left_but_not_taken = {**before, "a:1": (set(), True)}
    assert handed_over(left_but_not_taken, "a:1", symbols) == (False, symbols)
    half = {**left_but_not_taken, "b:2": ({"XRPUSDT", "BTCUSDT"}, False)}
    assert handed_over(half, "a:1", symbols) == (False, {"ETHUSDT"})
    done = {**half, "d:4": ({"ETHUSDT"}, False)}
    assert handed_over(done, "a:1", symbols) == (True, set())
