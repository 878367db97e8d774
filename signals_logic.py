"""Signal routing decisions: pure functions over plain data, no I/O.

An entry of `signals_stream` (fields as the bytes Redis gave) plus a routing snapshot
(tickers, phrases, strategies and which strategy listens to which phrase) gives a
`Decision`: the uid, the status the entry claims ('new', 'duplicate' within its batch,
or 'ignored' with a reason) and, for a 'new' one, what happens per strategy. Whether a
'new' entry really is the first of its uid is settled later by PostgreSQL, not here.

Normalisation rules (documented in the README):
- symbol: stripped, upper-cased; must be an enabled row of `tickers`.
- message: stripped for display and delivery; for the phrase lookup and the uid, runs
  of whitespace collapse to one space and the text is case-folded, so "Buy  BTC" and
  "buy btc" are the same signal.
- bar_time / sent_at: ISO-8601 (naive means UTC) or an epoch number; a number below
  10^11 is seconds, otherwise milliseconds. Normalised to whole milliseconds; only
  years 2000-2099 are accepted (a microsecond or nanosecond epoch fails that check).
- uid = sha256("SYMBOL|message key|bar_time ms"). An entry too broken to have those
  three gets the sha256 of its raw fields instead (it is 'ignored' anyway).

Entries arrive cut (`signals_io` reads them through a script that bounds every value,
name and field count before anything leaves Redis); `Cuts` says what was cut, with the
original length and SHA-1 of each cut value, so a cut entry is still judged right (a cut
message is too long, a cut symbol or time is invalid) and still has a stable raw uid.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType

import orjson

# --------------------------------------------------------------------------- limits and names

MAX_MESSAGE_CHARS = 4096
MAX_SYMBOL_CHARS = 40
MAX_TIME_CHARS = 64
MAX_RAW_FIELDS = 32
MAX_RAW_VALUE_CHARS = 4096
RAW_MAX_BYTES = 8192  # the whole signals_v2_log.raw (as PostgreSQL prints it), markers included

# What the reading script keeps of an entry (bytes). A valid message (4096 characters of
# up to 4 UTF-8 bytes) is never cut, and a cut one is longer than any valid message; the
# other required values are invalid long before READ_VALUE_BYTES; other fields only feed
# `raw`, which keeps MAX_RAW_VALUE_CHARS of a value and RAW_MAX_BYTES in all.
READ_MESSAGE_BYTES = MAX_MESSAGE_CHARS * 4
READ_VALUE_BYTES = 4096
READ_NAME_BYTES = 256
READ_EXTRA_FIELDS = MAX_RAW_FIELDS  # fields kept besides the required ones (which are always kept)

REQUIRED_FIELDS: tuple[str, ...] = ("symbol", "message", "bar_time", "sent_at")
OPEN_ACTIONS = frozenset({"open_long", "open_short"})
ACTIONS = frozenset({"open_long", "open_short", "close_long", "close_short", "close"})

EARLIEST_MS = 946_684_800_000  # 2000-01-01T00:00:00Z
LATEST_MS = 4_102_444_800_000  # 2100-01-01T00:00:00Z (exclusive)
SECONDS_BELOW = 100_000_000_000  # an epoch number below 10^11 is seconds

# Reasons of 'ignored' rows: a fixed phrase, optionally followed by ": detail".
REASON_MISSING = "missing field"  # "missing field sent_at"
REASON_NOT_UTF8 = "not valid UTF-8"  # "field message is not valid UTF-8"
REASON_NUL = "contains a NUL character"  # "field symbol contains a NUL character"
REASON_TOO_LONG = "message too long"
REASON_BAD_SYMBOL = "bad symbol"
REASON_BAD_BAR_TIME = "bad bar_time"
REASON_BAD_SENT_AT = "bad sent_at"
REASON_UNKNOWN_TICKER = "unknown ticker"
REASON_TICKER_DISABLED = "ticker disabled"
REASON_UNKNOWN_PHRASE = "unknown phrase"
REASON_PHRASE_DISABLED = "phrase disabled"
REASON_NO_STRATEGY = "no active strategy"
REASON_REJECTED = "rejected by the database"
# 'duplicate' rows say which 'new' row they repeat.
REASON_REPEAT = "repeat of log"  # "repeat of log 42"
REASON_REPEAT_IN_BATCH = "repeat of an earlier entry in the same batch"
NOTE_ALLOW_OPEN = "allow_open is false"

_WHITESPACE = re.compile(r"\s+")
_NUMBER = re.compile(r"^\d+(?:\.\d+)?$")


# --------------------------------------------------------------------------- snapshot


@dataclass(frozen=True, slots=True)
class Strategy:
    id: int
    name: str
    enabled: bool
    archived: bool
    allow_open: bool

    @property
    def active(self) -> bool:
        return self.enabled and not self.archived


@dataclass(frozen=True, slots=True)
class Phrase:
    id: int
    phrase: str
    action: str
    enabled: bool


@dataclass(frozen=True)
class RoutingSnapshot:
    """One consistent, read-only view of the routing tables.

    A reload builds a new snapshot and the router swaps one reference, so a batch
    always sees either the old view or the new one, never a mix.
    """

    tickers: Mapping[str, bool]  # symbol -> enabled
    phrases: Mapping[str, Phrase]  # message key -> phrase
    strategies: Mapping[int, Strategy]
    subscribers: Mapping[int, tuple[int, ...]]  # phrase id -> strategy ids, ascending
    warnings: tuple[str, ...] = ()

    def counts(self) -> dict[str, int]:
        return {
            "tickers": sum(self.tickers.values()),
            "phrases": sum(p.enabled for p in self.phrases.values()),
            "strategies": sum(s.active for s in self.strategies.values()),
            "mappings": sum(len(ids) for ids in self.subscribers.values()),
        }

    def fingerprint(self) -> tuple:
        """Equal for two snapshots with the same content (to log only real changes)."""
        return (
            tuple(sorted(self.tickers.items())),
            tuple(sorted(self.phrases.items())),
            tuple(sorted(self.strategies.items())),
            tuple(sorted(self.subscribers.items())),
        )


EMPTY_SNAPSHOT = RoutingSnapshot(MappingProxyType({}), MappingProxyType({}), MappingProxyType({}), MappingProxyType({}))


def message_key(message: str) -> str:
    """The form of a message used for the phrase lookup and the uid."""
    return _WHITESPACE.sub(" ", message.strip()).casefold()


def build_snapshot(
    tickers: Iterable[tuple[str, str]],
    phrases: Iterable[tuple[int, str, str, bool]],
    strategies: Iterable[tuple[int, str, bool, bool, bool]],
    mappings: Iterable[tuple[int, int]],
) -> RoutingSnapshot:
    """Rows of `tickers` (symbol, status), `signal_phrases` (id, phrase, action, enabled),
    `strategies` (id, name, enabled, archived, allow_open) and `strategy_signals`
    (strategy_id, phrase_id) -> a frozen snapshot.

    Two phrases that differ only in case or spacing collide after normalisation: the
    lowest id wins and the clash is reported in `warnings`.
    """
    warnings: list[str] = []
    ticker_map = {symbol.strip().upper(): status == "enabled" for symbol, status in tickers}
    phrase_map: dict[str, Phrase] = {}
    for pid, text, action, enabled in sorted(phrases):
        key = message_key(text)
        if key in phrase_map:
            warnings.append(f"phrase {pid} {text!r} collides with phrase {phrase_map[key].id}; ignored")
            continue
        phrase_map[key] = Phrase(pid, text, action, bool(enabled))
    strategy_map = {
        sid: Strategy(sid, name, bool(en), bool(arch), bool(allow)) for sid, name, en, arch, allow in strategies
    }
    subscribers: dict[int, list[int]] = {}
    for strategy_id, phrase_id in mappings:
        subscribers.setdefault(phrase_id, []).append(strategy_id)
    return RoutingSnapshot(
        tickers=MappingProxyType(ticker_map),
        phrases=MappingProxyType(phrase_map),
        strategies=MappingProxyType(strategy_map),
        subscribers=MappingProxyType({pid: tuple(sorted(set(ids))) for pid, ids in subscribers.items()}),
        warnings=tuple(warnings),
    )


# --------------------------------------------------------------------------- time


class BadTime(ValueError):
    pass


def parse_time_ms(text: str) -> int:
    """ISO-8601 or epoch seconds/milliseconds -> epoch ms (UTC), or BadTime."""
    text = text.strip()
    if not text or len(text) > MAX_TIME_CHARS:
        raise BadTime("empty" if not text else "too long")
    if _NUMBER.match(text):
        whole, _, fraction = text.partition(".")
        value = int(whole)
        if value < SECONDS_BELOW:
            ms = value * 1000 + int((fraction + "000")[:3])
        else:
            ms = value
    else:
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            raise BadTime(f"not ISO-8601 nor an epoch number: {text[:MAX_TIME_CHARS]!r}") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        ms = datetime_to_ms(moment)
    if not EARLIEST_MS <= ms < LATEST_MS:
        raise BadTime(f"{text!r} is outside 2000-2099")
    return ms


def datetime_to_ms(moment: datetime) -> int:
    delta = moment - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000


def ms_to_datetime(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC).replace(microsecond=(ms % 1000) * 1000)


def signal_uid(symbol: str, message: str, bar_time_ms: int) -> str:
    """Stable identity of a signal: same symbol, message key and bar -> same uid."""
    return hashlib.sha256(f"{symbol}|{message_key(message)}|{bar_time_ms}".encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Cuts:
    """What the reader left out of one entry.

    `values` maps a field name (as returned) to (original length in bytes, SHA-1 hex of
    the whole value) for each value cut to its read limit; `names` the same for cut field
    names (the key is the cut name); `dropped` fields were left out entirely
    (`dropped_bytes` of names and values).
    """

    values: Mapping[bytes, tuple[int, str]] = field(default_factory=dict)
    names: Mapping[bytes, tuple[int, str]] = field(default_factory=dict)
    dropped: int = 0
    dropped_bytes: int = 0

    def __bool__(self) -> bool:
        return bool(self.values or self.names or self.dropped)

    def original_bytes(self, fields: Mapping[bytes, bytes]) -> int:
        """Size of the whole entry as written (names and values)."""
        total = self.dropped_bytes
        for key, value in fields.items():
            total += self.names.get(key, (len(key),))[0] + self.values.get(key, (len(value),))[0]
        return total


NO_CUTS = Cuts()


def _cut_token(size: int, sha1: str) -> bytes:
    return f"\x00cut:{size}:{sha1}".encode()


def raw_uid(fields: Mapping[bytes, bytes], cuts: Cuts = NO_CUTS) -> str:
    """Identity of an entry too broken for `signal_uid`: its sorted raw fields. A cut
    value or name counts by its original length and SHA-1, so the uid is the same at
    every read of the entry; an entry read whole gets the sha256 of all its fields."""
    digest = hashlib.sha256()
    for key, value in sorted(fields.items()):
        name_cut, value_cut = cuts.names.get(key), cuts.values.get(key)
        name = key if name_cut is None else _cut_token(*name_cut)
        data = value if value_cut is None else _cut_token(*value_cut)
        digest.update(len(name).to_bytes(4, "big") + name + len(data).to_bytes(8, "big") + data)
    if cuts.dropped:
        digest.update(f"\x00dropped:{cuts.dropped}:{cuts.dropped_bytes}".encode())
    return digest.hexdigest()


# --------------------------------------------------------------------------- decisions


@dataclass(frozen=True, slots=True)
class Target:
    """What a 'new' signal does for one strategy: 'delivered' or 'skipped' (with a note)."""

    strategy_id: int
    status: str
    note: str | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    """The verdict on one stream entry, before the database has had its say.

    `status` is 'new', 'duplicate' (an earlier entry of this batch has the uid) or
    'ignored'. Text fields are safe for PostgreSQL (no NUL, bounded length).
    """

    entry_id: str
    uid: str
    status: str
    reason: str | None
    symbol: str | None
    message: str | None
    action: str | None
    bar_time_ms: int | None
    sent_at_ms: int | None
    raw: str
    targets: tuple[Target, ...] = field(default=())

    @property
    def deliveries(self) -> tuple[int, ...]:
        return tuple(t.strategy_id for t in self.targets if t.status == "delivered")


def _as_bytes(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def _clean(text: str, limit: int) -> str:
    """Text PostgreSQL accepts (no NUL), cut to `limit` characters."""
    return text[:limit].replace("\x00", "\ufffd")


def raw_json(fields: Mapping[bytes, bytes], cuts: Cuts = NO_CUTS) -> str:
    """The entry as a JSON object for `signals_v2_log.raw`, at most RAW_MAX_BYTES in all:
    invalid UTF-8 replaced, values cut to MAX_RAW_VALUE_CHARS (and shorter where the total
    would not fit), at most MAX_RAW_FIELDS fields. What was cut is marked: `_truncated`
    (values cut), `_dropped_fields` (fields left out) and `_entry_bytes` (the size of the
    whole entry as written)."""
    out: dict[str, str | int] = {}
    room = RAW_MAX_BYTES - _RAW_MARKER_ROOM
    truncated = dropped = 0
    for index, (key, value) in enumerate(fields.items()):
        if index == MAX_RAW_FIELDS:
            dropped += len(fields) - MAX_RAW_FIELDS
            break
        name = _clean(key[:100].decode("utf-8", errors="replace"), 100)
        text = value[: MAX_RAW_VALUE_CHARS * 4].decode("utf-8", errors="replace")
        cut = key in cuts.values or len(value) > MAX_RAW_VALUE_CHARS * 4 or len(text) > MAX_RAW_VALUE_CHARS
        text = _clean(text, MAX_RAW_VALUE_CHARS)
        # Bytes as PostgreSQL prints jsonb: "name": "value", (the separators with spaces).
        cost = len(orjson.dumps(name)) + 4
        size = len(orjson.dumps(text))
        if name in out or cost + _RAW_MIN_VALUE > room:
            dropped += 1
            continue
        if cost + size > room:
            text = _fit_json(text, room - cost)
            size = len(orjson.dumps(text))
            cut = True
        out[name] = text
        room -= cost + size
        truncated += cut
    dropped += cuts.dropped
    if truncated:
        out["_truncated"] = truncated
    if dropped:
        out["_dropped_fields"] = dropped
    if truncated or dropped:
        out["_entry_bytes"] = cuts.original_bytes(fields)
    return orjson.dumps(out).decode()


_RAW_MARKER_ROOM = 128  # braces and the three markers with their values
_RAW_MIN_VALUE = 16  # a field that would get less room than this is left out instead


def _fit_json(text: str, limit: int) -> str:
    """The longest prefix of `text` whose JSON string takes at most `limit` bytes."""
    n = min(len(text), limit)
    while n > 0:
        over = len(orjson.dumps(text[:n])) - limit
        if over <= 0:
            break
        n -= max(1, over // 6)  # a character takes 1 to 6 bytes in JSON
    return text[: max(n, 0)]


def _decode_fields(fields: Mapping[bytes, bytes], cuts: Cuts = NO_CUTS) -> tuple[dict[str, str], str | None]:
    """The required fields as text, or the reason the entry is unusable. A value the
    reader cut is judged by its length: a cut message is too long; a cut symbol or time
    is decoded as far as it goes and fails its own length check."""
    values: dict[str, str] = {}
    for name in REQUIRED_FIELDS:
        key = name.encode()
        value = fields.get(key)
        cut = cuts.values.get(key)
        if value is None or (cut is None and not value.strip()):
            return values, f"{REASON_MISSING} {name}"
        if name == "message" and (cut is not None or len(value) > MAX_MESSAGE_CHARS * 4):
            size = len(value) if cut is None else cut[0]
            return values, f"{REASON_TOO_LONG}: {size} bytes, over {MAX_MESSAGE_CHARS} characters"
        try:
            text = value.decode("utf-8") if cut is None else _decode_prefix(value)
        except UnicodeDecodeError:
            return values, f"field {name} is {REASON_NOT_UTF8}"
        if "\x00" in text:
            return values, f"field {name} {REASON_NUL}"
        values[name] = text.strip()
    if len(values["message"]) > MAX_MESSAGE_CHARS:
        return values, f"{REASON_TOO_LONG}: {len(values['message'])} characters, limit {MAX_MESSAGE_CHARS}"
    return values, None


def _decode_prefix(value: bytes) -> str:
    """UTF-8 text of a value cut at a byte limit: a character split by the cut is dropped."""
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(value) - 3 or exc.reason != "unexpected end of data":
            raise
        return value[: exc.start].decode("utf-8")


def _partial_text(fields: Mapping[bytes, bytes], name: str, limit: int) -> str | None:
    value = fields.get(name.encode())
    if value is None:
        return None
    return _clean(value[: limit * 4].decode("utf-8", errors="replace").strip(), limit) or None


def decide(
    entry_id: str, raw_fields: Mapping[bytes | str, bytes | str], snapshot: RoutingSnapshot, cuts: Cuts = NO_CUTS
) -> Decision:
    """Validate one entry and route it against `snapshot` (see the module docstring);
    `cuts` says what the reader cut of it."""
    fields = {_as_bytes(k): _as_bytes(v) for k, v in raw_fields.items()}
    raw = raw_json(fields, cuts)
    values, problem = _decode_fields(fields, cuts)

    def ignored(reason: str, uid: str | None = None, **known) -> Decision:
        return Decision(
            entry_id=entry_id,
            uid=uid or raw_uid(fields, cuts),
            status="ignored",
            reason=reason,
            symbol=known.get("symbol", _partial_text(fields, "symbol", MAX_SYMBOL_CHARS)),
            message=known.get("message", _partial_text(fields, "message", MAX_MESSAGE_CHARS)),
            action=None,
            bar_time_ms=known.get("bar_time_ms"),
            sent_at_ms=known.get("sent_at_ms"),
            raw=raw,
        )

    if problem:
        return ignored(problem)
    symbol = values["symbol"].upper()
    if len(symbol) > MAX_SYMBOL_CHARS or not symbol.isprintable() or " " in symbol:
        return ignored(f"{REASON_BAD_SYMBOL}: {symbol[:MAX_SYMBOL_CHARS]!r}")
    message = values["message"]
    try:
        bar_ms = parse_time_ms(values["bar_time"])
    except BadTime as exc:
        return ignored(f"{REASON_BAD_BAR_TIME}: {exc}", symbol=symbol, message=message)
    uid = signal_uid(symbol, message, bar_ms)
    known = {"symbol": symbol, "message": message, "bar_time_ms": bar_ms}
    try:
        sent_ms = parse_time_ms(values["sent_at"])
    except BadTime as exc:
        return ignored(f"{REASON_BAD_SENT_AT}: {exc}", uid, **known)
    known["sent_at_ms"] = sent_ms

    enabled = snapshot.tickers.get(symbol)
    if enabled is None:
        return ignored(REASON_UNKNOWN_TICKER, uid, **known)
    if not enabled:
        return ignored(REASON_TICKER_DISABLED, uid, **known)
    phrase = snapshot.phrases.get(message_key(message))
    if phrase is None:
        return ignored(REASON_UNKNOWN_PHRASE, uid, **known)
    if not phrase.enabled:
        return ignored(REASON_PHRASE_DISABLED, uid, **known)
    targets = route(phrase, snapshot)
    if not targets:
        return ignored(REASON_NO_STRATEGY, uid, **known)
    return Decision(entry_id, uid, "new", None, symbol, message, phrase.action, bar_ms, sent_ms, raw, targets)


def route(phrase: Phrase, snapshot: RoutingSnapshot) -> tuple[Target, ...]:
    """Strategies listening to `phrase`: disabled and archived ones are left out
    entirely; an open_* action is 'skipped' for a strategy with allow_open = false."""
    targets: list[Target] = []
    for strategy_id in snapshot.subscribers.get(phrase.id, ()):
        strategy = snapshot.strategies.get(strategy_id)
        if strategy is None or not strategy.active:
            continue
        if phrase.action in OPEN_ACTIONS and not strategy.allow_open:
            targets.append(Target(strategy_id, "skipped", NOTE_ALLOW_OPEN))
        else:
            targets.append(Target(strategy_id, "delivered"))
    return tuple(targets)


def decide_batch(entries: Sequence[tuple], snapshot: RoutingSnapshot) -> list[Decision]:
    """Decide every entry, (entry id, fields) or (entry id, fields, cuts), in stream
    order; a later 'new' with a uid already seen in the batch becomes 'duplicate'."""
    seen: set[str] = set()
    decisions: list[Decision] = []
    for entry_id, fields, *cuts in entries:
        decision = decide(entry_id, fields, snapshot, *cuts)
        if decision.status == "new":
            if decision.uid in seen:
                decision = as_duplicate(decision, REASON_REPEAT_IN_BATCH)
            seen.add(decision.uid)
        decisions.append(decision)
    return decisions


def as_duplicate(decision: Decision, reason: str) -> Decision:
    return Decision(
        decision.entry_id,
        decision.uid,
        "duplicate",
        reason,
        decision.symbol,
        decision.message,
        decision.action,
        decision.bar_time_ms,
        decision.sent_at_ms,
        decision.raw,
    )


def as_rejected(decision: Decision, error: str) -> Decision:
    """The stand-in row for an entry PostgreSQL refused: plain ASCII, always storable."""
    return Decision(
        decision.entry_id,
        decision.uid,
        "ignored",
        f"{REASON_REJECTED}: {error[:200]}".encode("ascii", "replace").decode().replace("\x00", "?"),
        None,
        None,
        None,
        None,
        None,
        orjson.dumps({"entry_id": decision.entry_id}).decode(),
    )


@dataclass(frozen=True, slots=True)
class Delivery:
    """A logged 'new' signal on its way to the streams of `strategy_ids`."""

    log_id: int
    uid: str
    symbol: str
    message: str
    action: str
    bar_time_ms: int
    sent_at_ms: int
    strategy_ids: tuple[int, ...]

    def fields(self) -> dict[str, str]:
        """The fields of each `strategy_signals:<strategy_id>` entry, bar `strategy_id`."""
        return {
            "log_id": str(self.log_id),
            "uid": self.uid,
            "symbol": self.symbol,
            "message": self.message,
            "action": self.action,
            "bar_time": str(self.bar_time_ms),
            "sent_at": str(self.sent_at_ms),
        }
