-- When a job was first delivered to a worker (ms). The provider checkout's `expires_at` is
-- computed from it (with the job's `scheduledFor`), so a job delivered late still asks for a
-- checkout inside the provider's bounds, and each redelivery asks for the same one.
ALTER TABLE retry_jobs ADD COLUMN first_delivered_at INTEGER;
