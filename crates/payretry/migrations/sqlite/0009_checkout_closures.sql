-- Provider checkouts that must be closed (superseded by a newer attempt's, left payable after
-- a payment, or past the window), written in the transaction that made them unwanted and
-- retried until the provider says they are closed.
CREATE TABLE checkout_closures (
    provider_session_id TEXT PRIMARY KEY,
    session_id          TEXT NOT NULL,
    run_at              INTEGER NOT NULL,
    tries               INTEGER NOT NULL DEFAULT 0,
    last_error          TEXT,
    created_at          INTEGER NOT NULL
);
CREATE INDEX checkout_closures_due ON checkout_closures (run_at);
