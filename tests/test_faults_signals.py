"""Fault scenario for the signal router: while the whole daemon replays real data, a
flood of signals (valid, malformed and repeated) is routed by two routers of one
consumer group at once, the daemon's own and a standalone `signals_v4_main.py`. Every
entry must be logged once with the right status, every valid signal delivered exactly
once, nothing left pending; the expectations come from what was sent, not the router."""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest
from faults import FaultRun, fault_run
from replay import START

import core_io
import signals_io
import signals_logic as sl

PROJECT = Path(__file__).resolve().parents[1]
STREAM = core_io.SIGNALS_STREAM
GROUP = core_io.SIGNAL_GROUP
SECOND_ROUTER = "standalone-racer"

TOTAL = 10_000
MALFORMED = 1_500
DUPLICATES = 1_500
VALID = TOTAL - MALFORMED - DUPLICATES
BURSTS = 4
MB = 1024 * 1024

# Strategies (id, name, enabled, archived, allow_open): 1 takes everything, 2 no opens,
# 3 disabled, 4 archived. Phrases 1-6 are mapped to all four, 7 only to 3 and 4.
STRATEGIES = [
    (1, "alpha", True, False, True),
    (2, "careful", True, False, False),
    (3, "off", False, False, True),
    (4, "retired", True, True, True),
]
PHRASES = [
    (1, "Buy", "open_long", True),
    (2, "Sell", "open_short", True),
    (3, "Close all", "close", True),
    (4, "Close long", "close_long", True),
    (5, "Close short", "close_short", True),
    (6, "paused", "close", False),
    (7, "legacy", "open_short", True),
]
MAPPINGS = [(s, p) for p in range(1, 7) for s in (1, 2, 3, 4)] + [(3, 7), (4, 7)]
ROUTED_PHRASES = [p for p in PHRASES if p[3] and p[0] != 7]
DISABLED_TICKER = "XRPUSDT"  # a row of `tickers` with status 'disabled'
UNKNOWN_TICKER = "DOGEUSDT"
VALID_BAR0 = START - 86_400_000  # bars of valid signals: one minute apart from here
BAD_BAR0 = START - 30 * 86_400_000  # bars of malformed entries, well apart


# --------------------------------------------------------------------------- what is sent


@dataclass
class Sent:
    """One XADDed entry and what the router must make of it."""

    fields: dict[bytes | str, bytes | str]
    signal: int | None = None  # index of the valid signal it carries (also for repeats)
    reason: str | None = None  # the reason prefix of a malformed ('ignored') entry
    entry_id: str = ""


@dataclass
class Signal:
    """A valid, distinct signal and what it must produce."""

    symbol: str
    message: str
    action: str
    bar_ms: int
    sent_ms: int
    targets: dict[int, tuple[str, str | None]]  # strategy id -> (status, note)
    copies: list[Sent] = field(default_factory=list)


def expected_targets(phrase_id: int, action: str) -> dict[int, tuple[str, str | None]]:
    """SPEC 9 on the configuration above: enabled, not archived; opens skipped without allow_open."""
    targets = {}
    for strategy_id, _, enabled, archived, allow_open in STRATEGIES:
        if (strategy_id, phrase_id) not in MAPPINGS or not enabled or archived:
            continue
        skipped = action.startswith("open_") and not allow_open
        targets[strategy_id] = ("skipped", sl.NOTE_ALLOW_OPEN) if skipped else ("delivered", None)
    return targets


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def time_text(ms: int, rng: random.Random) -> str:
    """The same instant as epoch ms, epoch seconds or ISO-8601, at random."""
    form = rng.randrange(3)
    if form == 0:
        return str(ms)
    if form == 1:
        return f"{ms // 1000}.{ms % 1000:03d}"
    return iso(ms)


