"""`Membership`: a peer set with precomputed hashes and the fast placement calls.

Peers are kept internally sorted by UUID bytes, so the reference's tie rule
("ties by peer UUID bytes ascending") is "lowest internal index wins" in every
kernel; results are translated back to the caller's order.

Backends: "jit" (numba kernels, `jit_kernels`), "numpy" (`numpy_kernels`) and
"auto" (jit if numba loads, else numpy). Numba is imported and the kernels
compiled or loaded from cache on the first pick that needs them, never on
`import hrw`; `warm_up()` does it ahead of time.
"""

from __future__ import annotations

import math
import numbers
import os
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from fractions import Fraction
from typing import Any, Literal, Protocol, cast

import numpy as np
import numpy.typing as npt
import xxhash

from hrw import numpy_kernels
from hrw.numpy_kernels import WEIGHTED_SAFE_MAX, WEIGHTED_SAFE_MIN, WEIGHTED_TIE_EPS
from hrw.reference import (
    Key,
    Weights,
    combine,
    key_bytes,
    key_hash,
    peer_hash,
    validate_peers,
    validate_weights,
    weighted_score,
)

Backend = Literal["auto", "jit", "numpy"]
U64Array = npt.NDArray[np.uint64]
I64Array = npt.NDArray[np.int64]
F64Array = npt.NDArray[np.float64]
Counts = Sequence[int] | Mapping[uuid.UUID, int] | npt.NDArray[np.integer[Any]]

_NO_CAPACITY_LIMIT = np.iinfo(np.int64).max
_SPLIT_PAIRS = 1 << 24  # below this, starting a thread costs more than it saves
_MAX_WEIGHT_RATIO = 1e250  # beyond this the JIT weighted kernel's bounds could underflow


class _Kernels(Protocol):
    """What `jit_kernels` and `numpy_kernels` both provide."""

    def pick_unweighted_one(self, key_hash: Any, peer_mixed: U64Array) -> Any: ...

    def pick_unweighted_batch(
        self, key_hashes: U64Array, peer_mixed: U64Array, out: I64Array
    ) -> None: ...

    def pick_weighted_one(
        self, key_hash: Any, peer_mixed: U64Array, weights: F64Array, inverse_weights: F64Array
    ) -> Any: ...

    def pick_weighted_batch(
        self,
        key_hashes: U64Array,
        peer_mixed: U64Array,
        weights: F64Array,
        inverse_weights: F64Array,
        out: I64Array,
    ) -> None: ...


