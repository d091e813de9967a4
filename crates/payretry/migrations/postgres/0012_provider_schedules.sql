-- The provider budget every process of a deployment shares (DESIGN.md §4): one row per
-- provider, the pacing schedule of its calls. Times are microseconds since the Unix epoch.
CREATE TABLE provider_schedules (
    name            TEXT PRIMARY KEY,
    max_rate        DOUBLE PRECISION NOT NULL,
    rate            DOUBLE PRECISION NOT NULL,
    next_slot_us    BIGINT NOT NULL,
    paused_until_us BIGINT NOT NULL,
    rate_since_us   BIGINT NOT NULL
);
