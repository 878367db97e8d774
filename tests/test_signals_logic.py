"""signals_logic: validation, uid, routing decisions. Pure: no servers."""

from __future__ import annotations

import hashlib
import json

import pytest

import signals_logic as sl

BAR_MS = 1_769_904_000_000  # 2026-02-01T00:00:00Z
SENT_MS = BAR_MS + 1_500


def snapshot(**overrides) -> sl.RoutingSnapshot:
    """BTCUSDT enabled, FILUSDT disabled; phrases 1 'Buy BTC' (open_long), 2 'close all'
    (close), 3 'old phrase' (disabled), 4 'orphan' (no strategy); strategies 1 active,
    2 allow_open=false, 3 disabled, 4 archived."""
    rows = dict(
        tickers=[("BTCUSDT", "enabled"), ("FILUSDT", "disabled")],
        phrases=[
            (1, "Buy BTC", "open_long", True),
            (2, "close all", "close", True),
            (3, "old phrase", "open_short", False),
            (4, "orphan", "open_short", True),
        ],
        strategies=[
            (1, "alpha", True, False, True),
            (2, "careful", True, False, False),
            (3, "off", False, False, True),
            (4, "retired", True, True, True),
        ],
        mappings=[(s, p) for p in (1, 2, 3) for s in (1, 2, 3, 4)],
    )
    rows.update(overrides)
    return sl.build_snapshot(rows["tickers"], rows["phrases"], rows["strategies"], rows["mappings"])


def entry(**fields) -> dict[bytes, bytes]:
    base = {"symbol": "BTCUSDT", "message": "Buy BTC", "bar_time": str(BAR_MS), "sent_at": str(SENT_MS)}
    base.update(fields)
    return {k.encode(): v if isinstance(v, bytes) else str(v).encode() for k, v in base.items() if v is not None}


# --------------------------------------------------------------------------- time


@pytest.mark.parametrize(
    "text",
    [
        "2026-02-01T00:00:00Z",
        "2026-02-01T00:00:00+00:00",
        "2026-02-01T03:00:00+03:00",
        "2026-02-01 00:00:00",  # naive: UTC
        "2026-02-01T00:00:00.000400Z",  # sub-millisecond: truncated
        str(BAR_MS),  # epoch ms
        str(BAR_MS // 1000),  # epoch seconds
        f"{BAR_MS // 1000}.0",
        f" {BAR_MS} ",
    ],
)
def test_timestamps_in_every_accepted_form_give_the_same_ms(text):
    assert sl.parse_time_ms(text) == BAR_MS


def test_fractional_seconds_and_milliseconds():
    assert sl.parse_time_ms("1769904000.123") == BAR_MS + 123
    assert sl.parse_time_ms("2026-02-01T00:00:00.123456Z") == BAR_MS + 123


@pytest.mark.parametrize(
    "text",
    ["", "yesterday", "2026-13-01T00:00:00Z", "-5", "1e12", "0", "1769904000000000", "1769904000000000000", "9" * 70],
)
def test_bad_timestamps_are_refused(text):
    with pytest.raises(sl.BadTime):
        sl.parse_time_ms(text)


def test_ms_round_trip():
    assert sl.datetime_to_ms(sl.ms_to_datetime(BAR_MS + 789)) == BAR_MS + 789


# --------------------------------------------------------------------------- uid


def test_uid_ignores_case_and_spacing_of_the_message_and_the_bar_time_format():
    a = sl.decide("1-0", entry(message="Buy BTC"), snapshot())
    b = sl.decide("2-0", entry(message="  buy   btc ", symbol="btcusdt", bar_time="2026-02-01T00:00:00Z"), snapshot())
    assert a.status == b.status == "new"
    assert a.uid == b.uid == sl.signal_uid("BTCUSDT", "buy btc", BAR_MS)
    assert len(a.uid) == 64


def test_uid_depends_on_symbol_message_and_bar_but_not_sent_at():
    base = sl.signal_uid("BTCUSDT", "Buy BTC", BAR_MS)
    assert sl.signal_uid("ETHUSDT", "Buy BTC", BAR_MS) != base
    assert sl.signal_uid("BTCUSDT", "close all", BAR_MS) != base
    assert sl.signal_uid("BTCUSDT", "Buy BTC", BAR_MS + 60_000) != base
    a = sl.decide("1-0", entry(sent_at=str(SENT_MS)), snapshot())
    b = sl.decide("2-0", entry(sent_at=str(SENT_MS + 5000)), snapshot())
    assert a.uid == b.uid


def test_message_is_kept_as_sent_but_stripped():
    d = sl.decide("1-0", entry(message="  Buy BTC  "), snapshot())
    assert d.message == "Buy BTC" and d.action == "open_long"


# --------------------------------------------------------------------------- routing


def test_new_signal_goes_to_active_strategies_and_open_skips_allow_open_false():
    d = sl.decide("1-0", entry(), snapshot())
    assert d.status == "new" and d.reason is None
    assert d.targets == (sl.Target(1, "delivered"), sl.Target(2, "skipped", sl.NOTE_ALLOW_OPEN))
    assert d.deliveries == (1,)  # 3 disabled and 4 archived are left out entirely
    assert (d.bar_time_ms, d.sent_at_ms, d.symbol) == (BAR_MS, SENT_MS, "BTCUSDT")


def test_close_action_reaches_strategies_that_may_not_open():
    d = sl.decide("1-0", entry(message="close all"), snapshot())
    assert d.action == "close"
    assert d.targets == (sl.Target(1, "delivered"), sl.Target(2, "delivered"))


def test_only_skipped_strategies_still_make_a_new_signal():
    snap = snapshot(mappings=[(2, 1)])
    d = sl.decide("1-0", entry(), snap)
    assert d.status == "new" and d.deliveries == () and d.targets[0].status == "skipped"


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"symbol": "ETHUSDT"}, sl.REASON_UNKNOWN_TICKER),
        ({"symbol": "FILUSDT"}, sl.REASON_TICKER_DISABLED),
        ({"message": "sell everything"}, sl.REASON_UNKNOWN_PHRASE),
        ({"message": "old phrase"}, sl.REASON_PHRASE_DISABLED),
        ({"message": "orphan"}, sl.REASON_NO_STRATEGY),
    ],
)
def test_unroutable_signals_are_ignored_with_a_reason(fields, reason):
    d = sl.decide("1-0", entry(**fields), snapshot())
    assert (d.status, d.reason, d.targets) == ("ignored", reason, ())
    assert d.bar_time_ms == BAR_MS and d.uid == sl.signal_uid(d.symbol, d.message, BAR_MS)


