-- anvil-compute registry, version 2: failover across peers.

-- A rescued job waits out a backoff before its next attempt may be claimed, so a
-- job that kills its peers does not hop through the whole fabric in a second.
ALTER TABLE jobs ADD COLUMN run_after TIMESTAMPTZ NOT NULL DEFAULT '1970-01-01 00:00:00+00';

-- The rescuer's scan for jobs queued on peers that went away.
CREATE INDEX jobs_queued_peer ON jobs (peer_id) WHERE state = 'queued';
