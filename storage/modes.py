"""The storage mode: what the database server offers and this database uses.

Three modes, same schema names and results in each (SPEC section 15). Only the full
edition has compression, continuous aggregates and the job scheduler; the Apache
edition has hypertables and chunk dropping; plain PostgreSQL has native partitions.
"""

from __future__ import annotations

from dataclasses import dataclass

PLAIN = "postgresql"
APACHE = "timescaledb-apache"
FULL = "timescaledb-full"
MODES = (PLAIN, APACHE, FULL)
MIN_SERVER_VERSION = 150000  # PostgreSQL 15


@dataclass(frozen=True)
class ServerFacts:
    """What one query reads from the server (see storage.detect)."""

    server_version_num: int
    installed: str | None  # timescaledb's extversion in this database
    available: str | None  # default_version in pg_available_extensions
    preloaded: bool  # the library is loaded (shared_preload_libraries): its license setting exists
    license: str | None  # SHOW timescaledb.license, when the library is loaded


@dataclass(frozen=True)
class StorageMode:
    mode: str
    timescaledb_version: str | None
    note: str  # for the boot line and status: why this mode, what else the server has

    @property
    def full(self) -> bool:
        return self.mode == FULL

    def describe(self) -> str:
        version = f" {self.timescaledb_version}" if self.timescaledb_version else ""
        return f"{self.mode}{version}" + (f" ({self.note})" if self.note else "")

    def as_json(self) -> dict[str, str | None]:
        return {"mode": self.mode, "timescaledb_version": self.timescaledb_version, "note": self.note}


def classify(facts: ServerFacts) -> StorageMode:
    """The mode from the server's facts. TimescaleDB counts only when this database has
    the extension: a server that merely offers it is plain, with a note saying so."""
    old = (
        f"PostgreSQL {facts.server_version_num // 10000} is older than the 15 this daemon is built for; "
        if facts.server_version_num < MIN_SERVER_VERSION
        else ""
    )
    if facts.installed:
        if facts.license == "timescale":
            return StorageMode(FULL, facts.installed, old.rstrip("; "))
        edition = "" if facts.license == "apache" else f"license {facts.license!r} read as Apache; "
        return StorageMode(APACHE, facts.installed, (old + edition).rstrip("; "))
    if facts.available and not facts.preloaded:
        note = f"TimescaleDB {facts.available} is installed on the server but not in shared_preload_libraries"
    elif facts.available:
        note = f"TimescaleDB {facts.available} can be loaded but is not created in this database"
    else:
        note = ""
    return StorageMode(PLAIN, None, (old + note).rstrip("; "))