def test_phrase_mapped_only_to_disabled_or_archived_strategies_is_no_active_strategy():
    d = sl.decide("1-0", entry(), snapshot(mappings=[(3, 1), (4, 1)]))
    assert (d.status, d.reason) == ("ignored", sl.REASON_NO_STRATEGY)


# --------------------------------------------------------------------------- malformed entries


@pytest.mark.parametrize("name", sl.REQUIRED_FIELDS)
def test_missing_or_blank_field_is_ignored(name):
    for value in (None, "", "   "):
        d = sl.decide("1-0", entry(**{name: value}), snapshot())
        assert (d.status, d.reason) == ("ignored", f"missing field {name}")
        assert len(d.uid) == 64


@pytest.mark.parametrize(("name", "reason"), [("bar_time", sl.REASON_BAD_BAR_TIME), ("sent_at", sl.REASON_BAD_SENT_AT)])
def test_bad_timestamp_is_ignored(name, reason):
    d = sl.decide("1-0", entry(**{name: "not a time"}), snapshot())
    assert d.status == "ignored" and d.reason.startswith(reason + ":")


def test_non_utf8_is_ignored_and_raw_keeps_a_readable_copy():
    d = sl.decide("1-0", entry(message=b"Buy \xff\xfe BTC"), snapshot())
    assert (d.status, d.reason) == ("ignored", "field message is not valid UTF-8")
    assert json.loads(d.raw)["message"] == "Buy \ufffd\ufffd BTC"
    assert d.message == "Buy \ufffd\ufffd BTC"


def test_nul_character_is_ignored_and_never_reaches_the_database_text():
    d = sl.decide("1-0", entry(symbol="BTC\x00USDT"), snapshot())
    assert (d.status, d.reason) == ("ignored", "field symbol contains a NUL character")
    assert "\x00" not in d.raw and "\x00" not in (d.symbol or "")


def test_huge_message_is_ignored_and_raw_truncated():
    d = sl.decide("1-0", entry(message="x" * 1_000_000), snapshot())
    assert d.status == "ignored" and d.reason.startswith(sl.REASON_TOO_LONG)
    raw = json.loads(d.raw)
    assert len(raw["message"]) == sl.MAX_RAW_VALUE_CHARS and raw["_truncated"] == 1
    assert len(d.message) == sl.MAX_MESSAGE_CHARS


