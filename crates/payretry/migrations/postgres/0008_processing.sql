-- A session (and its attempt) whose checkout completed with a payment that settles later is
-- `processing` (SQLite rebuilds its table in its own 0008).
ALTER TABLE payment_sessions DROP CONSTRAINT payment_sessions_status_check;
ALTER TABLE payment_sessions ADD CONSTRAINT payment_sessions_status_check
    CHECK (status IN ('open', 'failed', 'retry_scheduled', 'processing', 'succeeded', 'expired'));
ALTER TABLE payment_attempts DROP CONSTRAINT payment_attempts_status_check;
ALTER TABLE payment_attempts ADD CONSTRAINT payment_attempts_status_check
    CHECK (status IN ('scheduled', 'open', 'processing', 'failed', 'succeeded', 'abandoned', 'dead_lettered'));
