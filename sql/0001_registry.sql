-- anvil-compute registry, version 1.
-- compute_capabilities is the seed's table, verbatim; everything else is ours.

CREATE TABLE compute_capabilities (
    peer_id UUID NOT NULL,
    region TEXT NOT NULL,
    capability TEXT NOT NULL,
    resources JSONB,
    max_concurrency INT,
    PRIMARY KEY (peer_id, capability)
);

-- How the registering peer runs a capability (WASM module, Podman image, limits).
-- Kept beside the seed's table so that table stays exactly as specified.
CREATE TABLE capability_executors (
    peer_id UUID NOT NULL,
    capability TEXT NOT NULL,
    executor JSONB NOT NULL DEFAULT '{}',
    registered_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (peer_id, capability),
    FOREIGN KEY (peer_id, capability)
        REFERENCES compute_capabilities (peer_id, capability) ON DELETE CASCADE
);

CREATE TABLE peers (
    peer_id UUID PRIMARY KEY,
    address TEXT NOT NULL,
    region TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'up' CHECK (state IN ('up', 'draining', 'down')),
    version TEXT NOT NULL DEFAULT '',
    started_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    heartbeat_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TYPE job_state AS ENUM (
    'queued', 'running', 'succeeded', 'failed', 'timed_out', 'cancelled'
);

CREATE TABLE jobs (
    job_id UUID PRIMARY KEY,
    capability TEXT NOT NULL CHECK (capability <> ''),
    region TEXT NOT NULL,
    inputs TEXT[] NOT NULL DEFAULT '{}',
    params JSONB NOT NULL DEFAULT '{}',
    resources JSONB NOT NULL DEFAULT '{}',
    locality_key TEXT NOT NULL,
    idempotency_key TEXT,
    -- sha256 of the canonical request, so a reused key with another request is refused.
    request_sha256 TEXT NOT NULL,
    -- Wall-clock limit of one attempt; 0 = the running peer's capability default.
    timeout_ms BIGINT NOT NULL CHECK (timeout_ms >= 0),
    max_attempts INT NOT NULL DEFAULT 3 CHECK (max_attempts BETWEEN 1 AND 100),
    submitted_by TEXT NOT NULL DEFAULT '',
    state job_state NOT NULL DEFAULT 'queued',
    -- The peer the job is placed on (queued) or running on (running, terminal).
    peer_id UUID,
    attempt INT NOT NULL DEFAULT 0 CHECK (attempt >= 0),
    lease_expires_at TIMESTAMPTZ,
    output BYTEA,
    output_refs TEXT[] NOT NULL DEFAULT '{}',
    error TEXT NOT NULL DEFAULT '',
    exit_code INT,
    bytes_fetched_remote BIGINT NOT NULL DEFAULT 0,
    submitted_at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    started_at TIMESTAMPTZ,
    finished_at TIMESTAMPTZ,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    -- The state machine's invariants, enforced by the database itself.
    CHECK ((state = 'running') = (lease_expires_at IS NOT NULL)),
    CHECK ((state IN ('succeeded', 'failed', 'timed_out', 'cancelled')) = (finished_at IS NOT NULL)),
    CHECK (state <> 'running' OR (peer_id IS NOT NULL AND attempt >= 1)),
    CHECK (attempt <= max_attempts)
);

CREATE UNIQUE INDEX jobs_idempotency_key ON jobs (idempotency_key)
    WHERE idempotency_key IS NOT NULL;
-- A peer's queue, drained in order of submission.
CREATE INDEX jobs_queued_by_peer ON jobs (peer_id, submitted_at, job_id)
    WHERE state = 'queued';
-- The rescuer's scan.
CREATE INDEX jobs_running_lease ON jobs (lease_expires_at)
    WHERE state = 'running';
CREATE INDEX jobs_running_by_peer ON jobs (peer_id)
    WHERE state = 'running';

CREATE TABLE job_events (
    event_id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_id UUID NOT NULL REFERENCES jobs (job_id) ON DELETE CASCADE,
    at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    attempt INT NOT NULL,
    from_state job_state,
    to_state job_state NOT NULL,
    peer_id UUID,
    detail TEXT NOT NULL DEFAULT ''
);
CREATE INDEX job_events_by_job ON job_events (job_id, event_id);

-- Every state change (and the insert) is audited and announced in the same
-- transaction, so no writer can forget either and listeners never see a change
-- that rolled back.
CREATE FUNCTION jobs_audit_and_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' OR NEW.state IS DISTINCT FROM OLD.state
            OR NEW.attempt IS DISTINCT FROM OLD.attempt
            OR NEW.peer_id IS DISTINCT FROM OLD.peer_id THEN
        INSERT INTO job_events (job_id, attempt, from_state, to_state, peer_id, detail)
        VALUES (NEW.job_id, NEW.attempt,
                CASE WHEN TG_OP = 'INSERT' THEN NULL ELSE OLD.state END,
                NEW.state, NEW.peer_id, NEW.error);
        PERFORM pg_notify('anvil_job_events',
            json_build_object('job_id', NEW.job_id, 'state', NEW.state,
                              'attempt', NEW.attempt, 'peer_id', NEW.peer_id)::text);
        IF NEW.state = 'queued' AND NEW.peer_id IS NOT NULL THEN
            PERFORM pg_notify('anvil_peer_' || replace(NEW.peer_id::text, '-', ''),
                              NEW.job_id::text);
        END IF;
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER jobs_audit_and_notify
    AFTER INSERT OR UPDATE ON jobs
    FOR EACH ROW EXECUTE FUNCTION jobs_audit_and_notify();

-- Membership changes are announced so peers refresh their caches without polling.
CREATE FUNCTION registry_notify_membership() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('anvil_membership', TG_TABLE_NAME);
    RETURN NULL;
END
$$;

CREATE TRIGGER compute_capabilities_notify
    AFTER INSERT OR UPDATE OR DELETE ON compute_capabilities
    FOR EACH STATEMENT EXECUTE FUNCTION registry_notify_membership();

CREATE TRIGGER peers_state_notify
    AFTER INSERT OR DELETE OR UPDATE OF state, address, region ON peers
    FOR EACH STATEMENT EXECUTE FUNCTION registry_notify_membership();
