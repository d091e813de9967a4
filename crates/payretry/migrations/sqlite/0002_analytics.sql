-- The analytics outbox: Segment track events written in the same transaction as the state
-- change they describe, delivered in batches by the relay, deleted once Segment accepted them.
CREATE TABLE analytics_events (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id      TEXT NOT NULL UNIQUE,
    payload         TEXT NOT NULL,
    created_at      INTEGER NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    last_error      TEXT
) STRICT;

CREATE INDEX analytics_events_due ON analytics_events (next_attempt_at, id);
