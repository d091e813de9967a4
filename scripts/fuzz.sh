#!/usr/bin/env bash
# Coverage-guided fuzzing of the webhook edge with cargo-fuzz (libFuzzer).
#
#   scripts/fuzz.sh              # CI form: 30 s per target
#   scripts/fuzz.sh --long       # long form: 30 min per target
#   scripts/fuzz.sh 600          # N seconds per target
#   scripts/fuzz.sh --smoke      # stable only: the same checks as a plain cargo test
#
# Targets are those of fuzz/ (`cargo fuzz list`): today `webhook`, which feeds arbitrary
# headers, payloads, secrets and clocks to payretry::webhook::signature::verify and
# arbitrary bodies to payretry::webhook::event::parse (see fuzz/src/lib.rs for the
# properties). The corpus is kept in fuzz/corpus/<target> (git-ignored) and grows across
# runs; a crash is saved in fuzz/artifacts/<target>/ and makes this script exit non-zero.
# Reproduce one with: cargo +nightly fuzz run webhook fuzz/artifacts/webhook/<file>
#
# Needs a nightly toolchain (`rustup toolchain list`) and cargo-fuzz (installed from
# crates.io if missing). Without nightly it falls back to --smoke and says so.
# FUZZ_SMOKE_CASES sets the number of pseudo-random inputs of the smoke test (default 50000).
set -euo pipefail

cd "$(dirname "$0")/.."

SECONDS_PER_TARGET=30
SMOKE=0
case "${1:-}" in
    "") ;;
    --long) SECONDS_PER_TARGET=1800 ;;
    --smoke) SMOKE=1 ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *)
        if [[ "$1" =~ ^[0-9]+$ && "$1" -gt 0 ]]; then
            SECONDS_PER_TARGET=$1
        else
            echo "fuzz.sh: expected --long, --smoke or a number of seconds, got $1" >&2
            exit 2
        fi
        ;;
esac

log() { printf '[fuzz.sh] %s\n' "$*" >&2; }

smoke() {
    log "stable smoke: cargo test --release --manifest-path fuzz/Cargo.toml"
    cargo test --release --manifest-path fuzz/Cargo.toml
}

if [[ $SMOKE == 1 ]]; then
    smoke
    exit 0
fi

if ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    log "no nightly toolchain: cargo fuzz cannot run here; running the stable smoke instead"
    smoke
    exit 0
fi

if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    log "installing cargo-fuzz from crates.io"
    cargo install --locked cargo-fuzz
fi

TARGETS=$(cargo +nightly fuzz list)
log "targets: $(echo "$TARGETS" | tr '\n' ' ')(${SECONDS_PER_TARGET}s each)"

FAILED=0
for target in $TARGETS; do
    mkdir -p "fuzz/corpus/$target"
    log "fuzzing $target for ${SECONDS_PER_TARGET}s"
    # -rss_limit_mb: the target allocates little; a blow-up is a finding.
    # -max_len: header (8 KiB limit) + payload; libFuzzer's default 4096 is too short.
    set +e
    cargo +nightly fuzz run "$target" "fuzz/corpus/$target" -- \
        -max_total_time="$SECONDS_PER_TARGET" \
        -max_len=16384 \
        -rss_limit_mb=2048 \
        -timeout=10 \
        -print_final_stats=1 2>&1 | tee "fuzz/$target.log" |
        grep -E '^(#[0-9]+\s+DONE|stat::|==[0-9]+==|Done [0-9]+ runs)|panicked|SUMMARY|artifact'
    rc=${PIPESTATUS[0]}
    set -e
    if [[ $rc -ne 0 ]]; then
        log "$target FAILED (exit $rc); last lines of fuzz/$target.log:"
        tail -n 40 "fuzz/$target.log" >&2
        FAILED=1
    else
        log "$target: no crash in ${SECONDS_PER_TARGET}s (log: fuzz/$target.log)"
    fi
done
exit $FAILED
