"""`feed-v4 tickers`: the real CLI in a real process against the fake exchange, whose
exchangeInfo also lists the entries of a real Binance answer (a SETTLING perpetual, a
quarterly contract, a TradFi perpetual, a non-ASCII name); the pure judgement; and the
feed's one warning when no ticker is enabled."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import orjson
import pytest
from daemon import run_main
from servers import free_port

import core_io
from binance.protocol import valid_symbol
from candles import datetime_to_ms
from fake_exchange import FakeExchange, SyntheticSource
from fake_exchange.rest_api import load_listings
from infra import system_event_log
from ops import tickers as t
from ticker_following import TickerFollower

REAL_EXCHANGE_INFO = (
    Path(__file__).resolve().parents[2] / "shared/data/ws_frames/fstream_2026-10-07/rest_exchange_info_trimmed.json"
)
NON_ASCII = "币安人生USDT"
START = datetime_to_ms(datetime(2026, 10, 7, tzinfo=UTC))


@pytest.fixture
async def exchange():
    """Two replayed symbols (SYN0001USDT, SYN0002USDT) plus the real answer's listings."""
    listings = load_listings(REAL_EXCHANGE_INFO)
    fake = FakeExchange(SyntheticSource(2), start_ms=START, speed=1, books=False, listings=listings)
    await fake.start()
    yield fake
    await fake.stop()


def cli(env: dict[str, str], *args: str):
    return asyncio.to_thread(run_main, env, "tickers", *args, timeout=60)


async def rows(pool) -> dict[str, tuple[str, str | None]]:
    return {
        r["symbol"]: (r["status"], r["source"]) for r in await pool.fetch("SELECT symbol, status, source FROM tickers")
    }


def result_of(stdout: str, symbol: str) -> str:
    """The RESULT column of SYMBOL's line in add/enable/disable's table."""
    for line in stdout.splitlines():
        if line.split("  ")[0].strip() == symbol:
            return line[len(line.split("  ")[0]) :].strip()
    raise AssertionError(f"{symbol} not in\n{stdout}")


# --------------------------------------------------------------------------- the real CLI


@pytest.mark.timeout(180)
async def test_add_applies_the_good_and_refuses_each_bad_one_with_its_reason(pool, redis_url, pg_url, exchange):
    env = {"REDIS_URL": redis_url, "POSTGRES_URL": pg_url, "BINANCE_REST_URL": exchange.rest_url}
    typed = ["SYN0001USDT", "BTCUSDT", "xauusdt", "BTCUSTD", "BTC/USDT:USDT", "OMGUSDT", NON_ASCII, "BTCUSDT_261225"]
    run = await cli(env, "add", *typed, "NOPE\x1b[31m")
    assert run.returncode == 1, (run.stdout, run.stderr)
    out = run.stdout
    assert result_of(out, "SYN0001USDT") == "added" and result_of(out, "BTCUSDT") == "added"
    assert result_of(out, "XAUUSDT") == "added: a TradFi perpetual"  # case folded like SYMBOLS
    assert result_of(out, "BTCUSTD") == "refused: not listed by the exchange (did you mean BTCUSDT?)"
    assert "ccxt-style name: Binance writes it BTCUSDT" in result_of(out, "BTC/USDT:USDT")
    assert result_of(out, "OMGUSDT").startswith("refused: listed but not trading (status SETTLING)")
    quarterly = result_of(out, "BTCUSDT_261225")
    assert quarterly.startswith("refused: a dated contract (CURRENT_QUARTER, delivery 2026-12-25)")
    assert "--no-check adds it anyway" in quarterly
    assert "\x1b" not in out and "NOPE\\x1b[31m" in out  # a control character is escaped, never sent raw
    # The non-ASCII name: listed and TRADING; accepted exactly when the daemon's name rule takes it.
    if valid_symbol(NON_ASCII):
        assert result_of(out, NON_ASCII) == "added"
    else:
        assert "listed by the exchange (status TRADING) but this daemon cannot follow it" in result_of(out, NON_ASCII)
    refused = 5 if valid_symbol(NON_ASCII) else 6
    assert out.splitlines()[-2] == f"{9 - refused} added, {refused} refused"
    expected = {"SYN0001USDT", "BTCUSDT", "XAUUSDT"} | ({NON_ASCII} if valid_symbol(NON_ASCII) else set())
    assert await rows(pool) == {s: ("enabled", "cli") for s in expected}
    logged = await pool.fetch("SELECT level, module, message, details FROM system_log_v4 WHERE module = 'TICKERS'")
    assert len(logged) == 1 and logged[0]["message"].startswith("tickers add (CLI): ")
    details = orjson.loads(logged[0]["details"])
    assert set(details["changed"]) == expected and len(details["refused"]) == refused and details["checked"] is True

    again = await cli(env, "add", "BTCUSDT")  # idempotent: nothing refused, nothing changed
    assert again.returncode == 0 and result_of(again.stdout, "BTCUSDT") == "already enabled", again.stdout
    with_no_check = await cli(env, "add", "--no-check", "BTCUSDT_261225", "eth/usdt")
    assert with_no_check.returncode == 1
    assert result_of(with_no_check.stdout, "BTCUSDT_261225") == "added"
    assert "Binance writes it ETHUSDT" in result_of(with_no_check.stdout, "eth/usdt")  # names still judged
    assert (await rows(pool))["BTCUSDT_261225"] == ("enabled", "cli")


