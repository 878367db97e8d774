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


def raw_uid(fields: Mapping[bytes, bytes]) -> str:
    """Identity of an entry too broken for `signal_uid`: its sorted raw fields."""
    digest = hashlib.sha256()
    for key, value in sorted(fields.items()):
        digest.update(len(key).to_bytes(4, "big") + key + len(value).to_bytes(8, "big") + value)
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


def raw_json(fields: Mapping[bytes, bytes]) -> str:
    """The entry as a JSON object for `signals_v2_log.raw`: invalid UTF-8 replaced,
    values cut to MAX_RAW_VALUE_CHARS, at most MAX_RAW_FIELDS fields."""
    out: dict[str, str | int] = {}
    for index, (key, value) in enumerate(fields.items()):
        if index == MAX_RAW_FIELDS:
            out["_dropped_fields"] = len(fields) - MAX_RAW_FIELDS
            break
        text = value[: MAX_RAW_VALUE_CHARS * 4].decode("utf-8", errors="replace")
        if len(value) > MAX_RAW_VALUE_CHARS or len(text) > MAX_RAW_VALUE_CHARS:
            out.setdefault("_truncated", 0)
            out["_truncated"] = int(out["_truncated"]) + 1
        out[_clean(key[:100].decode("utf-8", errors="replace"), 100)] = _clean(text, MAX_RAW_VALUE_CHARS)
    return orjson.dumps(out).decode()


def _decode_fields(fields: Mapping[bytes, bytes]) -> tuple[dict[str, str], str | None]:
    """The required fields as text, or the reason the entry is unusable."""
    values: dict[str, str] = {}
    for name in REQUIRED_FIELDS:
        value = fields.get(name.encode())
        if value is None or not value.strip():
            return values, f"{REASON_MISSING} {name}"
        if name == "message" and len(value) > MAX_MESSAGE_CHARS * 4:
            return values, f"{REASON_TOO_LONG}: over {MAX_MESSAGE_CHARS} characters"
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError:
            return values, f"field {name} is {REASON_NOT_UTF8}"
        if "\x00" in text:
            return values, f"field {name} {REASON_NUL}"
        values[name] = text.strip()
    if len(values["message"]) > MAX_MESSAGE_CHARS:
        return values, f"{REASON_TOO_LONG}: {len(values['message'])} characters, limit {MAX_MESSAGE_CHARS}"
    return values, None


def _partial_text(fields: Mapping[bytes, bytes], name: str, limit: int) -> str | None:
    value = fields.get(name.encode())
    if value is None:
        return None
    return _clean(value[: limit * 4].decode("utf-8", errors="replace").strip(), limit) or None


def decide(entry_id: str, raw_fields: Mapping[bytes | str, bytes | str], snapshot: RoutingSnapshot) -> Decision:
    """Validate one entry and route it against `snapshot` (see the module docstring)."""
    fields = {_as_bytes(k): _as_bytes(v) for k, v in raw_fields.items()}
    raw = raw_json(fields)
    values, problem = _decode_fields(fields)

    def ignored(reason: str, uid: str | None = None, **known) -> Decision:
        return Decision(
            entry_id=entry_id,
            uid=uid or raw_uid(fields),
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


def decide_batch(
    entries: Sequence[tuple[str, Mapping[bytes | str, bytes | str]]], snapshot: RoutingSnapshot
) -> list[Decision]:
    """Decide every entry, in stream order; a later 'new' with a uid already seen in
    the batch becomes 'duplicate'."""
    seen: set[str] = set()
    decisions: list[Decision] = []
    for entry_id, fields in entries:
        decision = decide(entry_id, fields, snapshot)
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
