"""The hosted-plan imitations of tests/hosted.py behave like the hosted things: checked with
asyncpg and redis-py directly, no daemon code. The messages asserted here are the ones
hosted users see; the daemon's tests turn them into one clear line each."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import shutil
import ssl
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
import redis.exceptions
from cryptography import x509
from hosted import (
    FETCH_PGBOUNCER,
    PgBouncer,
    PrivateCA,
    RestrictedRedisServer,
    SslPostgresServer,
    TlsRedisServer,
    pgbouncer_binary,
)
from redis.asyncio import Redis
from redis.asyncio.connection import SSLConnection, parse_url
from servers import PostgresServer, RedisServer, free_port

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def bouncer(plain_pg: PostgresServer) -> Iterator[PgBouncer]:
    with PgBouncer(plain_pg.url) as server:
        yield server


async def fetch_once(url: str, query: str, **connect_args):
    conn = await asyncpg.connect(url, **connect_args)
    try:
        return await conn.fetchval(query)
    finally:
        await conn.close()


async def redis_command(url: str, *args):
    client = Redis.from_url(url, decode_responses=True, socket_connect_timeout=5, socket_timeout=5)
    try:
        return await client.execute_command(*args)
    finally:
        await client.aclose()


# ---------------------------------------------------------------- 1. CA and certificates


def test_server_certificate_names_localhost_and_is_signed_by_the_private_ca(ca: PrivateCA) -> None:
    cert = x509.load_pem_x509_certificate(ca.cert_file.read_bytes())
    authority = x509.load_pem_x509_certificate(ca.ca_file.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.1") in names.get_values_for_type(x509.IPAddress)
    assert "localhost" in names.get_values_for_type(x509.DNSName)
    assert cert.issuer == authority.subject
    cert.verify_directly_issued_by(authority)
    assert ca.key_file.read_text().startswith("-----BEGIN") and ca.key_file.stat().st_mode & 0o077 == 0


# ---------------------------------------------------------------- 2. TLS Redis


def test_redis_url_passes_ssl_ca_certs_to_the_ssl_connection(tls_redis: TlsRedisServer, ca: PrivateCA) -> None:
    options = parse_url(tls_redis.url)
    assert options["connection_class"] is SSLConnection
    assert options["ssl_ca_certs"] == str(ca.ca_file)


async def test_tls_redis_answers_with_the_ca(tls_redis: TlsRedisServer) -> None:
    assert await redis_command(tls_redis.url, "PING") is True
    assert await redis_command(tls_redis.url, "TS.CREATE", "hosted:tls:ts") == "OK"  # the module is loaded


async def test_plain_redis_url_to_the_tls_port_fails(tls_redis: TlsRedisServer) -> None:
    # The server reads a TLS record, gets "*1\r\n$4\r\nPING", and resets the connection.
    with pytest.raises(redis.exceptions.ConnectionError) as caught:
        await redis_command(tls_redis.plain_url, "PING")
    assert f"127.0.0.1:{tls_redis.port}" in str(caught.value)


async def test_tls_redis_without_the_ca_fails_certificate_verification(tls_redis: TlsRedisServer) -> None:
    with pytest.raises(redis.exceptions.ConnectionError, match="CERTIFICATE_VERIFY_FAILED") as caught:
        await redis_command(tls_redis.url_without_ca, "PING")
    # "Error 1 connecting to 127.0.0.1:P. [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify
    # failed: self-signed certificate in certificate chain (_ssl.c:1000)."
    assert isinstance(caught.value.__context__, ssl.SSLCertVerificationError)  # raised in `except`, no `from`
    assert "self-signed certificate in certificate chain" in str(caught.value)


async def test_ssl_ca_certs_on_a_plain_redis_url_is_a_type_error(tls_redis: TlsRedisServer, ca: PrivateCA) -> None:
    """redis-py hands unknown query arguments to the connection class: a plain URL (or a
    misspelt argument) fails at the first command with a TypeError, not at from_url."""
    with pytest.raises(TypeError, match="unexpected keyword argument 'ssl_ca_certs'"):
        await redis_command(f"{tls_redis.plain_url}?ssl_ca_certs={ca.ca_file}", "PING")


# ---------------------------------------------------------------- 3. ACL-restricted Redis


async def test_restricted_user_runs_data_commands_and_scripts(restricted_redis: RestrictedRedisServer) -> None:
    url = restricted_redis.url
    assert await redis_command(url, "ACL", "WHOAMI") == RestrictedRedisServer.USER
    assert await redis_command(url, "PING") is True
    assert await redis_command(url, "XADD", "hosted:acl:stream", "MAXLEN", "10", "*", "f", "1")
    assert await redis_command(url, "HSET", "hosted:acl:hash", "f", "1") in (0, 1)
    assert await redis_command(url, "EVAL", "return redis.call('HGET', KEYS[1], 'f')", "1", "hosted:acl:hash") == "1"


async def test_restricted_user_may_not_run_timeseries_commands(restricted_redis: RestrictedRedisServer) -> None:
    # The module is there: the default user can use it.
    assert await redis_command(restricted_redis.admin_url, "TS.CREATE", "hosted:acl:ts") == "OK"
    for command, name in [(("TS.INFO", "x"), "ts.info"), (("TS.CREATE", "x"), "ts.create")]:
        message = f"User {RestrictedRedisServer.USER} has no permissions to run the '{name}' command"
        with pytest.raises(redis.exceptions.NoPermissionError, match=message):
            await redis_command(restricted_redis.url, *command)
    # NoPermissionError is a ResponseError whose text does not say "unknown command".
    assert issubclass(redis.exceptions.NoPermissionError, redis.exceptions.ResponseError)
    # Inside a script the same denial is a plain ResponseError.
    with pytest.raises(redis.exceptions.ResponseError, match=r"ACL failure in script: .* 'ts\.info' command"):
        await redis_command(restricted_redis.url, "EVAL", "return redis.call('TS.INFO', 'x')", "0")


async def test_restricted_user_may_not_run_admin_or_dangerous_commands(
    restricted_redis: RestrictedRedisServer,
) -> None:
    denied = {
        ("CONFIG", "GET", "maxmemory"): "config|get",
        ("FLUSHALL",): "flushall",
        ("INFO",): "info",
        ("MODULE", "LIST"): "module|list",
        ("KEYS", "*"): "keys",
    }
    for command, name in denied.items():
        with pytest.raises(redis.exceptions.NoPermissionError, match=f"run the '{name}' command"):
            await redis_command(restricted_redis.url, *command)


async def test_restricted_user_with_a_wrong_password_is_refused(restricted_redis: RestrictedRedisServer) -> None:
    wrong = restricted_redis.url.replace(restricted_redis.password, "wrong-password")
    with pytest.raises(redis.exceptions.AuthenticationError, match="invalid username-password pair"):
        await redis_command(wrong, "PING")


async def test_server_without_the_module_says_unknown_command(plain_redis_server: RedisServer) -> None:
    with pytest.raises(redis.exceptions.ResponseError) as caught:
        await redis_command(plain_redis_server.url, "TS.INFO", "x")
    assert not isinstance(caught.value, redis.exceptions.NoPermissionError)
    assert str(caught.value).startswith("unknown command 'TS.INFO', with args beginning with: 'x'")


# ---------------------------------------------------------------- 4. PostgreSQL requiring SSL

SSL_IN_USE = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"


async def test_ssl_postgres_accepts_sslmode_require_over_tls(ssl_pg: SslPostgresServer) -> None:
    assert "sslmode=require" in ssl_pg.url
    assert await fetch_once(ssl_pg.url, SSL_IN_USE) is True


async def test_ssl_postgres_accepts_verify_full_with_the_ca(ssl_pg: SslPostgresServer) -> None:
    assert await fetch_once(ssl_pg.verify_url, SSL_IN_USE) is True


async def test_ssl_postgres_refuses_a_plain_connection(ssl_pg: SslPostgresServer) -> None:
    message = 'no pg_hba.conf entry for host "127.0.0.1", user "postgres", database "postgres", no encryption'
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError, match=message):
        await fetch_once(ssl_pg.plain_url, "SELECT 1")


# asyncpg gives the socket of a startup the server refused after the TLS upgrade to the
# garbage collector (seen once in a full run, at this test's collection): not ours to close.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_libpq_only_url_parameters_fail_at_connect_not_at_parse(ssl_pg: SslPostgresServer) -> None:
    """asyncpg sends query parameters it does not know as server settings (startup
    parameters): the server rejects the first one, so the error comes from the server."""
    extra = "&channel_binding=require&connect_timeout=10"
    with pytest.raises(asyncpg.UndefinedObjectError, match='unrecognized configuration parameter "channel_binding"'):
        await fetch_once(ssl_pg.url + extra, "SELECT 1")
    # Not at parse time: with nothing listening, the same URL fails to connect instead.
    nowhere = ssl_pg.url.replace(f":{ssl_pg.port}/", f":{free_port()}/")
    with pytest.raises(OSError):
        await fetch_once(nowhere + extra, "SELECT 1")


async def test_scram_password_user(ssl_pg: SslPostgresServer) -> None:
    assert await fetch_once(ssl_pg.password_url(), "SELECT current_user") == SslPostgresServer.APP_USER
    with pytest.raises(asyncpg.InvalidPasswordError, match='password authentication failed for user "app"'):
        await fetch_once(ssl_pg.password_url("wrong-password"), "SELECT 1")


async def test_sslmode_require_against_a_server_without_ssl(plain_pg: PostgresServer) -> None:
    assert await fetch_once(plain_pg.url, "SHOW ssl") == "off"
    # A builtins.ConnectionError, not an asyncpg exception.
    with pytest.raises(ConnectionError, match=f'server at "127.0.0.1:{plain_pg.port}" rejected SSL upgrade'):
        await fetch_once(plain_pg.url + "?sslmode=require", "SELECT 1")


# ---------------------------------------------------------------- 5. PgBouncer


def test_fetch_pgbouncer_is_idempotent_and_quick() -> None:
    binary = pgbouncer_binary()  # the first call may download; this one is cached on disk
    started = time.monotonic()
    again = subprocess.run([str(FETCH_PGBOUNCER)], capture_output=True, text=True, timeout=60, check=True)
    assert again.stdout.strip() == binary
    assert time.monotonic() - started < 5
    version = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10, check=True)
    assert version.stdout.startswith("PgBouncer ")


def test_fetch_pgbouncer_fails_clearly_without_a_mirror(tmp_path: Path) -> None:
    """A copy of the script in an empty project (its .local is tmp_path/.local), with a
    mirror that refuses connections."""
    (tmp_path / "scripts").mkdir()
    script = tmp_path / "scripts" / FETCH_PGBOUNCER.name
    shutil.copy2(FETCH_PGBOUNCER, script)
    env = {k: v for k, v in os.environ.items() if k != "PGBOUNCER"}
    env |= {"PATH": "/usr/bin:/bin", "DEBIAN_MIRROR": f"http://127.0.0.1:{free_port()}/debian"}
    if shutil.which("pgbouncer", path=env["PATH"]):
        pytest.skip("pgbouncer is on PATH: the script would not fetch")
    done = subprocess.run([str(script)], capture_output=True, text=True, timeout=60, env=env, check=False)
    assert done.returncode != 0 and done.stdout == ""
    assert "private apt-get update failed: cannot reach" in done.stderr
    assert "Connection refused" in done.stderr


async def test_asyncpg_connects_through_pgbouncer(bouncer: PgBouncer, plain_pg: PostgresServer) -> None:
    # The query runs on the upstream server, reached through the pooler's port.
    assert f":{bouncer.port}/" in bouncer.url
    assert await fetch_once(bouncer.url, "SELECT inet_server_port()") == plain_pg.port


async def hammer(url: str, statement_cache_size: int | None = None) -> Counter[tuple[str, str]]:
    """The same parameterised query from 4 tasks over a pool of 2 connections, 50 times
    each: the errors by (class, first line)."""
    options = {} if statement_cache_size is None else {"statement_cache_size": statement_cache_size}
    errors: Counter[tuple[str, str]] = Counter()
    async with asyncpg.create_pool(url, min_size=2, max_size=2, **options) as pool:

        async def worker() -> None:
            for n in range(50):
                try:
                    assert await pool.fetchval("SELECT $1::int + 1", n) == n + 1
                except asyncpg.PostgresError as exc:
                    errors[type(exc).__name__, str(exc).splitlines()[0]] += 1

        await asyncio.gather(*(worker() for _ in range(4)))
    return errors


async def test_statement_cache_fails_in_transaction_mode(bouncer: PgBouncer) -> None:
    errors = await hammer(bouncer.url)
    assert errors, "the prepared statements of one server connection were found on the other"
    kinds = {kind for kind, _ in errors}
    assert kinds <= {"InvalidSQLStatementNameError", "DuplicatePreparedStatementError"}, errors
    assert all(line.startswith('prepared statement "__asyncpg_stmt_') for _, line in errors), errors


async def test_statement_cache_size_zero_works_in_transaction_mode(bouncer: PgBouncer) -> None:
    assert await hammer(bouncer.url, statement_cache_size=0) == Counter()


RUN_QUERIES = """
import asyncio, sys
import asyncpg

