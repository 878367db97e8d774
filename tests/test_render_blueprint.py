"""render.yaml against Render's Blueprint rules, and against what the daemon reads (no server).

The rules are the subset of Render's Blueprint YAML reference (https://render.com/docs/blueprint-spec;
JSON Schema at https://render.com/schema/render.yaml.json) that a Python background worker touches,
embedded here so the test never fetches anything.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from binance.settings import FeedSettings
from infra import load_settings

PROJECT = Path(__file__).resolve().parents[1]

# --- the Blueprint rules (Render's reference, the parts a worker uses) -------------------
ROOT_KEYS = {"services", "databases", "envVarGroups", "projects", "ungrouped", "previews"}
SERVICE_TYPES = {"web", "pserv", "worker", "cron", "keyvalue", "redis"}
RUNTIMES = {"node", "python", "elixir", "go", "ruby", "rust", "docker", "image", "static"}
REGIONS = {"oregon", "ohio", "virginia", "frankfurt", "singapore"}
WORKER_PLANS = {"starter", "standard", "pro", "pro plus", "pro max", "pro ultra"}  # no `free` for workers
AUTO_DEPLOY_TRIGGERS = {"commit", "checksPass", "off"}
# Fields valid on a background worker, with their YAML types. Web-only (domains,
# healthCheckPath), cron-only (schedule), static-only (staticPublishPath, headers, routes)
# and Key Value fields (ipAllowList, maxmemoryPolicy, previewPlan) are not.
WORKER_FIELDS: dict[str, type | tuple[type, ...]] = {
    "type": str,
    "name": str,
    "runtime": str,
    "plan": str,
    "region": str,
    "repo": str,
    "branch": str,
    "rootDir": str,
    "buildCommand": str,
    "startCommand": str,
    "preDeployCommand": str,
    "autoDeployTrigger": str,
    "maxShutdownDelaySeconds": int,
    "numInstances": int,
    "scaling": dict,
    "buildFilter": dict,
    "disk": dict,
    "envVars": list,
    "previews": dict,
    "dockerCommand": str,
    "dockerfilePath": str,
    "dockerContext": str,
    "registryCredential": dict,
    "image": dict,
}
WEB_ONLY_FIELDS = {"healthCheckPath", "domains", "maxShutdownDelaySeconds"}
DEPRECATED_FIELDS = {"env", "autoDeploy", "pullRequestPreviewsEnabled", "previewsEnabled"}
# An envVars entry: `fromGroup` alone, or `key` with exactly one source.
ENV_SOURCES = {"value", "sync", "generateValue", "fromDatabase", "fromService"}
FROM_DATABASE_PROPERTIES = {"connectionString", "host", "port", "user", "password", "database"}
# Read by Render's Python build, not by the daemon.
PLATFORM_VARS = {"PYTHON_VERSION"}
SECRETS = {"REDIS_URL", "POSTGRES_URL"}


def load_blueprint() -> dict[str, Any]:
    return yaml.safe_load((PROJECT / "render.yaml").read_text())


def the_worker(blueprint: dict[str, Any]) -> dict[str, Any]:
    workers = [s for s in blueprint["services"] if s.get("type") == "worker"]
    assert len(workers) == 1, "exactly one background worker"
    return workers[0]


def env_vars(blueprint: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {entry["key"]: entry for entry in the_worker(blueprint)["envVars"] if "key" in entry}


def version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def daemon_sources() -> str:
    """The daemon's own code: top-level modules and its packages (not tests, tools, benches)."""
    skip = {".venv", "tests", "bench", "scripts", "fake_exchange"}
    files = [p for p in PROJECT.rglob("*.py") if not skip & set(p.relative_to(PROJECT).parts)]
    assert files
    return "\n".join(p.read_text() for p in files)


# --- structure ----------------------------------------------------------------------------


