-- Refunds of double payments settle asynchronously at the provider, and the refund call is
-- made by a background runner rather than inside the webhook request:
-- - `refund_pending`: the provider took the refund (Stripe `pending` / `requires_action`) and
--   reports its outcome later by webhook; `refund_id` is set.
-- - `refund_attempted_at`: when a process last claimed the owed refund's provider call, so
--   two processes do not send it at once (NULL: never tried yet, due at once).
-- - `failure_reason`: the provider's reason when a refund failed (Stripe `failure_reason`).
-- SQLite cannot change a CHECK constraint in place, so the table is rebuilt.
CREATE TABLE duplicate_payments_next (
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,
    session_id          TEXT NOT NULL REFERENCES payment_sessions (id),
    paid_attempt        INTEGER NOT NULL CHECK (paid_attempt >= 0),
    duplicate_attempt   INTEGER NOT NULL CHECK (duplicate_attempt >= 0),
    provider_session_id TEXT,
    payment_intent      TEXT,
    status              TEXT NOT NULL CHECK (status IN ('detected', 'refund_requested', 'refund_pending', 'refunded', 'refund_failed')),
    refund_id           TEXT,
    last_error          TEXT,
    detected_at         INTEGER NOT NULL,
    updated_at          INTEGER NOT NULL,
    refund_attempted_at INTEGER,
    failure_reason      TEXT,
    UNIQUE (session_id, duplicate_attempt)
) STRICT;

INSERT INTO duplicate_payments_next (id, session_id, paid_attempt, duplicate_attempt,
        provider_session_id, payment_intent, status, refund_id, last_error, detected_at,
        updated_at)
    SELECT id, session_id, paid_attempt, duplicate_attempt, provider_session_id,
        payment_intent, status, refund_id, last_error, detected_at, updated_at
    FROM duplicate_payments;

DROP TABLE duplicate_payments;
ALTER TABLE duplicate_payments_next RENAME TO duplicate_payments;

-- The refund runner looks only at owed refunds.
CREATE INDEX duplicate_payments_owed ON duplicate_payments (updated_at)
    WHERE status = 'refund_requested';
-- A refund event names the charge it refunds.
CREATE INDEX duplicate_payments_payment_intent ON duplicate_payments (payment_intent);
