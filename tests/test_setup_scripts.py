"""The set-up scripts keep secrets off the screen and out of other users' reach.

scripts/services.sh runs in a scratch copy of the project (its scripts, and stand-ins for the
Redis Stack binaries, so nothing is downloaded or started): the real .local/services.env, which
the other tests read, is never rewritten. No server is needed.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from infra import read_local_services

PROJECT = Path(__file__).resolve().parents[1]
SECRET = "s3cret"
REAL_SERVICES_ENV = PROJECT / ".local" / "services.env"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def scratch_project(root: Path) -> Path:
    """A project laid out like this one: scripts/ and a .local/redis-stack whose 'binaries' are
    copies of `true` (ELF files ldd accepts), so services.sh goes straight to the URLs."""
    project = root / "project"
    shutil.copytree(PROJECT / "scripts", project / "scripts")
    stack = project / ".local" / "redis-stack"
    true = shutil.which("true")
    assert true
    for relative in ("bin/redis-server", "bin/redis-cli", "lib/redistimeseries.so"):
        (stack / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(true, stack / relative)
        (stack / relative).chmod(0o755)
    return project


def run_services(project: Path, **urls: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "POSTGRES_URL", "DATABASE_URL")}
    env |= {"FEED_TIMESCALEDB": "off", **urls}  # TimescaleDB's clusters: tests/test_storage_modes.py
    return subprocess.run(
        ["bash", str(project / "scripts" / "services.sh")],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def sourced(env_file: Path, *names: str, env: dict[str, str] | None = None) -> list[str]:
    """The values a shell gets from `. services.env` (under `set -euo pipefail`, as make runs
    it), with only `env`'s server URLs set beforehand."""
    script = f"set -euo pipefail; . {env_file}; " + "; ".join(f'printf "%s\\n" "${{{name}:-}}"' for name in names)
    base = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "POSTGRES_URL", "DATABASE_URL")}
    run = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True, env=base | (env or {}))
    return run.stdout.splitlines()


@pytest.fixture
def real_services_env_untouched():
    """The shared .local/services.env is the same before and after (it is other tests' input)."""

    def state() -> tuple[bytes, int] | None:
        if not REAL_SERVICES_ENV.exists():
            return None
        return REAL_SERVICES_ENV.read_bytes(), REAL_SERVICES_ENV.stat().st_mtime_ns

    before = state()
    yield
    assert state() == before, "the project's own .local/services.env was rewritten"


# ------------------------------------------------------------------------- scripts/services.sh


@pytest.mark.usefixtures("real_services_env_untouched")
def test_services_prints_urls_without_their_passwords_and_writes_an_owner_only_env(tmp_path: Path):
    project = scratch_project(tmp_path)
    redis_url = f"redis://:{SECRET}@127.0.0.1:6390/0"
    pg_url = f"postgresql://postgres:{SECRET}@127.0.0.1:5432/feed_v4?password={SECRET}"
    run = run_services(project, REDIS_URL=redis_url, POSTGRES_URL=pg_url)
    report = f"exit {run.returncode}\n{run.stdout}\n{run.stderr}"
    assert run.returncode == 0, report
    assert SECRET not in run.stdout + run.stderr, report
    lines = run.stdout.splitlines()
    assert "REDIS_URL=redis://:***@127.0.0.1:6390/0" in lines, report
    assert "POSTGRES_URL=postgresql://postgres:***@127.0.0.1:5432/feed_v4?password=***" in lines, report
    env_file = project / ".local" / "services.env"
    assert mode(env_file) == 0o600
    assert not (project / ".local" / "services.env.tmp").exists()
    # URLs given in the environment are used for this run, never recorded for the next command.
    assert SECRET not in env_file.read_text()
    assert sourced(env_file, "REDIS_URL", "POSTGRES_URL") == ["", ""]
    assert "REDIS_URL" not in read_local_services(env_file) and "POSTGRES_URL" not in read_local_services(env_file)
    assert "REDIS_URL came from the environment: used for this run, not recorded" in run.stdout


@pytest.mark.usefixtures("real_services_env_untouched")
def test_services_env_left_world_readable_by_an_older_run_becomes_owner_only(tmp_path: Path):
    project = scratch_project(tmp_path)
    local = project / ".local"
    for name in ("services.env", "services.env.tmp"):
        (local / name).write_text("# an older run's\n")
        (local / name).chmod(0o644)
    old_umask = os.umask(0o022)  # what a shell usually has: new files 0644
    try:
        run = run_services(project, REDIS_URL=f"redis://u:{SECRET}@h:6379/0", POSTGRES_URL="postgresql://p@h/db")
    finally:
        os.umask(old_umask)
    assert run.returncode == 0, run.stderr
    assert mode(local / "services.env") == 0o600
    assert "an older run" not in (local / "services.env").read_text()  # rewritten
    assert SECRET not in run.stdout + run.stderr