def test_message_at_the_limit_is_accepted_and_one_more_is_not():
    snap = snapshot(phrases=[(1, "y" * sl.MAX_MESSAGE_CHARS, "close", True)], mappings=[(1, 1)])
    assert sl.decide("1-0", entry(message="y" * sl.MAX_MESSAGE_CHARS), snap).status == "new"
    d = sl.decide("1-0", entry(message="y" * (sl.MAX_MESSAGE_CHARS + 1)), snap)
    assert d.reason == f"message too long: {sl.MAX_MESSAGE_CHARS + 1} characters, limit {sl.MAX_MESSAGE_CHARS}"


def test_bad_symbol_is_ignored():
    assert sl.decide("1-0", entry(symbol="BTC USDT"), snapshot()).reason.startswith(sl.REASON_BAD_SYMBOL)
    assert sl.decide("1-0", entry(symbol="X" * 41), snapshot()).reason.startswith(sl.REASON_BAD_SYMBOL)


def test_raw_is_bounded_in_fields():
    fields = entry(**{f"extra{i}": "v" for i in range(100)})
    raw = json.loads(sl.decide("1-0", fields, snapshot()).raw)
    assert len(raw) == sl.MAX_RAW_FIELDS + 2 and raw["_dropped_fields"] == 104 - sl.MAX_RAW_FIELDS
    assert raw["_entry_bytes"] == sum(len(k) + len(v) for k, v in fields.items())


def test_text_keys_and_values_are_accepted_too():
    d = sl.decide(
        "1-0", {"symbol": "BTCUSDT", "message": "Buy BTC", "bar_time": BAR_MS, "sent_at": SENT_MS}, snapshot()
    )
    assert d.status == "new"


def test_broken_entries_get_a_stable_uid_from_their_raw_fields():
    a = sl.decide("1-0", entry(bar_time="nope"), snapshot())
    b = sl.decide("2-0", entry(bar_time="nope"), snapshot())
    c = sl.decide("3-0", entry(bar_time="nope!"), snapshot())
    assert a.uid == b.uid != c.uid


# --------------------------------------------------------------------------- batches and snapshot


def test_same_uid_twice_in_a_batch_first_new_then_duplicate():
    decisions = sl.decide_batch(
        [("1-0", entry()), ("2-0", entry(message="close all")), ("3-0", entry(message="BUY btc")), ("4-0", entry())],
        snapshot(),
    )
    assert [d.status for d in decisions] == ["new", "new", "duplicate", "duplicate"]
    assert decisions[2].targets == () and decisions[2].reason == sl.REASON_REPEAT_IN_BATCH


def test_ignored_entries_do_not_claim_a_uid_in_the_batch():
    decisions = sl.decide_batch([("1-0", entry(symbol="FILUSDT")), ("2-0", entry(symbol="FILUSDT"))], snapshot())
    assert [d.status for d in decisions] == ["ignored", "ignored"]


def test_snapshot_is_read_only():
    snap = snapshot()
    with pytest.raises(TypeError):
        snap.tickers["NEWUSDT"] = True  # type: ignore[index]
    with pytest.raises(AttributeError):
        snap.tickers = {}  # type: ignore[misc]


def test_phrases_differing_only_in_case_collide_and_the_lowest_id_wins():
    snap = snapshot(phrases=[(7, "Buy  btc", "open_short", True), (1, "Buy BTC", "open_long", True)])
    assert snap.phrases["buy btc"].id == 1
    assert snap.warnings and "collides" in snap.warnings[0]


def test_fingerprint_changes_only_with_content():
    assert snapshot().fingerprint() == snapshot().fingerprint()
    assert snapshot().fingerprint() != snapshot(tickers=[("BTCUSDT", "disabled")]).fingerprint()
    assert snapshot().counts() == {"tickers": 1, "phrases": 3, "strategies": 2, "mappings": 12}


def test_delivery_fields():
    d = sl.Delivery(42, "u" * 64, "BTCUSDT", "Buy BTC", "open_long", BAR_MS, SENT_MS, (1, 2))
    assert d.fields() == {
        "log_id": "42",
        "uid": "u" * 64,
        "symbol": "BTCUSDT",
        "message": "Buy BTC",
        "action": "open_long",
        "bar_time": str(BAR_MS),
        "sent_at": str(SENT_MS),
    }


def test_rejected_stand_in_is_plain_ascii():
    d = sl.decide("1-0", entry(), snapshot())
    r = sl.as_rejected(d, "invalid byte sequence \x00 é")
    assert r.status == "ignored" and r.reason.isascii() and "\x00" not in r.reason
    assert r.symbol is None and r.uid == d.uid


