"""The chart page in headless Chromium (Debian's /usr/bin/chromium, driven by
Playwright) against the demo's data: `scripts/demo.py` runs the fake exchange, the
daemon and `feed_v4_main.py web` as real processes; the page must load with no console
error, show candles, indicator panes and footprints, draw each new bar the daemon
announces within a second, and load older bars while scrolling left. Screenshots go
to `.local/screenshots/` (SCREENSHOT_DIR)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from browser import launch
from playwright.async_api import async_playwright
from servers import drop_database, free_port

from infra import make_redis

PROJECT = Path(__file__).resolve().parents[1]
SCREENSHOTS = Path(os.environ.get("SCREENSHOT_DIR") or PROJECT / ".local" / "screenshots")
NEW_BAR_BUDGET_MS = 1_000


@contextlib.asynccontextmanager
async def demo_with_chart(redis_url: str, pg_url: str, tmp_path: Path):
    """The demo (fake exchange + daemon + web) until the block ends; yields the chart URL."""
    database = f"feed_v4_web_test_{os.getpid()}"
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "POSTGRES_URL", "DATABASE_URL")}
    env.update(REDIS_URL=redis_url, POSTGRES_URL=pg_url, DEMO_DATABASE=database, DEMO_DIR=str(tmp_path))
    env["TIMEFRAMES"] = "m1,m5,m15,h1"  # the page offers what is built
    await drop_database(pg_url, database)
    demo = await asyncio.create_subprocess_exec(
        sys.executable, str(PROJECT / "scripts" / "demo.py"), "--fresh", "--speed", "60", "--web-port",
        str(free_port()), cwd=PROJECT, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    output: list[str] = []
    try:
        url = None
        while url is None:
            line = (await asyncio.wait_for(demo.stdout.readline(), 60)).decode()
            assert line, "the demo stopped:\n" + "".join(output)
            output.append(line)
            if m := re.search(r"chart\s+: (\S+)", line):
                url = m.group(1)
        reader = asyncio.create_task(_drain(demo.stdout, output))
        try:
            yield url
        except BaseException:
            print("the demo's last output:\n" + "".join(output[-100:]))
            raise
        finally:
            reader.cancel()
    finally:
        if demo.returncode is None:
            demo.terminate()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(demo.wait(), 30)
        if demo.returncode is None:
            demo.kill()
        await drop_database(pg_url, database)


async def _drain(stream: asyncio.StreamReader, output: list[str]) -> None:
    while line := await stream.readline():
        output.append(line.decode())
        del output[:-200]


async def wait_for_data(base: str, token: str, timeout: float = 120.0) -> str:
    """The first symbol once the API serves, twice in a row, 1,000 bars of indicator values
    (on a fresh database the daemon's first history is computed, rewritten as older bars
    land, and written behind its announcements), footprints and its book (the demo turns
    its book streams on)."""
    headers = {"Authorization": f"Bearer {token}"}
    deadline, ready_before = time.monotonic() + timeout, False
    async with aiohttp.ClientSession(headers=headers) as s:
        while time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientError, KeyError, IndexError, TypeError):
                async with s.get(f"{base}/api/v1/symbols") as r:
                    first = (await r.json())[0]
                symbol, query = first["symbol"], {"symbol": first["symbol"], "limit": 1000}
                async with s.get(f"{base}/api/v1/indicators", params=query) as r:
                    rows = await r.json()
                async with s.get(f"{base}/api/v1/footprints", params={**query, "limit": 3}) as r:
                    prints = await r.json()
                ready = sum(row["values"].get("RSI_14") is not None for row in rows) >= 950
                if ready and ready_before and len(prints) >= 3 and first["has_book"]:
                    return symbol
                ready_before = ready
            await asyncio.sleep(2.0)
    raise AssertionError("the demo's data never reached the API")


async def announced_at(redis_url: str, symbol: str, open_time: int) -> int:
    """When (Redis's clock, ms) the newest `ohlcv_m1_ready` entry of that bar was added."""
    redis = make_redis(redis_url)
    try:
        for entry_id, fields in await redis.xrevrange("ohlcv_m1_ready", count=5_000):
            if fields.get("symbol") == symbol and int(fields.get("open_time", 0)) == open_time:
                return int(entry_id.split("-")[0])
    finally:
        await redis.aclose()
    raise AssertionError(f"no announcement of {symbol} {open_time}")


@pytest.mark.timeout(400)
async def test_the_chart_page_in_chromium_on_the_demo(redis_stack_server, pg_url, tmp_path):
    await asyncio.to_thread(SCREENSHOTS.mkdir, parents=True, exist_ok=True)
    demo_redis = redis_stack_server.url.rsplit("/", 1)[0] + "/1"  # the demo's Redis db (scripts/demo.py)
    async with demo_with_chart(redis_stack_server.url, pg_url, tmp_path) as url:
        base, token = url.split("/#token=")
        symbol = await wait_for_data(base, token)
        async with async_playwright() as p:
            browser = await launch(p)
            problems: list[str] = []
            page = await browser.new_page(viewport={"width": 1400, "height": 900})
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("response", lambda r: problems.append(f"HTTP {r.status} {r.url}") if r.status >= 400 else None)
            await page.goto(f"{base}/?symbol={symbol}&tf=m1#token={token}")
            await page.wait_for_function("() => window.feedChart && window.feedChart.ready", timeout=30_000)
            state = await page.evaluate(
                "({bars: feedChart.bars, footprints: feedChart.footprints, panes: feedChart.indicatorPanes,"
                " overlays: feedChart.overlays, oldest: feedChart.oldest, symbol: feedChart.symbol})"
            )
            assert state["symbol"] == symbol and state["bars"] >= 500, state
            assert state["footprints"] >= 3, state
            assert {"RSI", "MACD"} <= set(state["panes"]), state
            assert any(name.startswith("EMA_") for name in state["overlays"]), state
            assert "#token" not in page.url  # the token left the address bar
            await page.screenshot(path=SCREENSHOTS / "chart_candles.png")

            # new bars: each drawn within a second of its announcement on ohlcv_m1_ready
            delays = []
            for _ in range(3):
                seen = await page.evaluate("feedChart.liveBars")
                await page.wait_for_function("n => feedChart.liveBars > n", arg=seen, timeout=15_000)
                drawn = await page.evaluate(
                    "[feedChart.lastLiveOpenTime, performance.timeOrigin + feedChart.lastLiveAt]"
                )
                delays.append(drawn[1] - await announced_at(demo_redis, symbol, drawn[0]))
            print(f"new bar drawn after its announcement: {', '.join(f'{d:.0f}' for d in delays)} ms")
            assert max(delays) < NEW_BAR_BUDGET_MS, delays

            # the footprint view, zoomed in far enough for the numbers
            await page.evaluate("feedChart.setView('footprint')")
            await page.evaluate("feedChart.chart.timeScale().applyOptions({barSpacing: 90})")
            await page.wait_for_function("() => feedChart.drawnFootprints > 0", timeout=10_000)
            await page.screenshot(path=SCREENSHOTS / "chart_footprint.png")

            # scrolling left loads older bars before they are needed
            before = await page.evaluate("({bars: feedChart.bars, oldest: feedChart.oldest})")
            await page.evaluate("feedChart.setView('candles')")
            await page.evaluate("feedChart.chart.timeScale().applyOptions({barSpacing: 6})")
            await page.evaluate(f"feedChart.chart.timeScale().scrollToPosition(-{before['bars'] - 200}, false)")
            await page.wait_for_function("t => feedChart.oldest < t", arg=before["oldest"], timeout=15_000)
            after = await page.evaluate("({bars: feedChart.bars, loads: feedChart.olderLoads})")
            assert after["bars"] > before["bars"] and after["loads"] >= 1, (before, after)

            # a phone-sized screen
            phone = await browser.new_page(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
            phone.on("console", lambda m: problems.append(f"phone {m.type}: {m.text}") if m.type == "error" else None)
            phone.on("pageerror", lambda e: problems.append(f"phone page error: {e}"))
            phone.on(
                "response", lambda r: problems.append(f"phone HTTP {r.status} {r.url}") if r.status >= 400 else None
            )
            await phone.goto(f"{base}/?symbol={symbol}&tf=m5#token={token}")
            await phone.wait_for_function("() => window.feedChart && window.feedChart.ready", timeout=30_000)
            width = await phone.evaluate("document.documentElement.scrollWidth")
            assert width <= 390, f"the page is {width} px wide on a 390 px screen"
            await phone.screenshot(path=SCREENSHOTS / "chart_phone.png")

            # a higher timeframe: its candles, indicators and footprints, and no error
            await page.goto(f"{base}/?symbol={symbol}&tf=h1#token={token}")
            await page.wait_for_function("() => window.feedChart && window.feedChart.ready", timeout=30_000)
            hourly = await page.evaluate("({bars: feedChart.bars, footprints: feedChart.footprints})")
            assert hourly["bars"] >= 10, hourly
            options = await page.eval_on_selector_all("#tf option", "els => els.map(e => e.value)")
            assert "h1" in options, options
            await browser.close()
            assert not problems, problems
