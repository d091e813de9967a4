-- no-transaction
-- A session whose checkout completed with a payment that settles later is `processing`.
-- SQLite cannot change a CHECK constraint in place, so the table is rebuilt as SQLite
-- documents (lang_altertable.html, "other kinds of table schema changes"): foreign keys off
-- while the parent table is swapped, checked before the commit, on again after it.
PRAGMA foreign_keys = OFF;
BEGIN IMMEDIATE;
CREATE TABLE payment_sessions_rebuilt (
    id                  TEXT PRIMARY KEY,
    buyer_id            TEXT NOT NULL,
    status              TEXT NOT NULL CHECK (status IN ('open', 'failed', 'retry_scheduled', 'processing', 'succeeded', 'expired')),
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
INSERT INTO payment_sessions_rebuilt SELECT * FROM payment_sessions;
DROP TABLE payment_sessions;
ALTER TABLE payment_sessions_rebuilt RENAME TO payment_sessions;
-- The window sweeper looks only at live sessions (a processing one waits for its outcome).
CREATE INDEX payment_sessions_live_by_expiry ON payment_sessions (expires_at)
    WHERE status IN ('open', 'failed', 'retry_scheduled');
PRAGMA foreign_key_check;
COMMIT;
PRAGMA foreign_keys = ON;
