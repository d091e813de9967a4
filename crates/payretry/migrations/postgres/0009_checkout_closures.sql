-- Provider checkouts that must be closed (superseded by a newer attempt's, left payable after
-- a payment, or past the window), written in the transaction that made them unwanted and
-- retried until the provider says they are closed.
CREATE TABLE checkout_closures (
    provider_session_id TEXT PRIMARY KEY,
    session_id          TEXT NOT NULL,
    run_at              BIGINT NOT NULL,
    tries               BIGINT NOT NULL DEFAULT 0 CHECK (tries >= 0),
    last_error          TEXT,
    created_at          BIGINT NOT NULL
);
CREATE INDEX checkout_closures_due ON checkout_closures (run_at);
