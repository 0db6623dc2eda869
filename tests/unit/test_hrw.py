"""hrw: the shared vectors, the public API's contract, and bounded loads."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import uuid
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import hrw

BACKENDS: list[hrw.membership.Backend] = ["jit", "numpy"]


# shared/hrw_vectors.json, which every implementation must reproduce, lives
# beside a checkout; a clone made elsewhere (a temp folder, a CI workspace) uses
# this copy of it, pinned by digest and compared with the original when present.
SHARED_VECTORS = Path(__file__).parents[3] / "shared" / "hrw_vectors.json"
VECTORS_COPY = Path(__file__).with_name("hrw_vectors.json")
VECTORS_SHA256 = "3a56ce9906028175ecfa304dd0bd23cbcebd38246bba49ccb8bdf88f0abf4898"


def _vectors_path() -> Path:
    from_env = os.environ.get("ANVIL_HRW_VECTORS")
    if from_env:
        return Path(from_env)
    return SHARED_VECTORS if SHARED_VECTORS.is_file() else VECTORS_COPY


def test_the_vectors_copy_is_the_shared_file() -> None:
    copy = VECTORS_COPY.read_bytes()
    assert hashlib.sha256(copy).hexdigest() == VECTORS_SHA256
    if SHARED_VECTORS.is_file():
        assert copy == SHARED_VECTORS.read_bytes(), "refresh tests/unit/hrw_vectors.json"


VECTORS: dict[str, Any] = json.loads(_vectors_path().read_text())
VECTOR_PEERS = [uuid.UUID(p) for p in VECTORS["peers"]]
CASES = VECTORS["cases"]


def _peers(n: int, seed: int = 7) -> list[uuid.UUID]:
    rng = np.random.default_rng(seed)
    return [uuid.UUID(bytes=rng.bytes(16)) for _ in range(n)]


@pytest.fixture(scope="module", autouse=True)
def _jit_loaded() -> None:
    assert hrw.warm_up("jit") == "jit"


# --- the vectors, bit for bit -------------------------------------------------


def test_vector_peer_hashes() -> None:
    assert [f"{hrw.peer_hash(p):016x}" for p in VECTOR_PEERS] == VECTORS["peer_hashes"]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c["key_hex"][:16] or "empty")
def test_vector_reference(case: dict[str, Any]) -> None:
    key = bytes.fromhex(case["key_hex"])
    assert f"{hrw.key_hash(key):016x}" == case["key_hash"]
    assert [f"{hrw.score(key, p):016x}" for p in VECTOR_PEERS] == case["scores"]
    assert [str(p) for p in hrw.rank(key, VECTOR_PEERS)] == case["rank"]
    weighted = hrw.rank(key, VECTOR_PEERS, case["weights"])
    assert [str(p) for p in weighted] == case["weighted_rank"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c["key_hex"][:16] or "empty")
def test_vector_membership(case: dict[str, Any], backend: hrw.membership.Backend) -> None:
    key = bytes.fromhex(case["key_hex"])
    n = len(VECTOR_PEERS)
    for weights, expected in ((None, case["rank"]), (case["weights"], case["weighted_rank"])):
        m = hrw.Membership(VECTOR_PEERS, weights, backend=backend)
        assert str(m.pick(key)) == expected[0]
        assert str(VECTOR_PEERS[m.pick_batch([key])[0]]) == expected[0]
        assert [str(p) for p in m.top_k(key, n)] == expected
        assert [str(p) for p in m.top_k(key, 3)] == expected[:3]


def test_vector_keys_as_text() -> None:
    for case in CASES:
        key = bytes.fromhex(case["key_hex"])
        try:
            text = key.decode("utf-8")
        except UnicodeDecodeError:
            continue
        assert f"{hrw.key_hash(text):016x}" == case["key_hash"]
        assert [str(p) for p in hrw.rank(text, VECTOR_PEERS)] == case["rank"]


def test_fmix64_is_murmur3_finalizer() -> None:
    assert hrw.fmix64(0) == 0
    # Known value of MurmurHash3's fmix64(1).
    assert hrw.fmix64(1) == 0xB456BCFC34C2CB2C


# --- API contract -------------------------------------------------------------


def test_import_does_not_load_numba() -> None:
    code = (
        "import sys, uuid, hrw; hrw.Membership([uuid.uuid4()]).top_k('k', 1);"
        " print('numba' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_jit_kernels_load_from_the_disk_cache() -> None:
    # This process has compiled (or loaded) the kernels; a new one must hit the cache.
    code = (
        "import hrw; hrw.warm_up('jit'); from hrw import jit_kernels as j;"
        " fs = (j.pick_unweighted_one, j.pick_unweighted_batch,"
        " j.pick_weighted_one, j.pick_weighted_batch);"
        " print(all(f.stats.cache_hits and not f.stats.cache_misses for f in fs))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_peer_lists(backend: hrw.membership.Backend) -> None:
    a, b = _peers(2)
    with pytest.raises(ValueError, match="at least one peer"):
        hrw.Membership([], backend=backend)
    with pytest.raises(ValueError, match="at least one peer"):
        hrw.rank("k", [])
    with pytest.raises(ValueError, match=f"duplicate peer ids: {a}"):
        hrw.Membership([a, b, a], backend=backend)
    with pytest.raises(ValueError, match="duplicate"):
        hrw.rank("k", [b, b])
    with pytest.raises(TypeError, match=r"uuid\.UUID"):
        hrw.Membership([a, str(b)], backend=backend)  # type: ignore[list-item]


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf, -math.inf])
def test_bad_weights(bad: float) -> None:
    a, b = _peers(2)
    with pytest.raises(ValueError, match=rf"weight of peer {b} must be finite and > 0"):
        hrw.Membership([a, b], [1.0, bad])
    with pytest.raises(ValueError, match="finite and > 0"):
        hrw.rank("k", [a, b], [bad, 1.0])


def test_weights_shape_and_mapping() -> None:
    a, b, c = _peers(3)
    with pytest.raises(ValueError, match="2 weights for 3 peers"):
        hrw.Membership([a, b, c], [1.0, 2.0])
    with pytest.raises(ValueError, match=f"no weight given for peers: {c}"):
        hrw.Membership([a, b, c], {a: 1.0, b: 2.0})
    with pytest.raises(TypeError, match="must be a number"):
        hrw.Membership([a, b], [1.0, "2"])  # type: ignore[list-item]
    by_map = hrw.Membership([a, b, c], {c: 3.0, a: 1.0, b: 2.0, uuid.uuid4(): 9.0})
    by_seq = hrw.Membership([a, b, c], [1, 2, 3.0])
    assert by_map.weights == by_seq.weights == (1.0, 2.0, 3.0)
    keys = [f"k{i}" for i in range(200)]
    assert (by_map.pick_batch(keys) == by_seq.pick_batch(keys)).all()


def test_bad_keys() -> None:
    m = hrw.Membership(_peers(3))
    with pytest.raises(TypeError, match="bytes or str"):
        m.pick(42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="bytes or str"):
        m.pick_batch(["a", 42])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="UTF-8"):
        hrw.key_hash("\ud800")
    with pytest.raises(ValueError, match="UTF-8"):
        m.pick_batch(["fine", "\ud800"])
    with pytest.raises(TypeError, match="single key"):
        m.pick_batch("one key")


def test_text_keys_are_utf8_and_mixed_batches_work() -> None:
    peers = _peers(20)
    m = hrw.Membership(peers)
    keys: list[bytes | str] = ["résumé", "résumé".encode(), b"\xff\x00", "", b"", "日本"]
    got = [peers[i] for i in m.pick_batch(keys)]
    assert got == [hrw.rank(k, peers)[0] for k in keys]
    assert got[0] == got[1]
    assert m.pick_batch(iter(keys)).tolist() == m.pick_batch(keys).tolist()
    assert m.pick_batch([]).shape == (0,)
    assert m.pick_batch([]).dtype == np.int64


def test_peers_keep_their_order() -> None:
    peers = _peers(50)
    m = hrw.Membership(peers)
    assert m.peers == tuple(peers)
    assert len(m) == 50
    assert m.weights is None
    keys = [f"job-{i}" for i in range(500)]
    assert [peers[i] for i in m.pick_batch(keys)] == [hrw.rank(k, peers)[0] for k in keys]


def test_top_k_bounds() -> None:
    peers = _peers(10)
    m = hrw.Membership(peers)
    assert m.top_k("k", 0) == []
    assert m.top_k("k", 99) == hrw.rank("k", peers)
    with pytest.raises(ValueError, match="k must be >= 0"):
        m.top_k("k", -1)


def test_single_peer() -> None:
    (p,) = _peers(1)
    for weights in (None, [0.3]):
        m = hrw.Membership([p], weights)
        assert m.pick("x") == p
        assert m.pick_batch(["x", "y"]).tolist() == [0, 0]
        assert m.top_k("x", 2) == [p]


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_threads_give_the_same_answer(threads: int) -> None:
    peers = _peers(300)
    keys = [f"obj/{i}" for i in range(3000)]
    expected = [peers.index(hrw.rank(k, peers)[0]) for k in keys[:200]]
    for weights in (None, list(np.linspace(0.5, 3.0, 300))):
        m = hrw.Membership(peers, weights)
        got = m.pick_batch(keys, threads=threads)
        assert got.tolist() == m.pick_batch(keys, threads=1).tolist()
        if weights is None:
            assert got[:200].tolist() == expected
    with pytest.raises(ValueError, match="threads"):
        hrw.Membership(peers).pick_batch(keys, threads=0)


def test_explicit_backend_is_reported() -> None:
    assert hrw.warm_up("numpy") == "numpy"
    assert "backend='numpy'" in repr(hrw.Membership(_peers(2), backend="numpy"))
    with pytest.raises(ValueError, match="backend"):
        hrw.Membership(_peers(2), backend="gpu")  # type: ignore[arg-type]


# --- bounded loads ------------------------------------------------------------


def _bounded_by_rank(
    *,
    key: str,
    peers: list[uuid.UUID],
    weights: list[float] | None,
    loads: list[int],
    c: float,
    capacities: list[int] | None,
) -> uuid.UUID | None:
    """Straight from the definition: first peer in rank order with room."""
    bound = math.ceil(Fraction(repr(c)) * (sum(loads) + 1) / len(peers))
    for p in hrw.rank(key, peers, weights):
        i = peers.index(p)
        if loads[i] < bound and (capacities is None or loads[i] < capacities[i]):
            return p
    return None


def test_bounded_with_no_load_is_the_plain_pick() -> None:
    peers = _peers(8)
    m = hrw.Membership(peers)
    for i in range(100):
        assert m.pick_bounded(f"k{i}", [0] * 8) == m.pick(f"k{i}")
        assert m.pick_bounded(f"k{i}", {}) == m.pick(f"k{i}")


def test_bounded_skips_full_peers_in_rank_order() -> None:
    peers = _peers(4)
    m = hrw.Membership(peers)
    order = hrw.rank("job", peers)
    loads = {order[0]: 2}
    # sum+1 = 3 jobs over 4 peers, c=1.25: bound ceil(0.9375) = 1 -> the owner (2) is full.
    assert m.pick_bounded("job", loads) == order[1]
    assert m.pick_bounded("job", loads, c=3.0) == order[0]  # bound ceil(2.25) = 3
    caps = {order[0]: 5, order[1]: 0}
    assert m.pick_bounded("job", loads, c=3.0, capacities=caps) == order[0]
    assert m.pick_bounded("job", {}, capacities=caps) == order[0]
    assert m.pick_bounded("job", {order[0]: 1}, c=3.0, capacities={order[0]: 1}) == order[1]


def test_bounded_returns_none_when_every_peer_is_full() -> None:
    peers = _peers(3)
    for weights in (None, [1.0, 2.0, 3.0]):
        m = hrw.Membership(peers, weights)
        assert m.pick_bounded("k", [1, 1, 1], capacities=[1, 1, 1]) is None
        assert m.pick_bounded("k", [0, 0, 0], capacities=[0, 0, 0]) is None


def test_bounded_keeps_load_within_the_bound() -> None:
    peers = _peers(10)
    m = hrw.Membership(peers)
    loads = [0] * 10
    for i in range(1000):
        p = m.pick_bounded(f"job-{i}", loads)
        assert p is not None
        loads[peers.index(p)] += 1
        assert max(loads) <= math.ceil(1.25 * sum(loads) / 10)


def test_bounded_takes_c_as_written() -> None:
    # 100 jobs (99 running + this one) on 2 peers, c = 1.1: the bound is 55. In
    # float arithmetic 1.1 * 100 / 2 is 55.00000000000001, whose ceiling is 56.
    peers = _peers(2)
    m = hrw.Membership(peers)
    order = hrw.rank("k", peers)
    assert m.pick_bounded("k", {order[0]: 55, order[1]: 44}, c=1.1) == order[1]
    assert m.pick_bounded("k", {order[0]: 54, order[1]: 45}, c=1.1) == order[0]
    assert m.pick_bounded("k", {order[0]: 55, order[1]: 44}, c=Fraction(12, 10)) == order[0]
    assert m.pick_bounded("k", {order[0]: 55, order[1]: 44}, c=2) == order[0]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"c": 0.9}, ValueError, "c must be >= 1"),
        ({"c": math.nan}, ValueError, "finite"),
        ({"c": math.inf}, ValueError, "finite"),
        ({"loads": [0, -1, 0]}, ValueError, "loads must be >= 0"),
        ({"loads": [0, 0]}, ValueError, "one count per peer"),
        ({"loads": [0.0, 1.0, 0.0]}, TypeError, "integers"),
        ({"capacities": [1, -1, 1]}, ValueError, "capacities must be >= 0"),
    ],
)
def test_bounded_rejects_bad_input(kwargs: dict[str, Any], error: type, match: str) -> None:
    m = hrw.Membership(_peers(3))
    args: dict[str, Any] = {"loads": [0, 0, 0], **kwargs}
    with pytest.raises(error, match=match):
        m.pick_bounded("k", **args)


def test_bounded_mapping_rejects_non_integer_counts() -> None:
    peers = _peers(3)
    with pytest.raises(TypeError, match="integer"):
        hrw.Membership(peers).pick_bounded("k", {peers[0]: 1.5})  # type: ignore[dict-item]


@pytest.mark.parametrize("backend", BACKENDS)
def test_bounded_matches_the_definition(backend: hrw.membership.Backend) -> None:
    rng = np.random.default_rng(3)
    peers = _peers(12)
    weights = list(rng.uniform(0.2, 5.0, 12))
    for w in (None, weights):
        m = hrw.Membership(peers, w, backend=backend)
        for i in range(300):
            loads = rng.integers(0, 6, 12).tolist()
            caps = rng.integers(0, 8, 12).tolist() if i % 2 else None
            c = float(rng.choice([1.0, 1.1, 1.25, 2.0]))
            expected = _bounded_by_rank(
                key=f"k{i}", peers=peers, weights=w, loads=loads, c=c, capacities=caps
            )
            assert m.pick_bounded(f"k{i}", loads, c=c, capacities=caps) == expected
