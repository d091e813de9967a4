-- Double payments: a session already paid through one attempt's checkout was paid through
-- another's too (an old checkout completing late). One row per session and duplicate attempt,
-- written in the transaction that detected it; support lists them, and with
-- PAYRETRY_AUTO_REFUND_DUPLICATES the row is the durable promise of a refund
-- (`refund_requested`) until the provider's answer is recorded.
CREATE TABLE duplicate_payments (
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,
    session_id          TEXT NOT NULL REFERENCES payment_sessions (id),
    paid_attempt        INTEGER NOT NULL CHECK (paid_attempt >= 0),
    duplicate_attempt   INTEGER NOT NULL CHECK (duplicate_attempt >= 0),
    provider_session_id TEXT,
    payment_intent      TEXT,
    status              TEXT NOT NULL CHECK (status IN ('detected', 'refund_requested', 'refunded', 'refund_failed')),
    refund_id           TEXT,
    last_error          TEXT,
    detected_at         INTEGER NOT NULL,
    updated_at          INTEGER NOT NULL,
    UNIQUE (session_id, duplicate_attempt)
) STRICT;

-- The periodic refund retry looks only at owed refunds.
CREATE INDEX duplicate_payments_owed ON duplicate_payments (updated_at)
    WHERE status = 'refund_requested';
