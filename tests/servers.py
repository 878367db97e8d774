"""Real servers for the tests: private Redis instances, a private PostgreSQL cluster and
scratch databases."""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from aiohttp import web

from infra import read_local_services


def setting(key: str) -> str:
    """From the environment, else from what `make services` wrote in .local/services.env."""
    value = os.environ.get(key) or read_local_services().get(key, "")
    if not value:
        raise RuntimeError(f"{key} is unknown: run `make services` (or `make test`) first")
    return value


def start_fake_exchange(
    symbols: int, speed: float, start: str, port: int, seed: int = 3, extra: tuple[str, ...] = ()
) -> subprocess.Popen:
    """The fake exchange with synthetic symbols, in its own process (for benchmarks)."""
    command = [sys.executable, "-m", "fake_exchange", "--source", "synthetic", "--symbols", str(symbols)]
    command += ["--seed", str(seed), "--speed", str(speed), "--start", start, "--port", str(port), *extra]
    project = Path(__file__).resolve().parents[1]
    return subprocess.Popen(command, cwd=project, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def time_closes(feed) -> dict[tuple[str, int], float]:
    """When (wall clock) each closed kline reached the feed's intake queue, by (symbol, open
    time): the start of the latency the benchmarks measure."""
    received: dict[tuple[str, int], float] = {}
    enqueue = feed.closed.put_nowait

    def timed_put(candle) -> None:
        received.setdefault((candle.symbol, candle.open_time), time.time())
        enqueue(candle)

    feed.closed.put_nowait = timed_put
    return received


def free_cluster_port() -> int:
    """A free port with its cluster bus port (+10,000) free too: at most 55,535."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20_000, 55_535)
        with contextlib.ExitStack() as stack:
            try:
                for candidate in (port, port + 10_000):
                    sock = stack.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", candidate))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port pair for a cluster node")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def redis_env() -> dict[str, str]:
    """The environment the Redis Stack binaries need (their shared libraries)."""
    env = dict(os.environ)
    lib = os.environ.get("REDIS_LD_LIBRARY_PATH") or read_local_services().get("REDIS_LD_LIBRARY_PATH", "")
    if lib:
        env["LD_LIBRARY_PATH"] = lib
    return env


class RedisServer:
    """A private redis-server process (with or without the TimeSeries module)."""

    def __init__(self, with_timeseries: bool, extra_args: tuple[str, ...] = (), port: int | None = None) -> None:
        self.with_timeseries = with_timeseries
        self.extra_args = extra_args
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="feed_v4_redis_"))
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [
            setting("REDIS_SERVER_BIN"),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.dir),
            "--enable-debug-command",
            "local",
            "--loglevel",
            "warning",
        ]
        if self.with_timeseries:
            args += ["--loadmodule", setting("REDIS_TS_MODULE")]
        args += self.extra_args
        env = redis_env()
        log_path = self.dir / "redis.log"
        with open(log_path, "ab") as log_file:
            self.process = subprocess.Popen(args, env=env, stdout=log_file, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited: {log_path.read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("redis-server did not start within 10 s")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        self.process = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class RedisCluster:
    """A Redis Cluster of private servers from the same binaries: `masters` masters with
    `replicas` replicas each, slots spread by `redis-cli --cluster create`."""

    def __init__(self, masters: int = 3, replicas: int = 1, with_timeseries: bool = True) -> None:
        self.nodes = [
            RedisServer(
                with_timeseries,
                (
                    *(
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "nodes.conf",
                        "--cluster-node-timeout",
                        "1500",
                    ),
                    *("--repl-diskless-sync-delay", "0"),  # a replica in sync at once, able to take over
                ),
                free_cluster_port(),
            )
            for _ in range(masters * (1 + replicas))
        ]
        self.replicas = replicas

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        subprocess.run(
            [
                self.cli_path,
                "--cluster",
                "create",
                *addresses,
                "--cluster-replicas",
                str(self.replicas),
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=60,
            env=redis_env(),
        )
        self.wait_ok()

    @property
    def cli_path(self) -> str:
        return str(Path(setting("REDIS_SERVER_BIN")).with_name("redis-cli"))

    def cli(self, node: RedisServer, *command: str) -> str:
        done = subprocess.run(
            [self.cli_path, "-p", str(node.port), *command], capture_output=True, text=True, timeout=10, env=redis_env()
        )
        return done.stdout

    def masters(self) -> list[RedisServer]:
        return [node for node in self.nodes if node.process and "role:master" in self.cli(node, "INFO", "replication")]

    def kill_master(self, index: int = 0, replicated: bool = False) -> RedisServer:
        """kill -9 of a master; returns once a replica has taken its slots over.

        replicated: only once its replicas have every write it took. Redis replicates
        asynchronously, so without this the writes of the last moment may die with the
        master (as they may in production: the daemon's tests take that as it comes)."""
        masters = self.masters()
        victim = masters[index]
        assert victim.process is not None
        deadline = time.monotonic() + 10
        while replicated and not self._replicas_caught_up(victim):
            if time.monotonic() > deadline:
                raise RuntimeError("the master's replicas did not catch up within 10 s")
            time.sleep(0.05)
        victim.process.kill()
        victim.process.wait(10)
        victim.process = None
        deadline = time.monotonic() + 30
        while len(self.masters()) < len(masters):  # until a replica is promoted
            if time.monotonic() > deadline:
                raise RuntimeError("no replica took over the killed master within 30 s")
            time.sleep(0.1)
        self.wait_ok()
        return victim

    def _replicas_caught_up(self, master: RedisServer) -> bool:
        info = self.cli(master, "INFO", "replication")
        offset = re.search(r"master_repl_offset:(\d+)", info)
        replicas = [int(o) for o in re.findall(r"slave\d+:[^\r\n]*?offset=(\d+)", info)]
        return offset is not None and bool(replicas) and min(replicas) >= int(offset.group(1))

    def restart(self, node: RedisServer) -> None:
        """A killed node back (it rejoins from its nodes.conf, as a replica)."""
        node.start()
        self.wait_ok()

    def wait_ok(self, timeout: float = 30) -> None:
        live = [node for node in self.nodes if node.process]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            replication = [self.cli(node, "INFO", "replication") for node in live]
            synced = all("role:master" in r or "master_link_status:up" in r for r in replication)
            if synced and all("cluster_state:ok" in self.cli(node, "CLUSTER", "INFO") for node in live):
                return
            time.sleep(0.1)
        raise RuntimeError(f"the test cluster was not ok within {timeout} s")

    def cleanup(self) -> None:
        for node in self.nodes:
            node.cleanup()


class PostgresServer:
    """A private PostgreSQL cluster (initdb, trust), for the faults that stop or restart
    the server: the shared one stays untouched. Run as root, it runs as `postgres`."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="feed_v4_pg_"))
        self.data = self.dir / "data"
        self.bindir = self._find_bindir()
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres")
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres")

    @staticmethod
    def _find_bindir() -> Path:
        found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
        initdb = str(found[-1]) if found else shutil.which("initdb")
        if not initdb:
            raise RuntimeError("no initdb: install PostgreSQL's server package")
        return Path(initdb).parent

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, program: str, *args: str) -> None:
        command = [str(self.bindir / program), *args]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=60)

    def start(self) -> None:
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.dir / "pg.log"), "-o", options, "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        """`immediate` is a crash: no checkpoint, recovery at the next start."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def cleanup(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


def database_url(base_url: str, name: str) -> str:
    parts = urlsplit(base_url)
    return urlunsplit(parts._replace(path=f"/{name}"))


async def recreate_database(base_url: str, name: str, template: str | None = None) -> str:
    """Drop and create a scratch database on the server of `base_url` (a copy of
    `template` if given); return its URL."""
    conn = await asyncpg.connect(database_url(base_url, "postgres"))
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
    finally:
        await conn.close()
    return database_url(base_url, name)


async def drop_database(base_url: str, name: str) -> None:
    conn = await asyncpg.connect(database_url(base_url, "postgres"))
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


class FakeTelegram:
    """Records each sendMessage call; answers from `script` (status, body, headers), then 200."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.script: deque[tuple[int, dict[str, Any], dict[str, str]]] = deque()
        self.port = 0
        self.runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def texts(self) -> list[str]:
        return [r["json"]["text"] for r in self.requests]

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append({"path": request.path, "json": await request.json(), "at": time.monotonic()})
        status, body, headers = self.script.popleft() if self.script else (200, {"ok": True, "result": {}}, {})
        if status >= 500:  # echo the path, as a proxy error page might: the token must not reach the log
            body = {"ok": False, "description": f"upstream failed for {request.path}"}
        return web.json_response(body, status=status, headers=headers)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        self.port = self.runner.addresses[0][1]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