async def main():
    conn = await asyncpg.connect(sys.argv[1])
    try:
        for n in range(5):
            await conn.fetchval("SELECT $1::int", n)
        print("ok")
    except asyncpg.PostgresError as exc:
        print(type(exc).__name__, str(exc).splitlines()[0])
    finally:
        await conn.close()

asyncio.run(main())
"""


async def test_a_restarted_process_finds_its_statement_names_taken(plain_pg: PostgresServer) -> None:
    """asyncpg numbers statements per process, so a second process (a restarted daemon, or
    a second daemon) prepares "__asyncpg_stmt_1__" again on a server connection that
    transaction pooling never reset."""
    with PgBouncer(plain_pg.url, default_pool_size=1) as single:
        outputs = []
        for _ in range(2):
            done = await asyncio.create_subprocess_exec(
                sys.executable, "-c", RUN_QUERIES, single.url, stdout=subprocess.PIPE
            )
            outputs.append((await done.communicate())[0].decode().strip())
    assert outputs[0] == "ok"
    assert outputs[1].startswith('DuplicatePreparedStatementError prepared statement "__asyncpg_stmt_'), outputs
    assert outputs[1].endswith('__" already exists')


async def test_listen_through_pgbouncer_never_receives(bouncer: PgBouncer, plain_pg: PostgresServer) -> None:
    via_pooler: list[str] = []
    direct: list[str] = []
    listener = await asyncpg.connect(bouncer.url)
    control = await asyncpg.connect(plain_pg.url)
    sender = await asyncpg.connect(plain_pg.url)
    try:
        await listener.add_listener("hosted_infra", lambda *args: via_pooler.append(args[3]))
        await control.add_listener("hosted_infra", lambda *args: direct.append(args[3]))
        for n in range(3):
            await sender.execute(f"NOTIFY hosted_infra, 'm{n}'")
            await listener.fetchval("SELECT 1")  # the pooler's client is alive and served
        deadline = time.monotonic() + 2
        while len(direct) < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)  # time for a (wrongly) forwarded notification to arrive
    finally:
        for conn in (listener, control, sender):
            await conn.close()
    assert direct == ["m0", "m1", "m2"]
    assert via_pooler == []
    # PgBouncer drops them: "got packet 'A' from server when not linked" (its log is written a moment later).
    deadline = time.monotonic() + 5
    while "got packet 'A' from server when not linked" not in bouncer.log_path.read_text():
        assert time.monotonic() < deadline, bouncer.log_path.read_text()[-2000:]
        await asyncio.sleep(0.05)


async def test_server_pid_differs_from_backend_pid_only_through_a_pooler(
    bouncer: PgBouncer, plain_pg: PostgresServer, ssl_pg: SslPostgresServer
) -> None:
    for url in (plain_pg.url, ssl_pg.url):
        conn = await asyncpg.connect(url)
        try:
            assert conn.get_server_pid() == await conn.fetchval("SELECT pg_backend_pid()")
        finally:
            await conn.close()
    for _ in range(3):  # PgBouncer sends a random BackendKeyData per client
        conn = await asyncpg.connect(bouncer.url)
        try:
            assert conn.get_server_pid() != await conn.fetchval("SELECT pg_backend_pid()")
        finally:
            await conn.close()


async def test_pgbouncer_startup_parameters(bouncer: PgBouncer) -> None:
    """asyncpg itself sends only client_encoding (accepted); server_settings become
    startup parameters, which PgBouncer accepts only from its short list."""
    assert await fetch_once(bouncer.url, "SELECT 1", server_settings={"application_name": "hosted"}) == 1
    assert await fetch_once(bouncer.url, "SELECT 1", server_settings={"extra_float_digits": "3"}) == 1  # ignored
    for name, value in [("jit", "off"), ("search_path", "public"), ("channel_binding", "require")]:
        with pytest.raises(asyncpg.ProtocolViolationError, match=f"unsupported startup parameter: {name}"):
            await fetch_once(bouncer.url, "SELECT 1", server_settings={name: value})


async def test_pgbouncer_with_tls_in_front_of_ssl_postgres(ca: PrivateCA, ssl_pg: SslPostgresServer) -> None:
    with PgBouncer(ssl_pg.url, ca=ca) as tls_bouncer:
        assert "sslmode=require" in tls_bouncer.url
        # TLS from the client to PgBouncer, verified against the CA; TLS from PgBouncer upstream.
        verified = tls_bouncer.url.replace("sslmode=require", f"sslmode=verify-full&sslrootcert={ca.ca_file}")
        assert await fetch_once(verified, SSL_IN_USE) is True
        with pytest.raises(asyncpg.ProtocolViolationError, match="SSL required"):
            await fetch_once(tls_bouncer.url.replace("sslmode=require", "sslmode=disable"), "SELECT 1")