@pytest.mark.timeout(180)
async def test_list_enable_disable_check_and_the_symbols_warning(pool, redis_url, pg_url, exchange):
    env = {"REDIS_URL": redis_url, "POSTGRES_URL": pg_url, "BINANCE_REST_URL": exchange.rest_url}
    await core_io.apply_symbols_setting(pool, ["BTCUSDT"])  # as a boot with SYMBOLS=BTCUSDT leaves it
    await core_io.enable_symbols(pool, ["OMGUSDT"], "cli")  # enabled before it was delisted
    await core_io.set_ticker_problems(pool, {"OMGUSDT": "not trading on the exchange (status SETTLING)"})
    await pool.execute("INSERT INTO tickers (symbol, status) VALUES ('SYN0002USDT', 'disabled')")
    await core_io.upsert_candles(pool, [candle("BTCUSDT", START)])

    listed = await cli(env, "list")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].split() == ["SYMBOL", "STATUS", "SOURCE", "STREAMS", "NEWEST", "M1", "(UTC)", "PROBLEM"]
    assert lines[1].split() == ["BTCUSDT", "enabled", "SYMBOLS", "kline,trades", "2026-10-07", "00:00", "-"]
    assert lines[2].split()[:5] == ["OMGUSDT", "enabled", "cli", "kline,trades", "-"]
    assert lines[2].endswith("not trading on the exchange (status SETTLING)")
    assert lines[3].split() == ["SYN0002USDT", "disabled", "-", "kline,trades", "-", "-"]
    assert lines[-1] == "2 enabled, 1 disabled"
    column = lines[0].index("STATUS")  # aligned: every row's status starts under its header
    assert all(line[column : column + 3] in ("ena", "dis") for line in lines[1:4])
    as_json = orjson.loads((await cli(env, "list", "--json")).stdout)
    assert [r["symbol"] for r in as_json] == ["BTCUSDT", "OMGUSDT", "SYN0002USDT"]
    assert as_json[0]["newest_m1"] == START and as_json[0]["source"] == "SYMBOLS"
    assert as_json[0]["streams"] == {"kline": True, "trades": True, "book_ticker": False, "depth": False}

    check = await cli(env, "check")
    assert check.returncode == 1, check.stdout
    verdicts = {line.split()[0]: line.split()[1] for line in check.stdout.splitlines()[1:-1]}
    assert verdicts == {"BTCUSDT": "ok", "OMGUSDT": "PROBLEM"}
    assert "1 of 2 enabled tickers can be followed (1 disabled not checked)" in check.stdout
    checked = orjson.loads((await cli(env, "check", "--json")).stdout)
    assert checked["ok"] is False and checked["disabled"] == 1
    omg = next(r for r in checked["tickers"] if r["symbol"] == "OMGUSDT")
    assert omg["exchange"].startswith("listed but not trading (status SETTLING)")
    assert omg["daemon_problem"] == "not trading on the exchange (status SETTLING)"

    disabled = await cli({**env, "SYMBOLS": "BTCUSDT"}, "disable", "BTCUSDT", "OMGUSDT", "SYN0001USTD")
    assert disabled.returncode == 1, disabled.stdout
    assert result_of(disabled.stdout, "BTCUSDT") == "disabled" and result_of(disabled.stdout, "OMGUSDT") == "disabled"
    assert result_of(disabled.stdout, "SYN0001USTD") == "refused: not in tickers (did you mean SYN0002USDT?)"
    assert "warning: SYMBOLS lists BTCUSDT: the next boot re-enables it while SYMBOLS lists it" in disabled.stderr
    assert "OMGUSDT" not in disabled.stderr.split("warning: no ticker")[0]  # not SYMBOLS': no warning for it
    assert "warning: no ticker is enabled" in disabled.stderr  # the last one went
    assert await rows(pool) == {
        "BTCUSDT": ("disabled", "cli"),
        "OMGUSDT": ("disabled", "cli"),
        "SYN0002USDT": ("disabled", None),
    }
    # A row SYMBOLS enabled warns even when this shell's SYMBOLS does not list it.
    await core_io.apply_symbols_setting(pool, ["BTCUSDT"])
    again = await cli(env, "disable", "BTCUSDT")
    assert again.returncode == 0 and "was enabled by SYMBOLS (source SYMBOLS)" in again.stderr

    enabled = await cli(env, "enable", "SYN0002USDT", "BTCUSDT", "SYN0001USDT")
    assert enabled.returncode == 0, enabled.stdout
    assert [result_of(enabled.stdout, s) for s in ("SYN0002USDT", "BTCUSDT", "SYN0001USDT")] == [
        "enabled",
        "enabled",
        "added",
    ]
    assert (await rows(pool))["SYN0002USDT"] == ("enabled", "cli")
    ok = await cli(env, "check")
    assert (
        ok.returncode == 0
        and ok.stdout.splitlines()[-1] == "3 of 3 enabled tickers can be followed (1 disabled not checked)"
    )


