#!/usr/bin/env bash
# Times the operator console's reads on PostgreSQL at scale: the retry funnel of
# GET /admin/stats/retries (since=24h and since=7d) and the pages of GET /admin/sessions.
#
#   scripts/funnel_bench.sh
#
# What it does:
#   1. builds the payretry binary if it is missing (`cargo build -p payretry`); set
#      FUNNEL_BENCH_BUILD=1 to rebuild it even when present (a binary older than migration
#      0014 is refused: its database lacks the indexes being measured);
#   2. creates a fresh database (FUNNEL_BENCH_DB, default payretry_funnel_bench) and applies
#      payretry's migrations to it with `payretry migrate`;
#   3. fills it with FUNNEL_BENCH_SESSIONS sessions (default 1 000 000) created over the 7
#      days before the last hour, each with its first attempt; about 40 % of them were declined and retried
#      1 to 3 times, every retry but the last failed and the last one paid, failed, open,
#      processing, scheduled, abandoned or dead-lettered; amounts in usd, eur and gbp;
#      then VACUUM ANALYZE;
#   4. runs each statement exactly as payretry's code holds it (read out of
#      crates/payretry/src/storage/reads.rs), prepared as sqlx prepares it, on a connection
#      with `enable_seqscan = off` as payretry's pool sets it, under
#      `EXPLAIN (ANALYZE, BUFFERS)`: once to warm the cache, then three times, and reports
#      the best execution time with the plan of that run. The funnel is timed with the plan
#      PostgreSQL makes for the bound values (the first five executions of a prepared
#      statement) and with the generic plan it may settle on afterwards;
#   5. drops the database (also when a step fails).
#
# Environment:
#   PAYRETRY_TEST_POSTGRES_URL  the server (default postgres://postgres@127.0.0.1:5432/postgres);
#                               its user must be allowed to create databases
#   CARGO_TARGET_DIR            where the binary lives (default: target)
#   FUNNEL_BENCH_DB             the database to create and drop
#   FUNNEL_BENCH_SESSIONS       how many sessions to generate
#   FUNNEL_BENCH_BUILD=1        rebuild the binary first
#   FUNNEL_BENCH_KEEP=1         keep the database afterwards (drop it yourself)
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
SERVER_URL=${PAYRETRY_TEST_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/postgres}
DB=${FUNNEL_BENCH_DB:-payretry_funnel_bench}
SESSIONS=${FUNNEL_BENCH_SESSIONS:-1000000}
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/debug/payretry
READS=$ROOT/crates/payretry/src/storage/reads.rs
DB_URL=${SERVER_URL%/*}/$DB

[[ $DB =~ ^[a-z_][a-z0-9_]*$ ]] || { echo "FUNNEL_BENCH_DB must be a plain name" >&2; exit 2; }
[[ $SESSIONS =~ ^[1-9][0-9]*$ ]] || { echo "FUNNEL_BENCH_SESSIONS must be a number" >&2; exit 2; }

psql_server() { psql "$SERVER_URL" -v ON_ERROR_STOP=1 -qAt "$@"; }
psql_db() { psql "$DB_URL" -v ON_ERROR_STOP=1 -qAt "$@"; }

drop_db() {
    if [[ ${FUNNEL_BENCH_KEEP:-0} == 1 ]]; then
        echo "kept database $DB"
        return
    fi
    psql_server -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)"
}

# The text of the Rust string constant `$1` in reads.rs (`const NAME: &str = "…";`).
statement() {
    local sql
    sql=$(awk -v name="$1" '
        index($0, "const " name ": &str = \"") {
            found = 1
            sub(".*const " name ": &str = \"", "")
        }
        found {
            if ($0 ~ /";$/) { sub(/";$/, ""); print; exit }
            print
        }' "$READS")
    [[ -n $sql ]] || { echo "no statement $1 in $READS" >&2; exit 1; }
    printf '%s\n' "$sql"
}

if [[ ! -x $BIN || ${FUNNEL_BENCH_BUILD:-0} == 1 ]]; then
    cargo build -p payretry
fi

psql_server -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)"
psql_server -c "CREATE DATABASE $DB"
trap drop_db EXIT

PAYRETRY_DATABASE_URL=$DB_URL "$BIN" migrate >/dev/null
if [[ $(psql_db -c "SELECT to_regclass('payment_attempts_retries_by_created') IS NOT NULL") != t ]]; then
    echo "$BIN predates migration 0014: rebuild it (FUNNEL_BENCH_BUILD=1)" >&2
    exit 1
fi
echo "migrated $DB"

NOW_MS=$(psql_db -c "SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint")
started=$(date +%s)
psql_db <<SQL
SELECT setseed(0.42);
-- One row per session: when it was created, what it costs, how many retries it had and where
-- the last one stands.
CREATE TEMP TABLE plan AS
SELECT g AS n,
       'ps_' || lpad(to_hex(g), 32, '0') AS id,
       'buyer_' || (1 + (random() * 200000)::int) AS buyer_id,
       $NOW_MS - 3600000 - (random() * (7 * 86400000 - 3600000))::bigint AS created_at,
       (500 + (random() * 19500)::int)::bigint AS amount,
       CASE WHEN r1 < 0.80 THEN 'usd' WHEN r1 < 0.95 THEN 'eur' ELSE 'gbp' END AS currency,
       CASE WHEN r2 >= 0.40 THEN 0 WHEN r3 < 0.60 THEN 1 WHEN r3 < 0.85 THEN 2 ELSE 3 END AS retries,
       CASE WHEN r4 < 0.50 THEN 'succeeded' WHEN r4 < 0.75 THEN 'failed'
            WHEN r4 < 0.85 THEN 'abandoned' WHEN r4 < 0.88 THEN 'dead_lettered'
            WHEN r4 < 0.96 THEN 'open' WHEN r4 < 0.98 THEN 'processing'
            ELSE 'scheduled' END AS last_status,
       r5 < 0.85 AS first_paid
FROM (SELECT g, random() AS r1, random() AS r2, random() AS r3, random() AS r4, random() AS r5
      FROM generate_series(1, $SESSIONS) AS g) AS draws;

INSERT INTO payment_sessions (id, buyer_id, status, amount, currency, description, metadata,
        failure_reason, retry_attempts, current_attempt, provider_session_id, checkout_url,
        paid_attempt, expires_at, created_at, updated_at)
SELECT id, buyer_id,
       CASE WHEN retries = 0 THEN CASE WHEN first_paid THEN 'succeeded' ELSE 'expired' END
            WHEN last_status = 'succeeded' THEN 'succeeded'
            WHEN last_status = 'processing' THEN 'processing'
            WHEN last_status = 'scheduled' THEN 'retry_scheduled'
            WHEN last_status = 'open' THEN 'open'
            WHEN last_status = 'abandoned' THEN 'expired'
            ELSE 'failed' END,
       amount, currency, 'Order ' || n, '{}',
       CASE WHEN retries > 0 AND last_status <> 'succeeded' THEN 'insufficient_funds' END,
       retries, retries, 'cs_' || n || '_' || retries, 'https://checkout.example/' || n,
       CASE WHEN retries = 0 AND first_paid THEN 0
            WHEN last_status = 'succeeded' THEN retries END,
       created_at + 86400000, created_at, created_at + 60000 * (1 + 20 * retries)
FROM plan;

-- The first checkout of every session.
INSERT INTO payment_attempts (session_id, attempt_number, status, provider_session_id,
        failure_reason, created_at, updated_at)
SELECT id, 0, CASE WHEN retries = 0 AND first_paid THEN 'succeeded' ELSE 'failed' END,
       'cs_' || n || '_0',
       CASE WHEN retries > 0 OR NOT first_paid THEN 'insufficient_funds' END,
       created_at, created_at + 60000
FROM plan;

-- The retries: attempt k accepted 20 minutes after the one before failed.
INSERT INTO payment_attempts (session_id, attempt_number, status, provider_session_id,
        failure_reason, scheduled_for, created_at, updated_at)
SELECT id, k, status,
       CASE WHEN status NOT IN ('scheduled', 'abandoned', 'dead_lettered') THEN 'cs_' || n || '_' || k END,
       CASE WHEN status = 'failed' THEN 'insufficient_funds' END,
       at + 60000 * k, at, at + 60000
FROM (SELECT p.n, p.id, k, p.created_at + 1200000 * k AS at,
             CASE WHEN k < p.retries THEN 'failed' ELSE p.last_status END AS status
      FROM plan AS p, generate_series(1, p.retries) AS k) AS retries;

VACUUM ANALYZE payment_sessions;
VACUUM ANALYZE payment_attempts;
SQL
echo "generated in $(( $(date +%s) - started )) s:"
psql_db -F ' ' <<'SQL'
SELECT 'sessions', count(*) FROM payment_sessions;
SELECT 'attempts (retries)', count(*), count(*) FILTER (WHERE attempt_number > 0) FROM payment_attempts;
SELECT 'retries by status', string_agg(status || '=' || c, ' ' ORDER BY status)
FROM (SELECT status, count(*) AS c FROM payment_attempts WHERE attempt_number > 0 GROUP BY status) AS s;
SELECT 'sizes', pg_size_pretty(pg_total_relation_size('payment_sessions')) AS sessions,
       pg_size_pretty(pg_total_relation_size('payment_attempts')) AS attempts;
SQL

# EXPLAIN (ANALYZE, BUFFERS) of `execute` after `prepare`, four times on one connection
# (the first warms the cache); prints the best execution time and that run's plan.
explain() {
    local label=$1 setup=$2 prepare=$3 execute=$4 out best_ms=
    out=$(psql_db <<SQL
SET enable_seqscan = off;
$setup
$prepare
\\echo ==run
EXPLAIN (ANALYZE, BUFFERS) $execute;
\\echo ==run
EXPLAIN (ANALYZE, BUFFERS) $execute;
\\echo ==run
EXPLAIN (ANALYZE, BUFFERS) $execute;
\\echo ==run
EXPLAIN (ANALYZE, BUFFERS) $execute;
SQL
)
    best_ms=$(printf '%s\n' "$out" | awk '
        /^==run/ { run++ }
        /Execution Time:/ && run > 1 { ms = $3; if (best == "" || ms + 0 < best + 0) { best = ms; bestrun = run } }
        END { print best " " bestrun }')
    local ms=${best_ms% *} run=${best_ms#* }
    echo
    echo "=== $label: best of 3 (warm) $ms ms"
    printf '%s\n' "$out" | awk -v want="$run" '/^==run/ { run++; next } run == want'
}

FUNNEL=$(statement RETRY_FUNNEL)
DAY=$((NOW_MS - 86400000))
WEEK=$((NOW_MS - 7 * 86400000))
PREPARE_FUNNEL="PREPARE funnel(bigint, bigint) AS $FUNNEL;"
for mode in custom generic; do
    if [[ $mode == custom ]]; then
        setup="SET plan_cache_mode = force_custom_plan;"
    else
        setup="SET plan_cache_mode = force_generic_plan;"
    fi
    explain "funnel since=24h ($mode plan)" "$setup" "$PREPARE_FUNNEL" "EXECUTE funnel($DAY, $NOW_MS)"
    explain "funnel since=7d ($mode plan)" "$setup" "$PREPARE_FUNNEL" "EXECUTE funnel($WEEK, $NOW_MS)"
done

# The session list: a first page of 50 and a page deep in the list, for each statement.
ALL=$(statement ALL)
BY_STATUS=$(statement BY_STATUS)
BY_BUYER=$(statement BY_BUYER)
HALF=$((SESSIONS / 2))
MIDDLE=$(psql_db -F ' ' -c "SELECT created_at, id FROM payment_sessions ORDER BY created_at DESC, id DESC OFFSET $HALF LIMIT 1")
MID_AT=${MIDDLE% *}
MID_ID=${MIDDLE#* }
BUYER=$(psql_db -c "SELECT buyer_id FROM payment_sessions ORDER BY created_at DESC, id DESC LIMIT 1")
explain "sessions, all, first page" "" "PREPARE page(bigint, text, bigint) AS $ALL;" \
    "EXECUTE page(9223372036854775807, '', 51)"
explain "sessions, all, page after $HALF rows" "" "PREPARE page(bigint, text, bigint) AS $ALL;" \
    "EXECUTE page($MID_AT, '$MID_ID', 51)"
explain "sessions, status=processing, first page" "" \
    "PREPARE page(bigint, text, bigint, text) AS $BY_STATUS;" \
    "EXECUTE page(9223372036854775807, '', 51, 'processing')"
explain "sessions, status=failed, page below the same key" "" \
    "PREPARE page(bigint, text, bigint, text) AS $BY_STATUS;" \
    "EXECUTE page($MID_AT, '$MID_ID', 51, 'failed')"
explain "sessions, buyer=$BUYER and status=failed" "" \
    "PREPARE page(bigint, text, bigint, text, text) AS $BY_BUYER;" \
    "EXECUTE page(9223372036854775807, '', 51, '$BUYER', 'failed')"
