"""The compiled (numba) kernels: the fast path behind `Membership`.

Importing this module imports numba and compiles the kernels, or loads them
from numba's on-disk cache (`cache=True`, next to this file or in the user
cache directory), so `membership.py` imports it lazily: on the first pick, or
eagerly through `hrw.warm_up()`. Kernels release the GIL.

All arrays are in the membership's internal order (peers sorted by UUID bytes),
so "ties by UUID bytes ascending" is "lowest index wins". `peer_mixed` holds
m(peer_hash) with m(x) = x ^ (x >> 33): fmix64 opens with that xorshift, which
is linear over XOR, so m(key_hash ^ peer_hash) = m(key_hash) ^ m(peer_hash) and
each pair saves a shift and a XOR.

Unweighted kernel: only the top 33 bits of the final fmix64 step decide most
keys (they equal the top 33 bits of the score), so each pair is reduced to
`(high 33 bits) | index` and a SIMD integer max replaces argmax. A second max
over `(high 33 bits) | (LOW - index)` tells whether the winning high bits were
unique: if not, the key is re-scored on full 64-bit scores (exact, ties to the
lowest index). The result is exactly the reference's rank[0] for every key.

Weighted kernel: bounds first, then the float64 formula of DESIGN.md §3 for
the few peers that can win (see `pick_weighted_one`). Its `log` is LLVM's,
which need not round like `math.log`, so a key whose best two weighted scores
are within a relative `WEIGHTED_TIE_EPS` (or whose best is outside a safe float
range) is returned as -1 and the caller settles it with the reference
(`reference.weighted_score`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, cast

import numba
import numpy as np
import numpy.typing as npt

U64Array = npt.NDArray[np.uint64]
I64Array = npt.NDArray[np.int64]
F64Array = npt.NDArray[np.float64]

# Every constant a kernel reads is written out in this file: numba freezes
# globals into the compiled code, and its on-disk cache is invalidated only when
# this file changes. tests/unit/test_hrw_ties.py checks them against the
# reference and `numpy_kernels`.
_C1 = np.uint64(0xFF51AFD7ED558CCD)
_C2 = np.uint64(0xC4CEB9FE1A85EC53)
_S33 = np.uint64(33)
_S11 = np.uint64(11)
_ONE = np.uint64(1)
_TWO_53 = np.uint64(1 << 53)
_LOW = np.uint64((1 << 31) - 1)  # index bits of a packed score; caps N at 2**31
_INV_2_53 = 2.0**-53
# The near-tie rule, the same as numpy_kernels.WEIGHTED_* (see there).
WEIGHTED_TIE_EPS = 1e-9
WEIGHTED_SAFE_MIN = 1e-280
WEIGHTED_SAFE_MAX = 1e280
# Float error in the bounds is a few ulps; anything well above that and well
# above WEIGHTED_TIE_EPS works. Wider only means more peers scored exactly.
_CANDIDATE_SLACK = 1e-6

_FuncT = TypeVar("_FuncT", bound=Callable[..., Any])


def _kernel(signature: str) -> Callable[[_FuncT], _FuncT]:
    """numba.njit, compiled now for one signature and cached on disk; typed for mypy."""

    def compile_now(fn: _FuncT) -> _FuncT:
        try:
            compiled = numba.njit(
                signature, cache=True, nogil=True, error_model="numpy", boundscheck=False
            )(fn)
        except RuntimeError:  # pragma: no cover - no writable cache directory at all
            compiled = numba.njit(signature, nogil=True, error_model="numpy", boundscheck=False)(fn)
        return cast(_FuncT, compiled)

    return compile_now


@_kernel("uint64(uint64, uint64[::1])")
def _best_exact(key_mixed: np.uint64, peer_mixed: U64Array) -> np.uint64:
    """Index of the highest full 64-bit score, lowest index on ties."""
    best = np.uint64(0)
    best_j = np.uint64(0)
    for j in range(peer_mixed.shape[0]):
        h = (key_mixed ^ peer_mixed[j]) * _C1
        h = (h ^ (h >> _S33)) * _C2
        s = h ^ (h >> _S33)
        if j == 0 or s > best:
            best = s
            best_j = np.uint64(j)
    return best_j


@_kernel("int64(uint64, uint64[::1])")
def _best_packed(key_mixed: np.uint64, peer_mixed: U64Array) -> np.int64:
    """Index of the winner for a pre-mixed key hash (see the module docstring)."""
    top = np.uint64(0)
    top_reversed = np.uint64(0)
    for j in range(peer_mixed.shape[0]):
        h = (key_mixed ^ peer_mixed[j]) * _C1
        h = (h ^ (h >> _S33)) * _C2
        high = h | _LOW
        jj = np.uint64(j)
        packed = high ^ (_LOW ^ jj)  # high bits | j
        packed_reversed = high ^ jj  # high bits | (LOW - j)
        top = packed if packed > top else top
        top_reversed = packed_reversed if packed_reversed > top_reversed else top_reversed
    winner = top & _LOW
    if winner == _LOW ^ (top_reversed & _LOW):
        return np.int64(winner)
    return np.int64(_best_exact(key_mixed, peer_mixed))


@_kernel("int64(uint64, uint64[::1])")
def pick_unweighted_one(key_hash: np.uint64, peer_mixed: U64Array) -> np.int64:
    """Internal index of the unweighted winner for one key hash."""
    return _best_packed(key_hash ^ (key_hash >> _S33), peer_mixed)


@_kernel("void(uint64[::1], uint64[::1], int64[::1])")
def pick_unweighted_batch(key_hashes: U64Array, peer_mixed: U64Array, out: I64Array) -> None:
    """out[i] = internal index of the unweighted winner for key_hashes[i]."""
    for i in range(key_hashes.shape[0]):
        kh = key_hashes[i]
        out[i] = _best_packed(kh ^ (kh >> _S33), peer_mixed)


@_kernel("float64(uint64, uint64[::1], float64[::1], int64)")
def _exact_weighted(key_mixed: np.uint64, peer_mixed: U64Array, weights: F64Array, j: int) -> float:
    """-w / ln(u) for peer j, the float64 formula of DESIGN.md section 3."""
    h = (key_mixed ^ peer_mixed[j]) * _C1
    h = (h ^ (h >> _S33)) * _C2
    s = h ^ (h >> _S33)
    u = (np.float64(s >> _S11) + 0.5) * _INV_2_53
    return float(-weights[j] / np.log(u))


@_kernel("int64(uint64, uint64[::1], float64[::1], float64[::1], float64[::1])")
def _best_weighted(
    key_mixed: np.uint64,
    peer_mixed: U64Array,
    weights: F64Array,
    inverse_weights: F64Array,
    scratch: F64Array,
) -> np.int64:
    """Weighted winner for a pre-mixed key hash, or -1 (see pick_weighted_one)."""
    n = peer_mixed.shape[0]
    least_upper = np.inf
    certain_losers = 0
    for j in range(n):
        h = (key_mixed ^ peer_mixed[j]) * _C1
        h = (h ^ (h >> _S33)) * _C2
        s = h ^ (h >> _S33)
        q = _TWO_53 - (s >> _S11)  # 2**53 * (1 - u), give or take the rounding of + 0.5
        certain_losers += q == _ONE  # u rounds to 1.0: score -inf, breaks the bounds below
        qf = np.float64(q)
        x = qf * _INV_2_53
        scratch[j] = (qf - 1.0) * _INV_2_53 * inverse_weights[j]
        upper = x * inverse_weights[j] / (1.0 - x)
        least_upper = upper if upper < least_upper else least_upper
    if certain_losers:
        return np.int64(-1)
    cut = least_upper * (1.0 + _CANDIDATE_SLACK)
    best = -np.inf
    second = -np.inf
    best_j = -1
    for j in range(n):
        if scratch[j] <= cut:
            wscore = _exact_weighted(key_mixed, peer_mixed, weights, j)
            if wscore > best:
                second = best
                best = wscore
                best_j = j
            elif wscore > second:
                second = wscore
    if (
        best_j >= 0
        and WEIGHTED_SAFE_MIN < best < WEIGHTED_SAFE_MAX
        and second < best * (1.0 - WEIGHTED_TIE_EPS)
    ):
        return np.int64(best_j)
    return np.int64(-1)


@_kernel("int64(uint64, uint64[::1], float64[::1], float64[::1])")
def pick_weighted_one(
    key_hash: np.uint64, peer_mixed: U64Array, weights: F64Array, inverse_weights: F64Array
) -> np.int64:
    """Internal index of the weighted winner, or -1 when the reference must decide.

    `inverse_weights` is max(weights) / weights (any common scale works; this one
    keeps the bounds normal floats for weight ratios up to ~1e250).

    Computing ln for every pair would cost ~20 cycles each, so a first pass
    bounds L/w per peer (L = -ln u, x = 1 - u): x <= L <= x / (1 - x), with x
    known to one unit of 2**-53. Only peers whose lower bound is within
    `_CANDIDATE_SLACK` of the least upper bound can win; those are scored
    exactly. -1: a near-tie among them (within WEIGHTED_TIE_EPS, where this
    `log` and `math.log` might disagree), a best score outside the safe range,
    or a pair whose u rounds to 1.0 (probability 2**-53 per pair).
    """
    scratch = np.empty(peer_mixed.shape[0], dtype=np.float64)
    return _best_weighted(
        key_hash ^ (key_hash >> _S33), peer_mixed, weights, inverse_weights, scratch
    )


@_kernel("void(uint64[::1], uint64[::1], float64[::1], float64[::1], int64[::1])")
def pick_weighted_batch(
    key_hashes: U64Array,
    peer_mixed: U64Array,
    weights: F64Array,
    inverse_weights: F64Array,
    out: I64Array,
) -> None:
    """out[i] = pick_weighted_one(key_hashes[i], ...) (-1: the reference must decide)."""
    scratch = np.empty(peer_mixed.shape[0], dtype=np.float64)
    for i in range(key_hashes.shape[0]):
        kh = key_hashes[i]
        out[i] = _best_weighted(kh ^ (kh >> _S33), peer_mixed, weights, inverse_weights, scratch)
