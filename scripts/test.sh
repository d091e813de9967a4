#!/usr/bin/env bash
# The whole payretry test suite, from a fresh clone: formatting, lints, every test.
#
#   scripts/test.sh
#
# Builds go to CARGO_TARGET_DIR, by default a cache outside the clone
# ($HOME/.cache/payretry-target), so a fresh clone reuses earlier builds.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/payretry-target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-auto}"

started=$SECONDS

section() {
    printf '\n==> %s  [%ds]\n' "$1" "$((SECONDS - started))"
}

finish() {
    local status=${1:-$?}
    local elapsed=$((SECONDS - started))
    if [ "$status" -eq 0 ]; then
        printf '\n==> all checks passed in %dm%02ds\n' "$((elapsed / 60))" "$((elapsed % 60))"
    else
        printf '\n==> FAILED (exit %d) after %dm%02ds\n' "$status" "$((elapsed / 60))" "$((elapsed % 60))" >&2
    fi
}
trap finish EXIT

section "toolchain"
if ! command -v cargo >/dev/null 2>&1; then
    echo "cargo not found: install Rust from https://rustup.rs (rustup also provides rustfmt and clippy)" >&2
    exit 1
fi
cargo --version
rustc --version
echo "CARGO_TARGET_DIR=$CARGO_TARGET_DIR"
mkdir -p "$CARGO_TARGET_DIR"

# --- test services -----------------------------------------------------------------
# PostgreSQL must be running (the project's machines start it); the tests that need it
# fail loudly rather than skip. moto's SQS server comes from a Python venv kept outside
# the clone and is started here for the whole run.
section "PostgreSQL"
export PAYRETRY_TEST_POSTGRES_URL="${PAYRETRY_TEST_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
if ! psql "$PAYRETRY_TEST_POSTGRES_URL" -qAtc 'SELECT 1' >/dev/null 2>&1; then
    echo "PostgreSQL is not reachable at $PAYRETRY_TEST_POSTGRES_URL." >&2
    echo "Start it (e.g. pg_ctlcluster <version> main start) or set PAYRETRY_TEST_POSTGRES_URL." >&2
    exit 1
fi
echo "reachable: $PAYRETRY_TEST_POSTGRES_URL"

section "moto SQS server, reference checkers (standardwebhooks, openapi-spec-validator)"
venv="${PAYRETRY_VENV:-$HOME/.cache/payretry-venv}"
if [ ! -x "$venv/bin/moto_server" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check 'moto[server]'
fi
# Reference checkers the tests call: the Standard Webhooks library verifies every merchant
# event the tests receive, openapi-spec-validator checks /openapi.json.
if ! "$venv/bin/python" -c 'import standardwebhooks, openapi_spec_validator' 2>/dev/null; then
    "$venv/bin/pip" install --quiet --disable-pip-version-check standardwebhooks openapi-spec-validator
fi
export PAYRETRY_TEST_PYTHON="$venv/bin/python"
moto_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
# Through scripts/moto_sqs.py: moto with its message deletion and receipt made thread-safe.
"$venv/bin/python" scripts/moto_sqs.py -H 127.0.0.1 -p "$moto_port" >"${TMPDIR:-/tmp}/payretry-moto-$moto_port.log" 2>&1 &
moto_pid=$!
stop_services() { kill "$moto_pid" 2>/dev/null || true; }
trap 'rc=$?; stop_services; finish $rc' EXIT
for _ in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$moto_port") 2>/dev/null; then break; fi
    sleep 0.1
done
export PAYRETRY_TEST_SQS_ENDPOINT="http://127.0.0.1:$moto_port"
export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_REGION=us-east-1
echo "moto at $PAYRETRY_TEST_SQS_ENDPOINT (pid $moto_pid)"
# ------------------------------------------------------------------------------------

section "cargo fmt --all -- --check"
cargo fmt --all -- --check

section "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

if cargo nextest --version >/dev/null 2>&1; then
    section "cargo nextest run --workspace"
    # outage_postgres restarts the PostgreSQL server: it runs alone, below.
    cargo nextest run --workspace -E 'not binary(outage_postgres)'
    section "cargo test --workspace --doc"
    cargo test --workspace --doc
else
    section "cargo test --workspace"
    # Without nextest the tests of one binary share a process; the DogStatsD test needs the
    # process-wide metrics recorder to itself, so it runs alone after the rest.
    cargo test --workspace -- --skip payretry_recovers_from_a_postgresql_restart --skip dogstatsd::
    cargo test -p payretry --test integration -- dogstatsd::
fi

section "PostgreSQL restarted under load (alone: it restarts the server)"
cargo test -p payretry --test outage_postgres

section "crash points (feature failpoints)"
# The same binary, built with its crash points compiled in, killed at each of them.
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run -p payretry --features failpoints --test failpoints
else
    cargo test -p payretry --features failpoints --test failpoints
fi

section "schemathesis against /openapi.json (over 2 000 generated cases per token)"
SCHEMATHESIS_MAX_EXAMPLES="${SCHEMATHESIS_MAX_EXAMPLES:-250}" scripts/schemathesis.sh

section "webhook fuzz properties (stable smoke; scripts/fuzz.sh runs libFuzzer)"
FUZZ_SMOKE_CASES="${FUZZ_SMOKE_CASES:-20000}" cargo test --manifest-path fuzz/Cargo.toml

section "browser tests (headless Chromium)"
# Screenshots of a CI run go beside the build, not over the committed ones in docs/.
SCREENSHOT_DIR="${SCREENSHOT_DIR:-$CARGO_TARGET_DIR/screenshots}" tests/browser/run.sh