@pytest.mark.timeout(120)
async def test_exchange_unreachable_is_one_line_and_exit_2_and_no_check_works(pool, redis_url, pg_url):
    env = {"REDIS_URL": redis_url, "POSTGRES_URL": pg_url, "BINANCE_REST_URL": f"http://127.0.0.1:{free_port()}"}
    for args in (["add", "BTCUSDT"], ["enable", "BTCUSDT"]):
        run = await cli(env, *args)
        assert run.returncode == 2 and run.stdout == "", (run.stdout, run.stderr)
        assert run.stderr.count("\n") == 1 and run.stderr.startswith("feed_v4: cannot read the exchange's listing")
        assert "rerun with --no-check" in run.stderr
    check = await cli(env, "check")
    assert check.returncode == 2 and "tickers list" in check.stderr
    assert await rows(pool) == {}
    run = await cli(env, "enable", "--no-check", "BTCUSDT", "A B")
    assert run.returncode == 1
    assert result_of(run.stdout, "BTCUSDT") == "added" and result_of(run.stdout, "A B").startswith("refused")
    assert await rows(pool) == {"BTCUSDT": ("enabled", "cli")}
    empty = await cli(env, "disable", "BTCUSDT")
    assert empty.returncode == 0 and "warning: no ticker is enabled" in empty.stderr


