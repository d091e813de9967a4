-- Double payments: the same table as migrations/sqlite/0003_duplicate_payments.sql.
CREATE TABLE duplicate_payments (
    id                  BIGSERIAL PRIMARY KEY,
    session_id          TEXT NOT NULL REFERENCES payment_sessions (id),
    paid_attempt        BIGINT NOT NULL CHECK (paid_attempt >= 0),
    duplicate_attempt   BIGINT NOT NULL CHECK (duplicate_attempt >= 0),
    provider_session_id TEXT,
    payment_intent      TEXT,
    status              TEXT NOT NULL CHECK (status IN ('detected', 'refund_requested', 'refunded', 'refund_failed')),
    refund_id           TEXT,
    last_error          TEXT,
    detected_at         BIGINT NOT NULL,
    updated_at          BIGINT NOT NULL,
    UNIQUE (session_id, duplicate_attempt)
);

-- The periodic refund retry looks only at owed refunds.
CREATE INDEX duplicate_payments_owed ON duplicate_payments (updated_at)
    WHERE status = 'refund_requested';

-- The sandbox provider can now refund a paid checkout (SQLite's column has no CHECK).
ALTER TABLE sandbox_checkouts DROP CONSTRAINT sandbox_checkouts_status_check;
ALTER TABLE sandbox_checkouts ADD CONSTRAINT sandbox_checkouts_status_check
    CHECK (status IN ('open', 'paid', 'expired', 'refunded'));