class _LazyJit:
    """Imports `jit_kernels` (numba) once, on first use; remembers why if it fails."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.kernels: _Kernels | None = None
        self.error: BaseException | None = None

    def load(self) -> _Kernels | None:
        if self.kernels is None and self.error is None:
            with self._lock:
                if self.kernels is None and self.error is None:
                    try:
                        from hrw import jit_kernels
                    except Exception as exc:  # numba missing, or it cannot compile here
                        self.error = exc
                    else:
                        self.kernels = cast(_Kernels, jit_kernels)
        return self.kernels


_jit = _LazyJit()


def _kernels_for(backend: Backend) -> _Kernels:
    if backend == "numpy":
        return cast(_Kernels, numpy_kernels)
    jit = _jit.load()
    if jit is not None:
        return jit
    if backend == "jit":
        raise RuntimeError(f"the numba kernels are unavailable: {_jit.error!r}") from _jit.error
    return cast(_Kernels, numpy_kernels)


def warm_up(backend: Backend = "auto") -> str:
    """Load the kernels now (import numba, compile or load its cache); returns "jit" or "numpy".

    Call it at daemon start so that the first placement does not pay for it.
    Raises RuntimeError if `backend="jit"` and numba cannot be used.
    """
    return "jit" if _kernels_for(backend) is _jit.kernels else "numpy"


def key_hashes(keys: Iterable[Key]) -> U64Array:
    """key_hash of every key, as a uint64 array (str keys as UTF-8).

    Raises TypeError if `keys` is itself a str or bytes (one key, not a batch).
    """
    if isinstance(keys, str | bytes | bytearray | memoryview):
        raise TypeError("expected an iterable of keys, got a single key")
    key_list = keys if isinstance(keys, list | tuple) else list(keys)
    n = len(key_list)
    if n == 0:
        return np.empty(0, dtype=np.uint64)
    digest = xxhash.xxh3_64_intdigest
    try:
        # The common case, all str or all bytes, without a per-key type test.
        if isinstance(key_list[0], str):
            hashes = map(digest, map(str.encode, key_list))
        else:
            hashes = map(digest, key_list)
        return np.fromiter(hashes, dtype=np.uint64, count=n)
    except (TypeError, UnicodeEncodeError):
        return np.fromiter((digest(key_bytes(k)) for k in key_list), dtype=np.uint64, count=n)


class Membership:
    """A fixed set of peers (optionally weighted) ready for fast HRW placement.

    Every pick equals the reference (`hrw.rank(key, peers, weights)[0]`) bit for
    bit, ties and near-ties included. Raises ValueError on an empty or
    duplicated peer list or a weight that is not finite and positive, TypeError
    on a peer that is not a `uuid.UUID`; RuntimeError with `backend="jit"` when
    numba cannot be used. Immutable; safe to share between threads (the JIT
    kernels release the GIL).
    """

    __slots__ = (
        "_backend",
        "_index",
        "_inverse_weights",
        "_kernels",
        "_order",
        "_peer_hashes",
        "_peer_mixed",
        "_peers",
        "_weights",
        "_weights_internal",
    )

    def __init__(
        self,
        peers: Sequence[uuid.UUID],
        weights: Weights | None = None,
        *,
        backend: Backend = "auto",
    ) -> None:
        peer_list = validate_peers(peers)
        if len(peer_list) >= 1 << 31:
            raise ValueError(f"at most 2**31 - 1 peers are supported, got {len(peer_list)}")
        if backend not in ("auto", "jit", "numpy"):
            raise ValueError(f'backend must be "auto", "jit" or "numpy", got {backend!r}')
        self._peers = tuple(peer_list)
        self._index = {p: i for i, p in enumerate(peer_list)}
        order = sorted(range(len(peer_list)), key=lambda i: peer_list[i].bytes)
        self._order: I64Array = np.array(order, dtype=np.int64)
        self._peer_hashes: U64Array = np.array(
            [peer_hash(peer_list[i]) for i in order], dtype=np.uint64
        )
        self._peer_mixed: U64Array = numpy_kernels.mix(self._peer_hashes)
        self._weights: tuple[float, ...] | None = None
        self._weights_internal: F64Array | None = None
        self._inverse_weights: F64Array = np.empty(0)
        if weights is not None:
            ws = validate_weights(weights, peer_list)
            self._weights = tuple(ws)
            self._weights_internal = np.array([ws[i] for i in order], dtype=np.float64)
            # The JIT kernel bounds L / w in floats; scaled so the largest weight
            # is 1, every bound stays a normal float unless weights span > 1e250.
            with np.errstate(over="ignore"):  # inf: a ratio beyond any float, see _get_kernels
                self._inverse_weights = self._weights_internal.max() / self._weights_internal
        self._backend: Backend = backend
        self._kernels: _Kernels | None = None
        if backend != "auto":
            self._get_kernels()

    @property
    def peers(self) -> tuple[uuid.UUID, ...]:
        """The peers in the order given; `pick_batch` indices point into this."""
        return self._peers

    @property
    def weights(self) -> tuple[float, ...] | None:
        """The weights aligned with `peers`, or None for unweighted HRW."""
        return self._weights

    def __len__(self) -> int:
        return len(self._peers)

    def __repr__(self) -> str:
        kind = "unweighted" if self._weights is None else "weighted"
        return f"Membership({len(self._peers)} peers, {kind}, backend={self._backend!r})"

    def kernels_in_use(self) -> Literal["jit", "numpy"]:
        """The kernels its picks run on: "numpy" whatever the backend when the weights
        span a ratio beyond 1e250 (the JIT kernel's bounds would underflow).

        Loads them first if no pick has yet; raises as `pick` would.
        """
        return "jit" if self._get_kernels() is _jit.kernels else "numpy"

    def _get_kernels(self) -> _Kernels:
        if self._kernels is None:
            kernels = _kernels_for(self._backend)
            if self._inverse_weights.size and self._inverse_weights.max() > _MAX_WEIGHT_RATIO:
                kernels = _kernels_for("numpy")
            self._kernels = kernels
        return self._kernels

    def pick(self, key: Key) -> uuid.UUID:
        """The peer that owns `key`: `rank(key, peers, weights)[0]`."""
        return self._peers[int(self._order[self._pick_internal(key_hash(key), None)])]

    def pick_batch(self, keys: Iterable[Key], *, threads: int | None = None) -> I64Array:
        """For each key, the index into `peers` of its owner (int64 array, one per key).

        Equals `[peers.index(rank(k, peers, weights)[0]) for k in keys]`. With the
        JIT backend a large batch (>= 2**24 key-peer pairs) is split over
        `threads` threads (default: the CPUs this process may use, at most 8),
        each started for this call only; `threads=1` stays on the caller's thread.
        """
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        hashes = key_hashes(keys)
        out = np.empty(hashes.shape[0], dtype=np.int64)
        if hashes.shape[0] == 0:
            return out
        kernels = self._get_kernels()
        weights = self._weights_internal
        if weights is None:

            def run(lo: int, hi: int) -> None:
                kernels.pick_unweighted_batch(hashes[lo:hi], self._peer_mixed, out[lo:hi])
        else:

            def run(lo: int, hi: int) -> None:
                kernels.pick_weighted_batch(
                    hashes[lo:hi], self._peer_mixed, weights, self._inverse_weights, out[lo:hi]
                )

        if kernels is _jit.kernels:
            _run_split(run, hashes.shape[0], len(self._peers), threads)
        else:
            run(0, hashes.shape[0])
        if weights is not None:
            for i in np.flatnonzero(out < 0):
                out[i] = self._settle_weighted(int(hashes[i]), None, weights)
        return self._order[out]

    def top_k(self, key: Key, k: int) -> list[uuid.UUID]:
        """The k best peers for `key`, best first (the failover order): `rank(...)[:k]`.

        k larger than the membership returns every peer; ValueError if k < 0.
        """
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        n = len(self._peers)
        k = min(k, n)
        if k == 0:
            return []
        kh = key_hash(key)
        if self._weights_internal is None:
            # Descending uint64 score = ascending bitwise complement; stable = index ties.
            neg = ~numpy_kernels.scores(kh, self._peer_mixed)
            if k < n:
                kth = np.partition(neg, k - 1)[k - 1]
                candidates = np.flatnonzero(neg <= kth)
            else:
                candidates = np.arange(n)
            best = candidates[np.argsort(neg[candidates], kind="stable")][:k]
        else:
            best = self._top_k_weighted(kh, k, self._weights_internal)
        return [self._peers[int(self._order[j])] for j in best]

    def _top_k_weighted(self, kh: int, k: int, weights: F64Array) -> I64Array:
        # NumPy's log may round differently from the reference: take every peer
        # that could be in the top k, then order those with the reference itself.
        n = len(self._peers)
        approx = numpy_kernels.weighted_scores(kh, self._peer_mixed, weights)
        candidates = np.arange(n)
        if k < n:
            kth = -np.partition(-approx, k - 1)[k - 1]
            if WEIGHTED_SAFE_MIN < kth < WEIGHTED_SAFE_MAX:
                candidates = np.flatnonzero(approx >= kth * (1.0 - WEIGHTED_TIE_EPS))
        exact = sorted(
            (-weighted_score(combine(kh, int(self._peer_hashes[j])), float(weights[j])), int(j))
            for j in candidates
        )
        return np.array([j for _, j in exact[:k]], dtype=np.int64)

    def pick_bounded(
        self,
        key: Key,
        loads: Counts,
        c: float | Fraction = 1.25,
        capacities: Counts | None = None,
    ) -> uuid.UUID | None:
        """The highest-ranked peer with room: consistent hashing with bounded loads.

        A peer has room when its load is below the bound ceil(c * (sum(loads) + 1) / n)
        and below its own capacity. The mean counts the job being placed (Mirrokni,
        Thorup & Zadimoghaddam, "Consistent Hashing with Bounded Loads"): with all
        loads at 0 the bound is ceil(c / n) = 1, so every peer can take the job, and
        with c >= 1 some peer always has room unless capacities say otherwise. The
        bound is computed exactly, taking a float `c` as the decimal it prints as
        (1.1 is 11/10): c=1.1 with 100 jobs on 2 peers gives 55, where float
        arithmetic (55.00000000000001) and the binary value of 1.1 give 56.

        `loads` and `capacities` are sequences aligned with `peers` or mappings by
        peer id; a peer missing from a mapping has load 0, or no capacity limit.
        Returns None when no peer has room. Raises ValueError on c < 1 or not
        finite, on negative loads or capacities, and on a sequence of the wrong
        length; TypeError on non-integer counts.
        """
        if isinstance(c, bool) or not isinstance(c, numbers.Real) or not math.isfinite(c):
            raise ValueError(f"c must be a finite number >= 1, got {c!r}")
        if c < 1:
            raise ValueError(f"c must be >= 1 (c = 1 is perfect balance), got {c!r}")
        n = len(self._peers)
        load = self._per_peer(loads, "loads", 0)
        bound = math.ceil(_as_written(c) * (int(load.sum()) + 1) / n)
        room = load < bound
        if capacities is not None:
            room &= load < self._per_peer(capacities, "capacities", _NO_CAPACITY_LIMIT)
        if room.all():
            return self.pick(key)
        subset = np.flatnonzero(room[self._order])
        if subset.shape[0] == 0:
            return None
        return self._peers[int(self._order[self._pick_internal(key_hash(key), subset)])]

    def _per_peer(self, values: Counts, name: str, missing: int) -> I64Array:
        """Counts aligned with `peers` (caller's order), validated non-negative."""
        n = len(self._peers)
        if isinstance(values, Mapping):
            out = np.full(n, missing, dtype=np.int64)
            for peer, value in values.items():
                i = self._index.get(peer)
                if i is not None:
                    out[i] = _count(value, name, peer)
        else:
            arr = np.asarray(values)
            if arr.shape != (n,):
                raise ValueError(f"{name} has shape {arr.shape}; need one count per peer ({n})")
            if arr.dtype.kind not in "iu":
                raise TypeError(f"{name} must be integers, got dtype {arr.dtype}")
            out = arr.astype(np.int64)
        if (out < 0).any():
            bad = [str(self._peers[i]) for i in np.flatnonzero(out < 0)]
            raise ValueError(f"{name} must be >= 0; negative for peers {', '.join(bad)}")
        return out

    def _pick_internal(self, kh: int, subset: I64Array | None) -> int:
        """Internal index of the winner among all peers or among `subset` (internal indices)."""
        kernels = self._get_kernels()
        mixed = self._peer_mixed if subset is None else self._peer_mixed[subset]
        if self._weights_internal is None:
            j = int(kernels.pick_unweighted_one(kh, mixed))
        else:
            weights = self._weights_internal
            inverse = self._inverse_weights
            if subset is not None:
                weights, inverse = weights[subset], inverse[subset]
            j = int(kernels.pick_weighted_one(kh, mixed, weights, inverse))
            if j < 0:
                return self._settle_weighted(kh, subset, self._weights_internal)
        return j if subset is None else int(subset[j])

    def _settle_weighted(self, kh: int, subset: I64Array | None, weights: F64Array) -> int:
        """The reference's weighted winner (internal index), for keys with near-ties."""
        candidates = range(len(self._peers)) if subset is None else (int(j) for j in subset)
        hashes = self._peer_hashes
        return max(
            candidates,
            key=lambda j: (weighted_score(combine(kh, int(hashes[j])), float(weights[j])), -j),
        )


def _run_split(
    run: Callable[[int, int], None], n_keys: int, n_peers: int, threads: int | None
) -> None:
    """run(lo, hi) over [0, n_keys), split across threads when the batch is large.

    The kernels release the GIL, so plain threads run them in parallel. The
    threads live for this call only: nothing lingers to break a later fork().
    """
    if threads is None:
        threads = min(_usable_cpus(), 8) if n_keys * n_peers >= _SPLIT_PAIRS else 1
    threads = min(threads, n_keys)
    if threads == 1:
        run(0, n_keys)
        return
    bounds = [n_keys * t // threads for t in range(threads + 1)]
    errors: list[BaseException] = []

    def work(lo: int, hi: int) -> None:
        try:
            run(lo, hi)
        except BaseException as exc:  # re-raised on the caller's thread below
            errors.append(exc)

    helpers = [
        threading.Thread(target=work, args=(bounds[t], bounds[t + 1]), name="hrw-pick-batch")
        for t in range(1, threads)
    ]
    for helper in helpers:
        helper.start()
    work(bounds[0], bounds[1])
    for helper in helpers:
        helper.join()
    if errors:
        raise errors[0]


def _usable_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):  # Linux: honours taskset and cgroup cpusets
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _as_written(c: float | Fraction) -> Fraction:
    """`c` as an exact fraction; floats as their shortest decimal repr."""
    if isinstance(c, numbers.Rational):
        return Fraction(c.numerator, c.denominator)
    return Fraction(repr(float(c)))


def _count(value: object, name: str, peer: uuid.UUID) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} of peer {peer} must be an integer, got {value!r}")
    return int(value)
