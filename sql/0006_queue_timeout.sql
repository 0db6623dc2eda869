-- anvil-compute registry, version 6: jobs never wait silently forever.
-- Upgrade with every peer stopped: version 5 code inserts jobs without a
-- queue timeout, which this version requires.

-- How long a job may stay queued, counted from when it last became queued,
-- before the rescuer fails it (no peer ran it). Set on insert from the job's
-- request or the front peer's queue_timeout_s; rows from before this version
-- get that setting's default, 24 h. No default afterwards: the daemon's
-- setting is the only one.
ALTER TABLE jobs ADD COLUMN queue_timeout_ms BIGINT NOT NULL DEFAULT 86400000
    CHECK (queue_timeout_ms > 0);
ALTER TABLE jobs ALTER COLUMN queue_timeout_ms DROP DEFAULT;

-- When the job last became queued: on insert, and in the same statement that
-- queues it again (a rescue, a hand-back). A re-placement does not reset it.
-- Rows from before this version: a queued row's last update is no earlier than
-- when it was queued, so none of them fails sooner than it should.
ALTER TABLE jobs ADD COLUMN queued_at TIMESTAMPTZ;
UPDATE jobs SET queued_at = CASE WHEN state = 'queued' THEN updated_at ELSE submitted_at END;
ALTER TABLE jobs ALTER COLUMN queued_at SET NOT NULL,
    ALTER COLUMN queued_at SET DEFAULT clock_timestamp();

-- The rescuer's scan for queued jobs past their queue timeout: the deadline
-- itself, so the scan reads only overdue rows. Spelled in UTC because an index
-- expression must be immutable and timestamptz + interval is not (it depends
-- on the session's time zone); queries.sql spells it exactly so.
CREATE INDEX jobs_queue_deadline ON jobs
    (((queued_at AT TIME ZONE 'UTC') + queue_timeout_ms * interval '1 millisecond'))
    WHERE state = 'queued';
