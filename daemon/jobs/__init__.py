"""A job's life on a peer: placed (scheduler, placer), dispatched, claimed and run
(runner, attempt), watched (events), rescued when its peer is lost (rescuer) and
finally pruned (pruner). The view of the fabric placement reads is `peer_view`."""
