"""Scheduling decision time vs number of registered peers (placement is pure: no I/O).

    python benchmarks/scheduling_bench.py

For N = 10 … 10,000 simulated capable peers, times one `CandidateSet.place`
(HRW over all candidates + the bounded-load pick, as SubmitJob and the rescuer
call it) beside the naive baseline of scoring every peer with the scalar
reference and sorting, in the same run. Prints medians and min-max.
"""

from __future__ import annotations

import statistics
import time
import uuid

import hrw
from daemon.jobs.scheduler import Candidate, CandidateSet

SIZES = (10, 100, 1_000, 10_000)
GOAL_US_AT_10K = 1000.0


def _time(fn, repeat: int) -> list[float]:  # type: ignore[no-untyped-def]
    samples = []
    for i in range(repeat):
        t0 = time.perf_counter()
        fn(i)
        samples.append((time.perf_counter() - t0) * 1e6)
    return samples


def main() -> None:
    hrw.warm_up()
    print(f"{'peers':>7}  {'place() µs median [min-max]':>30}  {'naive µs':>10}  naive/ours")
    for n in SIZES:
        candidates = [
            Candidate(
                peer_id=uuid.uuid4(), address=f"10.0.0.{i}:1", max_concurrency=8, resources={}
            )
            for i in range(n)
        ]
        cset = CandidateSet(candidates)
        loads = {c.peer_id: i % 9 for i, c in enumerate(candidates)}  # some peers full
        ids = [c.peer_id for c in candidates]
        cset.place("warm", loads, loads_version=1)

        def ours_once(i: int, cset: CandidateSet = cset, loads: dict = loads) -> None:  # type: ignore[type-arg]
            placement = cset.place(f"job-{i}", loads, loads_version=1)
            cset.bump(placement.peer_id)  # as SubmitJob does between load refreshes

        def naive_once(i: int, ids: list[uuid.UUID] = ids) -> None:
            hrw.rank(f"job-{i}", ids)

        ours = _time(ours_once, 300 if n < 10_000 else 100)
        naive = _time(naive_once, 30 if n < 10_000 else 5)
        med, base = statistics.median(ours), statistics.median(naive)
        print(
            f"{n:>7}  {med:>12.1f} [{min(ours):.1f}-{max(ours):.1f}]{'':>6}"
            f"  {base:>10.0f}  {base / med:>8.0f}x"
        )
        if n == 10_000:
            verdict = "met" if med <= GOAL_US_AT_10K else "NOT met"
            print(
                f"goal: decision at 10,000 peers <= {GOAL_US_AT_10K:.0f} µs: {med:.0f} µs {verdict}"
            )


if __name__ == "__main__":
    main()
