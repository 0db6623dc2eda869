-- anvil-compute registry, version 3: retention and per-submitter idempotency keys.
-- Upgrade with every peer stopped: a peer still running version 2 code names
-- the old index in its ON CONFLICT clause, and its idempotent submits fail.

-- Finished jobs are kept `job_retention_s`, then pruned with their events
-- (ON DELETE CASCADE): this finds the oldest of them without a scan.
CREATE INDEX jobs_finished_at ON jobs (finished_at) WHERE finished_at IS NOT NULL;

-- An idempotency key belongs to its submitter (the token's subject): two
-- clients that happen to pick one key get two jobs, and neither learns of the
-- other's job through it.
DROP INDEX jobs_idempotency_key;
CREATE UNIQUE INDEX jobs_idempotency_key ON jobs (submitted_by, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