def check_structure(blueprint: dict[str, Any]) -> None:
    assert isinstance(blueprint, dict) and set(blueprint) <= ROOT_KEYS
    assert isinstance(blueprint["services"], list)
    assert sorted(s.get("type") for s in blueprint["services"]) in (["worker"], ["web", "worker"])
    for service in blueprint["services"]:
        assert isinstance(service, dict)
        assert service["type"] in SERVICE_TYPES
    worker = the_worker(blueprint)
    unknown = set(worker) - set(WORKER_FIELDS)
    assert not unknown, f"fields a worker does not take: {sorted(unknown)}"
    assert not DEPRECATED_FIELDS & set(worker)
    for field, kind in WORKER_FIELDS.items():
        if field in worker:
            assert isinstance(worker[field], kind) and not isinstance(worker[field], bool), field
    assert re.fullmatch(r"[a-z0-9][a-z0-9-]*", worker["name"])
    assert worker["name"] == "feed-v4"
    assert worker["runtime"] in RUNTIMES and worker["runtime"] == "python"
    assert worker["plan"] in WORKER_PLANS and worker["plan"] == "starter"
    assert worker.get("region", "oregon") in REGIONS
    assert worker.get("autoDeployTrigger", "commit") in AUTO_DEPLOY_TRIGGERS
    assert 1 <= worker.get("maxShutdownDelaySeconds", 30) <= 300
    assert worker.get("numInstances", 1) >= 1  # N daemon processes share the symbols (README, Scale-out)
    for web in (s for s in blueprint["services"] if s["type"] == "web"):
        unknown = set(web) - set(WORKER_FIELDS) - WEB_ONLY_FIELDS
        assert not unknown, f"fields a web service does not take: {sorted(unknown)}"
        assert web["runtime"] == "python" and web["plan"] in WORKER_PLANS | {"free"}
        assert web.get("region", "oregon") == worker.get("region", "oregon"), "next to its servers and the worker"


def test_root_and_service_follow_the_blueprint_spec():
    check_structure(load_blueprint())


