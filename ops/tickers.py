"""`feed-v4 tickers`: the pure part. Names and listings judged, outcomes worded, tables
laid out for a terminal (wide characters counted as two columns) or as JSON.

The judgement builds on binance/symbols.py (the feed's own): a ticker the CLI accepts is
one the feed follows. The CLI is stricter in one way only: a dated contract
(CURRENT_QUARTER, NEXT_QUARTER, ...) is refused by `add`/`enable` because it expires
(the feed follows it until delivery, then records a problem); `--no-check` adds it anyway.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from binance.protocol import valid_symbol
from binance.symbols import TRADING, Listing, parse_listing, suggestion, ticker_problem

CLI_SOURCE = "cli"  # tickers.source of the rows the CLI enables or disables
SYMBOLS_SOURCE = "SYMBOLS"  # core_io.apply_symbols_setting's
PERPETUALS = ("PERPETUAL", "TRADIFI_PERPETUAL")  # no expiry
HOW_TO_ADD = "feed-v4 tickers add BTCUSDT (or SYMBOLS=BTCUSDT,ETHUSDT)"
_CCXT_STYLE = re.compile(r"^\s*([A-Za-z0-9]+)\s*/\s*([A-Za-z0-9]+)(?::[A-Za-z0-9]+)?\s*$")
MAX_SHOWN = 60  # characters of a name as typed that are echoed


@dataclass(frozen=True, slots=True)
class Listed:
    """One symbol of the exchange's listing, with what the CLI shows beyond the feed's Listing."""

    status: str
    contract_type: str
    delivery_ms: int | None = None  # deliveryDate of a dated contract (perpetuals carry a far-future one)

    @property
    def listing(self) -> Listing:
        return Listing(self.status, self.contract_type)


def parse_exchange_info(payload: Any) -> dict[str, Listed]:
    """GET /fapi/v1/exchangeInfo → symbol → Listed (parse_listing's entries; ValueError if
    the answer has no `symbols` list)."""
    listing = parse_listing(payload)
    delivery: dict[str, int] = {}
    for item in payload["symbols"]:
        if isinstance(item, dict) and isinstance(item.get("symbol"), str) and type(item.get("deliveryDate")) is int:
            delivery[item["symbol"]] = item["deliveryDate"]
    return {s: Listed(v.status, v.contract_type, delivery.get(s)) for s, v in listing.items()}


# --------------------------------------------------------------------------- text safety


def shown(text: str) -> str:
    """A name as typed, safe on a terminal: printable characters kept (any script),
    anything else (control characters, escape sequences, undecodable bytes) escaped, cut
    to MAX_SHOWN characters."""
    out = "".join(c if c.isprintable() else c.encode("unicode_escape", "backslashreplace").decode() for c in text)
    return out if len(out) <= MAX_SHOWN else out[: MAX_SHOWN - 1] + "…"


def width(text: str) -> int:
    """Terminal columns: East Asian wide and full-width characters take two."""
    return sum(2 if unicodedata.east_asian_width(c) in ("W", "F") else 1 for c in text)


def pad(text: str, columns: int) -> str:
    return text + " " * max(0, columns - width(text))


def table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """Aligned columns, two spaces apart; the last column is not padded."""
    rows = [list(map(str, row)) for row in rows]
    widths = [max([width(h)] + [width(r[i]) for r in rows]) for i, h in enumerate(headers)]
    lines = []
    for row in [list(headers), *rows]:
        cells = [pad(cell, widths[i]) for i, cell in enumerate(row[:-1])] + [row[-1]]
        lines.append("  ".join(cells).rstrip())
    return lines


def iso_minute(ms: int | None) -> str:
    return "-" if ms is None else datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M")


# --------------------------------------------------------------------------- judgement


@dataclass(frozen=True, slots=True)
class Verdict:
    """What one SYMBOL argument comes to: `name` to store (None: refused, `reason` says
    why), and a `note` worth saying about an accepted one."""

    typed: str
    name: str | None
    reason: str | None = None
    note: str | None = None

    @property
    def ok(self) -> bool:
        return self.name is not None


def normalised(typed: str) -> str:
    """Case folded as SYMBOLS does (`btcusdt` is BTCUSDT); nothing else changed."""
    return typed.strip().upper()


def judge_name(typed: str, known: Iterable[str] = ()) -> Verdict:
    """The name alone (what `--no-check` and `disable` judge): letters, digits and '_'
    as Binance writes them; a ccxt-style `BTC/USDT:USDT` is explained."""
    name = normalised(typed)
    if valid_symbol(name):
        return Verdict(typed, name)
    if match := _CCXT_STYLE.match(typed):
        joined = (match.group(1) + match.group(2)).upper()
        return Verdict(
            typed,
            None,
            f"'{shown(typed)}' is a ccxt-style name: Binance writes it {joined} (did you mean {joined}?)",
        )
    hint = suggestion(name, known) if known else None
    problem = "not a valid symbol name: letters, digits and '_' as Binance writes them, e.g. BTCUSDT"
    return Verdict(typed, None, problem + (f" (did you mean {hint}?)" if hint else ""))


def judge(typed: str, listing: Mapping[str, Listed], *, adding: bool = True) -> Verdict:
    """A SYMBOL against the exchange's listing: listed, TRADING, a perpetual (for
    `adding`; `check` only notes a dated contract, which the feed follows until delivery)."""
    name = normalised(typed)
    listed = listing.get(name)
    if listed is not None and not valid_symbol(name):
        return Verdict(
            typed,
            None,
            f"listed by the exchange (status {listed.status}) but this daemon cannot follow it: its name has "
            "characters the daemon does not accept in a stream name (binance/protocol.valid_symbol)",
        )
    by_name = judge_name(typed, listing)
    if not by_name.ok:
        return by_name
    problem = ticker_problem(name, {s: v.listing for s, v in listing.items()})
    if problem is not None:
        if listed is not None and listed.status != TRADING:
            problem = f"listed but not trading (status {listed.status}): {_status_meaning(listed.status)}"
        return Verdict(typed, None, problem)
    assert listed is not None
    if listed.contract_type not in PERPETUALS:
        kind = listed.contract_type or "no contract type"
        expiry = f", delivery {iso_minute(listed.delivery_ms)[:10]}" if listed.delivery_ms else ""
        what = f"a dated contract ({kind}{expiry})"
        if adding:
            return Verdict(
                typed,
                None,
                f"{what}: it expires, and this daemon is meant for perpetuals; --no-check adds it anyway "
                "(followed until delivery)",
            )
        return Verdict(typed, name, note=f"{what}: followed until delivery")
    note = "a TradFi perpetual" if listed.contract_type == "TRADIFI_PERPETUAL" else None
    return Verdict(typed, name, note=note)


def _status_meaning(status: str) -> str:
    return {
        "SETTLING": "delisted, being settled; the exchange sends it no more klines",
        "CLOSE": "delisted; the exchange sends it no more klines",
        "PENDING_TRADING": "not trading yet; --no-check adds it now (followed once it trades)",
    }.get(status, "the exchange sends no klines for it")


# --------------------------------------------------------------------------- outcomes


@dataclass(frozen=True, slots=True)
class Row:
    """One row of `tickers` as the CLI shows it."""

    symbol: str
    status: str
    source: str | None
    trades: bool
    book_ticker: bool
    depth: bool
    footprint_row: str | None
    problem: str | None
    problem_at_ms: int | None
    updated_at_ms: int | None
    newest_m1_ms: int | None

    def streams(self) -> str:
        on = ["kline"] + [n for n, flag in (("trades", self.trades), ("book_ticker", self.book_ticker)) if flag]
        return ",".join(on + (["depth"] if self.depth else []))

    def as_json(self) -> dict[str, Any]:
        return {
            "symbol": self.symbol,
            "status": self.status,
            "source": self.source,
            "streams": {"kline": True, "trades": self.trades, "book_ticker": self.book_ticker, "depth": self.depth},
            "footprint_row": self.footprint_row,
            "problem": self.problem,
            "problem_at": self.problem_at_ms,
            "updated_at": self.updated_at_ms,
            "newest_m1": self.newest_m1_ms,
            "newest_m1_iso": None if self.newest_m1_ms is None else iso_minute(self.newest_m1_ms),
        }


def list_lines(rows: Sequence[Row]) -> list[str]:
    if not rows:
        return [f"no tickers: {HOW_TO_ADD}"]
    lines = table(
        ("SYMBOL", "STATUS", "SOURCE", "STREAMS", "NEWEST M1 (UTC)", "PROBLEM"),
        (
            (shown(r.symbol), r.status, r.source or "-", r.streams(), iso_minute(r.newest_m1_ms), r.problem or "-")
            for r in rows
        ),
    )
    enabled = sum(r.status == "enabled" for r in rows)
    lines.append(f"{enabled} enabled, {len(rows) - enabled} disabled")
    if not enabled:
        lines.append(f"warning: no ticker is enabled: the daemon follows nothing; {HOW_TO_ADD}")
    return lines


@dataclass(frozen=True, slots=True)
class Outcome:
    """One SYMBOL of add/enable/disable: `what` happened (added, enabled, disabled,
    unchanged) or why it was refused."""

    typed: str
    name: str | None
    what: str  # "added", "enabled", "disabled", "already enabled", ..., "refused"
    detail: str | None = None

    @property
    def refused(self) -> bool:
        return self.what == "refused"


def change_lines(outcomes: Sequence[Outcome]) -> list[str]:
    rows = [(shown(o.name or o.typed), o.what + (f": {o.detail}" if o.detail else "")) for o in outcomes]
    lines = table(("SYMBOL", "RESULT"), rows)
    counts: dict[str, int] = {}
    for o in outcomes:
        key = "unchanged" if o.what.startswith("already") else o.what
        counts[key] = counts.get(key, 0) + 1
    lines.append(", ".join(f"{n} {what}" for what, n in counts.items()))
    return lines


def disable_warnings(
    names: Iterable[str], sources: Mapping[str, str | None], symbols_setting: Sequence[str]
) -> list[str]:
    """Disabling what SYMBOLS enables: the next boot re-enables it while SYMBOLS lists it."""
    out = []
    for name in names:
        if name in symbols_setting:
            out.append(
                f"warning: SYMBOLS lists {shown(name)}: the next boot re-enables it while SYMBOLS lists it "
                "(remove it from SYMBOLS to keep it disabled)"
            )
        elif sources.get(name) == SYMBOLS_SOURCE:
            out.append(
                f"warning: {shown(name)} was enabled by SYMBOLS (source SYMBOLS): a daemon whose SYMBOLS still "
                "lists it re-enables it at its next boot"
            )
    return out


@dataclass(frozen=True, slots=True)
class CheckResult:
    symbol: str
    verdict: Verdict | None  # None: the exchange was not asked
    daemon_problem: str | None
    daemon_problem_at_ms: int | None

    @property
    def ok(self) -> bool:
        return (self.verdict is None or self.verdict.ok) and self.daemon_problem is None

    def as_json(self) -> dict[str, Any]:
        verdict = self.verdict
        return {
            "symbol": self.symbol,
            "ok": self.ok,
            "exchange": None if verdict is None else ("ok" if verdict.ok else verdict.reason),
            "note": None if verdict is None else verdict.note,
            "daemon_problem": self.daemon_problem,
            "daemon_problem_at": self.daemon_problem_at_ms,
        }


def check_results(rows: Sequence[Row], listing: Mapping[str, Listed]) -> list[CheckResult]:
    """Every enabled row judged against the listing, beside the problem the daemon recorded."""
    return [
        CheckResult(r.symbol, judge(r.symbol, listing, adding=False), r.problem, r.problem_at_ms)
        for r in rows
        if r.status == "enabled"
    ]


def check_lines(results: Sequence[CheckResult], disabled: int) -> list[str]:
    if not results:
        return [f"no ticker is enabled: the daemon follows nothing; {HOW_TO_ADD}"]
    rows = []
    for r in results:
        v = r.verdict
        exchange = "-" if v is None else ("ok" + (f" ({v.note})" if v.note else "") if v.ok else f"REFUSED: {v.reason}")
        rows.append((shown(r.symbol), "ok" if r.ok else "PROBLEM", exchange, r.daemon_problem or "-"))
    lines = table(("SYMBOL", "VERDICT", "EXCHANGE", "DAEMON'S PROBLEM"), rows)
    bad = sum(not r.ok for r in results)
    tail = f" ({disabled} disabled not checked)" if disabled else ""
    lines.append(
        f"{len(results) - bad} of {len(results)} enabled tickers can be followed{tail}"
        + (f"; {bad} cannot: disable them (feed-v4 tickers disable SYMBOL) or fix the name" if bad else "")
    )
    return lines
