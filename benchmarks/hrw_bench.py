"""Print how fast hrw places keys, beside a naive pure-Python loop measured in the same run.

    python benchmarks/hrw_bench.py            # N = 10 .. 10,000 peers, 100,000 keys
    python benchmarks/hrw_bench.py --quick    # fewer keys and repeats, for a smoke run

Rates are medians over the repeats with [min-max]; "vs naive" divides our
(key, peer) pairs/s by the naive loop's (medians, same run, same kind of keys).
The naive loop is `hrw_naive.naive_pick`: one xxh3_64(key + peer) per pair, on
as many keys as take ~0.1 s. Key hashing (UTF-8 + xxh3 per key) is inside every
figure of ours. Balance is max/mean keys per peer over the whole key set
(weighted: max of count / expected share).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hrw_naive import naive_pick, naive_pick_batch, reference_pick_batch

import hrw


def _timed(repeat: int, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list[float]:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn(*args, **kwargs)
        times.append(time.perf_counter() - start)
    return times


def _fmt(rate: float) -> str:
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if rate >= scale:
            return f"{rate / scale:.3g}{unit}"
    return f"{rate:.3g}"


@dataclass(frozen=True, kw_only=True)
class Measured:
    """Rates of one path: work units per second over each run."""

    work: float
    times: Sequence[float]

    def rates(self, scale: float = 1.0) -> list[float]:
        return sorted(self.work * scale / t for t in self.times)

    def median(self, scale: float = 1.0) -> float:
        return statistics.median(self.rates(scale))

    def span(self, scale: float = 1.0) -> str:
        rates = self.rates(scale)
        return f"{_fmt(statistics.median(rates)):>6} [{_fmt(rates[0])}-{_fmt(rates[-1])}]"


def _row(n: int, path: str, keys: Measured, *, naive: float = 0.0, extra: str = "") -> None:
    ratio = f"{'':>10}"
    if naive:
        r = keys.median(n) / naive
        ratio = f"{r:9.0f}x" if r >= 10 else f"{r:9.2f}x"
    print(
        f"{n:>7,}  {path:<22} {int(keys.work):>8,}  {keys.span():<22} {keys.span(n):<22}"
        f"{ratio}  {extra}"
    )


def _peers(n: int, seed: int) -> list[uuid.UUID]:
    rng = np.random.default_rng(seed)
    return [uuid.UUID(bytes=rng.bytes(16)) for _ in range(n)]


def _split_threads(n_keys: int, n_peers: int) -> int:
    """How many threads pick_batch uses by default (mirrors hrw.membership)."""
    return min(len(os.sched_getaffinity(0)), 8) if n_keys * n_peers >= 1 << 24 else 1


def bench_batches(peer_counts: Sequence[int], keys: list[str], repeat: int) -> dict[int, float]:
    print(
        f"\npick_batch: keys/s and (key, peer) pairs/s, median [min-max] of {repeat} runs\n"
        f"{'N':>7}  {'path':<22} {'keys':>8}  {'keys/s':<22} {'pairs/s':<22}"
        f"{'vs naive':>10}  balance"
    )
    ratios: dict[int, float] = {}
    for n in peer_counts:
        peers = _peers(n, seed=n)
        peer_bytes = [p.bytes for p in peers]
        naive_keys = keys[: max(20, min(len(keys), 1_500_000 // n))]
        naive = Measured(
            work=len(naive_keys),
            times=_timed(max(3, repeat // 2), naive_pick_batch, naive_keys, peer_bytes),
        )
        naive_pairs = naive.median(n)
        _row(n, "naive xxh3(key+peer)", naive)
        ref_keys = keys[: max(5, min(len(keys), 300_000 // n))]
        hashes = [hrw.peer_hash(p) for p in peers]
        ref = Measured(work=len(ref_keys), times=_timed(3, reference_pick_batch, ref_keys, hashes))
        _row(n, "python reference", ref, naive=naive_pairs)

        m = hrw.Membership(peers, backend="jit")
        picks = m.pick_batch(keys)
        check = keys[:20]
        assert [peers[i] for i in picks[: len(check)]] == [hrw.rank(k, peers)[0] for k in check]
        counts = np.bincount(picks, minlength=n)
        balance = f"{counts.max() / counts.mean():.2f}"
        threads = _split_threads(len(keys), n)
        auto = Measured(work=len(keys), times=_timed(repeat, m.pick_batch, keys))
        one = Measured(work=len(keys), times=_timed(repeat, m.pick_batch, keys, threads=1))
        if threads > 1:
            _row(n, f"jit, {threads} threads", auto, naive=naive_pairs, extra=balance)
        _row(n, "jit, 1 thread", one, naive=naive_pairs, extra=balance)
        ratios[n] = auto.median(n) / naive_pairs

        np_keys = keys[: max(1000, min(len(keys), 200_000_000 // n))]
        mn = hrw.Membership(peers, backend="numpy")
        _row(
            n,
            "numpy",
            Measured(work=len(np_keys), times=_timed(3, mn.pick_batch, np_keys)),
            naive=naive_pairs,
        )

        weights = np.random.default_rng(n).uniform(0.5, 4.0, n)
        mw = hrw.Membership(peers, list(weights), backend="jit")
        w_keys = keys[: max(1000, min(len(keys), 50_000_000 // n))]
        expected = len(w_keys) * weights / weights.sum()
        w_balance = "-"  # max(count / expected) is noise with few keys per peer
        if expected.min() >= 30:
            w_counts = np.bincount(mw.pick_batch(w_keys), minlength=n)
            w_balance = f"{(w_counts / expected).max():.2f}"
        weighted = Measured(work=len(w_keys), times=_timed(3, mw.pick_batch, w_keys))
        _row(n, "jit weighted", weighted, naive=naive_pairs, extra=w_balance)
    return ratios


def _per_call(repeat: int, fn: Callable[[Any], Any], args: Sequence[Any]) -> list[float]:
    """Microseconds per fn(arg), one value per run over all of `args`."""

    def run() -> None:
        for a in args:
            fn(a)

    return sorted(t / len(args) * 1e6 for t in _timed(repeat, run))


def bench_single(peer_counts: Sequence[int], keys: list[str], repeat: int) -> dict[int, float]:
    print(
        f"\nsingle pick(key): microseconds per call, median [min-max] of {repeat} runs\n"
        f"{'N':>7}  {'naive':<23}{'jit':<23}{'numpy':<23}{'jit weighted':<23}{'vs naive':>8}"
    )
    medians: dict[int, float] = {}
    for n in peer_counts:
        peers = _peers(n, seed=n)
        peer_bytes = [p.bytes for p in peers]
        naive_keys = [k.encode() for k in keys[: max(3, min(2000, 100_000 // n))]]
        columns = [_per_call(repeat, partial(naive_pick, peer_bytes=peer_bytes), naive_keys)]
        sample = keys[:2000]
        for m in (
            hrw.Membership(peers, backend="jit"),
            hrw.Membership(peers, backend="numpy"),
            hrw.Membership(peers, list(np.linspace(0.5, 4.0, n)), backend="jit"),
        ):
            m.pick(sample[0])
            columns.append(_per_call(repeat, m.pick, sample))
        medians[n] = statistics.median(columns[1])
        cells = "".join(
            f"{f'{statistics.median(c):.3g} [{c[0]:.3g}-{c[-1]:.3g}]':<23}" for c in columns
        )
        print(f"{n:>7,}  {cells}{statistics.median(columns[0]) / medians[n]:7.0f}x")
    return medians


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--peers", default="10,100,1000,10000")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="20,000 keys, 3 repeats")
    args = parser.parse_args(argv)
    n_keys, repeat = (20_000, 3) if args.quick else (args.keys, args.repeat)
    peer_counts = [int(x) for x in args.peers.split(",")]
    keys = [f"bucket-{i % 13}/inputs/{i:09d}.parquet" for i in range(n_keys)]

    start = time.perf_counter()
    backend = hrw.warm_up()
    load = time.perf_counter() - start
    import numba

    print(
        f"hrw benchmark: {n_keys:,} str keys (~30 B), "
        f"N = {', '.join(f'{n:,}' for n in peer_counts)}\n"
        f"backend {backend} (numba {numba.__version__}, numpy {np.__version__}; "
        f"kernel load {load:.2f} s), {len(os.sched_getaffinity(0))} CPUs usable, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    hashing = Measured(work=n_keys, times=_timed(repeat, hrw.key_hashes, keys))
    print(f"key hashing alone: {hashing.span()} keys/s")

    ratios = bench_batches(peer_counts, keys, repeat)
    single = bench_single(peer_counts, keys, repeat)

    print("\ngoals")
    if 1000 in ratios:
        verdict = "met" if ratios[1000] >= 400 else "NOT met"
        print(f"  pick_batch at N=1,000 >= 400x naive: {ratios[1000]:.0f}x  {verdict}")
    if 10000 in single:
        verdict = "met" if single[10000] < 20 else "NOT met"
        print(f"  single pick at N=10,000 < 20 us: {single[10000]:.2f} us  {verdict}")


if __name__ == "__main__":
    main()
