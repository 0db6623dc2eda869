"""pytest-benchmark suite for hrw: ours beside the naive loop, grouped by N.

    pytest benchmarks/test_hrw_benchmark.py --benchmark-enable

(The project's addopts disable benchmarks, so a plain run only smoke-tests
each case once.) Every case in a group places the same keys, so the
relative columns of pytest-benchmark's table are the ratios. The script
`hrw_bench.py` prints the same comparison as keys/s and pairs/s.
"""

from __future__ import annotations

import uuid

import numpy as np
import pytest
from hrw_naive import naive_pick, naive_pick_batch

import hrw

PEER_COUNTS = [10, 100, 1000, 10_000]


def _peers(n: int) -> list[uuid.UUID]:
    rng = np.random.default_rng(n)
    return [uuid.UUID(bytes=rng.bytes(16)) for _ in range(n)]


def _keys(n_peers: int) -> list[str]:
    # Sized so that the naive loop takes ~0.1 s per round.
    count = max(10, 1_500_000 // n_peers)
    return [f"bucket-{i % 13}/inputs/{i:09d}.parquet" for i in range(count)]


@pytest.fixture(scope="module", autouse=True)
def _kernels_loaded() -> None:
    assert hrw.warm_up("jit") == "jit"


@pytest.mark.parametrize("n", PEER_COUNTS)
@pytest.mark.parametrize("path", ["naive", "jit", "jit-1-thread", "numpy", "jit-weighted"])
def test_pick_batch(benchmark: pytest.FixtureRequest, n: int, path: str) -> None:
    benchmark.group = f"pick_batch N={n}"  # type: ignore[attr-defined]
    peers = _peers(n)
    keys = _keys(n)
    if path == "naive":
        peer_bytes = [p.bytes for p in peers]
        result = benchmark(naive_pick_batch, keys, peer_bytes)  # type: ignore[operator]
        assert len(result) == len(keys)
        return
    weights = list(np.linspace(0.5, 4.0, n)) if path == "jit-weighted" else None
    m = hrw.Membership(peers, weights, backend="numpy" if path == "numpy" else "jit")
    threads = 1 if path == "jit-1-thread" else None
    result = benchmark(m.pick_batch, keys, threads=threads)  # type: ignore[operator]
    assert result.shape == (len(keys),)
    assert peers[result[0]] == hrw.rank(keys[0], peers, weights)[0]


@pytest.mark.parametrize("n", PEER_COUNTS)
@pytest.mark.parametrize("path", ["naive", "jit", "numpy", "jit-weighted"])
def test_pick_one(benchmark: pytest.FixtureRequest, n: int, path: str) -> None:
    benchmark.group = f"pick N={n}"  # type: ignore[attr-defined]
    peers = _peers(n)
    key = "bucket-3/inputs/000000042.parquet"
    if path == "naive":
        peer_bytes = [p.bytes for p in peers]
        benchmark(naive_pick, key.encode(), peer_bytes)  # type: ignore[operator]
        return
    weights = list(np.linspace(0.5, 4.0, n)) if path == "jit-weighted" else None
    m = hrw.Membership(peers, weights, backend="numpy" if path == "numpy" else "jit")
    assert benchmark(m.pick, key) == hrw.rank(key, peers, weights)[0]  # type: ignore[operator]


def test_key_hashing(benchmark: pytest.FixtureRequest) -> None:
    benchmark.group = "key hashing"  # type: ignore[attr-defined]
    keys = _keys(10)
    assert benchmark(hrw.key_hashes, keys).shape == (len(keys),)  # type: ignore[operator]
