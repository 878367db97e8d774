#!/usr/bin/env bash
# Provide a pgbouncer binary for the tests without installing a system service; print its path.
#   1. $PGBOUNCER, if set (must be executable);
#   2. `pgbouncer` on PATH;
#   3. else Debian 12's package, fetched with a private apt state (.local/apt-bookworm: own
#      sources list, lists and cache; the system's apt configuration stays untouched), unpacked
#      with `dpkg -x` into .local/pgbouncer together with any library package it needs that
#      the machine lacks (libc-ares2 on a bare Debian 12), behind a wrapper script
#      .local/pgbouncer/bin/pgbouncer that sets LD_LIBRARY_PATH.
# DEBIAN_MIRROR overrides http://deb.debian.org/debian.
# Idempotent: once unpacked it only checks the wrapper runs. Only the path goes to stdout.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
LOCAL=$ROOT/.local
DEST=$LOCAL/pgbouncer
APT_DIR=$LOCAL/apt-bookworm
DEBS=$APT_DIR/debs
LOG=$APT_DIR/apt.log
WRAPPER=$DEST/bin/pgbouncer
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE_LINE="deb $MIRROR bookworm main"

die() { echo "fetch_pgbouncer: $*" >&2; exit 1; }
say() { echo "fetch_pgbouncer: $*" >&2; }
works() { "$1" --version >/dev/null 2>&1; }

if [ -n "${PGBOUNCER:-}" ]; then
    works "$PGBOUNCER" || die "PGBOUNCER=$PGBOUNCER does not run ($PGBOUNCER --version failed)"
    echo "$PGBOUNCER"; exit 0
fi
if p=$(command -v pgbouncer 2>/dev/null) && works "$p"; then echo "$p"; exit 0; fi

mkdir -p "$LOCAL"
# Serialise concurrent first uses (parallel test sessions); cheap when uncontended.
if command -v flock >/dev/null 2>&1; then
    exec 9>"$LOCAL/.pgbouncer.lock"
    flock -w 120 9 || die "another fetch_pgbouncer.sh is still running (lock $LOCAL/.pgbouncer.lock)"
fi
if [ -x "$WRAPPER" ] && works "$WRAPPER"; then echo "$WRAPPER"; exit 0; fi

command -v apt-get >/dev/null && command -v dpkg >/dev/null \
    || die "no pgbouncer on PATH and no apt-get/dpkg to fetch Debian's package (install pgbouncer, or set PGBOUNCER)"

mkdir -p "$APT_DIR/lists/partial" "$APT_DIR/cache/archives/partial" "$DEBS"
echo "$SUITE_LINE" >"$APT_DIR/sources.list"
apt_opts=(-o "Dir::Etc::SourceList=$APT_DIR/sources.list" -o Dir::Etc::SourceParts=/dev/null
    -o "Dir::State::Lists=$APT_DIR/lists" -o "Dir::Cache=$APT_DIR/cache"
    -o APT::Sandbox::User=root -o Acquire::Languages=none -o Acquire::Retries=1
    -o Acquire::http::Timeout=20)
: >"$LOG"
apt_update() {  # once per run; a mirror that cannot be reached is an error, not a warning
    [ -e "$tmp/.apt-updated" ] && return 0  # fetch_deb runs in a subshell: a file, not a variable
    say "apt-get update with a private state ($SUITE_LINE)"
    apt-get "${apt_opts[@]}" -q --error-on=any update >>"$LOG" 2>&1 \
        || die "private apt-get update failed: cannot reach $MIRROR? ($(grep -E '^(E|W):' "$LOG" | head -n1); full log $LOG)"
    touch "$tmp/.apt-updated"
}
fetch_deb() {  # fetch_deb PACKAGE: path of its .deb in $DEBS (downloaded on first use)
    local deb
    deb=$(ls "$DEBS/$1"_*.deb 2>/dev/null | head -n1 || true)
    if [ -z "$deb" ]; then
        apt_update
        (cd "$DEBS" && apt-get "${apt_opts[@]}" -q download "$1") >>"$LOG" 2>&1 \
            || die "apt-get download $1 failed ($(grep -E '^(E|W):' "$LOG" | tail -n1); full log $LOG)"
        deb=$(ls "$DEBS/$1"_*.deb 2>/dev/null | head -n1 || true)
        [ -n "$deb" ] || die "apt-get download $1 left no .deb in $DEBS"
    fi
    echo "$deb"
}
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }
lib_dirs() { find "$1" \( -name '*.so' -o -name '*.so.*' \) -printf '%h\n' 2>/dev/null | sort -u | paste -sd: -; }
missing_libs() {  # missing_libs ROOT BINARY
    LD_LIBRARY_PATH=$(lib_dirs "$1") ldd "$2" 2>/dev/null | awk '/not found/ {print $1}' | sort -u
}

tmp=$(mktemp -d "$LOCAL/.pgbouncer.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
deb=$(fetch_deb pgbouncer)
dpkg -x "$deb" "$tmp" || die "dpkg -x $deb failed"
real=$tmp/usr/sbin/pgbouncer
[ -x "$real" ] || die "no usr/sbin/pgbouncer inside $deb"

missing=$(missing_libs "$tmp" "$real")
if [ -n "$missing" ]; then
    # The library packages among pgbouncer's Depends that this machine lacks.
    for pkg in $(dpkg-deb -f "$deb" Depends | tr ',' '\n' | sed -E 's/[|(].*//; s/[[:space:]]//g' | grep '^lib'); do
        installed "$pkg" && continue
        say "fetching $pkg (pgbouncer needs $(echo $missing))"
        dep=$(fetch_deb "$pkg")
        dpkg -x "$dep" "$tmp" || die "dpkg -x $dep failed"
    done
    missing=$(missing_libs "$tmp" "$real")
    [ -z "$missing" ] || die "pgbouncer still misses shared libraries: $(echo $missing)"
fi

# The wrapper refers to the final location, so build it after the move.
rm -f "$tmp/.apt-updated"
rm -rf "$DEST"
mv "$tmp" "$DEST"
trap - EXIT
chmod 755 "$DEST"
mkdir -p "$DEST/bin"
libs=$(lib_dirs "$DEST")
{
    echo '#!/bin/sh'
    echo '# Written by scripts/fetch_pgbouncer.sh: Debian 12 pgbouncer unpacked here, with its missing libraries.'
    if [ -n "$libs" ]; then
        printf "LD_LIBRARY_PATH='%s'\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}\nexport LD_LIBRARY_PATH\n" "$libs"
    fi
    printf "exec '%s' \"\$@\"\n" "$DEST/usr/sbin/pgbouncer"
} >"$WRAPPER"
chmod 755 "$WRAPPER"
works "$WRAPPER" || die "$WRAPPER --version failed after unpacking"
say "$("$WRAPPER" --version | head -n1) in $DEST"
echo "$WRAPPER"
