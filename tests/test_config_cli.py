"""`feed-v4 config`: every setting with its value and source, secrets masked, misspelt
variables warned about, invalid values named (exit 1); and the catalog holds every name
the code reads, so a new setting cannot be left out. No server is reached."""

from __future__ import annotations

import re
from pathlib import Path

import orjson
import pytest
from daemon import run_main

from infra import read_local_services
from ops import config_report as cr
from ops.settings_catalog import CATALOG

PROJECT = Path(__file__).resolve().parents[1]
SECRET = "Sup3r-Secret-value"
NOT_A_SERVER = {"BOOT_WAIT_S": "0"}  # and nothing listens on these ports: a connection would fail


def line_of(stdout: str, name: str) -> list[str]:
    """NAME's row of the text report, split on the column gaps."""
    for line in stdout.splitlines():
        if line.startswith(name + " "):
            return [cell for cell in re.split(r"\s{2,}", line.strip()) if cell]
    raise AssertionError(f"{name} not in\n{stdout}")


def errors_under(stdout: str, name: str) -> list[str]:
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(name + " "))
    out = []
    for line in lines[start + 1 :]:
        if not line.startswith("    error: "):
            break
        out.append(line.removeprefix("    error: "))
    return out


def test_values_sources_and_masks_in_text_and_json():
    env = {
        "POSTGRES_URL": f"postgresql://feed:{SECRET}@127.0.0.1:1/feed_v4?sslpassword={SECRET}",
        "WEB_TOKEN": SECRET + "-long-enough",
        "TELEGRAM_BOT_TOKEN": "123:" + SECRET,
        "REDIS_CANDLES": "300",
        "REDIS_CANDLE_STORE": "",  # set but empty: the default applies
        **NOT_A_SERVER,
    }
    run = run_main(env, "config")
    assert run.returncode == 0, run.stdout + run.stderr
    assert SECRET not in run.stdout + run.stderr
    assert line_of(run.stdout, "REDIS_CANDLES")[:3] == ["REDIS_CANDLES", "300", "environment"]
    assert line_of(run.stdout, "STREAM_MAXLEN")[:3] == ["STREAM_MAXLEN", "100000", "default"]
    assert line_of(run.stdout, "REDIS_CANDLE_STORE")[:3] == ["REDIS_CANDLE_STORE", "auto", "default (set but empty)"]
    assert line_of(run.stdout, "POSTGRES_URL")[1:3] == [
        "postgresql://feed:***@127.0.0.1:1/feed_v4?sslpassword=***",
        "environment",
    ]
    assert line_of(run.stdout, "WEB_TOKEN")[1] == f"*** ({len(env['WEB_TOKEN'])} characters)"
    assert line_of(run.stdout, "TELEGRAM_BOT_TOKEN")[1].startswith("***")
    assert "rows enabled otherwise (feed-v4 tickers, SQL) are left alone" in line_of(run.stdout, "SYMBOLS")[-1]
    local = read_local_services()
    if local.get("REDIS_URL"):  # REDIS_URL is not in the environment: services.env's, as load_settings takes it
        assert line_of(run.stdout, "REDIS_URL")[1:3] == [cr.mask_url(local["REDIS_URL"]), ".local/services.env"]
    assert run.stdout.splitlines()[-1] == "every value is valid"

    as_json = run_main(env, "config", "--json")
    assert as_json.returncode == 0 and SECRET not in as_json.stdout
    report = orjson.loads(as_json.stdout)
    by_name = {s["name"]: s for s in report["settings"]}
    assert report["ok"] is True and report["invalid"] == []
    assert set(by_name) == set(CATALOG)
    assert (by_name["REDIS_CANDLES"]["value"], by_name["REDIS_CANDLES"]["source"]) == ("300", "environment")
    assert (by_name["STREAM_MAXLEN"]["value"], by_name["STREAM_MAXLEN"]["source"]) == (None, "default")
    assert by_name["STREAM_MAXLEN"]["default"] == "100000"
    assert by_name["WEB_TOKEN"]["secret"] is True and by_name["WEB_TOKEN"]["value"].startswith("***")


def test_misspelt_variables_are_warned_about_and_their_values_never_shown():
    env = {"SYMBOL": "BTCUSDT" + SECRET, "REDIS_HOST": SECRET, "PGPASSWORD": SECRET, "webtoken": "x", **NOT_A_SERVER}
    run = run_main(env, "config")
    assert run.returncode == 0, run.stdout
    assert SECRET not in run.stdout + run.stderr
    warnings = [line for line in run.stdout.splitlines() if line.startswith("warning:")]
    assert "warning: SYMBOL is not a setting (did you mean SYMBOLS?)" in warnings
    assert "warning: webtoken is not a setting (did you mean WEB_TOKEN?)" in warnings
    assert any(w.startswith("warning: REDIS_HOST is not a setting") for w in warnings)
    assert not any("PGPASSWORD" in w for w in warnings)  # libpq's, not ours
    report = orjson.loads(run_main(env, "config", "--json").stdout)
    assert "warning: SYMBOL is not a setting (did you mean SYMBOLS?)" in report["warnings"]


