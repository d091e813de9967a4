-- The analytics outbox: Segment track events written in the same transaction as the state
-- change they describe, delivered in batches by the relay, deleted once Segment accepted them.
-- Same table as migrations/sqlite/0002_analytics.sql.
CREATE TABLE analytics_events (
    id              BIGSERIAL PRIMARY KEY,
    message_id      TEXT NOT NULL UNIQUE,
    payload         TEXT NOT NULL,
    created_at      BIGINT NOT NULL,
    attempts        BIGINT NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    next_attempt_at BIGINT NOT NULL,
    last_error      TEXT
);

CREATE INDEX analytics_events_due ON analytics_events (next_attempt_at, id);

-- Like retry_jobs, an outbox whose rows live for seconds: vacuum it early (see 0001).
ALTER TABLE analytics_events SET (
    autovacuum_vacuum_scale_factor = 0.01,
    autovacuum_vacuum_threshold = 50,
    autovacuum_analyze_scale_factor = 0.02
);
