"""`feed-v4 config`: every setting, its value and where it came from (environment,
.local/services.env, default), secrets masked; each invalid value named with the daemon's
own parsers' error; environment variables that look like a setting but are not one.
Reaches no server. Exit 0, or 1 when a value is invalid (the daemon would refuse to start).

`report()` is pure (an environment and the services.env values in, a report out);
`run_config()` reads the process's environment and prints.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

import infra
from infra import ConfigError, Settings, mask_url
from ops.settings_catalog import CATALOG, GROUPS, PREFIXES, Setting
from ops.tickers import table

SERVICES_FILE = ".local/services.env"
FROM_SERVICES = ("REDIS_URL", "POSTGRES_URL")  # the only values read from services.env
# Variables of the shell, Python, libpq (PGHOST, PGPASSWORD...: asyncpg honours some of
# them; they are libpq's, not ours) and the platforms: never reported as misspelt.
IGNORED = re.compile(
    r"^(PATH|HOME|USER|LOGNAME|SHELL|PWD|OLDPWD|TERM|LANG|LANGUAGE|TZ|HOSTNAME|SHLVL|_|MAIL|EDITOR|PAGER"
    r"|PYTHON.*|VIRTUAL_ENV.*|LC_.*|XDG_.*|SSH_.*|PG[A-Z]+|RENDER.*|CI|GITHUB_.*|PYTEST_.*|COLUMNS|LINES"
    r"|MAKE.*|MFLAGS|TMPDIR|TEMP|TMP|LD_.*|DISPLAY|COLORTERM|NO_COLOR|FORCE_COLOR)$"
)
PLACEHOLDERS = {"REDIS_URL": "redis://127.0.0.1:1/0", "POSTGRES_URL": "postgresql://placeholder@127.0.0.1:1/x"}


@dataclass
class Line:
    setting: Setting
    value: str | None  # as shown (masked); None: unset, the default applies
    source: str  # "environment", ".local/services.env", "default"
    errors: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        s = self.setting
        return {
            "name": s.name,
            "value": self.value,
            "source": self.source,
            "default": s.default,
            "group": s.group,
            "secret": s.secret,
            "meaning": s.meaning,
            "errors": self.errors,
        }


@dataclass
class Report:
    lines: list[Line]
    warnings: list[str]
    general_errors: list[str]

    @property
    def invalid(self) -> list[Line]:
        return [line for line in self.lines if line.errors]

    @property
    def ok(self) -> bool:
        return not self.invalid and not self.general_errors


def masked(setting: Setting, raw: str) -> str:
    if setting.secret:
        return f"*** ({len(raw)} characters)"
    if setting.url or "://" in raw:
        return mask_url(raw)
    return raw


def value_source(name: str, env: Mapping[str, str], local: Mapping[str, str]) -> tuple[str | None, str]:
    """The raw value a process would use, and where it comes from (as load_settings reads it)."""
    if env.get(name, "").strip():
        return env[name], "environment"
    if name == "POSTGRES_URL" and env.get("DATABASE_URL", "").strip():
        return env["DATABASE_URL"], "environment (DATABASE_URL)"
    if name in FROM_SERVICES and local.get(name):
        return local[name], SERVICES_FILE
    if name in env:
        return None, "default (set but empty)"
    return None, "default"


# --------------------------------------------------------------------------- validation


def _placeholder_settings(env: Mapping[str, str]) -> Settings:
    redis_candles = 250
    try:
        redis_candles = infra.env_number(env, "REDIS_CANDLES", 250, int, 1, 100_000)
    except ConfigError:
        pass
    return Settings(
        redis_url=PLACEHOLDERS["REDIS_URL"], postgres_url=PLACEHOLDERS["POSTGRES_URL"], redis_candles=redis_candles
    )


def parsers() -> list[tuple[str, Callable[[Mapping[str, str]], Any]]]:
    """The daemon's own parsers of the environment, each given an environment."""
    from alerts import TelegramAlerts
    from binance.settings import FeedSettings
    from book.intake import BookSettings
    from feed_v4_main import DaemonOptions
    from indicators_main import IndicatorOptions
    from ops.progress import progress_mode
    from retention import RetentionOptions
    from signals_v4_main import load_router_options
    from status_report import status_thresholds
    from storage.setup import timescaledb_setting
    from web.app import WebSettings

    def settings_then(fn: Callable[[Settings, Mapping[str, str]], Any]) -> Callable[[Mapping[str, str]], Any]:
        def run(env: Mapping[str, str]) -> Any:
            try:
                settings = infra.load_settings(env)
            except ConfigError:
                settings = _placeholder_settings(env)  # load_settings' own errors are reported by its line
            return fn(settings, env)

        return run

    return [
        ("load_settings", infra.load_settings),
        ("DaemonOptions", settings_then(DaemonOptions.from_env)),
        ("FeedSettings", settings_then(FeedSettings.from_env)),
        ("IndicatorOptions", IndicatorOptions.from_env),
        ("RouterOptions", load_router_options),
        ("RetentionOptions", RetentionOptions.from_env),
        ("BookSettings", BookSettings.from_env),
        ("TelegramAlerts", settings_then(lambda s, env: TelegramAlerts.from_settings(s, env))),
        ("WebSettings", WebSettings.from_env),
        ("status", status_thresholds),
        ("logging", infra.log_options),
        ("progress", progress_mode),
        ("storage", timescaledb_setting),
    ]


