"""The scalar reference of DESIGN.md §3: readable, slow, and the test oracle.

Every other path in this package (NumPy, JIT) must return exactly what these
functions return, ties and near-ties included. Weighted scores are evaluated
here with `math.log` (the C library's `log`) in float64; the vectorized paths
use other `log` implementations that may differ in the last ulp, so they
re-check near-ties with `weighted_score` below instead of trusting their own
rounding (see `membership.py`).
"""

from __future__ import annotations

import math
import numbers
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence

import xxhash

MASK64 = (1 << 64) - 1
FMIX_C1 = 0xFF51AFD7ED558CCD
FMIX_C2 = 0xC4CEB9FE1A85EC53

Key = bytes | str
Weights = Sequence[float] | Mapping[uuid.UUID, float]


def fmix64(h: int) -> int:
    """MurmurHash3's 64-bit finalizer on an unsigned 64-bit integer (a bijection)."""
    h ^= h >> 33
    h = (h * FMIX_C1) & MASK64
    h ^= h >> 33
    h = (h * FMIX_C2) & MASK64
    h ^= h >> 33
    return h


def key_bytes(key: Key) -> bytes:
    """The bytes a key is hashed as: `bytes` as given, `str` as UTF-8.

    Raises TypeError for anything else, ValueError for a `str` that is not
    encodable (lone surrogates).
    """
    if isinstance(key, str):
        try:
            return key.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(f"key {key!r} is not valid UTF-8 text: {exc}") from exc
    if isinstance(key, bytes | bytearray | memoryview):
        return bytes(key)
    raise TypeError(f"a key must be bytes or str, not {type(key).__name__}")


def key_hash(key: Key) -> int:
    """xxh3_64 of the key (str keys as UTF-8), as an unsigned 64-bit int."""
    return xxhash.xxh3_64_intdigest(key_bytes(key))


def peer_hash(peer_id: uuid.UUID) -> int:
    """xxh3_64 of the 16 raw bytes of the peer UUID, as an unsigned 64-bit int."""
    if not isinstance(peer_id, uuid.UUID):
        raise TypeError(f"a peer id must be a uuid.UUID, not {type(peer_id).__name__}")
    return xxhash.xxh3_64_intdigest(peer_id.bytes)


def combine(key_hash_: int, peer_hash_: int) -> int:
    """The score from the two hashes: fmix64(key_hash XOR peer_hash)."""
    return fmix64(key_hash_ ^ peer_hash_)


def score(key: Key, peer_id: uuid.UUID) -> int:
    """The unweighted HRW score of (key, peer): higher wins."""
    return combine(key_hash(key), peer_hash(peer_id))


def weighted_score(score_: int, weight: float) -> float:
    """The logarithmic-method score -weight / ln(u), u = ((score >> 11) + 0.5) / 2**53.

    Evaluated in IEEE float64 exactly as written. When the top 53 bits of the
    score are all ones, `+ 0.5` rounds u up to 1.0, ln(u) is +0.0 and IEEE
    division gives -inf (that pair loses to every other peer); Python would
    raise ZeroDivisionError, so that one case is spelled out.
    """
    u = ((score_ >> 11) + 0.5) / 2.0**53
    ln_u = math.log(u)
    if ln_u == 0.0:
        return -math.inf
    return -weight / ln_u


def rank(key: Key, peers: Sequence[uuid.UUID], weights: Weights | None = None) -> list[uuid.UUID]:
    """All peers, best first, for this key (the reference ordering of DESIGN.md §3).

    Order: score descending (the weighted score when `weights` is given), ties
    by peer UUID bytes ascending. `weights` is a sequence aligned with `peers`
    or a mapping covering every peer. Raises ValueError on an empty or
    duplicated peer list and on a weight that is not finite and positive.
    """
    peer_list = validate_peers(peers)
    kh = key_hash(key)
    hashes = [peer_hash(p) for p in peer_list]
    if weights is None:
        return [
            p
            for _, _, p in sorted(
                (-combine(kh, ph), p.bytes, p) for p, ph in zip(peer_list, hashes, strict=True)
            )
        ]
    ws = validate_weights(weights, peer_list)
    return [
        p
        for _, _, p in sorted(
            (-weighted_score(combine(kh, ph), w), p.bytes, p)
            for p, ph, w in zip(peer_list, hashes, ws, strict=True)
        )
    ]


def validate_peers(peers: Sequence[uuid.UUID]) -> list[uuid.UUID]:
    """The peers as a list; ValueError if empty or duplicated, TypeError if not UUIDs."""
    peer_list = list(peers)
    if not peer_list:
        raise ValueError("HRW needs at least one peer; the peer list is empty")
    for p in peer_list:
        if not isinstance(p, uuid.UUID):
            raise TypeError(f"a peer id must be a uuid.UUID, not {type(p).__name__}: {p!r}")
    if len(set(peer_list)) != len(peer_list):
        dups = sorted(str(p) for p, n in Counter(peer_list).items() if n > 1)
        raise ValueError(f"duplicate peer ids: {', '.join(dups)}")
    return peer_list


def validate_weights(weights: Weights, peers: Sequence[uuid.UUID]) -> list[float]:
    """Weights aligned with `peers`; ValueError unless each is finite and > 0.

    A mapping must name every peer (extra entries are ignored); a sequence must
    have one weight per peer.
    """
    if isinstance(weights, Mapping):
        missing = [str(p) for p in peers if p not in weights]
        if missing:
            raise ValueError(f"no weight given for peers: {', '.join(missing)}")
        values = [weights[p] for p in peers]
    else:
        values = list(weights)
        if len(values) != len(peers):
            raise ValueError(f"got {len(values)} weights for {len(peers)} peers; need one per peer")
    out: list[float] = []
    for p, w in zip(peers, values, strict=True):
        if isinstance(w, bool) or not isinstance(w, numbers.Real):
            raise TypeError(f"weight of peer {p} must be a number, not {type(w).__name__}")
        wf = float(w)
        if not math.isfinite(wf) or wf <= 0.0:
            raise ValueError(f"weight of peer {p} must be finite and > 0, got {w!r}")
        out.append(wf)
    return out
