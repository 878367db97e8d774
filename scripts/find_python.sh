#!/usr/bin/env bash
# Print the path of a Python >= 3.12 interpreter (its real sys.executable).
# Search order: $PYTHON, python3.13, python3.12 on PATH, pyenv versions
# (newest first), /usr/bin/python3.1[2-9]. Exit 1 with one line on stderr if none.
set -uo pipefail

check='import sys; print(sys.executable) if sys.version_info >= (3, 12) else exit(1)'

try() {  # try CMD: print its sys.executable and exit 0 if it is 3.12+
    local out
    [ -n "$1" ] || return 1
    out=$("$1" -c "$check" 2>/dev/null) || return 1
    [ -n "$out" ] || return 1
    printf '%s\n' "$out"
    exit 0
}

if [ -n "${PYTHON:-}" ]; then
    try "$PYTHON"
    echo "find_python: ignoring PYTHON=$PYTHON (not a working Python 3.12+)" >&2
fi
for name in python3.13 python3.12; do
    command -v "$name" >/dev/null 2>&1 && try "$name"
done

root=
if command -v pyenv >/dev/null 2>&1; then
    root=$(pyenv root 2>/dev/null)
fi
[ -n "$root" ] || root=${PYENV_ROOT:-$HOME/.pyenv}
if [ -d "$root/versions" ]; then
    # newest first (version sort), only 3.12+ CPython builds
    while IFS= read -r py; do
        try "$py"
    done < <(ls -d "$root"/versions/3.1[2-9]*/bin/python3 2>/dev/null | sort -rV)
fi

while IFS= read -r py; do
    try "$py"
done < <(ls -d /usr/bin/python3.1[2-9] 2>/dev/null | sort -rV)

echo "no Python 3.12+ found: install python3.12 (or set PYTHON=/path/to/python3.12)" >&2
exit 1
