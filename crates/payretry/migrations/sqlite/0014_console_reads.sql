-- The operator console's reads (DESIGN.md §3, §6c). Same indexes as
-- migrations/postgres/0014_console_reads.sql.
--
-- `GET /admin/sessions` lists sessions newest first, paged by the key (created_at, id): all of
-- them, one buyer's, or those in one stored status. Each has its own statement and its own
-- index, so every page is one index range read backwards from the cursor.
CREATE INDEX payment_sessions_by_created ON payment_sessions (created_at, id);
CREATE INDEX payment_sessions_by_buyer ON payment_sessions (buyer_id, created_at, id);
CREATE INDEX payment_sessions_by_status ON payment_sessions (status, created_at, id);

-- `GET /admin/stats/retries` counts the retries (attempt_number > 0: attempt 0 is the first
-- checkout) created since a time. Only retries are indexed: most sessions are never retried.
CREATE INDEX payment_attempts_retries_by_created ON payment_attempts (created_at)
    WHERE attempt_number > 0;
