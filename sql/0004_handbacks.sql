-- anvil-compute registry, version 4: a draining peer's hand-back is not an attempt.

-- Attempts that a draining peer handed back unfinished. They do not count
-- against max_attempts: the job did nothing wrong, so a job allowed one
-- attempt still runs to its end after its peer was stopped for maintenance.
ALTER TABLE jobs ADD COLUMN handed_back INT NOT NULL DEFAULT 0 CHECK (handed_back >= 0);

-- The attempt budget is max_attempts counted attempts: replace the plain
-- CHECK (attempt <= max_attempts) of version 1, found by its definition since
-- it was created without a name.
DO $$
DECLARE
    old_check TEXT;
BEGIN
    SELECT conname INTO STRICT old_check
    FROM pg_constraint
    WHERE conrelid = 'jobs'::regclass AND contype = 'c'
      AND pg_get_constraintdef(oid) = 'CHECK ((attempt <= max_attempts))';
    EXECUTE format('ALTER TABLE jobs DROP CONSTRAINT %I', old_check);
END
$$;
ALTER TABLE jobs ADD CONSTRAINT jobs_attempts_within_budget
    CHECK (attempt - handed_back <= max_attempts);
