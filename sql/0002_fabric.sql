-- anvil-compute registry, version 2: failover across peers.

-- A rescued job waits out a backoff before its next attempt may be claimed, so a
-- job that kills its peers does not hop through the whole fabric in a second.
ALTER TABLE jobs ADD COLUMN run_after TIMESTAMPTZ NOT NULL DEFAULT '1970-01-01 00:00:00+00';

-- The rescuer's scan for jobs queued on peers that went away.
CREATE INDEX jobs_queued_peer ON jobs (peer_id) WHERE state = 'queued';
-- Bounded loads read the active jobs per peer twice a second on every peer;
-- without this the query scans every finished job too.
CREATE INDEX jobs_active_by_peer ON jobs (peer_id) WHERE state IN ('queued', 'running');

-- Membership is announced only when it really changes: a statement-level
-- trigger on `UPDATE OF state` also fires for statements that change nothing
-- (every rescue sweep's "mark stale peers down"), and heartbeats must not
-- announce anything unless they bring a peer back.
DROP TRIGGER peers_state_notify ON peers;
CREATE FUNCTION peers_notify_membership() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('anvil_membership', 'peers');
    RETURN NULL;
END
$$;
CREATE TRIGGER peers_membership_insert_delete
    AFTER INSERT OR DELETE ON peers
    FOR EACH ROW EXECUTE FUNCTION peers_notify_membership();
CREATE TRIGGER peers_membership_update
    AFTER UPDATE ON peers
    FOR EACH ROW
    WHEN (OLD.state IS DISTINCT FROM NEW.state
          OR OLD.address IS DISTINCT FROM NEW.address
          OR OLD.region IS DISTINCT FROM NEW.region)
    EXECUTE FUNCTION peers_notify_membership();

-- The job audit trigger runs only for changes it records (not lease renewals).
DROP TRIGGER jobs_audit_and_notify ON jobs;
CREATE TRIGGER jobs_audit_insert
    AFTER INSERT ON jobs
    FOR EACH ROW EXECUTE FUNCTION jobs_audit_and_notify();
CREATE TRIGGER jobs_audit_update
    AFTER UPDATE ON jobs
    FOR EACH ROW
    WHEN (OLD.state IS DISTINCT FROM NEW.state
          OR OLD.attempt IS DISTINCT FROM NEW.attempt
          OR OLD.peer_id IS DISTINCT FROM NEW.peer_id)
    EXECUTE FUNCTION jobs_audit_and_notify();
