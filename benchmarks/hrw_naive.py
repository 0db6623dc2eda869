"""Baselines for the hrw benchmarks: what a placement loop looks like without this library.

`naive_pick` is the textbook rendezvous hash in pure Python: one xxh3_64 call
on key + peer bytes per (key, peer) pair, keep the maximum. It is not the
DESIGN.md §3 function (no fmix64, no precomputed peer hashes), but it is the
fastest obvious pure-Python loop, so ratios against it are not flattering.
`reference_pick` is the spec-exact scalar loop (precomputed peer hashes, fmix64
per pair in Python integers), for context.
"""

from __future__ import annotations

from collections.abc import Sequence

import xxhash

from hrw.reference import fmix64


def naive_pick(key: bytes, peer_bytes: Sequence[bytes]) -> int:
    """Index of the peer with the highest xxh3_64(key + peer bytes)."""
    digest = xxhash.xxh3_64_intdigest
    best = -1
    best_index = -1
    for i, peer in enumerate(peer_bytes):
        h = digest(key + peer)
        if h > best:
            best = h
            best_index = i
    return best_index


def naive_pick_batch(keys: Sequence[str], peer_bytes: Sequence[bytes]) -> list[int]:
    return [naive_pick(k.encode(), peer_bytes) for k in keys]


def reference_pick_batch(keys: Sequence[str], peer_hashes: Sequence[int]) -> list[int]:
    """Spec-exact winners (ties aside) with the per-pair loop in Python."""
    out = []
    for k in keys:
        kh = xxhash.xxh3_64_intdigest(k.encode())
        scores = [fmix64(kh ^ ph) for ph in peer_hashes]
        out.append(max(range(len(scores)), key=scores.__getitem__))
    return out