def candle(symbol: str, open_time: int):
    from tests.test_candles_pg import make_candle

    return make_candle(symbol, "m1", open_time)


# --------------------------------------------------------------------------- pure


def listing() -> dict[str, t.Listed]:
    return t.parse_exchange_info(orjson.loads(REAL_EXCHANGE_INFO.read_bytes()))


def test_judgement_of_the_real_listing():
    real = listing()
    assert set(real) == {"BTCUSDT", "XAUUSDT", NON_ASCII, "OMGUSDT", "BTCUSDT_261225"}
    assert t.judge("BTCUSDT", real) == t.Verdict("BTCUSDT", "BTCUSDT")
    assert t.judge(" btcusdt ", real).name == "BTCUSDT"
    assert t.judge("BTCUSDT_261225", real).name is None
    assert (
        t.judge("BTCUSDT_261225", real, adding=False).note
        == "a dated contract (CURRENT_QUARTER, delivery 2026-12-25): followed until delivery"
    )
    assert t.judge("OMGUSDT", real, adding=False).name is None  # check refuses what cannot be followed
    assert t.judge("ETHUSDT", real).reason == "not listed by the exchange"
    assert "did you mean BTCUSDT?" in t.judge("BTC-USDT", real).reason
    no_ascii = {**real, "ÄBCUSDT": t.Listed("TRADING", "PERPETUAL")}
    assert (t.judge("ÄBCUSDT", no_ascii).name is None) == (not valid_symbol("ÄBCUSDT"))


def test_terminal_text_is_aligned_for_wide_characters_and_escaped():
    lines = t.table(("SYMBOL", "X"), [(NON_ASCII, "a"), ("BTCUSDT", "b")])
    assert [t.width(line.split("  ")[0]) for line in lines] == [6, 12, 7]
    assert t.width(lines[1][: lines[1].index("a")]) == t.width(lines[2][: lines[2].index("b")])
    assert t.shown("A\x1b[2JB\x00") == "A\\x1b[2JB\\x00" and t.shown("X" * 100).endswith("…")


# --------------------------------------------------------------------------- the feed's warning


class ListingOnly:
    async def exchange_info(self):
        return orjson.loads(REAL_EXCHANGE_INFO.read_bytes())


@pytest.mark.timeout(60)
async def test_the_feed_warns_once_when_no_ticker_is_enabled_and_again_after_some_were(pool, caplog):
    settings = SimpleNamespace(ticker_refresh_s=0.05, exchange_info_refresh_s=3600.0)
    followed: list[set[str]] = []

    async def follow(symbols: set[str]) -> None:
        followed.append(set(symbols))

    follower = TickerFollower(pool, ListingOnly(), settings, follow)  # type: ignore[arg-type]
    system_event_log.pending.clear()
    caplog.set_level(logging.WARNING, logger="FEED")
    task = asyncio.create_task(follower.run())

    def warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records if "no ticker is enabled" in r.getMessage()]

    async def refreshes(n: int) -> None:
        seen = len(followed)
        while len(followed) < seen + n:
            await asyncio.sleep(0.02)

    try:
        await refreshes(5)
        assert len(warnings()) == 1 and "feed-v4 tickers add BTCUSDT" in warnings()[0] and "SYMBOLS" in warnings()[0]
        assert any("no ticker is enabled" in row[3] for row in system_event_log.pending)  # system_log_v4 too
        await core_io.enable_symbols(pool, ["BTCUSDT"])
        while {"BTCUSDT"} not in followed:
            await asyncio.sleep(0.02)
        await refreshes(3)
        assert len(warnings()) == 1
        await pool.execute("UPDATE tickers SET status = 'disabled'")
        await refreshes(5)
        assert len(warnings()) == 2
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        system_event_log.pending.clear()
