-- Named queries used by daemon/registry. Each starts with a `-- name:` line.
-- Parameters are psycopg named placeholders.

-- name: upsert_capability
INSERT INTO compute_capabilities (peer_id, region, capability, resources, max_concurrency)
VALUES (%(peer_id)s, %(region)s, %(capability)s, %(resources)s, %(max_concurrency)s)
ON CONFLICT (peer_id, capability) DO UPDATE
    SET region = EXCLUDED.region,
        resources = EXCLUDED.resources,
        max_concurrency = EXCLUDED.max_concurrency
RETURNING *;

-- name: upsert_capability_executor
INSERT INTO capability_executors (peer_id, capability, executor, source, status)
VALUES (%(peer_id)s, %(capability)s, %(executor)s, %(source)s, %(status)s)
ON CONFLICT (peer_id, capability) DO UPDATE
    SET executor = EXCLUDED.executor, source = EXCLUDED.source, status = EXCLUDED.status,
        registered_at = now()
RETURNING executor, source, status;

-- name: set_capability_status
-- The peer's verdict on a deployed row, for the executor it checked: a row
-- re-deployed meanwhile (another executor) keeps its own 'pending'.
UPDATE capability_executors SET status = %(status)s
WHERE peer_id = %(peer_id)s AND capability = %(capability)s AND executor = %(executor)s
  AND status IS DISTINCT FROM %(status)s
RETURNING status;

-- name: delete_capability
DELETE FROM compute_capabilities
WHERE peer_id = %(peer_id)s AND capability = %(capability)s
RETURNING peer_id;

-- name: delete_peer_capabilities
-- A stopping peer removes the rows it writes again at start (config and
-- fleet); rows deployed to it stay, and its next start runs them again.
DELETE FROM compute_capabilities c
USING capability_executors e
WHERE c.peer_id = %(peer_id)s AND e.peer_id = c.peer_id AND e.capability = c.capability
  AND e.source <> 'deployed';

-- name: prune_peer_capabilities
-- At start: config rows of capabilities this peer no longer offers would
-- attract jobs it never claims. Deployed rows are not the config's to prune.
DELETE FROM compute_capabilities c
USING capability_executors e
WHERE c.peer_id = %(peer_id)s AND e.peer_id = c.peer_id AND e.capability = c.capability
  AND e.source = 'config' AND NOT (c.capability = ANY(%(keep)s))
RETURNING c.capability;

-- name: upsert_fleet_deployment
INSERT INTO fleet_deployments (region, capability, resources, max_concurrency, executor)
VALUES (%(region)s, %(capability)s, %(resources)s, %(max_concurrency)s, %(executor)s)
ON CONFLICT (region, capability) DO UPDATE
    SET resources = EXCLUDED.resources, max_concurrency = EXCLUDED.max_concurrency,
        executor = EXCLUDED.executor, deployed_at = now()
RETURNING *;

-- name: delete_fleet_deployment
DELETE FROM fleet_deployments
WHERE region = %(region)s AND capability = %(capability)s
RETURNING capability;

-- name: delete_fleet_rows
-- Every peer's row of a fleet deployment (or, with a peer, that peer's alone).
DELETE FROM compute_capabilities c
USING capability_executors e
WHERE e.peer_id = c.peer_id AND e.capability = c.capability AND e.source = 'fleet'
  AND c.region = %(region)s AND c.capability = %(capability)s
  AND (%(peer_id)s::uuid IS NULL OR c.peer_id = %(peer_id)s)
RETURNING c.peer_id;

-- name: list_fleet_deployments
SELECT * FROM fleet_deployments
WHERE (%(region)s::text IS NULL OR region = %(region)s)
ORDER BY region, capability;

-- name: capability_loads
-- Jobs queued and running per (peer, capability), for ListCapabilities.
SELECT peer_id, capability,
       count(*) FILTER (WHERE state = 'queued') AS queued,
       count(*) FILTER (WHERE state = 'running') AS running
FROM jobs
WHERE state IN ('queued', 'running') AND peer_id = ANY(%(peer_ids)s::uuid[])
GROUP BY peer_id, capability;

