-- Merchant events (DESIGN.md §6b): one row per event, written in the transaction of the state
-- change it announces, delivered by the webhook relay and kept afterwards (the admin routes
-- list deliveries, and a failed one can be redelivered). Same table as
-- migrations/sqlite/0013_merchant_events.sql.
--
-- A pending row is due at next_attempt_at; a relay that takes it moves next_attempt_at to the
-- end of its lease, which is also the lease's token: the relay's outcome is written only
-- while next_attempt_at still holds it, so a relay whose lease ran out (and whose row another
-- relay took) writes nothing.
CREATE TABLE webhook_deliveries (
    id              BIGSERIAL PRIMARY KEY,
    -- The Standard Webhooks `webhook-id`: the same on every redelivery.
    event_id        TEXT NOT NULL UNIQUE,
    session_id      TEXT NOT NULL,
    event_type      TEXT NOT NULL,
    sequence        BIGINT NOT NULL,
    body            TEXT NOT NULL,
    status          TEXT NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts        BIGINT NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    -- Set by an admin's redelivery: one more try, then `failed` again.
    redelivery      BIGINT NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL,
    last_error      TEXT,
    created_at      BIGINT NOT NULL,
    delivered_at    BIGINT,
    updated_at      BIGINT NOT NULL,
    UNIQUE (session_id, sequence)
);

CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at)
    WHERE status = 'pending';
CREATE INDEX webhook_deliveries_by_status ON webhook_deliveries (status, id);

-- The sequence of the session's last merchant event: a transition that writes events
-- advances it by their number, under the session's compare-and-set.
ALTER TABLE payment_sessions ADD COLUMN event_sequence BIGINT NOT NULL DEFAULT 0;
