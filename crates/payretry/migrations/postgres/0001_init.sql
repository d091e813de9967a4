-- payretry schema for PostgreSQL: the same tables as migrations/sqlite/0001_init.sql.
-- Every timestamp is BIGINT milliseconds since the epoch (UTC) and every integer is BIGINT,
-- so the Rust code reads exactly the values (i64) it reads from SQLite. JSON (metadata,
-- audit details, job payloads) is stored as TEXT for the same reason: it round-trips the
-- serialised text unchanged.

CREATE TABLE payment_sessions (
    id                  TEXT PRIMARY KEY,
    buyer_id            TEXT NOT NULL,
    status              TEXT NOT NULL CHECK (status IN ('open', 'failed', 'retry_scheduled', 'succeeded', 'expired')),
    amount              BIGINT NOT NULL CHECK (amount > 0),
    currency            TEXT NOT NULL,
    description         TEXT NOT NULL,
    metadata            TEXT NOT NULL,
    failure_reason      TEXT,
    retry_attempts      BIGINT NOT NULL DEFAULT 0 CHECK (retry_attempts >= 0),
    last_retry_at       BIGINT,
    retry_reason        TEXT,
    next_retry_at       BIGINT,
    current_attempt     BIGINT NOT NULL DEFAULT 0 CHECK (current_attempt >= 0),
    provider_session_id TEXT,
    checkout_url        TEXT,
    paid_attempt        BIGINT CHECK (paid_attempt >= 0),
    expires_at          BIGINT NOT NULL,
    created_at          BIGINT NOT NULL,
    updated_at          BIGINT NOT NULL,
    version             BIGINT NOT NULL DEFAULT 0
);

-- The window sweeper looks only at live sessions.
CREATE INDEX payment_sessions_live_by_expiry ON payment_sessions (expires_at)
    WHERE status IN ('open', 'failed', 'retry_scheduled');

CREATE TABLE payment_attempts (
    session_id          TEXT NOT NULL REFERENCES payment_sessions (id),
    attempt_number      BIGINT NOT NULL CHECK (attempt_number >= 0),
    status              TEXT NOT NULL CHECK (status IN ('scheduled', 'open', 'failed', 'succeeded', 'abandoned', 'dead_lettered')),
    provider_session_id TEXT,
    failure_reason      TEXT,
    scheduled_for       BIGINT,
    created_at          BIGINT NOT NULL,
    updated_at          BIGINT NOT NULL,
    PRIMARY KEY (session_id, attempt_number)
);

CREATE TABLE audit_log (
    id             BIGSERIAL PRIMARY KEY,
    session_id     TEXT NOT NULL,
    at             BIGINT NOT NULL,
    action         TEXT NOT NULL,
    attempt_number BIGINT CHECK (attempt_number >= 0),
    actor          TEXT NOT NULL,
    details        TEXT NOT NULL
);

CREATE INDEX audit_log_by_session ON audit_log (session_id, id);

CREATE TABLE idempotency_keys (
    caller          TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    fingerprint     TEXT NOT NULL,
    response_status BIGINT CHECK (response_status BETWEEN 100 AND 999),
    response_body   BYTEA,
    locked_at       BIGINT NOT NULL,
    created_at      BIGINT NOT NULL,
    PRIMARY KEY (caller, idempotency_key)
);

CREATE TABLE processed_webhook_events (
    event_id     TEXT PRIMARY KEY,
    processed_at BIGINT NOT NULL
);

-- The outbox. With the embedded queue it is the queue itself.
CREATE TABLE retry_jobs (
    id             BIGSERIAL PRIMARY KEY,
    session_id     TEXT NOT NULL,
    attempt_number BIGINT NOT NULL CHECK (attempt_number >= 0),
    payload        TEXT NOT NULL,
    run_at         BIGINT NOT NULL,
    locked_until   BIGINT,
    receive_count  BIGINT NOT NULL DEFAULT 0 CHECK (receive_count >= 0),
    last_error     TEXT,
    created_at     BIGINT NOT NULL
);

-- Due jobs: receive() scans by run_at, next_due() takes the minimum.
CREATE INDEX retry_jobs_by_run_at ON retry_jobs (run_at);

-- Every job row is inserted, updated at least once per delivery (the lease) and deleted
-- within minutes, so the table is mostly dead tuples between default autovacuum runs (which
-- wait for 20 % of the table to be dead). Dead tuples slow the claim query, which must step
-- over them in the run_at index. Vacuum after 1 % (or 50 rows) instead, unthrottled (the
-- live table is small, so a vacuum is short), and leave 30 % of each page free so the lease
-- updates, which touch no indexed column, stay HOT (same page, no index write).
ALTER TABLE retry_jobs SET (
    autovacuum_vacuum_scale_factor = 0.01,
    autovacuum_vacuum_threshold = 50,
    autovacuum_analyze_scale_factor = 0.02,
    autovacuum_vacuum_cost_delay = 0,
    fillfactor = 70
);

CREATE TABLE dead_letters (
    id             BIGSERIAL PRIMARY KEY,
    session_id     TEXT NOT NULL,
    attempt_number BIGINT NOT NULL CHECK (attempt_number >= 0),
    payload        TEXT NOT NULL,
    receive_count  BIGINT NOT NULL CHECK (receive_count >= 0),
    last_error     TEXT NOT NULL,
    dead_at        BIGINT NOT NULL
);

CREATE TABLE service_secrets (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE sandbox_checkouts (
    id             TEXT PRIMARY KEY,
    session_id     TEXT NOT NULL,
    attempt_number BIGINT NOT NULL CHECK (attempt_number >= 0),
    amount         BIGINT NOT NULL,
    currency       TEXT NOT NULL,
    description    TEXT NOT NULL,
    success_url    TEXT NOT NULL,
    cancel_url     TEXT NOT NULL,
    expires_at     BIGINT NOT NULL,
    status         TEXT NOT NULL CHECK (status IN ('open', 'paid', 'expired')),
    created_at     BIGINT NOT NULL
);