-- name: list_capabilities
-- Capabilities in (capability, peer_id) order, filtered; a page of them after
-- the last row of the previous page (keyset paging: no row is skipped or
-- repeated when rows come and go between pages), or all with a NULL limit.
SELECT c.peer_id, c.region, c.capability, c.resources, c.max_concurrency,
       e.executor, e.source, e.status, p.address,
       (p.state = 'up' AND p.heartbeat_at > clock_timestamp() - %(ttl)s) AS peer_live
FROM compute_capabilities c
LEFT JOIN capability_executors e USING (peer_id, capability)
LEFT JOIN peers p USING (peer_id)
WHERE (%(capability)s::text IS NULL OR c.capability = %(capability)s)
  AND (%(region)s::text IS NULL OR c.region = %(region)s)
  AND (%(peer_id)s::uuid IS NULL OR c.peer_id = %(peer_id)s)
  AND (NOT %(live_only)s
       OR (p.state = 'up' AND p.heartbeat_at > clock_timestamp() - %(ttl)s))
  AND (%(after_capability)s::text IS NULL
       OR (c.capability, c.peer_id) > (%(after_capability)s, %(after_peer_id)s::uuid))
ORDER BY c.capability, c.peer_id
LIMIT %(limit)s::bigint;

-- name: upsert_peer
INSERT INTO peers (peer_id, address, region, state, version, started_at, heartbeat_at)
VALUES (%(peer_id)s, %(address)s, %(region)s, 'up', %(version)s, now(), now())
ON CONFLICT (peer_id) DO UPDATE
    SET address = EXCLUDED.address, region = EXCLUDED.region, state = 'up',
        version = EXCLUDED.version, started_at = now(), heartbeat_at = now()
RETURNING *, true AS live;

-- name: heartbeat_peer
-- A peer marked down while it could not reach the registry (an outage, a
-- partition, a stalled loop) is alive again as soon as it heartbeats; only a
-- draining peer stays out.
UPDATE peers
SET heartbeat_at = now(), state = CASE WHEN state = 'down' THEN 'up' ELSE state END
WHERE peer_id = %(peer_id)s
RETURNING peer_id;

-- name: set_peer_state
UPDATE peers SET state = %(state)s WHERE peer_id = %(peer_id)s RETURNING *;

-- name: list_peers
SELECT *, (state = 'up' AND heartbeat_at > clock_timestamp() - %(ttl)s) AS live
FROM peers
WHERE (%(region)s::text IS NULL OR region = %(region)s)
ORDER BY peer_id;

-- name: get_peer
SELECT *, (state = 'up' AND heartbeat_at > clock_timestamp() - %(ttl)s) AS live
FROM peers WHERE peer_id = %(peer_id)s;

-- name: active_load
-- Jobs placed on each peer and not yet finished: what bounded loads balance.
SELECT peer_id, count(*) AS active
FROM jobs
WHERE state IN ('queued', 'running') AND peer_id IS NOT NULL
GROUP BY peer_id;

-- name: insert_job
INSERT INTO jobs (job_id, capability, region, inputs, params, resources, locality_key,
                  idempotency_key, request_sha256, timeout_ms, queue_timeout_ms, max_attempts,
                  submitted_by, peer_id)
VALUES (%(job_id)s, %(capability)s, %(region)s, %(inputs)s, %(params)s, %(resources)s,
        %(locality_key)s, %(idempotency_key)s, %(request_sha256)s, %(timeout_ms)s,
        %(queue_timeout_ms)s, %(max_attempts)s, %(submitted_by)s, %(peer_id)s)
