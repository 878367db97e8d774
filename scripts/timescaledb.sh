#!/usr/bin/env bash
# TimescaleDB for the storage modes: build and install the full edition once per machine
# from the vendored source, then start two private clusters that load it:
#   full edition   127.0.0.1:$FEED_TS_PORT        (default 5434, .local/pg-timescale)
#   Apache edition 127.0.0.1:$FEED_TS_APACHE_PORT (default 5435, .local/pg-timescale-apache;
#                  the same build with timescaledb.license=apache, which only the server's
#                  configuration can set)
#   scripts/timescaledb.sh        install if missing, start both; the last two lines printed
#                                 are their URLs (scripts/services.sh records them)
#   scripts/timescaledb.sh stop   stop both clusters
# The source is $TIMESCALEDB_TARBALL, or ../shared/vendor/timescaledb-<version>.tar.gz beside
# the checkout. Without it (and without an installed build) this prints nothing and exits 3.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
LOCAL=$ROOT/.local
VERSION=2.28.3
TARBALL=${TIMESCALEDB_TARBALL:-$ROOT/../shared/vendor/timescaledb-$VERSION.tar.gz}
FULL_PORT=${FEED_TS_PORT:-5434}
APACHE_PORT=${FEED_TS_APACHE_PORT:-5435}
DB_NAME=feed_v4

die() { echo "timescaledb: $*" >&2; exit 1; }
say() { echo "timescaledb: $*" >&2; }
is_root() { [ "$(id -u)" -eq 0 ]; }
as_pg_owner() { if is_root; then runuser -u postgres -- "$@"; else "$@"; fi; }

PG_CONFIG=$(ls -d /usr/lib/postgresql/*/bin/pg_config 2>/dev/null | sort -V | tail -n1 || true)
[ -n "$PG_CONFIG" ] || PG_CONFIG=$(command -v pg_config || true)
[ -n "$PG_CONFIG" ] || die "no PostgreSQL server found (run scripts/services.sh first)"
BINDIR=$("$PG_CONFIG" --bindir)
PG_MAJOR=$("$PG_CONFIG" --version | sed -E 's/^PostgreSQL ([0-9]+).*/\1/')

cluster() {  # cluster DIR PORT LICENSE: a trust-auth cluster loading TimescaleDB, started
    local dir=$1 port=$2 license=$3
    if [ ! -f "$dir/PG_VERSION" ]; then
        rm -rf "$dir" && mkdir -p "$dir"
        is_root && chown postgres: "$dir"
        as_pg_owner "$BINDIR/initdb" -D "$dir" -A trust -U postgres >"$dir.initdb.log" 2>&1 \
            || die "initdb failed (see $dir.initdb.log)"
        printf '%s\n' "shared_preload_libraries = 'timescaledb'" "timescaledb.license = '$license'" \
            "timescaledb.telemetry_level = off" "listen_addresses = '127.0.0.1'" "port = $port" \
            "unix_socket_directories = '/tmp'" "shared_buffers = 64MB" "max_connections = 60" \
            | as_pg_owner tee -a "$dir/postgresql.conf" >/dev/null
    fi
    # The job scheduler (compression, continuous aggregate policies) needs a background
    # worker per running job besides the launcher: with PostgreSQL's default of 8 worker
    # processes and TimescaleDB's 16 background workers, jobs failed to start.
    if ! grep -q '^max_worker_processes' "$dir/postgresql.conf"; then
        printf '%s\n' "max_worker_processes = 16" "timescaledb.max_background_workers = 8" \
            | as_pg_owner tee -a "$dir/postgresql.conf" >/dev/null
        if as_pg_owner "$BINDIR/pg_ctl" -D "$dir" status >/dev/null 2>&1; then  # running: restarted below
            as_pg_owner "$BINDIR/pg_ctl" -D "$dir" -m fast -w stop >/dev/null
        fi
    fi
    if ! "$BINDIR/pg_isready" -q -h 127.0.0.1 -p "$port"; then
        touch "$dir.log" && { ! is_root || chown postgres: "$dir.log"; }
        say "starting TimescaleDB ($license) on 127.0.0.1:$port"
        as_pg_owner "$BINDIR/pg_ctl" -D "$dir" -l "$dir.log" -w start 9>&- >/dev/null \
            || die "TimescaleDB cluster failed to start (see $dir.log)"
    fi
    "$BINDIR/psql" -h 127.0.0.1 -p "$port" -U postgres -d postgres -w -Atqc \
        "select 1 from pg_database where datname = '$DB_NAME'" | grep -q 1 \
        || "$BINDIR/createdb" -h 127.0.0.1 -p "$port" -U postgres -w "$DB_NAME"
}

if [ "${1:-}" = stop ]; then
    for dir in "$LOCAL/pg-timescale" "$LOCAL/pg-timescale-apache"; do
        [ -f "$dir/postmaster.pid" ] && as_pg_owner "$BINDIR/pg_ctl" -D "$dir" -m fast -w stop >/dev/null \
            && say "stopped $dir"
    done
    exit 0
fi

if [ ! -f "$("$PG_CONFIG" --pkglibdir)/timescaledb-$VERSION.so" ]; then
    [ -f "$TARBALL" ] || { say "no TimescaleDB installed and no source at $TARBALL"; exit 3; }
    if [ ! -f "$("$PG_CONFIG" --includedir-server)/postgres.h" ] || ! command -v cmake >/dev/null; then
        is_root || die "building TimescaleDB needs postgresql-server-dev-$PG_MAJOR and cmake (apt-get, as root)"
        say "installing postgresql-server-dev-$PG_MAJOR and cmake"
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            "postgresql-server-dev-$PG_MAJOR" cmake; } >"$LOCAL/apt-timescaledb.log" 2>&1 \
            || die "apt-get failed (see $LOCAL/apt-timescaledb.log)"
    fi
    build=$LOCAL/build-timescaledb
    rm -rf "$build" && mkdir -p "$build"
    say "building TimescaleDB $VERSION (3 to 4 minutes on 2 cores; once per machine)"
    tar xzf "$TARBALL" -C "$build"
    src=$build/timescaledb-$VERSION
    started=$SECONDS
    { cmake -S "$src" -B "$src/build" -DPG_CONFIG="$PG_CONFIG" -DREGRESS_CHECKS=OFF -DTAP_CHECKS=OFF \
        -DWARNINGS_AS_ERRORS=OFF -DUSE_TELEMETRY=OFF -DCMAKE_BUILD_TYPE=Release \
        && make -C "$src/build" -j"$(nproc)" && make -C "$src/build" install; } >"$LOCAL/build-timescaledb.log" 2>&1 \
        || die "TimescaleDB build failed (see $LOCAL/build-timescaledb.log)"
    rm -rf "$build"
    say "TimescaleDB $VERSION installed in $((SECONDS - started)) s"
fi

mkdir -p "$LOCAL"
cluster "$LOCAL/pg-timescale" "$FULL_PORT" timescale
cluster "$LOCAL/pg-timescale-apache" "$APACHE_PORT" apache
echo "postgresql://postgres@127.0.0.1:$FULL_PORT/$DB_NAME"
echo "postgresql://postgres@127.0.0.1:$APACHE_PORT/$DB_NAME"
