#!/usr/bin/env bash
# Create .venv (Python 3.12+) and install requirements*.txt into it, only when
# they changed since the last successful install (stamp: .venv/.requirements.sha256).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

die() { echo "setup_venv: $*" >&2; exit 1; }

venv=.venv
stamp=$venv/.requirements.sha256

# 1. (Re)create the venv if missing or not 3.12+.
if ! "$venv/bin/python" -c 'import sys; exit(sys.version_info < (3, 12))' 2>/dev/null; then
    py=$(scripts/find_python.sh) || exit 1
    [ -e "$venv" ] && echo "setup_venv: recreating $venv (missing, broken or older than 3.12)"
    rm -rf "$venv"
    echo "setup_venv: creating $venv with $py"
    "$py" -m venv "$venv" || die "could not create $venv with $py"
fi

# 2. Install requirements when their content changed.
[ -f requirements.txt ] || die "requirements.txt not found in $PWD"
reqs=(requirements.txt)
[ -f requirements-dev.txt ] && reqs+=(requirements-dev.txt)
want=$(for f in "${reqs[@]}"; do echo "== $f"; cat "$f"; done | sha256sum | cut -d' ' -f1)
have=$(cat "$stamp" 2>/dev/null || true)
if [ "$want" != "$have" ]; then
    echo "setup_venv: installing ${reqs[*]} into $venv"
    args=()
    for f in "${reqs[@]}"; do args+=(-r "$f"); done
    set +e
    "$venv/bin/python" -m pip install -q "${args[@]}" 2>&1 \
        | grep -v -E "^WARNING: Location '.*' is ignored"
    rc=${PIPESTATUS[0]}
    set -e
    [ "$rc" -eq 0 ] || die "pip install failed (exit $rc)"
    echo "$want" >"$stamp"
    echo "setup_venv: done ($("$venv/bin/python" -V))"
fi
