"""Which tickers the feed follows: the enabled rows of `tickers` that have a valid name
and that the exchange lists as TRADING (binance/symbols.py judges; this is its I/O).
The others are recorded in `tickers.problem` (shown by `status`) and logged once.
No enabled ticker at all is logged once (WARNING, with how to add one), and again only
after some were enabled and then none are."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

import asyncpg

import core_io
from binance.rest import RestClient, RestError
from binance.symbols import TickerFilter, parse_listing
from infra import PG_DOWN_ERRORS, RateLimitedLog, log_system_event


class FollowSettings(Protocol):
    ticker_refresh_s: float
    exchange_info_refresh_s: float


class TickerFollower:
    """Reads `tickers` every TICKER_REFRESH_S (or when woken) and the exchange's listing
    every EXCHANGE_INFO_REFRESH_S, and hands the set to follow to `follow`."""

    LISTING_WAIT_S = 5.0  # at start, how long following waits for the exchange's listing
    NONE_ENABLED = (
        "no ticker is enabled in `tickers`: nothing is followed; add one with "
        "`feed-v4 tickers add BTCUSDT` (checked against the exchange) or set SYMBOLS=BTCUSDT,ETHUSDT"
    )

    def __init__(
        self,
        pool: asyncpg.Pool,
        rest: RestClient,
        settings: FollowSettings,
        follow: Callable[[set[str]], Awaitable[None]],
    ) -> None:
        self.pool, self.rest, self.settings, self.follow = pool, rest, settings, follow
        self.tickers = TickerFilter(settings.exchange_info_refresh_s)
        self.wake = asyncio.Event()
        self.listing_errors = RateLimitedLog("FEED", interval_s=600)
        self.told_none_enabled = False  # the warning below is given once per empty spell

    def refused(self, symbol: str) -> None:
        """The exchange answered -1121 (invalid symbol) for it: stop following it."""
        self.tickers.refused(symbol)
        self.wake.set()

    async def run(self) -> None:
        listing_task: asyncio.Task | None = None
        try:
            while True:
                try:
                    enabled = set(await core_io.enabled_symbols(self.pool))
                except PG_DOWN_ERRORS:
                    await asyncio.sleep(self.settings.ticker_refresh_s)
                    continue  # the intake logs the outage
                self._tell_if_none_enabled(enabled)
                if (listing_task is None or listing_task.done()) and self.tickers.due(enabled, time.monotonic()):
                    listing_task = asyncio.create_task(self._fetch_listing())
                    if self.tickers.listing is None:  # the first: judged before anything is subscribed
                        await asyncio.wait([listing_task], timeout=self.LISTING_WAIT_S)
                wanted, problems = self.tickers.split(enabled)
                await self.follow(wanted)
                if problems != self.tickers.recorded:
                    with contextlib.suppress(*PG_DOWN_ERRORS):
                        await self._record_problems(problems)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), self.settings.ticker_refresh_s)
                self.wake.clear()
        finally:
            if listing_task is not None:
                listing_task.cancel()
                await asyncio.gather(listing_task, return_exceptions=True)

    def _tell_if_none_enabled(self, enabled: set[str]) -> None:
        if enabled:
            self.told_none_enabled = False
        elif not self.told_none_enabled:
            self.told_none_enabled = True
            log_system_event("WARNING", "FEED", self.NONE_ENABLED)

    async def _fetch_listing(self) -> None:
        self.tickers.attempted(time.monotonic())
        try:
            listing = parse_listing(await self.rest.exchange_info())
        except (RestError, ValueError, OSError, TimeoutError) as exc:
            self.listing_errors.warn(
                "exchangeInfo", f"cannot read the exchange's listing ({exc}): tickers are judged by name only"
            )
            return
        self.tickers.update(listing, time.monotonic())
        self.wake.set()

    async def _record_problems(self, problems: dict[str, str]) -> None:
        """Write who is not followed and why to `tickers`; their open gaps become
        'unfillable' (the exchange will not fill them)."""
        await core_io.set_ticker_problems(self.pool, problems)
        new = {s: p for s, p in problems.items() if self.tickers.recorded.get(s) != p}
        if new:
            await core_io.close_missing_m1(self.pool, sorted(new))
            for symbol, problem in sorted(new.items())[:20]:
                log_system_event(
                    "WARNING", "FEED", f"ticker {symbol!r} is enabled but not followed: {problem}", {"symbol": symbol}
                )
            if len(new) > 20:
                log_system_event("WARNING", "FEED", f"{len(new) - 20} more enabled tickers are not followed")
        self.tickers.recorded = problems