@pytest.mark.usefixtures("real_services_env_untouched")
@pytest.mark.parametrize(
    ("urls", "shown"),
    [
        (  # user and password, password parameter on a unix socket (redis-py's form)
            {"REDIS_URL": f"unix://:{SECRET}@/tmp/redis.sock?db=0&password={SECRET}"},
            "REDIS_URL=unix://:***@/tmp/redis.sock?db=0&password=***",
        ),
        (  # DATABASE_URL stands in for POSTGRES_URL; sslpassword is a secret too
            {
                "DATABASE_URL": f"postgresql://feed:{SECRET}@db.example:5432/feed_v4?sslmode=require&sslpassword={SECRET}"
            },
            "POSTGRES_URL=postgresql://feed:***@db.example:5432/feed_v4?sslmode=require&sslpassword=***",
        ),
        (  # an unescaped / in the password (base64) does not end the masking early
            {"REDIS_URL": f"rediss://default:ab/{SECRET}+x=@cache.example:6380/0"},
            "REDIS_URL=rediss://default:***@cache.example:6380/0",
        ),
        (  # no password: shown as it is
            {"REDIS_URL": "redis://127.0.0.1:6390/0", "POSTGRES_URL": "postgresql://postgres@127.0.0.1:5432/feed_v4"},
            "POSTGRES_URL=postgresql://postgres@127.0.0.1:5432/feed_v4",
        ),
    ],
)
def test_services_masks_every_password_form(tmp_path: Path, urls: dict[str, str], shown: str):
    project = scratch_project(tmp_path)
    urls = {"REDIS_URL": "redis://127.0.0.1:1/0", "POSTGRES_URL": "postgresql://postgres@127.0.0.1:1/x"} | urls
    if "DATABASE_URL" in urls:
        del urls["POSTGRES_URL"]
    run = run_services(project, **urls)
    assert run.returncode == 0, run.stderr
    assert SECRET not in run.stdout + run.stderr, run.stdout
    assert shown in run.stdout.splitlines(), run.stdout


def local_redis_stack() -> tuple[Path, int]:
    """The Redis Stack `make services` runs here (its binaries and port), else skip."""
    from urllib.parse import urlsplit

    recorded = read_local_services(REAL_SERVICES_ENV).get("REDIS_URL", "")
    parts = urlsplit(recorded)
    stack = PROJECT / ".local" / "redis-stack"
    if parts.hostname != "127.0.0.1" or not parts.port or not (stack / "bin" / "redis-server").is_file():
        pytest.skip("no local Redis Stack from `make services`")
    return stack, parts.port


@pytest.mark.usefixtures("real_services_env_untouched")
def test_services_records_only_what_it_found_and_sourcing_never_overrides_the_environment(tmp_path: Path):
    """`REDIS_URL=x make services` never makes x the next command's default; a server found
    earlier stays recorded; a URL set for one command wins over the file for that command."""
    stack, port = local_redis_stack()
    project = tmp_path / "project"
    shutil.copytree(PROJECT / "scripts", project / "scripts")
    (project / ".local").mkdir()
    (project / ".local" / "redis-stack").symlink_to(stack)
    if (PROJECT / ".local" / "libssl").is_dir():
        (project / ".local" / "libssl").symlink_to(PROJECT / ".local" / "libssl")
    env_file = project / ".local" / "services.env"
    found = f"redis://127.0.0.1:{port}/0"
    pg_given = f"postgresql://feed:{SECRET}@db.example:5432/feed_v4"
    run = run_services(project, POSTGRES_URL=pg_given, FEED_REDIS_PORT=str(port))  # Redis found, PG given
    if run.returncode != 0:
        pytest.skip(f"the local Redis Stack does not answer: {run.stderr}")
    assert read_local_services(env_file).get("REDIS_URL") == found
    assert "POSTGRES_URL" not in read_local_services(env_file) and SECRET not in env_file.read_text()
    assert sourced(env_file, "REDIS_URL", "POSTGRES_URL") == [found, ""]

    elsewhere = f"redis://:{SECRET}@cache.example:6380/0"
    run = run_services(project, REDIS_URL=elsewhere, POSTGRES_URL=pg_given)  # both given: nothing new recorded
    assert run.returncode == 0, run.stderr
    assert SECRET not in env_file.read_text() + run.stdout
    assert read_local_services(env_file).get("REDIS_URL") == found  # what was found before stays
    # Sourcing it (what `make run` does first) keeps a URL the command was given.
    assert sourced(env_file, "REDIS_URL", env={"REDIS_URL": "redis://given:1/0"}) == ["redis://given:1/0"]
    assert sourced(env_file, "REDIS_URL") == [found]
    with_pg = {"DATABASE_URL": "postgresql://given/x"}
    assert sourced(env_file, "POSTGRES_URL", "DATABASE_URL", env=with_pg) == ["", "postgresql://given/x"]


