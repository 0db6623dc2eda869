"""hrw: property tests (hypothesis) of the fast paths against the reference."""

from __future__ import annotations

import math
import uuid

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hrw

BACKENDS: list[hrw.membership.Backend] = ["jit", "numpy"]

peer_lists = st.lists(st.uuids(), min_size=1, max_size=24, unique=True)
keys = st.one_of(st.binary(max_size=64), st.text(max_size=24))
key_lists = st.lists(keys, min_size=1, max_size=40)
weight_values = st.one_of(
    st.floats(min_value=1e-3, max_value=1e3),
    st.sampled_from([1.0, 2.0, 0.5, 3.0]),  # repeated weights make ties likelier
)

fast = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module", autouse=True)
def _jit_loaded() -> None:
    assert hrw.warm_up("jit") == "jit"


@st.composite
def weighted_peers(draw: st.DrawFn) -> tuple[list[uuid.UUID], list[float]]:
    peers = draw(peer_lists)
    weights = draw(st.lists(weight_values, min_size=len(peers), max_size=len(peers)))
    return peers, weights


@pytest.mark.parametrize("backend", BACKENDS)
@fast
@given(peers=peer_lists, batch=key_lists)
def test_pick_batch_is_rank_zero(
    backend: hrw.membership.Backend, peers: list[uuid.UUID], batch: list[bytes | str]
) -> None:
    m = hrw.Membership(peers, backend=backend)
    expected = [hrw.rank(k, peers)[0] for k in batch]
    assert [peers[i] for i in m.pick_batch(batch)] == expected
    assert [m.pick(k) for k in batch] == expected
    k = min(3, len(peers))
    assert m.top_k(batch[0], k) == hrw.rank(batch[0], peers)[:k]


@pytest.mark.parametrize("backend", BACKENDS)
@fast
@given(pw=weighted_peers(), batch=key_lists)
def test_weighted_pick_batch_is_rank_zero(
    backend: hrw.membership.Backend,
    pw: tuple[list[uuid.UUID], list[float]],
    batch: list[bytes | str],
) -> None:
    peers, weights = pw
    m = hrw.Membership(peers, weights, backend=backend)
    expected = [hrw.rank(k, peers, weights)[0] for k in batch]
    assert [peers[i] for i in m.pick_batch(batch)] == expected
    assert [m.pick(k) for k in batch] == expected
    assert m.top_k(batch[0], len(peers)) == hrw.rank(batch[0], peers, weights)
    k = min(2, len(peers))
    assert m.top_k(batch[-1], k) == hrw.rank(batch[-1], peers, weights)[:k]


MOVE_KEYS = [f"bucket/object-{i}" for i in range(2000)]


@fast
@given(pw=weighted_peers(), data=st.data())
def test_removing_a_peer_moves_only_its_keys(
    pw: tuple[list[uuid.UUID], list[float]], data: st.DataObject
) -> None:
    peers, weights = pw
    if len(peers) < 2:
        return
    gone = data.draw(st.integers(0, len(peers) - 1))
    rest = peers[:gone] + peers[gone + 1 :]
    for w, w_rest in ((None, None), (weights, weights[:gone] + weights[gone + 1 :])):
        before = [peers[i] for i in hrw.Membership(peers, w).pick_batch(MOVE_KEYS)]
        after = [rest[i] for i in hrw.Membership(rest, w_rest).pick_batch(MOVE_KEYS)]
        for b, a in zip(before, after, strict=True):
            if b == peers[gone]:
                assert a != b
            else:
                assert a == b


@fast
@given(pw=weighted_peers(), newcomer=st.uuids(), new_weight=weight_values)
def test_adding_a_peer_moves_keys_only_to_it(
    pw: tuple[list[uuid.UUID], list[float]], newcomer: uuid.UUID, new_weight: float
) -> None:
    peers, weights = pw
    if newcomer in peers:
        return
    grown = [*peers, newcomer]
    for w, w_grown in ((None, None), (weights, [*weights, new_weight])):
        before = [peers[i] for i in hrw.Membership(peers, w).pick_batch(MOVE_KEYS)]
        after = [grown[i] for i in hrw.Membership(grown, w_grown).pick_batch(MOVE_KEYS)]
        assert all(a in (b, newcomer) for b, a in zip(before, after, strict=True))


SHARE_KEYS = [f"share/{i}" for i in range(20000)]


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    peers=st.lists(st.uuids(), min_size=2, max_size=8, unique=True),
    data=st.data(),
)
def test_weighted_shares_track_weights(peers: list[uuid.UUID], data: st.DataObject) -> None:
    """Each peer's share of keys is weight / total, within 5 binomial standard deviations."""
    weights = data.draw(st.lists(st.floats(0.1, 10.0), min_size=len(peers), max_size=len(peers)))
    counts = np.bincount(
        hrw.Membership(peers, weights).pick_batch(SHARE_KEYS), minlength=len(peers)
    )
    n = len(SHARE_KEYS)
    total = sum(weights)
    for count, w in zip(counts, weights, strict=True):
        p = w / total
        assert abs(count - n * p) <= 5 * math.sqrt(n * p * (1 - p)) + 1, (count, n * p)


@fast
@given(
    peers=st.lists(st.uuids(), min_size=1, max_size=10, unique=True),
    key=keys,
    data=st.data(),
)
def test_pick_bounded_is_first_in_rank_with_room(
    peers: list[uuid.UUID], key: bytes | str, data: st.DataObject
) -> None:
    n = len(peers)
    loads = data.draw(st.lists(st.integers(0, 20), min_size=n, max_size=n))
    capacities = data.draw(st.none() | st.lists(st.integers(0, 25), min_size=n, max_size=n))
    c = data.draw(st.sampled_from([1.0, 1.25, 1.5, 2.0, 3.0]))
    bound = math.ceil(c * (sum(loads) + 1) / n)  # exact: these c are dyadic
    expected = next(
        (
            p
            for p in hrw.rank(key, peers)
            if loads[peers.index(p)] < bound
            and (capacities is None or loads[peers.index(p)] < capacities[peers.index(p)])
        ),
        None,
    )
    got = hrw.Membership(peers).pick_bounded(key, loads, c=c, capacities=capacities)
    assert got == expected
    if capacities is None:
        assert got is not None  # with c >= 1 someone is always below the bound
