-- Refunds settle asynchronously: the same change as migrations/sqlite/0007_refund_pending.sql.
ALTER TABLE duplicate_payments DROP CONSTRAINT duplicate_payments_status_check;
ALTER TABLE duplicate_payments ADD CONSTRAINT duplicate_payments_status_check
    CHECK (status IN ('detected', 'refund_requested', 'refund_pending', 'refunded', 'refund_failed'));
ALTER TABLE duplicate_payments
    ADD COLUMN refund_attempted_at BIGINT,
    ADD COLUMN failure_reason TEXT;

-- A refund event names the charge it refunds.
CREATE INDEX duplicate_payments_payment_intent ON duplicate_payments (payment_intent);
