-- anvil-compute registry, version 5: capabilities deployed at run time.

-- Where a peer's capability row came from: the peer's own config, a
-- deployment to that peer (RegisterCapability naming it), or a deployment to
-- its whole region (a fleet deployment, below). A peer re-asserts and prunes
-- only its config rows; deployed rows outlive its restarts.
ALTER TABLE capability_executors
    ADD COLUMN source TEXT NOT NULL DEFAULT 'config'
        CHECK (source IN ('config', 'deployed', 'fleet'));
-- What the peer made of a deployed row: 'pending' until it has fetched and
-- checked the module, then 'ready' (only ready rows attract jobs) or
-- 'failed: <reason>'. Config rows are ready when written.
ALTER TABLE capability_executors
    ADD COLUMN status TEXT NOT NULL DEFAULT 'ready'
        CHECK (status IN ('pending', 'ready') OR status LIKE 'failed: %');

-- A status change is membership news: placement follows ready rows. (Other
-- changes come with an upsert of compute_capabilities, which announces itself;
-- row-level, as a statement trigger on UPDATE also fires for every INSERT ...
-- ON CONFLICT DO UPDATE, changed or not.)
CREATE TRIGGER capability_executors_notify
    AFTER UPDATE OF status ON capability_executors
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION registry_notify_membership();

-- A capability deployed to every live peer of a region, now and later: each
-- peer of the region writes its own row (source 'fleet') for it.
CREATE TABLE fleet_deployments (
    region TEXT NOT NULL,
    capability TEXT NOT NULL,
    resources JSONB NOT NULL DEFAULT '{}',
    max_concurrency INT NOT NULL CHECK (max_concurrency >= 1),
    executor JSONB NOT NULL,
    deployed_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (region, capability)
);

CREATE TRIGGER fleet_deployments_notify
    AFTER INSERT OR UPDATE OR DELETE ON fleet_deployments
    FOR EACH STATEMENT EXECUTE FUNCTION registry_notify_membership();
