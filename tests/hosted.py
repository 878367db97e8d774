"""Local imitations of what hosted plans give users, for the tests that run the daemon
against them:

- `PrivateCA`: a private CA and a server certificate for 127.0.0.1/localhost (PEM files);
- `TlsRedisServer`: Redis Stack reachable only over TLS, its certificate signed by that CA
  (`rediss://...?ssl_ca_certs=<ca.pem>`);
- `RestrictedRedisServer`: Redis Stack with an ACL user that may not run `@admin`,
  `@dangerous` or any TimeSeries command (Upstash and other restricted plans);
- `SslPostgresServer`: a PostgreSQL cluster that accepts only TLS connections
  (`sslmode=require`), plus a user that authenticates with a SCRAM password;
- `PgBouncer`: PgBouncer in transaction pooling mode in front of a PostgreSQL (Supabase,
  Neon, Heroku connection poolers), the binary from scripts/fetch_pgbouncer.sh.

Each has start()/stop()/cleanup(), a `url` and is a context manager (start on enter,
cleanup on exit); `PrivateCA` is ready once made. Servers that must not run as root
(PostgreSQL, PgBouncer) run as the `postgres` OS user when the tests run as root.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Self
from urllib.parse import parse_qs, quote, urlsplit

import redis  # the sync client: start() is synchronous, and may run inside an event loop
import trustme
from servers import PostgresServer, RedisServer, free_port, setting

from infra import read_local_services

PROJECT = Path(__file__).resolve().parents[1]
FETCH_PGBOUNCER = PROJECT / "scripts" / "fetch_pgbouncer.sh"
SERVER_OS_USER = "postgres"  # PostgreSQL and PgBouncer refuse to run as root
START_TIMEOUT_S = 10.0


class _Managed:
    """`with Server(...) as server:` starts it and cleans it up."""

    def start(self) -> None:
        raise NotImplementedError

    def cleanup(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cleanup()


def _is_root() -> bool:
    return os.geteuid() == 0


def _give_to_server_user(*paths: Path) -> None:
    """Make files a server running as `postgres` must read (or own) its own when we are root."""
    if _is_root():
        for path in paths:
            shutil.chown(path, SERVER_OS_USER, SERVER_OS_USER)


def _wait_until(ready, process: subprocess.Popen, what: str, log_path: Path) -> None:
    """Poll `ready()` until it is true; fail with the server's log if it exits or times out."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited ({process.returncode}): {_tail(log_path)}")
        with contextlib.suppress(OSError):
            if ready():
                return
        time.sleep(0.02)
    raise RuntimeError(f"{what} did not start within {START_TIMEOUT_S:.0f} s: {_tail(log_path)}")


def _tail(path: Path, lines: int = 20) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return "(no log)"


def _terminate(process: subprocess.Popen | None) -> None:
    if process is not None and process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


# ---------------------------------------------------------------- 1. CA and certificates


