import pytest

from daemon.exceptions import InvalidArgument
from daemon.resources import satisfies, validate


@pytest.mark.parametrize(
    ("offered", "required", "expected"),
    [
        ({}, {}, True),
        ({"gpu": "1"}, {}, True),
        ({}, {"gpu": "1"}, False),
        ({"memory_mib": "4096"}, {"memory_mib": "2048"}, True),
        ({"memory_mib": "4096"}, {"memory_mib": "4096"}, True),
        ({"memory_mib": "1024"}, {"memory_mib": "2048"}, False),
        ({"arch": "x86_64"}, {"arch": "x86_64"}, True),
        ({"arch": "x86_64"}, {"arch": "aarch64"}, False),
        ({"gpu": "nvidia-a100"}, {"gpu": "1"}, False),
        ({"memory_mib": "nan"}, {"memory_mib": "1"}, False),
        ({"cpu": "2.5", "gpu": "1"}, {"cpu": "2"}, True),
    ],
)
def test_satisfies(offered: dict[str, str], required: dict[str, str], expected: bool) -> None:
    assert satisfies(offered, required) is expected


def test_validate_refuses_bad_entries() -> None:
    with pytest.raises(InvalidArgument, match="key ''"):
        validate({"": "1"})
    with pytest.raises(InvalidArgument, match="longer than"):
        validate({"k": "x" * 1000})
    with pytest.raises(InvalidArgument, match="at most"):
        validate({str(i): "1" for i in range(100)})
    assert validate({"gpu": "1"}) == {"gpu": "1"}
