"""Executor slots (daemon/jobs/slots.py) and a job's timeout rule (LocalCapability.timeout_ms)."""

from __future__ import annotations

import pytest

from daemon.capability_config import CapabilityLimits, LocalCapability
from daemon.jobs.slots import Slots


def test_no_capability_takes_every_shared_slot() -> None:
    slots = Slots({"wasm": 3}, {"a": "wasm", "b": "wasm", "c": "podman"})
    assert slots.free_for("a") == 2
    slots.take("a")
    slots.take("a")
    assert slots.free_for("a") == 0  # the third worker stays for the others
    assert slots.free_for("b") == 1
    slots.take("b")
    assert slots.free_for("b") == 0 and slots.free_for("a") == 0
    with pytest.raises(ValueError, match="no free slot"):
        slots.take("a")
    slots.give_back("a")
    assert slots.free_for("b") == 1 and slots.free_for("a") == 1
    # A kind without a bound (containers here) never limits claims.
    assert slots.free_for("c") is None
    slots.take("c")
    slots.give_back("c")
    with pytest.raises(ValueError, match="holds no slot"):
        slots.give_back("c")


@pytest.mark.parametrize(("capacity", "sharing", "own"), [(1, 2, 1), (4, 1, 4), (4, 2, 3)])
def test_who_has_no_one_to_share_with_may_take_all(capacity: int, sharing: int, own: int) -> None:
    kinds = {f"c{i}": "wasm" for i in range(sharing)}
    assert Slots({"wasm": capacity}, kinds).free_for("c0") == own


@pytest.mark.parametrize(
    ("capability_ms", "job_ms", "expected"),
    [
        (0, 0, 60_000),  # neither: the peer's default
        (0, 5_000, 5_000),  # the job's own
        (0, 7_200_000, 3_600_000),  # never above the operator's ceiling
        (30_000, 0, 30_000),  # the capability's default
        (30_000, 10_000, 10_000),  # lowered by the job
        (30_000, 90_000, 30_000),  # never raised by it
        (7_200_000, 0, 3_600_000),  # nor by the capability past the operator's ceiling
    ],
)
def test_a_job_may_only_lower_the_timeout(capability_ms: int, job_ms: int, expected: int) -> None:
    cap = LocalCapability(
        name="t:x", kind="wasm", limits=CapabilityLimits(timeout_ms=capability_ms)
    )
    assert cap.timeout_ms(job_ms, default_ms=60_000, ceiling_ms=3_600_000) == expected
