#!/usr/bin/env bash
# Create .venv (Python 3.12+) and install the hashed lock files into it, only when
# they changed since the last successful install (stamp: .venv/.requirements.sha256):
#   pip install --require-hashes -r requirements.txt -r requirements-dev.txt
# Both files pin every package (transitive ones too) with sha256 hashes; they are generated
# from requirements*.in by scripts/lock.sh. The lock is resolved for Python 3.12 (what
# Render runs), so a 3.12 interpreter is preferred for a new venv: $PYTHON, python3.12,
# pyenv's 3.12.x, then any 3.12+ that scripts/find_python.sh finds.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

die() { echo "setup_venv: $*" >&2; exit 1; }

is_312() { [ -n "$1" ] && "$1" -c 'import sys; exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; }
find_python312() {  # print a Python 3.12 (the lock's version), if there is one
    local c root
    [ -n "${PYTHON:-}" ] && return 1  # an explicit $PYTHON is find_python.sh's to judge
    is_312 python3.12 && { python3.12 -c 'import sys; print(sys.executable)'; return 0; }
    root=$(pyenv root 2>/dev/null || echo "${PYENV_ROOT:-$HOME/.pyenv}")
    while IFS= read -r c; do
        is_312 "$c" && { echo "$c"; return 0; }
    done < <(ls -d "$root"/versions/3.12*/bin/python3.12 /usr/bin/python3.12 2>/dev/null | sort -rV)
    return 1
}

venv=.venv
stamp=$venv/.requirements.sha256

# 1. (Re)create the venv if missing or not 3.12+.
if ! "$venv/bin/python" -c 'import sys; exit(sys.version_info < (3, 12))' 2>/dev/null; then
    py=$(find_python312) || py=$(scripts/find_python.sh) || exit 1
    [ -e "$venv" ] && echo "setup_venv: recreating $venv (missing, broken or older than 3.12)"
    rm -rf "$venv"
    echo "setup_venv: creating $venv with $py"
    "$py" -m venv "$venv" || die "could not create $venv with $py"
fi

# 2. Install the lock files when their content changed (hash-checked: a file whose sha256
#    is not in the lock, or a package the lock does not pin, stops the install).
reqs=(requirements.txt requirements-dev.txt)
for f in "${reqs[@]}"; do
    [ -f "$f" ] || die "$f not found in $PWD"
    grep -q -- '--hash=sha256:' "$f" || die "$f has no hashes: regenerate it with scripts/lock.sh"
done
want=$(for f in "${reqs[@]}"; do echo "== $f"; cat "$f"; done | sha256sum | cut -d' ' -f1)
have=$(cat "$stamp" 2>/dev/null || true)
if [ "$want" != "$have" ]; then
    echo "setup_venv: installing ${reqs[*]} into $venv"
    args=()
    for f in "${reqs[@]}"; do args+=(-r "$f"); done
    set +e
    "$venv/bin/python" -m pip install -q --require-hashes "${args[@]}" 2>&1 \
        | grep -v -E "^WARNING: Location '.*' is ignored"
    rc=${PIPESTATUS[0]}
    set -e
    [ "$rc" -eq 0 ] || die "pip install failed (exit $rc)"
    echo "$want" >"$stamp"
    echo "setup_venv: done ($("$venv/bin/python" -V))"
fi
