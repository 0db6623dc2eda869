"""hrw: ties and near-ties, on crafted peer hashes, against the reference.

Real UUIDs almost never collide, so these tests build a membership of real
peers while `peer_hash` answers with hashes solved for a chosen key: fmix64 is
a bijection, so any target score can be reached. Peers are sorted first so the
given order is UUID-bytes order and "lowest index" = "smallest UUID".
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Sequence
from unittest import mock

import numpy as np
import pytest

import hrw
from hrw import numpy_kernels
from hrw.reference import FMIX_C1, FMIX_C2, MASK64, combine, weighted_score

BACKENDS: list[hrw.membership.Backend] = ["jit", "numpy"]
C1_INV = pow(FMIX_C1, -1, 1 << 64)
C2_INV = pow(FMIX_C2, -1, 1 << 64)
KEY = "objects/ties.bin"
KH = hrw.key_hash(KEY)
TOP33 = MASK64 ^ ((1 << 31) - 1)


def unfmix64(s: int) -> int:
    h = s ^ (s >> 33)
    h = (h * C2_INV) & MASK64
    h ^= h >> 33
    h = (h * C1_INV) & MASK64
    return h ^ (h >> 33)


def hash_for_score(target: int, kh: int = KH) -> int:
    """A peer hash whose score against key hash `kh` is `target`."""
    return unfmix64(target) ^ kh


def crafted(
    hashes: Sequence[int], weights: Sequence[float] | None, backend: hrw.membership.Backend
) -> hrw.Membership:
    """A membership of real peers, built while each peer hashes to its crafted hash."""
    rng = np.random.default_rng(len(hashes))
    peers = sorted(uuid.UUID(bytes=rng.bytes(16)) for _ in hashes)
    assert peers == sorted(peers, key=lambda p: p.bytes)  # index order = UUID-bytes order
    crafted_hash = dict(zip(peers, hashes, strict=True))
    with mock.patch.object(hrw.membership, "peer_hash", crafted_hash.__getitem__):
        return hrw.Membership(peers, weights, backend=backend)


def expected_order(kh: int, hashes: Sequence[int], weights: Sequence[float] | None) -> list[int]:
    """The reference ordering on hashes: score descending, then index (= UUID) ascending."""
    if weights is None:
        return sorted(range(len(hashes)), key=lambda j: (-combine(kh, hashes[j]), j))
    return sorted(
        range(len(hashes)), key=lambda j: (-weighted_score(combine(kh, hashes[j]), weights[j]), j)
    )


def check(hashes: Sequence[int], weights: Sequence[float] | None) -> None:
    """Every fast path on every backend equals the reference for KEY (and a few other keys)."""
    order = expected_order(KH, hashes, weights)
    for backend in BACKENDS:
        m = crafted(hashes, weights, backend)
        peers = m.peers
        assert m.pick(KEY) == peers[order[0]], backend
        assert m.pick_batch([KEY]).tolist() == [order[0]], backend
        assert m.top_k(KEY, len(peers)) == [peers[j] for j in order], backend
        assert m.top_k(KEY, 2) == [peers[j] for j in order[:2]], backend
        others = [f"other-{i}" for i in range(50)]
        got = m.pick_batch([*others, KEY]).tolist()
        want = [expected_order(hrw.key_hash(k), hashes, weights)[0] for k in others]
        assert got == [*want, order[0]], backend


def random_hashes(n: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    return [int(x) for x in rng.integers(0, 1 << 63, n, dtype=np.uint64) << np.uint64(1)]


@pytest.mark.parametrize("where", [(0, 1), (1, 0), (5, 17), (17, 5), (0, 31)])
def test_top_33_bits_collide_at_the_top(where: tuple[int, int]) -> None:
    """Two scores share the high bits the packed kernel compares: full scores must decide."""
    hashes = random_hashes(32, seed=1)
    hi, lo = where
    hashes[hi] = hash_for_score(TOP33 | 0x55)
    hashes[lo] = hash_for_score(TOP33 | 0x54)
    check(hashes, None)


def test_three_way_collision_and_a_full_tie() -> None:
    hashes = random_hashes(16, seed=2)
    hashes[3] = hash_for_score(TOP33 | 7)
    hashes[9] = hash_for_score(TOP33 | 7)  # identical score: smaller UUID (index 3) wins
    hashes[12] = hash_for_score(TOP33 | 6)
    check(hashes, None)
    assert expected_order(KH, hashes, None)[:3] == [3, 9, 12]


def test_collision_below_the_winner_is_harmless() -> None:
    hashes = random_hashes(16, seed=3)
    hashes[2] = hash_for_score((TOP33 - (1 << 31)) | 9)
    hashes[4] = hash_for_score((TOP33 - (1 << 31)) | 8)
    hashes[11] = hash_for_score(TOP33 | 1)
    check(hashes, None)


def test_identical_peer_hashes_tie_by_uuid() -> None:
    hashes = random_hashes(8, seed=4)
    hashes[6] = hashes[1]
    hashes[7] = hashes[1]
    check(hashes, None)
    for backend in BACKENDS:
        m = crafted(hashes, None, backend)
        for i in range(300):
            if expected_order(hrw.key_hash(f"k{i}"), hashes, None)[0] in (1, 6, 7):
                assert m.pick(f"k{i}") == m.peers[1]


def test_jit_constants_match() -> None:
    # numba caches compiled kernels per source file, so jit_kernels keeps its own copies.
    jit_kernels = pytest.importorskip("hrw.jit_kernels")
    assert int(jit_kernels._C1) == FMIX_C1
    assert int(jit_kernels._C2) == FMIX_C2
    for name in ("WEIGHTED_TIE_EPS", "WEIGHTED_SAFE_MIN", "WEIGHTED_SAFE_MAX"):
        assert getattr(jit_kernels, name) == getattr(numpy_kernels, name)


def test_packed_kernel_flags_collisions_directly() -> None:
    jit_kernels = pytest.importorskip("hrw.jit_kernels")
    hashes = np.array(
        [hash_for_score(TOP33 | 1), hash_for_score(TOP33 | 2), hash_for_score(5)], dtype=np.uint64
    )
    mixed = numpy_kernels.mix(hashes)
    assert jit_kernels.pick_unweighted_one(np.uint64(KH), mixed) == 1
    out = np.empty(1, dtype=np.int64)
    jit_kernels.pick_unweighted_batch(np.array([KH], dtype=np.uint64), mixed, out)
    assert out.tolist() == [1]


# --- weighted -----------------------------------------------------------------


def test_weighted_exact_tie() -> None:
    hashes = random_hashes(10, seed=5)
    hashes[8] = hash_for_score(TOP33 | 3)
    hashes[2] = hashes[8]
    weights = [1.0] * 10
    check(hashes, weights)
    assert expected_order(KH, hashes, weights)[:2] == [2, 8]


def test_weighted_ties_within_the_low_11_bits() -> None:
    # Scores differing only in bits the weighted formula drops: same u, weight decides.
    hashes = random_hashes(10, seed=6)
    hashes[1] = hash_for_score(TOP33 | 0x7FF)
    hashes[7] = hash_for_score(TOP33 | 0x001)
    for w1, w7 in ((1.0, 1.0), (1.0, math.nextafter(1.0, 2.0)), (math.nextafter(1.0, 2.0), 1.0)):
        weights = [1.0] * 10
        weights[1], weights[7] = w1, w7
        check(hashes, weights)


def test_weighted_near_tie_across_weights() -> None:
    # -2/ln(u2) vs -1/ln(u1) with u2 ~ u1**2: equal to ~1e-16, below any log's accuracy.
    rng = np.random.default_rng(7)
    for trial in range(40):
        hashes = random_hashes(12, seed=100 + trial)
        m1 = (1 << 53) - int(rng.integers(2, 1 << 20))
        u1 = (m1 + 0.5) / 2.0**53
        m2 = round(u1 * u1 * 2.0**53 - 0.5) + int(rng.integers(-1, 2))
        hashes[4] = hash_for_score((m1 << 11) | int(rng.integers(0, 2048)))
        hashes[9] = hash_for_score((m2 << 11) | int(rng.integers(0, 2048)))
        weights = [0.01] * 12
        weights[4], weights[9] = 1.0, 2.0
        check(hashes, weights)


def test_weighted_score_of_one_is_minus_infinity() -> None:
    # Top 53 bits all ones: u rounds to 1.0, ln(u) = +0.0, -w / +0.0 = -inf (IEEE).
    top = ((1 << 53) - 1) << 11
    assert weighted_score(top | 5, 3.0) == -math.inf
    assert weighted_score(top - (1 << 11), 3.0) > 1e15
    hashes = random_hashes(6, seed=8)
    hashes[0] = hash_for_score(top | 5)
    check(hashes, [1.0] * 6)
    assert expected_order(KH, hashes, [1.0] * 6)[-1] == 0
    hashes[3] = hash_for_score(top | 9)  # two at -inf: tie by UUID among the last
    check(hashes, [1.0] * 6)
    check(hashes[:1] + hashes[3:4], [1.0, 2.0])  # only -inf peers


@pytest.mark.parametrize("extreme", [1e-300, 5e-324, 1e-100, 1e100, 1e300, 1.7e308])
def test_extreme_weights(extreme: float) -> None:
    hashes = random_hashes(8, seed=9)
    weights = [1.0, extreme, 2.0, extreme, 0.5, 1.0, extreme, 3.0]
    check(hashes, weights)
    # Weight ratios beyond 1e250 would underflow the JIT kernel's bounds: NumPy takes over.
    m = crafted(hashes, weights, "jit")
    uses_numpy = m.kernels_in_use() == "numpy"
    assert uses_numpy == (not 1e-200 < extreme < 1e200)


def test_weighted_kernels_flag_near_ties() -> None:
    hashes = np.array([hash_for_score(TOP33 | 1)] * 2 + [hash_for_score(9)], dtype=np.uint64)
    mixed = numpy_kernels.mix(hashes)
    weights = np.ones(3)
    assert numpy_kernels.pick_weighted_one(KH, mixed, weights, weights) == -1
    jit_kernels = pytest.importorskip("hrw.jit_kernels")
    assert jit_kernels.pick_weighted_one(np.uint64(KH), mixed, weights, 1 / weights) == -1
    weights[0] = 2.0
    assert numpy_kernels.pick_weighted_one(KH, mixed, weights, weights) == 0
    assert jit_kernels.pick_weighted_one(np.uint64(KH), mixed, weights, 2 / weights) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_weighted_sweep_matches_the_reference(backend: hrw.membership.Backend) -> None:
    """Many keys: NumPy's SIMD log differs from math.log in the last ulp on some
    inputs; the near-tie rule must make that invisible."""
    rng = np.random.default_rng(10)
    peers = [uuid.UUID(bytes=rng.bytes(16)) for _ in range(40)]
    weights = list(rng.choice([0.5, 1.0, 1.0, 2.0, 3.7], 40))
    keys = [f"sweep/{i}" for i in range(4000)]
    m = hrw.Membership(peers, weights, backend=backend)
    got = m.pick_batch(keys).tolist()
    assert got == [peers.index(hrw.rank(k, peers, weights)[0]) for k in keys]
