#!/usr/bin/env bash
# Browser tests of the buyer's /pay page, the sandbox checkout and the operator console
# (/admin), in headless Chromium, driven by playwright-core (no browser download: Debian's
# chromium is used), with axe-core checking accessibility in the console.
#
#   tests/browser/run.sh
#
# Honours CARGO_TARGET_DIR and PAYRETRY_BIN (the binary under test), CHROMIUM (default
# /usr/bin/chromium) and SCREENSHOT_DIR (default docs/screenshots).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo_root="$(cd "$here/../.." && pwd)"
cd "$repo_root"

chromium="${CHROMIUM:-/usr/bin/chromium}"
if [ ! -x "$chromium" ]; then
    echo "browser tests: $chromium missing; installing Debian's chromium" >&2
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "browser tests: FAILED: no apt-get to install chromium; set CHROMIUM to a Chromium binary" >&2
        exit 1
    fi
    sudo_cmd=()
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1; then sudo_cmd=(sudo); else
            echo "browser tests: FAILED: not root and no sudo, cannot apt-get install chromium" >&2
            exit 1
        fi
    fi
    export DEBIAN_FRONTEND=noninteractive
    if ! { "${sudo_cmd[@]}" apt-get update -q && "${sudo_cmd[@]}" apt-get install -y -q chromium chromium-driver; }; then
        echo "browser tests: FAILED: apt-get install chromium failed" >&2
        exit 1
    fi
    if [ ! -x "$chromium" ]; then
        echo "browser tests: FAILED: chromium installed but $chromium is still missing" >&2
        exit 1
    fi
fi
"$chromium" --version

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    echo "browser tests: FAILED: node and npm are required (Node >= 20)" >&2
    exit 1
fi
node_major="$(node -p 'process.versions.node.split(".")[0]')"
if [ "$node_major" -lt 20 ]; then
    echo "browser tests: FAILED: Node >= 20 required, found $(node --version)" >&2
    exit 1
fi

(
    cd "$here"
    if [ -f package-lock.json ]; then
        npm ci --no-audit --no-fund
    else
        npm install --no-audit --no-fund
    fi
)

if [ -n "${PAYRETRY_BIN:-}" ]; then
    case "$PAYRETRY_BIN" in /*) bin="$PAYRETRY_BIN" ;; *) bin="$repo_root/$PAYRETRY_BIN" ;; esac
    if [ ! -x "$bin" ]; then
        echo "browser tests: FAILED: PAYRETRY_BIN=$PAYRETRY_BIN is not an executable" >&2
        exit 1
    fi
else
    # Cargo decides whether anything needs rebuilding; a no-op when the binary is fresh.
    cargo build -p payretry --bin payretry
fi

export CHROMIUM="$chromium"
exec node --test --test-concurrency=1 --test-reporter=spec "$here/story.spec.mjs" "$here/console.spec.mjs"
