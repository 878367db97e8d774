"""Debian's Chromium for the chart page's test and bench, driven by Playwright (which
downloads no browser here: `make browser` installs Debian's package)."""

from __future__ import annotations

import os

from playwright.async_api import Browser, Playwright

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
# Headless as root in a sandboxed VM with no network but loopback: without the
# background-networking flags Chromium keeps trying Google's hosts.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


async def launch(playwright: Playwright) -> Browser:
    return await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