def test_read_local_services_reads_both_formats(tmp_path: Path):
    path = tmp_path / "services.env"
    path.write_text(
        "# Written by scripts/services.sh\n"
        "[ -n \"${REDIS_URL:-}\" ] || export REDIS_URL='redis://127.0.0.1:6390/0'\n"
        "[ -n \"${POSTGRES_URL:-}${DATABASE_URL:-}\" ] || export POSTGRES_URL='postgresql://p@h/db'\n"
        "export REDIS_SERVER_BIN='/a b/it'\\''s/redis-server'\n"
        "export REDIS_TS_MODULE=/x/ts\\ module.so\n"  # the older %q format
    )
    assert read_local_services(path) == {
        "REDIS_URL": "redis://127.0.0.1:6390/0",
        "POSTGRES_URL": "postgresql://p@h/db",
        "REDIS_SERVER_BIN": "/a b/it's/redis-server",
        "REDIS_TS_MODULE": "/x/ts module.so",
    }


# ------------------------------------------------------------------------- scripts/demo.py


def load_demo():
    """scripts/demo.py as a module of its own name (test_demo.py keeps `demo`)."""
    name = "feed_v4_demo_script"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, PROJECT / "scripts" / "demo.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("earlier", [None, 0o644])
def test_demo_env_is_owner_only(tmp_path: Path, earlier: int | None):
    demo = load_demo()
    env_file = tmp_path / "demo.env"
    if earlier is not None:  # left by an older run, readable by everyone
        env_file.write_text("# old\n")
        env_file.chmod(earlier)
    redis_url = f"redis://:{SECRET}@127.0.0.1:6390/1"
    pg_url = f"postgresql://postgres:{SECRET}@127.0.0.1:5432/feed_v4_demo"
    old_umask = os.umask(0o022)
    try:
        files = demo.DemoFiles.prepare(tmp_path, redis_url, pg_url)
        assert os.umask(0o022) == 0o022, "prepare() left its umask behind"
    finally:
        os.umask(old_umask)
    assert files.env_file == env_file
    assert mode(env_file) == 0o600
    assert sourced(env_file, "REDIS_URL", "POSTGRES_URL") == [redis_url, pg_url]


# ------------------------------------------------------------------------- the scripts themselves


@pytest.mark.parametrize("script", ["lock.sh", "setup_venv.sh", "services.sh"])
def test_scripts_parse_and_are_executable(script: str):
    path = PROJECT / "scripts" / script
    assert os.access(path, os.X_OK), f"chmod +x {path}"
    subprocess.run(["bash", "-n", str(path)], check=True, timeout=30)


FAKE_PYTHON = """#!/bin/sh
# A stand-in for .venv/bin/python: passes setup_venv.sh's version check, records anything else.
case "$1" in -c) exit 0 ;; esac
echo "$*" >>"$(dirname "$0")/../calls"
"""


def scratch_setup(root: Path) -> Path:
    """A project with setup_venv.sh and a .venv whose python only records its calls (no pip runs)."""
    project = root / "project"
    shutil.copytree(PROJECT / "scripts", project / "scripts")
    fake = project / ".venv" / "bin" / "python"
    fake.parent.mkdir(parents=True)
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    for lock in ("requirements.txt", "requirements-dev.txt"):
        shutil.copy(PROJECT / lock, project / lock)
    return project


def run_setup(project: Path) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    run = subprocess.run(
        ["bash", str(project / "scripts" / "setup_venv.sh")], capture_output=True, text=True, timeout=60
    )
    calls = project / ".venv" / "calls"
    recorded = calls.read_text().splitlines() if calls.exists() else []
    calls.unlink(missing_ok=True)
    return run, [call for call in recorded if call != "-V"]


def test_setup_venv_installs_the_lock_hash_checked_once(tmp_path: Path):
    project = scratch_setup(tmp_path)
    run, calls = run_setup(project)
    assert run.returncode == 0, run.stderr
    assert calls == ["-m pip install -q --require-hashes -r requirements.txt -r requirements-dev.txt"]
    assert (project / ".venv" / ".requirements.sha256").is_file()
    run, calls = run_setup(project)  # unchanged lock: nothing to do
    assert run.returncode == 0 and calls == [], (run.stdout, calls)


def test_setup_venv_refuses_a_lock_without_hashes(tmp_path: Path):
    """An unhashed file (what requirements-dev.txt was before the lock) stops it before pip runs."""
    project = scratch_setup(tmp_path)
    (project / "requirements-dev.txt").write_text("pytest==9.2.0\n")
    run, calls = run_setup(project)
    assert run.returncode != 0
    assert "requirements-dev.txt has no hashes" in run.stderr, run.stderr
    assert calls == []
    assert not (project / ".venv" / ".requirements.sha256").exists()
