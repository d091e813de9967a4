-- The worker asks "when is the next job due?" whenever the queue runs dry: the earliest
-- run_at among unleased jobs, or the earliest lease end among leased ones. These two
-- partial indexes answer both halves without scanning the table.
CREATE INDEX retry_jobs_unleased_by_run_at ON retry_jobs (run_at) WHERE locked_until IS NULL;
CREATE INDEX retry_jobs_leased_by_lease_end ON retry_jobs (locked_until) WHERE locked_until IS NOT NULL;