ON CONFLICT (submitted_by, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
RETURNING *;

-- name: insert_jobs
-- Many submissions without an idempotency key in one statement (group commit).
-- Rows go in the order given, so submitted_at keeps the order of arrival.
INSERT INTO jobs (job_id, capability, region, inputs, params, resources, locality_key,
                  request_sha256, timeout_ms, queue_timeout_ms, max_attempts, submitted_by,
                  peer_id)
SELECT j.job_id, j.capability, j.region, ARRAY(SELECT jsonb_array_elements_text(j.inputs)),
       j.params, j.resources, j.locality_key, j.request_sha256, j.timeout_ms,
       j.queue_timeout_ms, j.max_attempts, j.submitted_by, j.peer_id
FROM unnest(%(job_ids)s::uuid[], %(capabilities)s::text[], %(regions)s::text[],
            %(inputs)s::jsonb[], %(params)s::jsonb[], %(resources)s::jsonb[],
            %(locality_keys)s::text[], %(request_sha256s)s::text[], %(timeout_ms)s::bigint[],
            %(queue_timeout_ms)s::bigint[], %(max_attempts)s::int[], %(submitted_by)s::text[],
            %(peer_ids)s::uuid[])
     WITH ORDINALITY AS j(job_id, capability, region, inputs, params, resources,
                          locality_key, request_sha256, timeout_ms, queue_timeout_ms,
                          max_attempts, submitted_by, peer_id, n)
ORDER BY j.n
RETURNING *;

-- name: get_job_by_idempotency_key
SELECT * FROM jobs
WHERE submitted_by = %(submitted_by)s AND idempotency_key = %(idempotency_key)s;

-- name: prune_finished_jobs
-- Delete up to `limit` jobs (and, by cascade, their events) that ended more
-- than `older_than` ago by the database's clock, oldest first. SKIP LOCKED:
-- peers pruning at once split the work.
DELETE FROM jobs
WHERE job_id IN (
    SELECT job_id FROM jobs
    WHERE finished_at < clock_timestamp() - %(older_than)s
    ORDER BY finished_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
);

-- name: get_job
SELECT * FROM jobs WHERE job_id = %(job_id)s;

-- name: job_outputs
-- What the results janitor keeps: the outputs of the jobs that still exist.
SELECT job_id, state, output_refs FROM jobs WHERE job_id = ANY(%(job_ids)s::uuid[]);

-- name: get_job_owner
-- Whose job it is, without reading its (possibly large) output.
SELECT submitted_by FROM jobs WHERE job_id = %(job_id)s;

-- name: assign_job
-- Place (or re-place) a queued job: compare-and-set on its current placement,
-- so two sweepers cannot both move it. A job with a peer no longer waits for
-- one: the reason it waited (note_waiting_reason) goes.
UPDATE jobs SET peer_id = %(peer_id)s, error = '', updated_at = clock_timestamp()
WHERE job_id = %(job_id)s AND state = 'queued'
  AND peer_id IS NOT DISTINCT FROM %(from_peer_id)s
RETURNING *;

-- name: claim_job
-- The dispatch fast path: the chosen peer claims one named job.
UPDATE jobs
SET state = 'running', attempt = attempt + 1, error = '',
    lease_expires_at = clock_timestamp() + %(lease)s,
    started_at = clock_timestamp(), updated_at = clock_timestamp()
WHERE job_id = %(job_id)s AND state = 'queued' AND peer_id = %(peer_id)s
  AND attempt - handed_back < max_attempts AND run_after <= clock_timestamp()
RETURNING *;

-- name: claim_next
-- The polling backstop: the oldest queued jobs placed on this peer. SKIP LOCKED
-- lets concurrent claimers pass each other; FOR UPDATE re-checks the row's
-- current state after a concurrent commit, so a job is claimed once. The CTE
-- is MATERIALIZED so the locking subquery runs exactly once: as a joined
-- subquery the planner may re-run it per row and claim more than the limit.
WITH next AS MATERIALIZED (
    SELECT job_id FROM jobs
    WHERE state = 'queued' AND peer_id = %(peer_id)s AND attempt - handed_back < max_attempts
      AND run_after <= clock_timestamp()
      AND (%(capabilities)s::text[] IS NULL OR capability = ANY(%(capabilities)s))
    ORDER BY submitted_at, job_id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
UPDATE jobs
SET state = 'running', attempt = jobs.attempt + 1, error = '',
    lease_expires_at = clock_timestamp() + %(lease)s,
    started_at = clock_timestamp(), updated_at = clock_timestamp()
FROM next
WHERE jobs.job_id = next.job_id AND jobs.state = 'queued'
RETURNING jobs.*;

-- name: renew_leases
-- Extends the leases this peer still owns; a job missing from the result was
-- rescued, cancelled or finished elsewhere, and its guest must be stopped.
-- Rows are locked in job_id order, as finish_jobs does: two statements that
-- each update many rows cannot deadlock if both lock in one order.
WITH owned AS MATERIALIZED (
    SELECT jobs.job_id
    FROM jobs JOIN unnest(%(job_ids)s::uuid[], %(attempts)s::int[]) AS o(job_id, attempt)
      ON jobs.job_id = o.job_id AND jobs.attempt = o.attempt
    WHERE jobs.state = 'running' AND jobs.peer_id = %(peer_id)s
    ORDER BY jobs.job_id
    FOR UPDATE OF jobs
)
UPDATE jobs SET lease_expires_at = clock_timestamp() + %(lease)s
FROM owned
WHERE jobs.job_id = owned.job_id
RETURNING jobs.job_id;

-- name: finish_jobs
-- finish_job for many attempts in one statement (group commit); an attempt
-- missing from the result did not own its job. Rows are locked in job_id
-- order, as renew_leases does.
WITH owned AS MATERIALIZED (
    SELECT jobs.job_id, f.state, f.output, f.output_refs, f.error, f.exit_code,
           f.bytes_fetched_remote
    FROM jobs JOIN unnest(%(job_ids)s::uuid[], %(attempts)s::int[], %(peer_ids)s::uuid[],
                          %(states)s::job_state[], %(outputs)s::bytea[],
                          %(output_refs)s::jsonb[], %(errors)s::text[], %(exit_codes)s::int[],
                          %(bytes_fetched_remote)s::bigint[])
         AS f(job_id, attempt, peer_id, state, output, output_refs, error, exit_code,
              bytes_fetched_remote)
      ON jobs.job_id = f.job_id AND jobs.attempt = f.attempt AND jobs.peer_id = f.peer_id
    WHERE jobs.state = 'running'
    ORDER BY jobs.job_id
    FOR UPDATE OF jobs
)
UPDATE jobs
SET state = owned.state, output = owned.output,
    output_refs = ARRAY(SELECT jsonb_array_elements_text(owned.output_refs)),
    error = owned.error, exit_code = owned.exit_code,
    bytes_fetched_remote = jobs.bytes_fetched_remote + owned.bytes_fetched_remote,
    lease_expires_at = NULL, finished_at = clock_timestamp(), updated_at = clock_timestamp()
FROM owned
WHERE jobs.job_id = owned.job_id
RETURNING jobs.*;

-- name: finish_job
-- First terminal write wins: only the attempt that owns the job may end it.
UPDATE jobs
SET state = %(state)s, output = %(output)s, output_refs = %(output_refs)s,
    error = %(error)s, exit_code = %(exit_code)s,
    bytes_fetched_remote = bytes_fetched_remote + %(bytes_fetched_remote)s,
    lease_expires_at = NULL, finished_at = clock_timestamp(), updated_at = clock_timestamp()
WHERE job_id = %(job_id)s AND state = 'running' AND attempt = %(attempt)s
  AND peer_id = %(peer_id)s
RETURNING *;

-- name: release_job
-- Hand a running attempt back: queued again for next_peer_id. After a
-- transient failure the attempt counts (failed for good once they are used
-- up); a draining peer's hand-back (`spare`) does not count. Every SET
-- expression reads the row as it was, so handed_back below is the old value.
-- Queued again, its queue timeout starts over.
UPDATE jobs
SET handed_back = handed_back + %(spare)s::int,
    state = CASE WHEN attempt - handed_back - %(spare)s::int >= max_attempts
                 THEN 'failed'::job_state ELSE 'queued' END,
    peer_id = CASE WHEN attempt - handed_back - %(spare)s::int >= max_attempts
                   THEN peer_id ELSE %(next_peer_id)s END,
    finished_at = CASE WHEN attempt - handed_back - %(spare)s::int >= max_attempts
                       THEN clock_timestamp() END,
    queued_at = CASE WHEN attempt - handed_back - %(spare)s::int >= max_attempts
                     THEN queued_at ELSE clock_timestamp() END,
    error = %(error)s, lease_expires_at = NULL, updated_at = clock_timestamp()
WHERE job_id = %(job_id)s AND state = 'running' AND attempt = %(attempt)s
  AND peer_id = %(peer_id)s
RETURNING *;

-- name: find_expired_leases
SELECT job_id, attempt, peer_id, locality_key, capability, region, resources
FROM jobs
WHERE state = 'running' AND lease_expires_at < clock_timestamp()
ORDER BY lease_expires_at
LIMIT %(limit)s;

-- name: rescue_job
-- Compare-and-set on (running, same attempt, lease in the past): a completion
-- or renewal that commits first makes this a no-op, never an overwrite.
-- Queued again, its queue timeout starts over.
UPDATE jobs
SET state = CASE WHEN attempt - handed_back >= max_attempts
                 THEN 'failed'::job_state ELSE 'queued' END,
    peer_id = CASE WHEN attempt - handed_back >= max_attempts
                   THEN peer_id ELSE %(next_peer_id)s END,
    finished_at = CASE WHEN attempt - handed_back >= max_attempts
                       THEN clock_timestamp() END,
    queued_at = CASE WHEN attempt - handed_back >= max_attempts
                     THEN queued_at ELSE clock_timestamp() END,
    run_after = clock_timestamp() + %(backoff)s,
    error = %(error)s, lease_expires_at = NULL, updated_at = clock_timestamp()
WHERE job_id = %(job_id)s AND state = 'running' AND attempt = %(attempt)s
  AND lease_expires_at < clock_timestamp()
RETURNING *;

-- name: cancel_job
UPDATE jobs
SET state = 'cancelled', error = %(reason)s, lease_expires_at = NULL,
    finished_at = clock_timestamp(), updated_at = clock_timestamp()
WHERE job_id = %(job_id)s AND state IN ('queued', 'running')
RETURNING *;

-- name: mark_stale_peers_down
UPDATE peers SET state = 'down'
WHERE state = 'up' AND heartbeat_at < clock_timestamp() - %(ttl)s
RETURNING peer_id;

-- name: unplace_from_unavailable_peers
-- Queued jobs whose peer is down, draining or silent go back to be placed again.
UPDATE jobs SET peer_id = NULL, updated_at = clock_timestamp()
WHERE state = 'queued' AND peer_id IN (
    SELECT peer_id FROM peers
    WHERE state <> 'up' OR heartbeat_at < clock_timestamp() - %(ttl)s
)
RETURNING job_id;

-- name: unplace_peer_queue
UPDATE jobs SET peer_id = NULL, updated_at = clock_timestamp()
WHERE state = 'queued' AND peer_id = %(peer_id)s
RETURNING job_id;

-- name: list_queued_unplaced
SELECT * FROM jobs
WHERE state = 'queued' AND peer_id IS NULL
ORDER BY submitted_at, job_id
LIMIT %(limit)s;

-- name: note_waiting_reason
-- Why an unplaced job waits, shown in its status until a peer takes it. Only
-- when the text changes, so a sweep does not rewrite the row on every pass.
-- Not a change of state: no event is recorded or announced (0002's trigger).
UPDATE jobs SET error = %(reason)s, updated_at = clock_timestamp()
WHERE job_id = %(job_id)s AND state = 'queued' AND peer_id IS NULL AND error <> %(reason)s
RETURNING job_id;

-- name: find_overdue_queued
-- Queued jobs past their queue timeout by the database's clock, the longest
-- overdue first. The deadline is spelled as the index jobs_queue_deadline
-- (0005) has it, and compared with statement_timestamp() (stable, where
-- clock_timestamp() is volatile and cannot bound an index scan), so the scan
-- reads only overdue rows.
SELECT * FROM jobs
WHERE state = 'queued'
  AND (queued_at AT TIME ZONE 'UTC') + queue_timeout_ms * interval '1 millisecond'
      < (statement_timestamp() AT TIME ZONE 'UTC')
ORDER BY (queued_at AT TIME ZONE 'UTC') + queue_timeout_ms * interval '1 millisecond', job_id
LIMIT %(limit)s;

-- name: fail_overdue_job
-- QUEUED -> FAILED: no peer ran the job within its queue timeout. Compare-and-set
-- on (queued, same attempt, still past its deadline): a claim that commits
-- first makes this a no-op (every claim starts a new attempt).
UPDATE jobs
SET state = 'failed', error = %(error)s,
    finished_at = clock_timestamp(), updated_at = clock_timestamp()
WHERE job_id = %(job_id)s AND state = 'queued' AND attempt = %(attempt)s
  AND (queued_at AT TIME ZONE 'UTC') + queue_timeout_ms * interval '1 millisecond'
      < (statement_timestamp() AT TIME ZONE 'UTC')
RETURNING *;

-- name: job_events
SELECT * FROM job_events WHERE job_id = %(job_id)s ORDER BY event_id;