class PrivateCA:
    """A private CA (`ca_file`) and a server certificate for 127.0.0.1 and localhost
    (`cert_file`, key in `key_file`), PEM files in a temp dir. Clients that trust only
    the system's CAs reject the certificate, as they would a hosted server's private CA."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="feed_v4_ca_"))
        ca = trustme.CA(organization_name="feed_v4 test CA")
        server = ca.issue_cert("127.0.0.1", "localhost")
        self.ca_file = self.dir / "ca.pem"
        self.cert_file = self.dir / "server.crt"
        self.key_file = self.dir / "server.key"
        ca.cert_pem.write_to_path(str(self.ca_file))
        self.cert_file.write_bytes(b"".join(blob.bytes() for blob in server.cert_chain_pems))
        server.private_key_pem.write_to_path(str(self.key_file))
        self.key_file.chmod(0o600)

    def client_context(self) -> ssl.SSLContext:
        """An SSL context that trusts this CA only and verifies the host name."""
        return ssl.create_default_context(cafile=str(self.ca_file))

    def copy_server_pair(self, directory: Path) -> tuple[Path, Path]:
        """Copy the certificate and key into `directory`, owned by the server's OS user with
        the key 0600 (PostgreSQL refuses a key others can read); return (cert, key)."""
        cert, key = directory / "server.crt", directory / "server.key"
        shutil.copyfile(self.cert_file, cert)
        shutil.copyfile(self.key_file, key)
        key.chmod(0o600)
        _give_to_server_user(cert, key)
        return cert, key

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cleanup()

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


# ---------------------------------------------------------------- 2. TLS Redis


class TlsRedisServer(_Managed):
    """A redis-server that listens only on a TLS port (`--port 0`), with `ca`'s server
    certificate and no client certificates (`--tls-auth-clients no`), as hosted Redis
    with TLS. The Redis Stack binary of `make services` is built with TLS; `server_bin`
    picks another (Debian's /usr/bin/redis-server 7.0 is too, and loads the module)."""

    def __init__(self, ca: PrivateCA, with_timeseries: bool = True, server_bin: str | None = None) -> None:
        self.ca = ca
        self.with_timeseries = with_timeseries
        self.server_bin = server_bin or setting("REDIS_SERVER_BIN")
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="feed_v4_tls_redis_"))
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """redis-py passes unknown query arguments to the connection class as strings:
        `ssl_ca_certs` reaches SSLConnection(ssl_ca_certs=...)."""
        return f"rediss://127.0.0.1:{self.port}/0?ssl_ca_certs={quote(str(self.ca.ca_file))}"

    @property
    def url_without_ca(self) -> str:
        """TLS, trusting only the system's CAs: certificate verification fails."""
        return f"rediss://127.0.0.1:{self.port}/0"

    @property
    def plain_url(self) -> str:
        """No TLS, to the TLS port: the server drops the connection."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [self.server_bin, "--port", "0", "--tls-port", str(self.port), "--bind", "127.0.0.1"]
        args += ["--tls-cert-file", str(self.ca.cert_file), "--tls-key-file", str(self.ca.key_file)]
        args += ["--tls-ca-cert-file", str(self.ca.ca_file), "--tls-auth-clients", "no"]
        args += ["--save", "", "--appendonly", "no", "--dir", str(self.dir), "--loglevel", "warning"]
        if self.with_timeseries:
            args += ["--loadmodule", setting("REDIS_TS_MODULE")]
        env = dict(os.environ)
        lib = os.environ.get("REDIS_LD_LIBRARY_PATH") or read_local_services().get("REDIS_LD_LIBRARY_PATH", "")
        if lib:
            env["LD_LIBRARY_PATH"] = lib
        log_path = self.dir / "redis.log"
        with open(log_path, "ab") as log_file:
            self.process = subprocess.Popen(args, env=env, stdout=log_file, stderr=subprocess.STDOUT)
        context = self.ca.client_context()

        def answers_ping() -> bool:
            with (
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as raw,
                context.wrap_socket(raw, server_hostname="127.0.0.1") as sock,
            ):
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")

        _wait_until(answers_ping, self.process, f"TLS redis-server ({self.server_bin})", log_path)

    def stop(self) -> None:
        _terminate(self.process)
        self.process = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


# ---------------------------------------------------------------- 3. ACL-restricted Redis


class RestrictedRedisServer(RedisServer, _Managed):
    """A private Redis (Stack by default) whose `url` logs in as an ACL user that may run
    every command except the `@admin` and `@dangerous` categories and every command of
    the TimeSeries module, as restricted hosted plans (Upstash) do. TimeSeries 1.12 (Redis
    Stack 7.4) registers no ACL category, so its commands are denied one by one, from
    `COMMAND LIST FILTERBY MODULE timeseries`; a `@timeseries` category is used where the
    server has one. The `default` user stays unrestricted: `admin_url`."""

    USER = "hosted_app"

    def __init__(self, with_timeseries: bool = True, password: str = "hosted-app-secret") -> None:
        super().__init__(with_timeseries=with_timeseries)
        self.password = password
        self.acl_rules: list[str] = []

    @property
    def url(self) -> str:
        return f"redis://{self.USER}:{quote(self.password, safe='')}@127.0.0.1:{self.port}/0"

    @property
    def admin_url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        super().start()
        self._set_up_user()

    def _set_up_user(self) -> None:
        with redis.Redis.from_url(self.admin_url, decode_responses=True) as admin:
            categories = set(admin.acl_cat())
            denied = ["-@admin", "-@dangerous"]
            if "timeseries" in categories:
                denied.append("-@timeseries")
            elif self.with_timeseries:
                commands = admin.command_list(module="timeseries")
                if not commands:
                    raise RuntimeError("the TimeSeries module registered no commands: is it loaded?")
                denied += [f"-{command}" for command in sorted(commands)]
            # `reset` first: idempotent across restarts.
            self.acl_rules = ["reset", "on", f">{self.password}", "~*", "&*", "+@all", *denied]
            admin.execute_command("ACL", "SETUSER", self.USER, *self.acl_rules)


# ---------------------------------------------------------------- 4. PostgreSQL requiring SSL


class SslPostgresServer(PostgresServer, _Managed):
    """A private cluster with `ssl = on` (`ca`'s server certificate) whose pg_hba.conf has
    only `hostssl` lines for TCP: a plain connection finds no entry and is refused, as on
    hosted PostgreSQL with SSL enforced. `postgres` is trusted (over TLS); `app_user`
    authenticates with a SCRAM-SHA-256 password (`password_url`). `url` has
    `sslmode=require`, `verify_url` verifies the certificate against the CA."""

    APP_USER = "app"

    def __init__(self, ca: PrivateCA, app_password: str = "app-secret") -> None:
        super().__init__()  # initdb -A trust
        self.ca = ca
        self.app_password = app_password
        self._roles_made = False
        cert, key = ca.copy_server_pair(self.dir)
        (self.data / "pg_hba.conf").write_text(
            "# Hosted-style: TLS only over TCP; local socket for the test harness.\n"
            "local   all  all                     trust\n"
            "hostssl all  postgres  127.0.0.1/32  trust\n"
            "hostssl all  all       127.0.0.1/32  scram-sha-256\n"
        )
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(f"\nssl = on\nssl_cert_file = '{cert}'\nssl_key_file = '{key}'\n")
            conf.write("password_encryption = 'scram-sha-256'\n")

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres?sslmode=require"

    @property
    def verify_url(self) -> str:
        return (
            f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
            f"?sslmode=verify-full&sslrootcert={quote(str(self.ca.ca_file))}"
        )

    @property
    def plain_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres?sslmode=disable"

    def password_url(self, password: str | None = None) -> str:
        """The SCRAM user's URL, with its password or the one given (a wrong one)."""
        secret = quote(self.app_password if password is None else password, safe="")
        return f"postgresql://{self.APP_USER}:{secret}@127.0.0.1:{self.port}/postgres?sslmode=require"

    def start(self) -> None:
        super().start()
        if not self._roles_made:
            # Over the local socket (trust); the password is hashed with SCRAM by the server.
            sql = f"CREATE ROLE {self.APP_USER} LOGIN PASSWORD '{self.app_password}'"
            self._run("psql", "-h", str(self.dir), "-p", str(self.port), "-U", "postgres", "-d", "postgres", "-c", sql)
            self._roles_made = True


# ---------------------------------------------------------------- 5. PgBouncer


@functools.cache
def pgbouncer_binary() -> str:
    """scripts/fetch_pgbouncer.sh: PATH's pgbouncer, or Debian 12's, fetched on first use."""
    try:
        done = subprocess.run([str(FETCH_PGBOUNCER)], capture_output=True, text=True, timeout=300, check=False)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"{FETCH_PGBOUNCER} took over {exc.timeout:.0f} s") from exc
    if done.returncode != 0 or not done.stdout.strip():
        raise RuntimeError(f"{FETCH_PGBOUNCER} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout.strip().splitlines()[-1]


class PgBouncer(_Managed):
    """PgBouncer in front of the PostgreSQL of `upstream_url` (host, port and its
    `sslmode` if disable/allow/prefer/require), every database (`* =`), in `pool_mode`
    (transaction, like hosted poolers) with `default_pool_size` server connections per
    database and user. `auth_type = trust` with an auth_file listing `users`: the
    upstream decides (trust for the test servers). With `ca`, clients must use TLS
    (`client_tls_sslmode = require`, the CA's server certificate) and `url` says
    `sslmode=require`. `url` is for the upstream's database; `url_for(name)` another."""

    def __init__(
        self,
        upstream_url: str,
        pool_mode: str = "transaction",
        default_pool_size: int = 4,
        ca: PrivateCA | None = None,
        users: tuple[str, ...] = ("postgres",),
    ) -> None:
        parts = urlsplit(upstream_url)
        query = {key: values[-1] for key, values in parse_qs(parts.query).items()}
        self.upstream_host = parts.hostname or "127.0.0.1"
        self.upstream_port = parts.port or 5432
        self.upstream_sslmode = query.get("sslmode")
        if self.upstream_sslmode not in (None, "disable", "allow", "prefer", "require"):
            raise ValueError(f"PgBouncer: upstream sslmode {self.upstream_sslmode!r} is not supported here")
        self.database = parts.path.lstrip("/") or "postgres"
        self.user = parts.username or "postgres"
        self.pool_mode = pool_mode
        self.default_pool_size = default_pool_size
        self.ca = ca
        self.users = users
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="feed_v4_pgbouncer_"))
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return self.url_for(self.database)

    def url_for(self, database: str) -> str:
        tls = "?sslmode=require" if self.ca else ""
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}{tls}"

    @property
    def log_path(self) -> Path:
        return self.dir / "pgbouncer.log"

    def _write_config(self) -> Path:
        upstream = f"host={self.upstream_host} port={self.upstream_port}"
        settings = {
            "listen_addr": "127.0.0.1",
            "listen_port": str(self.port),
            "unix_socket_dir": "",  # TCP only
            "auth_type": "trust",
            "auth_file": str(self.dir / "users.txt"),
            "pool_mode": self.pool_mode,
            "default_pool_size": str(self.default_pool_size),
            "max_client_conn": "100",
            # asyncpg sends only client_encoding (accepted); JDBC and some drivers send this.
            "ignore_startup_parameters": "extra_float_digits",
            "logfile": str(self.log_path),
            "pidfile": str(self.dir / "pgbouncer.pid"),
            "admin_users": "postgres",
        }
        if self.upstream_sslmode:
            settings["server_tls_sslmode"] = self.upstream_sslmode
        if self.ca:
            cert, key = self.ca.copy_server_pair(self.dir)
            settings |= {"client_tls_sslmode": "require", "client_tls_cert_file": str(cert)}
            settings["client_tls_key_file"] = str(key)
        lines = ["[databases]", f"* = {upstream}", "", "[pgbouncer]"]
        lines += [f"{key} = {value}" for key, value in settings.items()]
        config = self.dir / "pgbouncer.ini"
        config.write_text("\n".join(lines) + "\n")
        users = self.dir / "users.txt"
        users.write_text("".join(f'"{user}" ""\n' for user in self.users))
        _give_to_server_user(self.dir, config, users)
        return config

    def start(self) -> None:
        binary = pgbouncer_binary()
        config = self._write_config()
        # As root, pgbouncer refuses to run: drop to `postgres` directly (no runuser in
        # between, so terminate() signals pgbouncer itself).
        as_user: dict[str, object] = {}
        if _is_root():
            as_user = {"user": SERVER_OS_USER, "group": SERVER_OS_USER, "extra_groups": []}
        stderr_path = self.dir / "stderr.log"
        with open(stderr_path, "ab") as stderr:
            self.process = subprocess.Popen(
                [binary, str(config)], stdout=stderr, stderr=subprocess.STDOUT, cwd=self.dir, **as_user
            )

        def listening() -> bool:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True

        try:
            _wait_until(listening, self.process, "pgbouncer", stderr_path)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\n{_tail(self.log_path)}") from None

    def stop(self) -> None:
        _terminate(self.process)
        self.process = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
