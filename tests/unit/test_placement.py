"""Placement as a spec: the key, the HRW order, bounded loads, the all-full case,
failover and the Placer's policy. Pure: the HRW reference (hrw/reference.py) is
the oracle; a stand-in view holds the candidates and loads a peer would cache."""

from __future__ import annotations

import uuid
from collections.abc import Mapping

import pytest

from daemon.exceptions import InvalidArgument, NoCapablePeer
from daemon.jobs.placer import PlacementPolicy, Placer, Wanted
from daemon.jobs.scheduler import Candidate, CandidateSet, locality_key
from hrw import reference

PEERS = [uuid.UUID(int=i * 7919 + 1) for i in range(5)]


def candidates(capacity: int = 4, timeouts: Mapping[uuid.UUID, int] | None = None) -> CandidateSet:
    return CandidateSet(
        [
            Candidate(
                peer_id=p,
                address=f"10.0.0.{i}:50051",
                max_concurrency=capacity,
                resources={},
                timeout_ms=(timeouts or {}).get(p, 0),
            )
            for i, p in enumerate(PEERS)
        ]
    )


def order(key: str) -> list[uuid.UUID]:
    return reference.rank(key, PEERS)


def test_the_key_is_explicit_else_the_first_inputs_key_else_the_job() -> None:
    job = uuid.uuid4()
    assert locality_key(explicit="k", inputs=["anvil://b/x"], job_id=job) == "k"
    assert (
        locality_key(explicit="", inputs=["anvil://b/dir/x?version=3", "s3://o/y"], job_id=job)
        == "dir/x"
    )
    digest = "a" * 64
    assert locality_key(explicit="", inputs=[f"sha256:{digest}"], job_id=job) == digest
    assert locality_key(explicit="", inputs=[], job_id=job) == str(job)
    with pytest.raises(InvalidArgument):
        locality_key(explicit="", inputs=["not a ref"], job_id=job)


@pytest.mark.parametrize("key", [f"key-{i}" for i in range(20)])
def test_an_idle_fabric_places_on_the_keys_first_hrw_peer(key: str) -> None:
    placement = candidates().place(key, {}, loads_version=1)
    assert placement.peer_id == order(key)[0]
    assert (placement.rank, placement.saturated) == (0, False)
    assert placement.address.endswith(":50051")


def test_a_loaded_peer_spills_to_the_next_in_hrw_order_and_says_how_far() -> None:
    key = "spill"
    first, second = order(key)[:2]
    # First at its max_concurrency: the job goes one rank down.
    placement = candidates(capacity=4).place(key, {first: 4}, loads_version=1)
    assert (placement.peer_id, placement.rank) == (second, 1)
    # Under its capacity but over ceil(c x mean): spills as well ...
    loads = {first: 3}
    assert candidates(capacity=100).place(key, loads, c=1.25, loads_version=1).peer_id == second
    # ... unless c allows it.
    assert candidates(capacity=100).place(key, loads, c=100, loads_version=1).peer_id == first


def test_when_every_peer_is_full_the_job_queues_on_the_data_local_peer() -> None:
    key = "full"
    placement = candidates(capacity=2).place(key, dict.fromkeys(PEERS, 2), loads_version=1)
    assert (placement.peer_id, placement.saturated) == (order(key)[0], True)


def test_bumps_count_between_load_refreshes() -> None:
    key = "burst"
    cset = candidates(capacity=2)
    first = order(key)[0]
    assert cset.place(key, {}, loads_version=7).peer_id == first
    cset.bump(first)
    cset.bump(first)
    # The loads were not re-read (same version): the two bumps make `first` full.
    assert cset.place(key, {}, loads_version=7).peer_id == order(key)[1]
    # A new version re-reads them and forgets the bumps.
    assert cset.place(key, {}, loads_version=8).peer_id == first


def test_failover_follows_the_hrw_order_without_the_lost_peer() -> None:
    key = "lost"
    lost = order(key)[0]
    assert [c.peer_id for c in candidates().failover_order(key, exclude={lost})] == order(key)[1:]
    assert CandidateSet([]).failover_order(key) == []
    with pytest.raises(NoCapablePeer):
        CandidateSet([]).place(key, {})


class View:
    """Stands in for PeerView: the candidates and loads a peer caches."""

    def __init__(self, cset: CandidateSet, loads: dict[uuid.UUID, int]) -> None:
        self.cset = cset
        self.loads = loads
        self.loads_version = 1
        self.placed: list[uuid.UUID] = []

    def candidates(
        self, capability: str, region: str, resources: Mapping[str, str]
    ) -> CandidateSet:
        return self.cset if capability == "text:wordcount" else CandidateSet([])

    def note_placed(self, peer_id: uuid.UUID) -> None:
        self.placed.append(peer_id)


WORDCOUNT = Wanted(capability="text:wordcount", region="local", resources={})


def test_the_placer_applies_one_policy_and_tells_the_chosen_peer() -> None:
    key = "policy"
    first, second = order(key)[:2]
    woken: list[tuple[uuid.UUID, str, uuid.UUID]] = []

    def placer(balance: float) -> tuple[Placer, View]:
        view = View(candidates(capacity=100), {first: 3})
        return (
            Placer(
                view=view,
                dispatch=lambda *args: woken.append(args),
                policy=PlacementPolicy(balance=balance),
            ),
            view,
        )

    tight, _ = placer(1.0)
    assert tight.choose(WORDCOUNT, key).peer_id == second
    loose, view = placer(1000.0)
    placement = loose.choose(WORDCOUNT, key)
    assert placement.peer_id == first
    job = uuid.uuid4()
    loose.placed(placement, job, capability="text:wordcount")
    assert view.placed == [first] and woken == [(first, placement.address, job)]
    assert loose.failover(WORDCOUNT, key, lost=first) is not None
    assert loose.failover(WORDCOUNT, key, lost=first).peer_id == second  # type: ignore[union-attr]


def test_the_placer_refuses_what_no_peer_may_run() -> None:
    key = "refuse"
    slow = Placer(
        view=View(candidates(timeouts={PEERS[0]: 5000, PEERS[1]: 9000}), {}),
        dispatch=lambda *args: None,
        policy=PlacementPolicy(max_timeout_ms=60_000),
    )
    with pytest.raises(NoCapablePeer, match="'text:nothing'"):
        slow.choose(Wanted(capability="text:nothing", region="local", resources={}), key)
    with pytest.raises(InvalidArgument, match="over the 5000 ms that capability"):
        slow.choose(
            Wanted(capability="text:wordcount", region="local", resources={}, timeout_ms=5001), key
        )
    with pytest.raises(InvalidArgument, match="max_job_timeout_s"):
        slow.choose(
            Wanted(capability="text:wordcount", region="local", resources={}, timeout_ms=60_001),
            key,
        )
    assert slow.choose(
        Wanted(capability="text:wordcount", region="local", resources={}, timeout_ms=5000), key
    )