# --------------------------------------------------------------------------- bounds


def _old_raw_uid(fields: dict[bytes, bytes]) -> str:
    """raw_uid as it was before entries could arrive cut (uids already logged must not change)."""
    digest = hashlib.sha256()
    for key, value in sorted(fields.items()):
        digest.update(len(key).to_bytes(4, "big") + key + len(value).to_bytes(8, "big") + value)
    return digest.hexdigest()


def test_raw_uid_of_an_entry_read_whole_is_unchanged():
    fields = entry(bar_time="nope", extra="x")
    assert sl.raw_uid(fields) == sl.raw_uid(fields, sl.NO_CUTS) == _old_raw_uid(fields)


def test_raw_uid_of_a_cut_entry_depends_on_the_whole_values():
    cut = {b"payload": b"a" * 10}
    one = sl.Cuts(values={b"payload": (5_000_000, "1" * 40)})
    other = sl.Cuts(values={b"payload": (5_000_000, "2" * 40)})
    assert sl.raw_uid(cut, one) == sl.raw_uid(dict(cut), one)  # stable at every read
    assert sl.raw_uid(cut, one) != sl.raw_uid(cut, other) != _old_raw_uid(cut)
    dropped = sl.Cuts(values=one.values, dropped=3, dropped_bytes=12)
    assert sl.raw_uid(cut, dropped) != sl.raw_uid(cut, one)


def test_cut_values_are_judged_by_their_length():
    message_cut = sl.Cuts(values={b"message": (5_000_000, "0" * 40)})
    d = sl.decide("1-0", entry(message="Buy BTC" + "x" * 100), snapshot(), message_cut)
    assert (d.status, d.reason) == ("ignored", "message too long: 5000000 bytes, over 4096 characters")
    # A symbol cut in the middle of a character is no "invalid UTF-8": it is too long.
    symbol = ("€" * 2000).encode()[: sl.READ_VALUE_BYTES]
    d = sl.decide("1-0", entry(symbol=symbol), snapshot(), sl.Cuts(values={b"symbol": (6000, "0" * 40)}))
    assert d.status == "ignored" and d.reason.startswith(sl.REASON_BAD_SYMBOL)
    d = sl.decide("1-0", entry(bar_time=b"1" * 4096), snapshot(), sl.Cuts(values={b"bar_time": (10**6, "0" * 40)}))
    assert d.status == "ignored" and d.reason.startswith(sl.REASON_BAD_BAR_TIME) and "too long" in d.reason
    # A cut extra field does not matter to the signal.
    d = sl.decide("1-0", entry(note="n" * 4096), snapshot(), sl.Cuts(values={b"note": (10**7, "0" * 40)}))
    assert d.status == "new"
    assert json.loads(d.raw)["_entry_bytes"] == sum(len(k) + len(v) for k, v in entry().items()) + 4 + 10**7


def test_decide_batch_takes_what_the_reader_cut():
    cuts = sl.Cuts(values={b"message": (99_999, "0" * 40)})
    first, second = sl.decide_batch([("1-0", entry(), cuts), ("2-0", entry())], snapshot())
    assert first.reason.startswith(sl.REASON_TOO_LONG) and second.status == "new"


@pytest.mark.parametrize("value", ["v" * 4096, "é" * 4096, "\x01" * 4096, "𝄞" * 4096])
def test_raw_is_bounded_in_total_with_markers(value):
    fields = entry(**{f"extra{i}": value for i in range(40)})
    raw = sl.decide("1-0", fields, snapshot()).raw
    # PostgreSQL prints jsonb with a space after each colon and comma: bounded as printed.
    printed = json.dumps(json.loads(raw), ensure_ascii=False)
    assert len(printed.encode()) <= sl.RAW_MAX_BYTES
    data = json.loads(raw)
    assert data["_truncated"] >= 1 and data["_dropped_fields"] >= 40 + 4 - sl.MAX_RAW_FIELDS
    assert data["_entry_bytes"] == sum(len(k) + len(v) for k, v in fields.items())
    assert data["symbol"] == "BTCUSDT" and data["message"] == "Buy BTC"  # the first fields are whole


def test_raw_of_a_small_entry_has_no_markers():
    assert json.loads(sl.decide("1-0", entry(extra="kept"), snapshot()).raw) == {
        "symbol": "BTCUSDT",
        "message": "Buy BTC",
        "bar_time": str(BAR_MS),
        "sent_at": str(SENT_MS),
        "extra": "kept",
    }