def valid_signals(symbols: list[str], rng: random.Random) -> list[Signal]:
    signals = []
    for i in range(VALID):
        phrase_id, text, action, _ = rng.choice(ROUTED_PHRASES)
        message = rng.choice([text, text.upper(), f"  {text.lower()} "])
        bar = VALID_BAR0 + i * 60_000
        sig = Signal(symbols[i % len(symbols)], message.strip(), action, bar, bar + rng.randrange(1, 5000), {})
        sig.targets = expected_targets(phrase_id, action)
        symbol = rng.choice([sig.symbol, sig.symbol.lower()])
        fields = {
            "symbol": symbol,
            "message": message,
            "bar_time": time_text(bar, rng),
            "sent_at": time_text(sig.sent_ms, rng),
        }
        if rng.random() < 0.1:
            fields["source"] = "tradingview"  # extra fields are kept in raw, not a fault
        if i % 2000 == 1000:  # an attachment of megabytes: read cut, the signal routed as any other
            fields["attachment"] = "z" * (2 * MB)
        sig.copies.append(Sent(fields, signal=i))
        signals.append(sig)
    return signals


def malformed_entry(n: int, symbols: list[str], rng: random.Random) -> Sent:
    """One broken entry of a random kind and the reason the router must give."""
    bar = BAD_BAR0 + n * 60_000
    good = {"symbol": rng.choice(symbols), "message": "Close all", "bar_time": str(bar), "sent_at": str(bar + 1)}
    kind = rng.randrange(15)
    if n % 300 == 150:  # now and then a message of megabytes: read cut, never whole
        good["message"] = "Close all " + "x" * ((1 + n // 300 % 3) * MB)
        return Sent(good, reason=sl.REASON_TOO_LONG)
    if kind == 0:
        name = rng.choice(sl.REQUIRED_FIELDS)
        del good[name]
        return Sent(good, reason=f"{sl.REASON_MISSING} {name}")
    if kind == 1:
        name = rng.choice(sl.REQUIRED_FIELDS)
        good[name] = " " * rng.randrange(1, 3)
        return Sent(good, reason=f"{sl.REASON_MISSING} {name}")
    if kind == 2:
        good["bar_time"] = rng.choice(["half past nine", "2026-13-45T00:00:00Z", "-5", "NaN", str(bar * 1000)])
        return Sent(good, reason=sl.REASON_BAD_BAR_TIME)
    if kind == 3:
        good["sent_at"] = rng.choice(["1e99", "yesterday", "12:00", "0x1F", "1970-01-01T00:00:00Z"])
        return Sent(good, reason=sl.REASON_BAD_SENT_AT)
    if kind == 4:
        good["message"] = b"Close \xff\xfe all"
        return Sent(good, reason=f"field message is {sl.REASON_NOT_UTF8}")
    if kind == 5:
        good["symbol"] = b"ALGO\xc3USDT"
        return Sent(good, reason=f"field symbol is {sl.REASON_NOT_UTF8}")
    if kind == 6:
        good["symbol"] = "ALGO\x00USDT"
        return Sent(good, reason=f"field symbol {sl.REASON_NUL}")
    if kind == 7:
        good["symbol"] = UNKNOWN_TICKER
        return Sent(good, reason=sl.REASON_UNKNOWN_TICKER)
    if kind == 8:
        good["symbol"] = DISABLED_TICKER
        return Sent(good, reason=sl.REASON_TICKER_DISABLED)
    if kind == 9:
        good["message"] = rng.choice(["Sell the house", "Buy BTC now", "close everything"])
        return Sent(good, reason=sl.REASON_UNKNOWN_PHRASE)
    if kind == 10:
        good["message"] = "paused"
        return Sent(good, reason=sl.REASON_PHRASE_DISABLED)
    if kind == 11:
        good["message"] = "legacy"
        return Sent(good, reason=sl.REASON_NO_STRATEGY)
    if kind == 12:
        good["message"] = "Close all " + "x" * (sl.MAX_MESSAGE_CHARS + 10)
        return Sent(good, reason=sl.REASON_TOO_LONG)
    if kind == 13:
        good["symbol"] = "ALGO USDT"
        return Sent(good, reason=sl.REASON_BAD_SYMBOL)
    # garbage: binary names and values, none of the fields a signal has
    garbage = {b"\x80junk%d-%d" % (n, j): rng.randbytes(rng.randrange(1, 40)) for j in range(rng.randrange(1, 4))}
    garbage[b"payload"] = rng.randbytes(16)
    return Sent(garbage, reason=f"{sl.REASON_MISSING} symbol")


def build_entries(symbols: list[str], seed: int = 7) -> tuple[list[Signal], list[Sent]]:
    """TOTAL entries in stream order: VALID distinct signals, MALFORMED broken entries and
    DUPLICATES exact repeats of valid ones, each repeat somewhere after (sometimes right
    after, i.e. in the same batch) the entry it repeats."""
    rng = random.Random(seed)
    signals = valid_signals(symbols, rng)
    firsts = [s.copies[0] for s in signals] + [malformed_entry(n, symbols, rng) for n in range(MALFORMED)]
    rng.shuffle(firsts)
    keyed = [(float(i), sent) for i, sent in enumerate(firsts)]
    originals = [k for k in keyed if k[1].signal is not None]
    for _ in range(DUPLICATES):
        index, original = rng.choice(originals)
        near = rng.random() < 0.3
        key = index + rng.uniform(0.01, 20) if near else rng.uniform(index, len(firsts))
        repeat = Sent(dict(original.fields), signal=original.signal)
        signals[original.signal].copies.append(repeat)
        keyed.append((key, repeat))
    keyed.sort(key=lambda k: k[0])
    return signals, [sent for _, sent in keyed]


async def seed_routing(pool) -> None:
    await pool.execute("INSERT INTO tickers (symbol, status) VALUES ($1, 'disabled')", DISABLED_TICKER)
    await pool.executemany(
        "INSERT INTO strategies (id, name, enabled, archived, allow_open) VALUES ($1, $2, $3, $4, $5)", STRATEGIES
    )
    await pool.executemany("INSERT INTO signal_phrases (id, phrase, action, enabled) VALUES ($1, $2, $3, $4)", PHRASES)
    await pool.executemany("INSERT INTO strategy_signals (strategy_id, phrase_id) VALUES ($1, $2)", MAPPINGS)


async def send_in_bursts(run: FaultRun, entries: list[Sent]) -> None:
    """XADD everything in BURSTS pipelined rounds, a moment apart, while the replay runs."""
    size = -(-len(entries) // BURSTS)
    for start in range(0, len(entries), size):
        chunk = entries[start : start + size]
        pipe = run.redis.pipeline(transaction=False)
        for sent in chunk:
            pipe.xadd(STREAM, sent.fields)
        for sent, entry_id in zip(chunk, await pipe.execute()):
            sent.entry_id = entry_id
        await run.sleep(0.7)


# --------------------------------------------------------------------------- the second router


class SecondRouter:
    """`python signals_v4_main.py` on the same servers and consumer group."""

    def __init__(self, redis_url: str, pg_url: str) -> None:
        self.env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "POSTGRES_URL", "DATABASE_URL")}
        self.env.update(
            REDIS_URL=redis_url,
            POSTGRES_URL=pg_url,
            SIGNAL_CONSUMER=SECOND_ROUTER,
            SIGNAL_BATCH="64",  # not the daemon's 200: the two routers' batches interleave
            SIGNAL_BLOCK_MS="100",
            SIGNAL_CLAIM_IDLE_MS="1000",  # and it takes over entries the daemon holds for a second
            SIGNAL_CLAIM_EVERY_S="1",
        )
        self.log_fd, log_name = tempfile.mkstemp(prefix="signals_v4_", suffix=".log")
        self.log_path = Path(log_name)
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        try:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                str(PROJECT / "signals_v4_main.py"),
                env=self.env,
                cwd=PROJECT,
                stdout=self.log_fd,
                stderr=asyncio.subprocess.STDOUT,
            )
        finally:
            os.close(self.log_fd)

    async def terminate(self, timeout: float = 12) -> int | None:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self.process.wait(), timeout)
        except TimeoutError:
            return None

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def cleanup(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()
        self.log_path.unlink(missing_ok=True)


def router_stats(output: str, consumer: str) -> dict[str, int] | None:
    """The counters a router logs when it stops."""
    found = re.findall(rf"router {re.escape(consumer)} stopped: (\{{[^}}]*\}})", output)
    if not found:
        return None
    return {k: int(v) for k, v in re.findall(r"'(\w+)': (\d+)", found[-1])}


async def consumers(redis) -> dict[str, int]:
    """Consumer name -> entries pending at it, for the router group."""
    try:
        return {c["name"]: c["pending"] for c in await redis.xinfo_consumers(STREAM, GROUP)}
    except Exception:  # no stream or group yet
        return {}


async def wait_for(run: FaultRun, second: SecondRouter, predicate, timeout: float, what: str) -> None:
    """Poll `predicate`; either process ending meanwhile fails at once."""
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert run.daemon.alive(), run.daemon.output()[-3000:]
        assert second.process.returncode is None, f"{SECOND_ROUTER} ended:\n{second.output()[-3000:]}"
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        await asyncio.sleep(0.1)


# --------------------------------------------------------------------------- the checks


async def signal_mismatches(run: FaultRun, signals: list[Signal], entries: list[Sent]) -> list[tuple]:
    """Every entry against what it must have become; one tuple per difference."""
    wrong: list[tuple] = []
    rows = await run.pool.fetch(
        "SELECT id, stream_id, uid, status, reason, symbol, message, action, bar_time, sent_at, "
        "octet_length(raw::text) AS raw_bytes FROM signals_v2_log"
    )
    wrong += [
        ("signals", r["stream_id"], f"raw of {r['raw_bytes']} bytes") for r in rows if r["raw_bytes"] > sl.RAW_MAX_BYTES
    ]
    by_entry: dict[str, list] = defaultdict(list)
    for row in rows:
        by_entry[row["stream_id"]].append(row)
    sent_ids = {sent.entry_id for sent in entries}
    wrong += [("signals", entry_id, "logged but never sent") for entry_id in by_entry.keys() - sent_ids]
    for sent in entries:
        n = len(by_entry.get(sent.entry_id, []))
        if n != 1:
            wrong.append(("signals", sent.entry_id, f"logged {n} times"))
    row_of = {e: found[0] for e, found in by_entry.items() if len(found) == 1}

    targets_of: dict[int, dict[int, tuple[str, str | None]]] = defaultdict(dict)
    for r in await run.pool.fetch("SELECT log_id, strategy_id, status, note FROM signal_log_entries_v2"):
        if r["strategy_id"] in targets_of[r["log_id"]]:
            wrong.append(("signals", r["log_id"], r["strategy_id"], "two log entries for one strategy"))
        targets_of[r["log_id"]][r["strategy_id"]] = (r["status"], r["note"])
    routed: dict[int, Counter] = {}
    routed_fields: dict[tuple[int, str], dict] = {}
    for strategy_id, *_ in STRATEGIES:
        routed[strategy_id] = Counter()
        for _, f in await run.redis.xrange(signals_io.strategy_stream(strategy_id)):
            routed[strategy_id][f.get("log_id")] += 1
            routed_fields[(strategy_id, f.get("log_id"))] = f

    new_ids: set[str] = set()
    uids: dict[str, int] = {}
    for index, sig in enumerate(signals):
        copies = [row_of[c.entry_id] for c in sig.copies if c.entry_id in row_of]
        new = [r for r in copies if r["status"] == "new"]
        if len(new) != 1:
            wrong.append(("signals", sig.copies[0].entry_id, f"{len(new)} 'new' rows of {len(sig.copies)} copies"))
            continue
        [first] = new
        new_ids.add(str(first["id"]))
        if len({r["uid"] for r in copies}) != 1:
            wrong.append(("signals", first["stream_id"], "copies of one signal got different uids"))
        if first["uid"] in uids:
            wrong.append(("signals", first["stream_id"], f"same uid as signal {uids[first['uid']]}"))
        uids[first["uid"]] = index
        got = (
            first["symbol"],
            first["message"],
            first["action"],
            sl.datetime_to_ms(first["bar_time"]),
            sl.datetime_to_ms(first["sent_at"]),
        )
        want = (sig.symbol, sig.message, sig.action, sig.bar_ms, sig.sent_ms)
        if got != want or first["reason"] is not None:
            wrong.append(("signals", first["stream_id"], "new row differs", got, want, first["reason"]))
        for r in copies:
            if r["status"] == "new":
                continue
            if r["status"] != "duplicate" or r["reason"] != f"{sl.REASON_REPEAT} {first['id']}":
                wrong.append(("signals", r["stream_id"], "repeat logged as", r["status"], r["reason"]))
            if targets_of.get(r["id"]):
                wrong.append(("signals", r["stream_id"], "repeat has log entries"))
        if targets_of.get(first["id"], {}) != sig.targets:
            wrong.append(("signals", first["stream_id"], "log entries", targets_of.get(first["id"]), sig.targets))
        log_id = str(first["id"])
        for strategy_id, *_ in STRATEGIES:
            times = routed[strategy_id][log_id]
            want_times = int(sig.targets.get(strategy_id, ("",))[0] == "delivered")
            if times != want_times:
                wrong.append(("signals", first["stream_id"], f"delivered {times}x to strategy {strategy_id}"))
            elif times:
                f = routed_fields[(strategy_id, log_id)]
                delivered = (f["uid"], f["symbol"], f["message"], f["action"], f["bar_time"], f["sent_at"])
                expected = (first["uid"], sig.symbol, sig.message, sig.action, str(sig.bar_ms), str(sig.sent_ms))
                if delivered != expected or f["strategy_id"] != str(strategy_id):
                    wrong.append(("signals", first["stream_id"], "delivered fields differ", delivered, expected))

    for sent in entries:
        if sent.signal is not None or sent.entry_id not in row_of:
            continue
        r = row_of[sent.entry_id]
        if r["status"] != "ignored" or not (r["reason"] or "").startswith(sent.reason):
            wrong.append(("signals", sent.entry_id, "malformed logged as", r["status"], r["reason"], sent.reason))
        if targets_of.get(r["id"]):
            wrong.append(("signals", sent.entry_id, "malformed entry has log entries"))
    for strategy_id, counter in routed.items():
        stray = set(counter) - new_ids
        if stray:
            wrong.append(("signals", f"strategy {strategy_id}", f"{len(stray)} deliveries of no new signal"))
    pending = (await run.redis.xpending(STREAM, GROUP))["pending"]
    if pending:
        wrong.append(("signals", GROUP, f"{pending} entries left pending"))
    return wrong


# --------------------------------------------------------------------------- the scenario


@pytest.mark.timeout(300)
async def test_signal_flood_with_two_routers_racing(pool, redis, redis_url, pg_url):
    async with fault_run("signals-flood", pool, redis, redis_url, pg_url, minutes=240) as run:
        signals, entries = build_entries(run.symbols)
        assert len(entries) == TOTAL and len(signals) == VALID
        await seed_routing(pool)
        second = SecondRouter(redis_url, pg_url)
        try:
            run.daemon.start()
            await run.ready()
            await second.start()
            await wait_for(run, second, lambda: _two_consumers(run), 30, "both routers reading the group")
            run.inject(f"{TOTAL:,} signals, 30% malformed/duplicated, 8 of 1-3 MB, 2 routers")
            await send_in_bursts(run, entries)
            await wait_for(run, second, lambda: _drained(run), 60, "every signal logged and acknowledged")
            code = await second.terminate()
            output = second.output()
            if code != 0 or "Traceback" in output:
                run.other_mismatches.append(("signals", SECOND_ROUTER, f"exit code {code}", output[-2000:]))
            run.other_mismatches += await signal_mismatches(run, signals, entries)
            stats = router_stats(output, SECOND_ROUTER)
            if not stats or not 0 < stats["entries"] < TOTAL:
                run.other_mismatches.append(("signals", SECOND_ROUTER, "did not race: routed", stats))
            await run.finish()
        finally:
            await second.cleanup()
        # After both stopped: the daemon's stop left nothing pending or unlogged either.
        assert (await redis.xpending(STREAM, GROUP))["pending"] == 0
        assert await pool.fetchval("SELECT count(*) FROM signals_v2_log") == TOTAL
        daemon_stats = next(
            (router_stats(run.daemon.output(), name) for name in await consumers(redis) if name != SECOND_ROUTER), None
        )
        print(f"routed by the daemon: {daemon_stats}; by {SECOND_ROUTER}: {stats}")


async def _two_consumers(run: FaultRun) -> bool:
    names = await consumers(run.redis)
    return len(names) >= 2 and SECOND_ROUTER in names


async def _drained(run: FaultRun) -> bool:
    logged = await run.pool.fetchval("SELECT count(*) FROM signals_v2_log")
    return logged >= TOTAL and (await run.redis.xpending(STREAM, GROUP))["pending"] == 0