_NAME = re.compile(r"\b[A-Z][A-Z0-9_]*[A-Z0-9]\b")


def named_setting(message: str) -> str | None:
    """The first catalog name a ConfigError's message mentions."""
    for match in _NAME.finditer(message):
        if match.group() in CATALOG:
            return match.group()
    return None


def validate(
    env: Mapping[str, str], run_parsers: list[tuple[str, Callable[[Mapping[str, str]], Any]]]
) -> tuple[dict[str, list[str]], list[str]]:
    """Every ConfigError the parsers raise on `env`, by the setting it names: a parser
    stops at its first error, so the named variable is taken out and the parser run again."""
    errors: dict[str, list[str]] = {}
    general: list[str] = []
    for label, parse in run_parsers:
        trial = dict(env)
        for _ in range(len(CATALOG)):
            try:
                parse(trial)
                break
            except ConfigError as exc:
                message = str(exc)
                name = named_setting(message)
                if name is None:
                    general.append(f"{label}: {message}")
                    break
                if message not in errors.setdefault(name, []):
                    errors[name].append(message)
                if trial.get(name):
                    trial.pop(name)
                    if name == "POSTGRES_URL":
                        trial.pop("DATABASE_URL", None)
                elif name in PLACEHOLDERS and trial.get(name) != PLACEHOLDERS[name]:
                    trial[name] = PLACEHOLDERS[name]
                else:
                    break
            except Exception as exc:  # a parser's bug must not hide the rest of the report
                general.append(f"{label}: {type(exc).__name__}: {exc}")
                break
    return errors, general


# --------------------------------------------------------------------------- misspellings


def misspelt(env: Mapping[str, str]) -> list[str]:
    """Warnings for environment names that look like a setting but are none (SYMBOL=)."""
    out = []
    for name in sorted(env):
        if name in CATALOG or IGNORED.match(name):
            continue
        close = difflib.get_close_matches(name.upper(), list(CATALOG), n=1, cutoff=0.8)
        if close:
            out.append(f"warning: {name} is not a setting (did you mean {close[0]}?)")
        elif name.upper().startswith(PREFIXES):
            out.append(f"warning: {name} is not a setting, though it looks like one (`feed-v4 config` lists them)")
    return out


def report(env: Mapping[str, str], local: Mapping[str, str], run_parsers=None) -> Report:
    errors, general = validate(env, parsers() if run_parsers is None else run_parsers)
    lines = []
    for setting in CATALOG.values():
        raw, source = value_source(setting.name, env, local)
        value = None if raw is None else masked(setting, raw)
        lines.append(Line(setting, value, source, errors.get(setting.name, [])))
    return Report(lines, misspelt(env), general)


def _scrub(text: str, env: Mapping[str, str]) -> str:
    """An error message never carries a secret's value (the parsers mask URLs already)."""
    for name, setting in CATALOG.items():
        raw = env.get(name, "")
        if setting.secret and len(raw) >= 4:
            text = text.replace(raw, "***")
    return text


def text_lines(rep: Report, env: Mapping[str, str]) -> list[str]:
    rows: list[tuple[str, str, str, str]] = []
    starts: dict[int, str] = {}  # row index -> the group it opens
    errors: dict[int, list[str]] = {}  # row index -> its errors, under it
    for group in GROUPS:
        starts[len(rows)] = group
        for line in (line for line in rep.lines if line.setting.group == group):
            value = line.value if line.value is not None else line.setting.default
            errors[len(rows)] = line.errors
            rows.append((line.setting.name, value, line.source, line.setting.meaning))
    laid = table(("NAME", "VALUE", "SOURCE", "MEANING"), rows)
    out = [f"feed_v4 settings: value and source (environment, {SERVICES_FILE}, default); secrets masked", laid[0]]
    for index, text in enumerate(laid[1:]):
        if index in starts:
            out.append(f"[{starts[index]}]")
        out.append(text)
        out += [f"    error: {_scrub(error, env)}" for error in errors.get(index, ())]
    out.append("")
    out += rep.warnings
    out += [f"error: {_scrub(e, env)}" for e in rep.general_errors]
    bad = [line.setting.name for line in rep.invalid]
    if bad:
        out.append(f"{len(bad)} invalid: {', '.join(bad)}: the daemon would refuse to start (exit 2)")
    else:
        out.append("every value is valid")
    return out


def json_report(rep: Report, env: Mapping[str, str]) -> dict[str, Any]:
    lines = [line.as_json() for line in rep.lines]
    for item in lines:
        item["errors"] = [_scrub(e, env) for e in item["errors"]]
    return {
        "ok": rep.ok,
        "settings": lines,
        "warnings": rep.warnings,
        "invalid": [line.setting.name for line in rep.invalid],
        "errors": [_scrub(e, env) for e in rep.general_errors],
    }


def run_config(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> int:
    env = dict(os.environ if env is None else env)
    rep = report(env, infra.read_local_services())
    with_errors = "backslashreplace"
    sys.stdout.reconfigure(errors=with_errors)  # type: ignore[union-attr]
    if args.json:
        print(orjson.dumps(json_report(rep, env), option=orjson.OPT_INDENT_2).decode())
    else:
        print("\n".join(text_lines(rep, env)))
    return 0 if rep.ok else 1
