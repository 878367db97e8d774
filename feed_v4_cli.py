"""The command line: `feed-v4` (the installed console script) and `python feed_v4_main.py`.

Arguments are parsed (argparse) before any setting is read, any server is reached or
the daemon's modules are imported: `--help` and `--version` anywhere print and do
nothing else, quickly, even where the daemon's dependencies are not installed.
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from datetime import date
from importlib import metadata
from pathlib import Path

PROG = "feed-v4"
DEFAULT_COMMAND = "run"


def version() -> str:
    """The installed distribution's version, else the checkout's pyproject.toml's."""
    try:
        return metadata.version("feed_v4")
    except metadata.PackageNotFoundError:
        pyproject = Path(__file__).resolve().parent / "pyproject.toml"
        return tomllib.loads(pyproject.read_text())["project"]["version"]


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Binance USDⓈ-M futures market-data daemon: candles, indicators, order flow, the book, "
            "signal routing; Redis as bus and cache, PostgreSQL as the source of truth. "
            "Settings come from the environment (README, Configuration)."
        ),
        epilog=f"Without a command: {DEFAULT_COMMAND}. `{PROG} COMMAND --help` for a command's options.",
    )
    root.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    commands = root.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser(
        "run",
        help="run the daemon (the default)",
        description="Run the daemon: migrations, restore, then every worker until SIGTERM/SIGINT (exit 0).",
    )
    migrate = commands.add_parser(
        "migrate",
        help="apply the database migrations and the storage mode, and exit",
        description="Apply the pending migrations (sql/), then TimescaleDB where the server loads it.",
    )
    migrate.add_argument(
        "--status",
        action="store_true",
        help="list applied and pending migrations, change nothing; exit 0 when none is pending, 1 otherwise",
    )
    status = commands.add_parser(
        "status",
        help="print the state of the deployment",
        description=(
            "Print the state of feed_v4 from Redis and PostgreSQL: daemons, per-ticker lag, streams, missing "
            "minutes, recent errors. Exit 0 when healthy, 1 when unhealthy, 2 when a server cannot be reached."
        ),
    )
    status.add_argument("--json", action="store_true", help="print the report as JSON (times as ms and ISO UTC)")
    commands.add_parser(
        "restore",
        help="rebuild the Redis cache from PostgreSQL and exit",
        description="Rebuild Redis (candles, indicators, streams, groups) from PostgreSQL; safe while the daemon runs.",
    )
    tickers = commands.add_parser(
        "tickers",
        help="list, add, enable, disable and check the followed tickers",
        description=(
            "Manage the `tickers` table, judged against the exchange's listing (GET /fapi/v1/exchangeInfo): "
            "status TRADING and a perpetual contract. Changes take effect in a running daemon within "
            "TICKER_REFRESH_S."
        ),
    )
    actions = tickers.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="every row of `tickers` with its switches and problem")
    listing.add_argument("--json", action="store_true", help="print the rows as JSON")
    for name, what in (
        ("add", "add symbols as enabled (new rows) after checking them against the exchange"),
        ("enable", "enable symbols (added when missing) after checking them against the exchange"),
        ("disable", "disable symbols (the feed unsubscribes them; their data stays)"),
    ):
        action = actions.add_parser(name, help=what, description=what[0].upper() + what[1:] + ".")
        action.add_argument("symbols", nargs="+", metavar="SYMBOL", help="e.g. BTCUSDT (as Binance writes it)")
        if name != "disable":
            action.add_argument(
                "--no-check",
                action="store_true",
                help="skip the exchange check (names are still validated): when the exchange cannot be reached",
            )
    check = actions.add_parser(
        "check", help="judge every enabled ticker against the exchange; exit 1 when one cannot be followed"
    )
    check.add_argument("--json", action="store_true", help="print the verdicts as JSON")
    config = commands.add_parser(
        "config",
        help="print every setting, its value and where it came from",
        description=(
            "Every setting with its value and source (environment, .local/services.env, default), secrets "
            "masked; warns about environment variables that look like a setting but are misspelt. Reaches no "
            "server. Exit 1 when a value is invalid."
        ),
    )
    config.add_argument("--json", action="store_true", help="print the settings as JSON")
    importer = commands.add_parser(
        "import",
        help="take history from Binance's public archives (data.binance.vision)",
        description=(
            "Daily kline files of a date range into PostgreSQL: each verified against its .CHECKSUM, its rows "
            "checked and COPYed in, the day's M5/M15 built again, gaps it fills marked backfilled. Resumable "
            "and idempotent: a file already taken in (same sha256) is skipped. Exit 1 when a file failed (the "
            "others are imported)."
        ),
    )
    importer.add_argument("--from", dest="first", required=True, type=_day, metavar="YYYY-MM-DD", help="first day")
    importer.add_argument("--to", dest="last", required=True, type=_day, metavar="YYYY-MM-DD", help="last day")
    importer.add_argument(
        "--symbols", type=_symbols, metavar="A,B,...", help="comma list (default: the enabled tickers)"
    )
    importer.add_argument(
        "--source",
        default="https://data.binance.vision",
        help="the archive's base URL or a folder laid out the same way (default: %(default)s)",
    )
    importer.add_argument(
        "--kind", choices=("klines", "aggTrades"), default="klines", help="what to import (default: klines)"
    )
    drain = commands.add_parser(
        "drain",
        help="move a daemon process's symbols to the other processes (before a deploy)",
        description=(
            "Ask the daemon process HOST:PID (as `status` lists it) to hand every symbol to the other processes "
            "and follow nothing; wait until they follow them. Exit 0 when drained, 1 when not within --wait, "
            "2 when the request is refused (no such process, or no other process to take the symbols)."
        ),
    )
    drain.add_argument("process", metavar="HOST:PID", help="the process, as `status` lists it")
    drain.add_argument("--cancel", action="store_true", help="withdraw the request: the process takes a share again")
    drain.add_argument("--force", action="store_true", help="drain even when no other process would take the symbols")
    drain.add_argument("--wait", type=float, default=60.0, metavar="SECONDS", help="how long to wait (default 60)")
    commands.add_parser(
        "web",
        help="serve the read API and chart page",
        description="The read API and chart page (read only): WEB_HOST, WEB_PORT, WEB_TOKEN (README).",
    )
    return root


def _day(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a day as YYYY-MM-DD") from None


def _symbols(text: str) -> list[str]:
    symbols = [s.strip().upper() for s in text.split(",") if s.strip()]
    if not symbols:
        raise argparse.ArgumentTypeError("no symbol given")
    return symbols


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)  # --help, --version, errors: exit here
    import feed_v4_main  # the daemon's modules, only now

    return feed_v4_main.run_command(args.command or DEFAULT_COMMAND, args)


if __name__ == "__main__":
    sys.exit(main())
