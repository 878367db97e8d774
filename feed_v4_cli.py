"""The command line: `feed-v4` (the installed console script) and `python feed_v4_main.py`.

Arguments are parsed (argparse) before any setting is read, any server is reached or
the daemon's modules are imported: `--help` and `--version` anywhere print and do
nothing else, quickly, even where the daemon's dependencies are not installed.
"""

from __future__ import annotations

import argparse
import sys
import tomllib
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
        "migrate", help="apply the database migrations and exit", description="Apply the pending migrations (sql/)."
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
    commands.add_parser(
        "web",
        help="serve the read API and chart page",
        description="The read API and chart page (read only): WEB_HOST, WEB_PORT, WEB_TOKEN (README).",
    )
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)  # --help, --version, errors: exit here
    import feed_v4_main  # the daemon's modules, only now

    return feed_v4_main.run_command(args.command or DEFAULT_COMMAND, args)


if __name__ == "__main__":
    sys.exit(main())
