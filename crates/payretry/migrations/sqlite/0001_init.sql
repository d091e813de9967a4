-- payretry schema for SQLite. Every timestamp is INTEGER milliseconds since the epoch (UTC).

CREATE TABLE payment_sessions (
    id                  TEXT PRIMARY KEY,
    buyer_id            TEXT NOT NULL,
    status              TEXT NOT NULL CHECK (status IN ('open', 'failed', 'retry_scheduled', 'succeeded', 'expired')),
    amount              INTEGER NOT NULL CHECK (amount > 0),
    currency            TEXT NOT NULL,
    description         TEXT NOT NULL,
    metadata            TEXT NOT NULL,
    failure_reason      TEXT,
    retry_attempts      INTEGER NOT NULL DEFAULT 0 CHECK (retry_attempts >= 0),
    last_retry_at       INTEGER,
    retry_reason        TEXT,
    next_retry_at       INTEGER,
    current_attempt     INTEGER NOT NULL DEFAULT 0,
    provider_session_id TEXT,
    checkout_url        TEXT,
    paid_attempt        INTEGER,
    expires_at          INTEGER NOT NULL,
    created_at          INTEGER NOT NULL,
    updated_at          INTEGER NOT NULL,
    version             INTEGER NOT NULL DEFAULT 0
) STRICT;

-- The window sweeper looks only at live sessions.
CREATE INDEX payment_sessions_live_by_expiry ON payment_sessions (expires_at)
    WHERE status IN ('open', 'failed', 'retry_scheduled');

CREATE TABLE payment_attempts (
    session_id          TEXT NOT NULL REFERENCES payment_sessions (id),
    attempt_number      INTEGER NOT NULL,
    status              TEXT NOT NULL,
    provider_session_id TEXT,
    failure_reason      TEXT,
    scheduled_for       INTEGER,
    created_at          INTEGER NOT NULL,
    updated_at          INTEGER NOT NULL,
    PRIMARY KEY (session_id, attempt_number)
) STRICT;

CREATE TABLE audit_log (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    session_id     TEXT NOT NULL,
    at             INTEGER NOT NULL,
    action         TEXT NOT NULL,
    attempt_number INTEGER,
    actor          TEXT NOT NULL,
    details        TEXT NOT NULL
) STRICT;

CREATE INDEX audit_log_by_session ON audit_log (session_id, id);

CREATE TABLE idempotency_keys (
    caller          TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    fingerprint     TEXT NOT NULL,
    response_status INTEGER,
    response_body   BLOB,
    locked_at       INTEGER NOT NULL,
    created_at      INTEGER NOT NULL,
    PRIMARY KEY (caller, idempotency_key)
) STRICT;

CREATE TABLE processed_webhook_events (
    event_id     TEXT PRIMARY KEY,
    processed_at INTEGER NOT NULL
) STRICT;

-- The outbox. With the embedded queue it is the queue itself.
CREATE TABLE retry_jobs (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    session_id     TEXT NOT NULL,
    attempt_number INTEGER NOT NULL,
    payload        TEXT NOT NULL,
    run_at         INTEGER NOT NULL,
    locked_until   INTEGER,
    receive_count  INTEGER NOT NULL DEFAULT 0,
    last_error     TEXT,
    created_at     INTEGER NOT NULL
) STRICT;

CREATE INDEX retry_jobs_by_run_at ON retry_jobs (run_at);

CREATE TABLE dead_letters (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    session_id     TEXT NOT NULL,
    attempt_number INTEGER NOT NULL,
    payload        TEXT NOT NULL,
    receive_count  INTEGER NOT NULL,
    last_error     TEXT NOT NULL,
    dead_at        INTEGER NOT NULL
) STRICT;

CREATE TABLE service_secrets (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
) STRICT;

CREATE TABLE sandbox_checkouts (
    id             TEXT PRIMARY KEY,
    session_id     TEXT NOT NULL,
    attempt_number INTEGER NOT NULL,
    amount         INTEGER NOT NULL,
    currency       TEXT NOT NULL,
    description    TEXT NOT NULL,
    success_url    TEXT NOT NULL,
    cancel_url     TEXT NOT NULL,
    expires_at     INTEGER NOT NULL,
    status         TEXT NOT NULL,
    created_at     INTEGER NOT NULL
) STRICT;
