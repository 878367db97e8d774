#!/usr/bin/env bash
# The chart page's one front-end package (lightweight-charts, pinned in web/package-lock.json
# with its integrity hash) into web/node_modules, from the npm registry, when the lock
# changed since the last install (stamp: web/node_modules/.lock.sha256). The page is
# served by `python feed_v4_main.py web`; nothing is fetched from a CDN at run time.
#   scripts/setup_web.sh            npm ci when needed
#   scripts/setup_web.sh browser    also make sure Debian's Chromium is installed (the
#                                   page's browser tests and bench/web_bench.py drive it)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

die() { echo "setup_web: $*" >&2; exit 1; }

stamp=web/node_modules/.lock.sha256
want=$(sha256sum web/package-lock.json | cut -d' ' -f1)
if [ "$want" != "$(cat "$stamp" 2>/dev/null || true)" ]; then
    command -v npm >/dev/null || die "npm not found: install Node.js 18+ (Debian: apt-get install nodejs npm)"
    echo "setup_web: npm ci in web/ (lightweight-charts)"
    npm ci --prefix web --omit=dev --no-audit --no-fund --loglevel=error
    echo "$want" >"$stamp"
fi

if [ "${1:-}" = browser ]; then
    browser=${CHROMIUM:-/usr/bin/chromium}
    if [ ! -x "$browser" ]; then
        [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null \
            || die "$browser not found: install Debian's chromium package (apt-get install chromium) or set CHROMIUM"
        echo "setup_web: installing Debian's chromium (for the browser tests)"
        apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 \
            || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends chromium >/dev/null; } \
            || die "apt-get install chromium failed"
    fi
fi