def test_each_invalid_value_is_named_and_exits_1():
    env = {
        "REDIS_CANDLES": "abc",
        "WEB_HOST": "0.0.0.0",  # beyond loopback without WEB_TOKEN
        "SIGNAL_MARK_TTL_S": "60",  # below SIGNAL_CLAIM_IDLE_MS
        "LOG_FORMAT": "xml",
        "POSTGRES_URL": f"postgresql://feed:p@{SECRET}@127.0.0.1:1/feed_v4",  # an unencoded '@'
        **NOT_A_SERVER,
    }
    run = run_main(env, "config")
    assert run.returncode == 1, run.stdout
    assert SECRET not in run.stdout + run.stderr
    assert errors_under(run.stdout, "REDIS_CANDLES") == ["REDIS_CANDLES='abc' is not a int"]
    assert errors_under(run.stdout, "WEB_HOST")[0].startswith("WEB_HOST=0.0.0.0 listens beyond this machine")
    assert errors_under(run.stdout, "SIGNAL_MARK_TTL_S")[0].startswith("SIGNAL_MARK_TTL_S=60")
    assert errors_under(run.stdout, "LOG_FORMAT") == [
        "LOG_FORMAT='xml': use text or json"
    ]  # infra.log_options' own words
    assert "unencoded '@'" in errors_under(run.stdout, "POSTGRES_URL")[0]
    assert errors_under(run.stdout, "STREAM_MAXLEN") == []
    invalid = ["POSTGRES_URL", "REDIS_CANDLES", "SIGNAL_MARK_TTL_S", "LOG_FORMAT", "WEB_HOST"]
    assert run.stdout.splitlines()[-1].startswith(f"5 invalid: {', '.join(invalid)}")
    report = orjson.loads(run_main(env, "config", "--json").stdout)
    assert report["ok"] is False and report["invalid"] == invalid


def test_sources_by_precedence():
    local = {"REDIS_URL": "redis://127.0.0.1:6390/0", "POSTGRES_URL": "postgresql://postgres@127.0.0.1/feed_v4"}
    assert cr.value_source("REDIS_URL", {}, local) == (local["REDIS_URL"], ".local/services.env")
    assert cr.value_source("REDIS_URL", {"REDIS_URL": "redis://h/0"}, local) == ("redis://h/0", "environment")
    assert cr.value_source("POSTGRES_URL", {"DATABASE_URL": "postgresql://d/x"}, local) == (
        "postgresql://d/x",
        "environment (DATABASE_URL)",
    )
    assert cr.value_source("SYMBOLS", {}, local) == (None, "default")
    assert cr.value_source("STREAM_MAXLEN", {"STREAM_MAXLEN": " "}, local) == (None, "default (set but empty)")
    assert cr.value_source("STREAM_MAXLEN", {}, {"STREAM_MAXLEN": "5"}) == (None, "default")  # only the URLs


# Every way the code reads a variable by name.
READS = re.compile(
    r"""(?:env\.get|environ\.get|os\.getenv|env_bool\(\s*env\s*,|env_number\(\s*env\s*,|env\[|environ\[)"""
    r"""\(?\s*["']([A-Z][A-Z0-9_]*)["']"""
)


def names_read_by_the_code() -> dict[str, str]:
    found: dict[str, str] = {}
    for path in PROJECT.rglob("*.py"):
        relative = path.relative_to(PROJECT)
        if relative.parts[0] in ("tests", ".venv", "node_modules", ".local") or "node_modules" in relative.parts:
            continue
        for name in READS.findall(path.read_text(errors="replace")):
            found.setdefault(name, str(relative))
    return found


def test_every_setting_the_code_reads_is_in_the_catalog():
    found = names_read_by_the_code()
    assert {"REDIS_URL", "SYMBOLS", "WEB_TOKEN", "SIGNAL_BATCH", "BOOK_RANGE_PCT", "DEMO_DIR"} <= set(found)
    assert len(found) > 90, sorted(found)  # the search finds what it should
    missing = {name: where for name, where in found.items() if name not in CATALOG}
    assert not missing, f"settings read by the code but not in ops/settings_catalog.py: {missing}"


@pytest.mark.parametrize("name", ["METRICS_PORT", "METRICS_HOST", "LOG_FORMAT", "LOG_LEVEL", "PROGRESS"])
def test_the_settings_being_added_are_catalogued(name):
    assert name in CATALOG and CATALOG[name].meaning
