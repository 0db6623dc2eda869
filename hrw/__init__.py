"""Rendezvous (highest random weight) hashing, exactly as DESIGN.md §3 defines it.

The scalar functions (`key_hash`, `peer_hash`, `score`, `rank`) are the readable
reference; `Membership` precomputes a peer set and places keys with compiled
or NumPy kernels that return exactly what `rank(...)[0]` returns.
"""

from hrw.membership import Membership, key_hashes, warm_up
from hrw.reference import fmix64, key_hash, peer_hash, rank, score, weighted_score

__all__ = [
    "Membership",
    "fmix64",
    "key_hash",
    "key_hashes",
    "peer_hash",
    "rank",
    "score",
    "warm_up",
    "weighted_score",
]
