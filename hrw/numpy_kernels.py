"""The NumPy kernels: same contract as `jit_kernels`, no compiler needed.

Used when numba is unavailable (or asked for with `backend="numpy"`), and for
whole score vectors (`top_k`). Arrays are in the membership's internal order
(peers sorted by UUID bytes) and `peer_mixed` is m(peer_hash), m(x) = x ^ (x >> 33);
see `jit_kernels` for why. Batches run in chunks of keys so that the
(keys x peers) block and its temporaries stay in the L2 cache.

Unweighted scores are exact uint64 arithmetic and `argmax` returns the first
maximum, i.e. the lowest index on ties. Weighted scores use `numpy.log`, which
on SIMD hardware differs from `math.log` in the last ulp for a fraction of a
percent of inputs, hence the same near-tie rule as the JIT kernel: -1 means
"settle this key with the reference".
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from hrw.reference import FMIX_C1, FMIX_C2

U64Array = npt.NDArray[np.uint64]
I64Array = npt.NDArray[np.int64]
F64Array = npt.NDArray[np.float64]

_C1 = np.uint64(FMIX_C1)
_C2 = np.uint64(FMIX_C2)
_INV_2_53 = 2.0**-53
_CHUNK_PAIRS = 1 << 15

# The near-tie rule shared with `jit_kernels`. The band is far wider than any
# last-ulp disagreement between two `log` implementations (~1e-16 relative) and
# narrow enough that ~1e-9 of keys fall in it. Outside the safe range the
# relative-band argument fails (subnormals, overflow to inf).
WEIGHTED_TIE_EPS = 1e-9
WEIGHTED_SAFE_MIN = 1e-280
WEIGHTED_SAFE_MAX = 1e280


def mix(hashes: U64Array) -> U64Array:
    """m(x) = x ^ (x >> 33), the opening xorshift of fmix64."""
    return hashes ^ (hashes >> np.uint64(33))


def _finish(x: U64Array) -> U64Array:
    """fmix64 after its opening xorshift, in place on `x` (already m(k ^ p))."""
    tmp = np.empty_like(x)
    np.multiply(x, _C1, out=x)
    np.right_shift(x, np.uint64(33), out=tmp)
    np.bitwise_xor(x, tmp, out=x)
    np.multiply(x, _C2, out=x)
    np.right_shift(x, np.uint64(33), out=tmp)
    np.bitwise_xor(x, tmp, out=x)
    return x


def scores(key_hash: int, peer_mixed: U64Array) -> U64Array:
    """The unweighted score of one key against every peer."""
    return _finish(peer_mixed ^ mix(np.array([key_hash], dtype=np.uint64)))


def _weighted_from_scores(s: U64Array, weights: F64Array) -> F64Array:
    u = (s >> np.uint64(11)).astype(np.float64)
    u += 0.5
    u *= _INV_2_53
    # IEEE results, as the reference computes them: ln(1.0) = +0.0 gives -w / +0.0 =
    # -inf; extreme weights overflow to inf or underflow to 0.
    with np.errstate(divide="ignore", over="ignore", under="ignore"):
        np.log(u, out=u)
        np.divide(-weights, u, out=u)
    return u


def weighted_scores(key_hash: int, peer_mixed: U64Array, weights: F64Array) -> F64Array:
    """The weighted score of one key against every peer (numpy.log rounding)."""
    return _weighted_from_scores(scores(key_hash, peer_mixed), weights)


def pick_unweighted_batch(key_hashes: U64Array, peer_mixed: U64Array, out: I64Array) -> None:
    """out[i] = internal index of the unweighted winner for key_hashes[i]."""
    step = max(1, _CHUNK_PAIRS // peer_mixed.shape[0])
    key_mixed = mix(key_hashes)
    for start in range(0, key_hashes.shape[0], step):
        block = key_mixed[start : start + step, None] ^ peer_mixed[None, :]
        out[start : start + step] = np.argmax(_finish(block), axis=1)


def pick_unweighted_one(key_hash: int, peer_mixed: U64Array) -> int:
    """Internal index of the unweighted winner for one key hash."""
    return int(np.argmax(scores(key_hash, peer_mixed)))


def _settle_weighted(wscores: F64Array) -> I64Array:
    """Row-wise argmax, or -1 where the best is near-tied or out of the safe range."""
    best_j = np.argmax(wscores, axis=1)
    best = wscores[np.arange(wscores.shape[0]), best_j]
    in_band = np.count_nonzero(wscores >= (best * (1.0 - WEIGHTED_TIE_EPS))[:, None], axis=1)
    clear = (in_band == 1) & (best > WEIGHTED_SAFE_MIN) & (best < WEIGHTED_SAFE_MAX)
    return np.where(clear, best_j, -1).astype(np.int64)


def pick_weighted_batch(
    key_hashes: U64Array,
    peer_mixed: U64Array,
    weights: F64Array,
    inverse_weights: F64Array,
    out: I64Array,
) -> None:
    """out[i] = internal index of the weighted winner, -1 where a near-tie needs the reference."""
    step = max(1, _CHUNK_PAIRS // peer_mixed.shape[0])
    key_mixed = mix(key_hashes)
    for start in range(0, key_hashes.shape[0], step):
        block = _finish(key_mixed[start : start + step, None] ^ peer_mixed[None, :])
        out[start : start + step] = _settle_weighted(_weighted_from_scores(block, weights))


def pick_weighted_one(
    key_hash: int, peer_mixed: U64Array, weights: F64Array, inverse_weights: F64Array
) -> int:
    """Internal index of the weighted winner, or -1 when a near-tie needs the reference.

    `inverse_weights` (used by the JIT kernel's bounds) is accepted and ignored.
    """
    row = weighted_scores(key_hash, peer_mixed, weights)[None, :]
    return int(_settle_weighted(row)[0])
