"""The command line (feed_v4_cli.py) as users run it, in real processes: `--help` on
every command prints and changes nothing (PostgreSQL and Redis byte for byte), the
version, `migrate --status`, bad commands, and `pip install .` giving a working
`feed-v4` console script in a fresh virtualenv."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from daemon import run_main
from servers import drop_database, recreate_database
from web_data import seed

from infra import make_redis

PROJECT = Path(__file__).resolve().parents[1]
COMMANDS = ["run", "migrate", "status", "restore", "web", "tickers", "config"]
SUBCOMMANDS = [["tickers", action] for action in ("list", "add", "enable", "disable", "check")]
VERSION = tomllib.loads((PROJECT / "pyproject.toml").read_text())["project"]["version"]


def pg_dump(url: str) -> str:
    """The database's schema and data (less pg_dump's per-run random `\\restrict` key)."""
    dump = subprocess.run(["pg_dump", "--no-owner", url], capture_output=True, text=True, check=True).stdout
    return "\n".join(line for line in dump.splitlines() if not line.startswith(("\\restrict", "\\unrestrict")))


async def redis_snapshot(url: str) -> dict[bytes, tuple[bytes, bytes]]:
    """Every key's type and serialised value (DUMP)."""
    raw = make_redis(url, decode_responses=False)
    try:
        return {key: (await raw.type(key), await raw.dump(key)) for key in sorted(await raw.keys("*"))}
    finally:
        await raw.aclose()


async def test_help_on_every_command_prints_and_changes_nothing(pool, redis, redis_url, pg_url):
    await seed(pool, redis)
    await redis.xadd("ohlcv_m1_ready", {"symbol": "BTCUSDT", "tf": "m1", "open_time": "1"})
    before_pg, before_redis = await asyncio.to_thread(pg_dump, pg_url), await redis_snapshot(redis_url)
    assert "BTCUSDT" in before_pg and len(before_redis) >= 5  # the comparison below compares something
    await asyncio.to_thread(helps_print_usage, {"REDIS_URL": redis_url, "POSTGRES_URL": pg_url})
    assert await asyncio.to_thread(pg_dump, pg_url) == before_pg
    assert await redis_snapshot(redis_url) == before_redis


def helps_print_usage(env: dict[str, str]) -> None:
    for args in (["--help"], *([*command, "--help"] for command in [[c] for c in COMMANDS] + SUBCOMMANDS)):
        run = run_main(env, *args, timeout=30)
        assert run.returncode == 0 and run.stdout.startswith("usage: feed-v4"), (args, run.stdout, run.stderr)
        assert run.stderr == "", (args, run.stderr)
    restore = subprocess.run(
        [sys.executable, str(PROJECT / "restore_redis_from_pg.py"), "--help"],
        capture_output=True, text=True, timeout=30, env={**os.environ, **env},
    )  # fmt: skip
    assert restore.returncode == 0 and restore.stdout.startswith("usage: restore_redis_from_pg.py")


def test_version_and_bad_commands():
    run = run_main({}, "--version")
    assert run.returncode == 0 and run.stdout.strip() == f"feed-v4 {VERSION}"
    bad_commands = (
        ["bogus"],
        ["migrate", "--force"],
        ["status", "extra"],
        ["tickers"],  # an action is required
        ["tickers", "add"],  # a SYMBOL is required
        ["tickers", "disable", "BTCUSDT", "--no-check"],  # disable asks no exchange
        ["tickers", "list", "BTCUSDT"],
        ["config", "--bogus"],
    )
    for bad in bad_commands:
        run = run_main({}, *bad)
        assert run.returncode == 2 and "usage: feed-v4" in run.stderr and run.stdout == "", bad


@pytest.mark.timeout(120)
async def test_migrate_status_lists_pending_then_applied(pg_url):
    scratch = await recreate_database(pg_url, f"feed_v4_cli_test_{os.getpid()}")
    try:
        env = {"POSTGRES_URL": scratch, "REDIS_URL": "redis://127.0.0.1:1/0"}  # migrate needs no Redis
        listed = await asyncio.to_thread(run_main, env, "migrate", "--status")
        migrations = sorted(p.name for p in (PROJECT / "sql").glob("*.sql"))
        assert listed.returncode == 1, listed.stderr
        assert [line.split()[-1] for line in listed.stdout.splitlines()[:-1]] == migrations
        assert all(line.startswith("pending") for line in listed.stdout.splitlines()[:-1])
        assert listed.stdout.splitlines()[-1] == f"{len(migrations)} pending"
        assert (await asyncio.to_thread(run_main, env, "migrate")).returncode == 0
        listed = await asyncio.to_thread(run_main, env, "migrate", "--status")
        assert listed.returncode == 0 and listed.stdout.splitlines()[-1] == "schema up to date"
        assert all(line.startswith("applied 20") for line in listed.stdout.splitlines()[:-1])
    finally:
        await drop_database(pg_url, f"feed_v4_cli_test_{os.getpid()}")


@pytest.mark.timeout(300)
def test_pip_install_gives_a_working_console_script(tmp_path):
    """`pip install .` into a fresh virtualenv (without the dependencies, which the hashed
    lock installs: `--no-deps` keeps this to seconds) gives `feed-v4`, whose help and
    version need none of them."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    install = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", "--no-deps", str(PROJECT)],
        capture_output=True, text=True, timeout=240, cwd=tmp_path,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr
    script = venv / "bin" / "feed-v4"
    version = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=30)
    assert version.returncode == 0 and version.stdout.strip() == f"feed-v4 {VERSION}", version.stderr
    helped = subprocess.run([str(script), "migrate", "--help"], capture_output=True, text=True, timeout=30)
    assert helped.returncode == 0 and "--status" in helped.stdout
    site = next((venv / "lib").glob("python3*/site-packages"))
    assert sorted(p.name for p in (site / "sql").glob("*.sql")) == sorted(
        p.name for p in (PROJECT / "sql").glob("*.sql")
    )
    assert (site / "web" / "static" / "index.html").is_file() and (site / "web" / "openapi.json").is_file()