def test_services_deploy_only_commits_whose_checks_pass():
    """A push reaches production only after the repository's checks ran the test suite."""
    for service in load_blueprint()["services"]:
        assert service.get("autoDeployTrigger") == "checksPass", service["name"]
    workflow = yaml.safe_load((PROJECT / ".github" / "workflows" / "ci.yml").read_text())
    triggers = workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` as True
    assert "push" in triggers and "pull_request" in triggers
    steps = [step.get("run", "") for job in workflow["jobs"].values() for step in job["steps"]]
    assert any(run.strip() == ".ci/run" for run in steps), steps


def test_worker_builds_and_starts_the_daemon():
    worker = the_worker(load_blueprint())
    # Native runtimes need both commands (Docker ones use dockerCommand instead).
    build = shlex.split(worker["buildCommand"])
    assert build[:2] == ["pip", "install"], worker["buildCommand"]
    # Exactly the hashed runtime lock, hash-checked: no other requirement file, package or index.
    assert sorted(build[2:]) == sorted(["--require-hashes", "-r", "requirements.txt"]), worker["buildCommand"]
    assert build[build.index("-r") + 1] == "requirements.txt"
    assert (PROJECT / "requirements.txt").is_file()
    assert_hashed_lock((PROJECT / "requirements.txt").read_text())
    command = shlex.split(worker["startCommand"])
    assert command[0] == "python" and command[1] == "feed_v4_main.py"
    assert command[2:] == [], "the daemon itself, not `migrate` or `status`"
    assert (PROJECT / command[1]).is_file()


def test_every_env_var_has_a_key_and_exactly_one_source():
    entries = the_worker(load_blueprint())["envVars"]
    keys = [entry.get("key") for entry in entries]
    assert len(keys) == len(set(keys)), "duplicate keys"
    for entry in entries:
        assert isinstance(entry, dict)
        if "fromGroup" in entry:
            assert set(entry) == {"fromGroup"}, entry
            continue
        assert isinstance(entry.get("key"), str) and re.fullmatch(r"[A-Z][A-Z0-9_]*", entry["key"]), entry
        sources = set(entry) - {"key"}
        assert len(sources) == 1 and sources <= ENV_SOURCES, f"{entry['key']}: one of {sorted(ENV_SOURCES)}"
        (source,) = sources
        if source == "value":
            assert isinstance(entry["value"], str), f"{entry['key']}: quote the value (the env gets text)"
        elif source == "sync":
            assert entry["sync"] is False, f"{entry['key']}: only `sync: false` means something"
        elif source == "generateValue":
            assert entry["generateValue"] is True
        elif source == "fromDatabase":
            ref = entry["fromDatabase"]
            assert set(ref) == {"name", "property"} and ref["property"] in FROM_DATABASE_PROPERTIES
        else:
            ref = entry["fromService"]
            assert {"name", "type"} <= set(ref) and len({"property", "envVarKey"} & set(ref)) == 1


def test_server_urls_and_tokens_are_secrets_asked_in_the_dashboard():
    variables = env_vars(load_blueprint())
    for key in (*SECRETS, "TELEGRAM_BOT_TOKEN", "TELEGRAM_CHAT_ID"):
        assert variables[key] == {"key": key, "sync": False}, key
    hardcoded = " ".join(v.get("value", "") for v in variables.values())
    assert "redis://" not in hardcoded and "postgres" not in hardcoded  # no credentials in git


def test_every_env_var_is_one_the_daemon_reads():
    code = daemon_sources()
    for key in env_vars(load_blueprint()):
        if key in PLATFORM_VARS:
            continue
        assert f'"{key}"' in code, f"{key} is set in render.yaml but read nowhere in the daemon"


def test_the_values_boot_the_daemon_with_the_documented_defaults():
    """The blueprint's values go through the daemon's own settings parser unchanged."""
    variables = env_vars(load_blueprint())
    env = {k: v["value"] for k, v in variables.items() if "value" in v}
    env |= {"REDIS_URL": "redis://red-example:6379", "POSTGRES_URL": "postgresql://u:p@dpg-example/feed_v4"}
    settings = load_settings(env)
    assert settings.debug_mode is False
    assert settings.symbols == ("BTCUSDT", "ETHUSDT")
    assert settings.redis_candles == 250
    assert settings.binance_ws_url == "wss://fstream.binance.com/market"
    assert settings.binance_rest_url == "https://fapi.binance.com"
    assert settings.candle_store == "auto"
    feed = FeedSettings.from_env(settings, env)
    assert feed.limit_group == "render-frankfurt"  # every instance shares one group: one region's IPs


def test_n_instances_are_a_valid_worker():
    """Scaling the worker out is a change of numInstances only (README, From one worker to N)."""
    blueprint = load_blueprint()
    the_worker(blueprint)["numInstances"] = 3
    check_structure(blueprint)
    assert "numInstances" in (PROJECT / "render.yaml").read_text().split("# Deploy a push")[0]


# --- the hashed lock files (scripts/lock.sh) ---------------------------------------------

LOCK_FILES = {"requirements.txt": "requirements.in", "requirements-dev.txt": "requirements-dev.in"}
PIN = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.!+_-]+)")
HASH = re.compile(r"--hash=sha256:[0-9a-f]{64}")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def logical_lines(text: str) -> list[str]:
    """pip's view of a requirements file: comments dropped, backslash continuations joined."""
    lines: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", raw).rstrip()
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = (pending + line).strip()
        pending = ""
        if line:
            lines.append(line)
    assert not pending.strip(), "a continuation runs off the end of the file"
    return lines


def assert_hashed_lock(text: str) -> dict[str, tuple[str, frozenset[str]]]:
    """Every line that names a package pins it with == and carries sha256 hashes; nothing else.

    Returns {canonical name: (version, hashes)}."""
    pins: dict[str, tuple[str, frozenset[str]]] = {}
    for line in logical_lines(text):
        assert not line.startswith("-"), f"an option line in a lock file ({line!r}): pip-compile writes none"
        requirement, *options = line.split()
        match = PIN.fullmatch(requirement)
        assert match, f"{requirement!r} is not pinned with == (no extras, no URL, no range)"
        hashes = frozenset(options)
        assert hashes, f"{requirement} carries no --hash"
        assert all(HASH.fullmatch(option) for option in hashes), f"{requirement}: only --hash=sha256:... may follow"
        name = canonical(match.group(1))
        assert name not in pins, f"{name} listed twice"
        pins[name] = (match.group(2), hashes)
    assert pins, "no package at all"
    return pins


def direct_pins(in_file: str) -> dict[str, str]:
    """The hand-pinned direct dependencies of a .in file (extras stripped, like --strip-extras)."""
    pins: dict[str, str] = {}
    for line in logical_lines((PROJECT / in_file).read_text()):
        if line.startswith("-c ") or line.startswith("-r "):
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==(\S+)", line)
        assert match, f"{in_file}: {line!r} should pin one version with =="
        pins[canonical(match.group(1))] = match.group(2)
    return pins


@pytest.mark.parametrize("lock", sorted(LOCK_FILES))
def test_every_package_in_the_lock_files_is_pinned_with_hashes(lock: str):
    text = (PROJECT / lock).read_text()
    assert_hashed_lock(text)
    head = "\n".join(text.splitlines()[:12])
    # The header says how to regenerate it: the script and pip-compile's exact command.
    assert "scripts/lock.sh" in head, head
    command = rf"#\s+pip-compile .*--generate-hashes .*--output-file={re.escape(lock)} .*{re.escape(LOCK_FILES[lock])}"
    assert re.search(command, head), head


@pytest.mark.parametrize("lock", sorted(LOCK_FILES))
def test_the_lock_files_keep_the_hand_pinned_versions(lock: str):
    locked = assert_hashed_lock((PROJECT / lock).read_text())
    for name, version in direct_pins(LOCK_FILES[lock]).items():
        assert name in locked, f"{name} is in {LOCK_FILES[lock]} but not in {lock}: run scripts/lock.sh"
        assert locked[name][0] == version, f"{name}: {LOCK_FILES[lock]} says {version}, {lock} {locked[name][0]}"


def test_runtime_and_dev_locks_agree_on_shared_packages():
    runtime = assert_hashed_lock((PROJECT / "requirements.txt").read_text())
    dev = assert_hashed_lock((PROJECT / "requirements-dev.txt").read_text())
    assert "-c requirements.txt" in logical_lines((PROJECT / "requirements-dev.in").read_text())
    for name in runtime.keys() & dev.keys():
        assert runtime[name] == dev[name], f"{name}: the two lock files pin it differently"


def test_no_installed_dependency_floats_outside_the_lock():
    """Every dependency (markers evaluated here) of a locked package that is installed is locked too."""
    from importlib import metadata

    from packaging.requirements import Requirement

    locked: dict[str, str] = {}
    for lock in LOCK_FILES:
        locked |= {name: version for name, (version, _) in assert_hashed_lock((PROJECT / lock).read_text()).items()}
    checked = 0
    for name, version in locked.items():
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        if dist.version != version:
            continue  # another version installed here: its metadata says nothing about the lock
        checked += 1
        for spec in dist.requires or []:
            requirement = Requirement(spec)
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
                continue
            assert canonical(requirement.name) in locked, f"{name} needs {requirement.name}, which no lock file pins"
    if not checked:
        pytest.skip("none of the locked versions is installed in this environment")


@pytest.mark.parametrize(
    "bad",
    [
        "pytest==9.2.0\n",  # pinned, no hash: what requirements-dev.txt held before the lock
        "redis[hiredis]==8.1.0 \\\n    --hash=sha256:" + "0" * 64 + "\n",  # extras
        "idna>=3.20 \\\n    --hash=sha256:" + "0" * 64 + "\n",  # a range
        "idna==3.20 \\\n    --hash=md5:" + "0" * 32 + "\n",  # not sha256
        "idna==3.20 \\\n    --hash=sha256:" + "0" * 64 + "\n-e git+https://example.org/x.git#egg=x\n",
        "idna==3.20 --hash=sha256:" + "0" * 64 + "\nidna==3.20 --hash=sha256:" + "1" * 64 + "\n",  # twice
    ],
)
def test_the_lock_check_catches_an_unhashed_or_loose_line(bad: str):
    """Guard against a vacuous check: each of these would let pip install something unchecked."""
    with pytest.raises(AssertionError):
        assert_hashed_lock(bad)


# --- Python version -----------------------------------------------------------------------


def requires_python() -> tuple[int, ...]:
    spec = tomllib.loads((PROJECT / "pyproject.toml").read_text())["project"]["requires-python"]
    match = re.fullmatch(r">=\s*(\d+(?:\.\d+)*)", spec.strip())
    assert match, f"requires-python {spec!r}: this test understands only >=X.Y"
    return version_tuple(match.group(1))


def test_pinned_python_satisfies_the_project():
    minimum = requires_python()
    pinned = env_vars(load_blueprint())["PYTHON_VERSION"]["value"]
    # Render takes PYTHON_VERSION only fully qualified (x.y.z); it wins over .python-version.
    assert re.fullmatch(r"3\.\d+\.\d+", pinned), pinned
    assert version_tuple(pinned) >= minimum
    file_version = (PROJECT / ".python-version").read_text().strip()
    assert re.fullmatch(r"3\.\d+(\.\d+)?", file_version), file_version
    assert version_tuple(file_version) >= minimum
    assert version_tuple(pinned)[:2] == version_tuple(file_version)[:2], "the two pins disagree"


@pytest.mark.parametrize("bad", ["env: python", "healthCheckPath: /", "schedule: '0 * * * *'", "plan: free"])
def test_the_checks_catch_a_broken_worker(bad: str):
    """Guard against a vacuous check: typical mistakes make the structure check fail."""
    text = (PROJECT / "render.yaml").read_text()
    if bad.startswith("plan:"):
        broken = text.replace("plan: starter", bad)
    else:
        broken = text.replace("    runtime: python\n", f"    runtime: python\n    {bad}\n")
    assert broken != text
    with pytest.raises(AssertionError):
        check_structure(yaml.safe_load(broken))


# --- the optional web service (the read API and chart page) ------------------------------


def the_web_service(blueprint: dict[str, Any]) -> dict[str, Any]:
    (web,) = [s for s in blueprint["services"] if s.get("type") == "web"]
    return web


def test_the_web_service_serves_the_api_with_a_health_check_and_a_generated_token():
    from web.app import WebSettings

    web = the_web_service(load_blueprint())
    build = [shlex.split(part) for part in web["buildCommand"].split("&&")]
    assert build[0] == ["pip", "install", "--require-hashes", "-r", "requirements.txt"]
    assert build[1][:4] == ["npm", "ci", "--prefix", "web"] and (PROJECT / "web" / "package-lock.json").is_file()
    assert shlex.split(web["startCommand"]) == ["python", "feed_v4_main.py", "web"]
    assert web["healthCheckPath"] == "/api/v1/health"
    variables = {e["key"]: e for e in web["envVars"]}
    assert variables["WEB_TOKEN"] == {"key": "WEB_TOKEN", "generateValue": True}
    for key in SECRETS:
        assert variables[key] == {"key": key, "sync": False}
    assert variables["PYTHON_VERSION"] == env_vars(load_blueprint())["PYTHON_VERSION"]
    code = daemon_sources()
    for key in variables:
        assert key in PLATFORM_VARS or f'"{key}"' in code, f"{key} is read nowhere"
    env = {k: v["value"] for k, v in variables.items() if "value" in v} | {"PORT": "10000"}
    with pytest.raises(Exception, match="WEB_TOKEN"):
        WebSettings.from_env(env)  # listening on 0.0.0.0 without the generated token: refused
    settings = WebSettings.from_env(env | {"WEB_TOKEN": "x" * 43})  # what Render generates: 256 bits, base64
    assert settings.host == "0.0.0.0" and settings.port == 10000 and settings.trust_proxy
