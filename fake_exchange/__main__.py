"""CLI: `python -m fake_exchange --source archive|synthetic --symbols N --speed X --start ISO --port P`.

Order books (bookTicker, diff depth, GET /fapi/v1/depth) are on unless `--no-books`.

Runs until Ctrl-C (or SIGTERM) and prints the URLs to point the feed at.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from datetime import UTC, datetime
from pathlib import Path

if __package__ in (None, ""):  # `python fake_exchange/__main__.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from candles import datetime_to_ms, ms_to_datetime
from fake_exchange.book import BookConfig
from fake_exchange.rest_api import load_listings
from fake_exchange.server import FakeExchange
from fake_exchange.sources import ArchiveSource, CandleSource, SyntheticSource
from fake_exchange.trades import TRADES_PER_AGG
from market_data import archive_symbols


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m fake_exchange", description=__doc__)
    parser.add_argument("--source", choices=("archive", "synthetic"), default="archive")
    parser.add_argument(
        "--symbols", default=None, help="how many symbols (archive: the first N; default all / 20), or a comma list"
    )
    parser.add_argument("--speed", type=float, default=1.0, help="simulated seconds per real second")
    parser.add_argument("--start", default=None, help="sim start, UTC ISO time (default: the source's first minute)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--close-delay-ms",
        default="200,2000",
        help="a minute's closing klines go out this long after it ends, spread over MIN,MAX simulated ms",
    )
    parser.add_argument(
        "--updates-per-minute", type=int, default=4, help="forming-kline pushes per symbol and minute (Binance: ~240)"
    )
    parser.add_argument(
        "--trades-per-agg",
        type=int,
        default=TRADES_PER_AGG,
        help="exchange trades per made-up aggTrade, about (fewer aggTrades for fast replays)",
    )
    parser.add_argument(
        "--book-ticker-per-s",
        type=float,
        default=BookConfig.book_ticker_per_s,
        help="made-up books: best bid/ask changes per second and symbol (bookTicker events, about)",
    )
    parser.add_argument("--no-books", action="store_true", help="no order books on /public (nor GET /fapi/v1/depth)")
    parser.add_argument(
        "--listings",
        metavar="FILE",
        default=None,
        help="a saved exchangeInfo answer whose symbols are listed too (exchangeInfo only: no data is served "
        "for them), e.g. ../shared/data/ws_frames/fstream_2026-10-07/rest_exchange_info_trimmed.json",
    )
    return parser.parse_args(argv)


def make_source(args: argparse.Namespace) -> CandleSource:
    spec = args.symbols
    if args.source == "synthetic":
        return SyntheticSource(int(spec) if spec else 20, seed=args.seed)
    if spec is None:
        return ArchiveSource()
    if spec.isdigit():
        return ArchiveSource(archive_symbols()[: int(spec)])
    return ArchiveSource([s.strip().upper() for s in spec.split(",") if s.strip()])


def parse_start(text: str | None) -> int | None:
    if not text:
        return None
    moment = datetime.fromisoformat(text)
    return datetime_to_ms(moment if moment.tzinfo else moment.replace(tzinfo=UTC))


async def serve(args: argparse.Namespace) -> None:
    source = make_source(args)
    low, _, high = args.close_delay_ms.partition(",")
    exchange = FakeExchange(
        source,
        start_ms=parse_start(args.start),
        speed=args.speed,
        host=args.host,
        port=args.port,
        seed=args.seed,
        close_delay_ms=(int(low), int(high or low)),
        updates_per_minute=args.updates_per_minute,
        trades_per_agg=args.trades_per_agg,
        book=BookConfig(book_ticker_per_s=args.book_ticker_per_s, seed=args.seed),
        books=not args.no_books,
        listings=load_listings(args.listings) if args.listings else (),
    )
    await exchange.start()
    started = ms_to_datetime(exchange.clock.now_ms())
    print(f"fake exchange: {len(source.symbols)} symbols, speed {args.speed:g}x, sim start {started:%Y-%m-%dT%H:%M}Z")
    print(f"BINANCE_WS_URL={exchange.ws_url}")
    print(f"BINANCE_REST_URL={exchange.rest_url}")
    print(f"book streams (bookTicker, depth) on {exchange.public_ws_url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await exchange.stop()
        print("fake exchange stopped", flush=True)


def main(argv: list[str] | None = None) -> None:
    asyncio.run(serve(parse_args(argv)))


if __name__ == "__main__":
    main()
